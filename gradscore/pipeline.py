"""``score()``: stream every example through every checkpoint and write a scores file."""
from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ._version import __version__
from .io.checkpoints import CheckpointStore
from .batch import Inputs, batch_len, take
from .config import CLASS_SCORES, TARGET_SCORES, RunConfig, resolve_device
from .io.datasets import Dataset, check_targets, load_dataset, probe_model, subset
from .distributed import Ranks, process_group
from .exceptions import ConfigError, DataError
from .scores.costate import CostateConfig, CostateFile, compute_costate
from .losses import resolve_loss
from .io.outputs import claim, lock
from .scorer import Scorer
from .scores import datadiet, dynamics, pds
from .scores.pds import DOT_SCORES
from .io.store import HDF5ScoreStore, ReusableRows, read_fingerprint


def _select_checkpoints(ckpts: CheckpointStore, epochs_upto: float | None) -> np.ndarray:
    epochs = np.array([i.epoch for i in ckpts], dtype=np.float64)
    if epochs_upto is None:
        return np.ones(len(epochs), dtype=bool)
    select = epochs <= epochs_upto
    if not select.any():
        raise ConfigError(f"invalid value for 'epochs_upto': {epochs_upto} selects no checkpoint "
                          f"(epochs present: {sorted(set(epochs.tolist()))})")
    return select


#: the settings that change a per-checkpoint row's numbers (beyond the data and the pass)
ROW_SETTINGS = ("engine", "dtype", "batch_size", "chunk_size", "chunk_bytes", "lm_reduction", "params")


def rows_key(config: RunConfig, device: str, data: dict, costate: dict | None) -> dict[str, Any]:
    """What a per-checkpoint row depends on besides its checkpoint: the data, the pass that
    made it (forward, gradients, or dots with the co-states), and the numeric settings.
    Rows with equal keys and checkpoints are bit-identical, so a new run may reuse them."""
    kind = "dots" if config.needs_target else "gradients" if config.needs_gradients else "forward"
    return {"data": data, "pass": kind, "device": device, "costate": costate,
            "settings": {k: config.to_dict()[k] for k in ROW_SETTINGS}}


def adds_to(old: dict | None, new: dict) -> bool:
    """True when the run fingerprinted ``new`` only adds to the file fingerprinted ``old``:
    same data, checkpoints and settings, and a superset of its scores and variants, so
    every score already in the file keeps its meaning (settings only the new scores use
    may differ)."""
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        return False
    a, b = old["config"], new["config"]
    if not (set(a.get("scores", ())) <= set(b["scores"]) and set(a.get("variants", ())) <= set(b["variants"])):
        return False
    free = {"scores", "variants"}
    if not TARGET_SCORES & set(a["scores"]):
        free |= {"target", "costate", "lr_scale_steps"}
    if not a.get("variants"):
        free.add("clip_quantile")
    if any(a.get(k) != b.get(k) for k in (set(a) | set(b)) - free):
        return False
    if "costate" in old and old["costate"] != new.get("costate"):
        return False
    return all(old.get(k) == new.get(k) for k in (set(old) | set(new)) - {"config", "costate"})


#: names of the per-checkpoint dots with the reference vectors, in order
REF_METRICS = ("dot_target", "dot_costate")


def score_chunk(scorer: Scorer, x: Inputs, y: torch.Tensor, *, batch_size: int,
                gradients: bool, blocks: list[torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Per-example metrics (n,) for one chunk: loss, el2n, p_gold, correct[, sq_grad_norm]
    [, dot_target, dot_costate when ``blocks`` = ref_blocks((∇J(θ_t), λ_{t+1})) are given]."""
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, batch_len(x), batch_size):
        yb = y[i:i + batch_size]
        out = scorer.score_batch(take(x, i, i + batch_size), yb, refs=blocks, gradients=gradients)
        metrics = {"loss": out.loss}
        metrics.update(datadiet.classification_metrics(scorer.loss, out.logits, yb.to(out.logits.device)))
        if out.sq_norm is not None:
            metrics["sq_grad_norm"] = out.sq_norm
        if out.dots is not None:
            metrics.update({name: out.dots[:, k] for k, name in enumerate(REF_METRICS)})
        for k, v in metrics.items():
            parts.setdefault(k, []).append(v.detach().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def run(config: RunConfig, out: str | os.PathLike, *, overwrite: bool = False,
        progress: bool = True, distributed: bool = False) -> Path:
    """Score every example at every checkpoint per ``config``; write ``out`` (HDF5).

    Resumable: rerunning after an interruption continues where it stopped. Returns
    the path of the finished scores file. Under torchrun the work is split by rank (see
    :mod:`gradscore.distributed`); ``distributed=True`` refuses to run without torchrun.
    """
    with process_group(resolve_device(config.device), required=distributed) as ranks:
        with lock(out) if ranks.main else contextlib.nullcontext():   # one writer per output
            return _run(config, Path(out), overwrite, progress, ranks)


def _run(config: RunConfig, out: Path, overwrite: bool, progress: bool, ranks: Ranks) -> Path:
    ckpts = CheckpointStore(config.checkpoints)
    if resolve_loss(ckpts.loss).output == "tokens" and CLASS_SCORES & set(config.scores):
        raise ConfigError(f"invalid value for 'scores': {', '.join(sorted(CLASS_SCORES & set(config.scores)))} "
                          f"need class probabilities; the loss '{ckpts.loss}' of {config.checkpoints} "
                          f"is a language-modelling loss (use loss, grand, pds, target_dot, target_cos)")
    costate_path = (Path(config.costate) if config.costate else Path(config.checkpoints) / "costate.h5")
    claim(out, "scores", overwrite=overwrite, resumable=True, inputs={
        "the --data file": [config.data], "the --target file": [config.target],
        "the co-state file": [costate_path if config.needs_target else None],
        "a checkpoint": [info.path for info in ckpts.infos]})
    ds = subset(load_dataset(config.data), ids=config.ids, index_range=config.index_range)
    if len(ds) == 0:
        raise DataError(f"{config.data}: has no examples; there is nothing to score")
    select = _select_checkpoints(ckpts, config.epochs_upto)
    # the checkpoints scored: those aggregated over; PDS sums over every one
    scored = np.arange(len(ckpts)) if config.needs_target else np.flatnonzero(select)
    device = resolve_device(config.device)
    dtype = getattr(torch, config.dtype)
    n, T = len(ds), len(scored)
    checksums = ckpts.checksums()
    fingerprint = {"config": config.to_dict(), "checkpoints_sha256": checksums, "data": ds.fingerprint()}
    costate = None
    if config.needs_target:  # computed once, by rank 0; the other ranks read the file
        path = costate_path
        if ranks.main:
            compute_costate(CostateConfig(
                checkpoints=config.checkpoints, proxy=config.data, target=config.target,
                batch_size=config.batch_size, dtype=config.dtype, device=config.device,
                lr_scale_steps=config.lr_scale_steps, lm_reduction=config.lm_reduction), path, progress=progress)
        ranks.barrier()
        costate = CostateFile(path)
        fingerprint["costate"] = json.loads(costate.fingerprint)
    rows = {"key": rows_key(config, device, fingerprint["data"], fingerprint.get("costate")),
            "checkpoints_sha256": [checksums[t] for t in scored]}
    replace = out.exists() and adds_to(read_fingerprint(out), fingerprint)

    def open_store(discard: bool) -> HDF5ScoreStore:
        return HDF5ScoreStore(out, fingerprint, n=n, T=T, chunk_size=config.chunk_size,
                              overwrite=discard, replace=replace)
    if ranks.main:  # rank 0 sets up (or discards) the journal before the others open it
        store = open_store(overwrite)
    ranks.barrier()
    if not ranks.main:
        store = open_store(False)
    if not store.complete:
        reusable = ReusableRows(out, rows["key"])
        try:
            _fill(store, ckpts, scored, ds, config, device, dtype, progress and ranks.main, costate,
                  ranks.share(store.n_chunks), reusable, rows["checkpoints_sha256"])
        finally:
            reusable.close()
    ranks.barrier()
    if not ranks.main:
        ranks.barrier()  # rank 0 joins the chunks meanwhile
        return store.out
    noisy = ds.noisy()
    infos = [ckpts[t] for t in scored]
    extras: dict[str, Any] = {"checkpoints": {
        "step": np.array([i.step for i in infos], dtype=np.int64),
        "epoch": np.array([i.epoch for i in infos]), "lr": np.array([i.lr for i in infos]),
        "selected": select[scored]}}
    if costate is not None:  # ‖v_t‖ of the two references of checkpoint t, for `diagnose`
        extras["checkpoints"].update(
            eta=costate.eta, ref_norm_target=costate.grad_target_norm,
            ref_norm_costate=np.append(costate.costate_norm[1:], 0.0))  # ‖λ_{t+1}‖, 0 at the last
    if noisy is not None:
        extras["noisy"] = noisy
    wanted = set(config.scores)

    def aggregate(pc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        agg = datadiet.aggregate(pc, select[scored])
        agg.update(dynamics.aggregate(pc, select[scored]))
        if costate is not None:
            agg.update(pds.aggregate(pc, costate.eta, costate.grad_target_norm))
        return {k: v for k, v in agg.items() if k in wanted}

    def whole(f) -> dict[str, np.ndarray]:
        """Variants of the dot scores: they rank, clip and regress over all examples."""
        out: dict[str, np.ndarray] = {}
        if config.allow_nonfinite:   # the examples with a NaN/Inf metric at any checkpoint
            f.create_dataset("nonfinite", data=np.any([(~np.isfinite(d[()])).any(0) for d in
                                                       f["per_checkpoint"].values() if d.dtype.kind == "f"], 0))
        if costate is None or not config.variants:
            return out
        pc, ck = f["per_checkpoint"], f["checkpoints"]
        weight = np.append(ck["eta"][()], 0.0)
        for name, (dot_key, norm_key) in DOT_SCORES.items():
            if name in wanted:
                v = pds.variants(pc[dot_key][()], pc["sq_grad_norm"][()], ck[norm_key][()], weight,
                                 clip_quantile=config.clip_quantile)
                out.update({f"{name}_{k}": v[k] for k in config.variants})
        return out

    path = store.finalize(ids=ds.ids(), extras=extras, aggregate=aggregate, whole=whole, attrs={
        "config": config.to_dict(), "gradscore_version": __version__, "loss": ckpts.loss,
        "checkpoints_sha256": fingerprint["checkpoints_sha256"], "rows": rows,
        "warnings": costate.warnings if costate is not None else []})
    ranks.barrier()
    return path


def _check_finite(metrics: dict[str, np.ndarray], ds: Dataset, start: int, ckpt: Path) -> None:
    """One line naming the examples and the checkpoint where a metric is NaN or infinite."""
    bad = np.zeros(len(next(iter(metrics.values()))), dtype=bool)
    for v in metrics.values():
        if v.dtype.kind == "f":
            bad |= ~np.isfinite(v)
    if bad.any():
        where = np.flatnonzero(bad)
        ids = ds.ids()[start + where[:5]]
        names = sorted(k for k, v in metrics.items() if v.dtype.kind == "f" and not np.isfinite(v[where]).all())
        raise DataError(f"{ds.source}: {len(where)} example(s) (ids {', '.join(map(str, ids))}"
                        f"{', …' if len(where) > 5 else ''}) give non-finite {', '.join(names)} at checkpoint "
                        f"{ckpt}: NaN/Inf in their inputs, or a diverged checkpoint; fix them, or pass "
                        f"--allow-nonfinite to keep going and record them in /nonfinite")


def _refs(costate: CostateFile | None, t: int, T: int) -> list[dict[str, torch.Tensor]] | None:
    """(∇J(θ_t), λ_{t+1}) for checkpoint t; λ_{T+1} does not exist: zeros at the last one."""
    if costate is None:
        return None
    g = costate.grad_target(t)
    lam = costate.costate(t + 1) if t < T - 1 else {k: torch.zeros_like(v) for k, v in g.items()}
    return [g, lam]


def _prefetched(ds: Dataset, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int, Inputs, torch.Tensor]]:
    """``(a, b, x, y)`` for each range, reading the next range in a thread meanwhile."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(ds.read, *ranges[0]) if ranges else None
        for i, (a, b) in enumerate(ranges):
            x, y = pending.result()
            if i + 1 < len(ranges):
                pending = pool.submit(ds.read, *ranges[i + 1])
            yield a, b, x, y


def _fill(store: HDF5ScoreStore, ckpts: CheckpointStore, scored: np.ndarray, ds: Dataset,
          config: RunConfig, device: str, dtype: torch.dtype, progress: bool, costate: CostateFile | None,
          share: range, reusable: ReusableRows, checksums: list[str]) -> None:
    """Write the chunks of ``share`` that are not done yet, for every scored checkpoint
    (row ``t`` of the store is checkpoint ``scored[t]``, SHA-256 ``checksums[t]``): taken
    from ``reusable`` where it has them, else computed."""
    todo = [[c for c in share if not store.is_done(t, c)] for t in range(len(scored))]
    total = sum(store.chunk_range(c)[1] - store.chunk_range(c)[0] for c in share) * len(scored)
    remaining = sum(store.chunk_range(c)[1] - store.chunk_range(c)[0] for cs in todo for c in cs)
    bar = tqdm(total=total, initial=total - remaining,
               desc="scoring", unit="ex", unit_scale=True, disable=None if progress else True,
               dynamic_ncols=True)  # None: shown only on a terminal
    with bar:
        for t, chunks in enumerate(todo):
            if not chunks:
                continue
            k, sha = int(scored[t]), checksums[t]
            if reusable.has(sha):
                for c in chunks:
                    metrics = reusable.read(sha, *store.chunk_range(c))
                    if not config.allow_nonfinite:
                        _check_finite(metrics, ds, store.chunk_range(c)[0], ckpts[k].path)
                    store.write_chunk(t, c, metrics)
                    bar.update(len(next(iter(metrics.values()))))
                continue
            model = ckpts.build_model(k, dtype=dtype, device=device)
            scorer = Scorer(model, loss=resolve_loss(ckpts.loss, config.lm_reduction),
                            engine=config.engine, chunk_bytes=config.chunk_bytes, params=config.params or None)
            refs = _refs(costate, k, len(ckpts))
            blocks = scorer.ref_blocks(refs) if refs is not None else None
            n_classes = None
            for c, (a, b, x, y) in zip(chunks, _prefetched(ds, [store.chunk_range(c) for c in chunks])):
                if n_classes is None:
                    n_classes = probe_model(model, ds, x, ckpts[k].path)
                check_targets(ds, scorer.loss, a, y, n_classes)
                metrics = score_chunk(scorer, x, y, batch_size=config.batch_size,
                                      gradients=config.needs_gradients, blocks=blocks)
                if not config.allow_nonfinite:
                    _check_finite(metrics, ds, a, ckpts[k].path)
                store.write_chunk(t, c, metrics)
                bar.update(b - a)


def score(checkpoints: str | os.PathLike, data: str | os.PathLike, *, out: str | os.PathLike,
          scores: Sequence[str] = ("el2n", "grand", "loss"), overwrite: bool = False,
          progress: bool = True, **options: Any) -> Path:
    """Score every example of ``data`` at every checkpoint in ``checkpoints``.

    Writes ``out`` (HDF5, see :mod:`gradscore.io.store`) and returns its path. ``options``
    are the other :class:`~gradscore.config.RunConfig` fields (engine, device, dtype,
    batch_size, chunk_size, chunk_bytes, epochs_upto, params, ids, index_range; target,
    costate, lr_scale_steps for the PDS scores).

    Against an existing ``out``, only what is missing is computed: the rows of the
    checkpoints it already holds, made by the same pass with the same numeric settings,
    are reused, so the file is bit-identical to a fresh run. A run that only adds scores
    replaces ``out`` without ``overwrite``; one that would change a score in it needs it.
    """
    config = RunConfig(checkpoints=str(checkpoints), data=str(data), scores=tuple(scores), **options)
    return run(config, out, overwrite=overwrite, progress=progress)
