"""``score()``: stream every example through every checkpoint and write a scores file."""
from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from ._version import __version__
from .batch import Inputs, batch_len, take
from .config import CLASS_SCORES, TARGET_SCORES, RunConfig, as_names, parse_range, resolve_device
from .distributed import Ranks, process_group, raise_everywhere
from .exceptions import ConfigError, ConfigMismatchError, DataError, GradscoreError, warn
from .io.checkpoints import CheckpointStore
from .io.datasets import Dataset, check_targets, load_dataset, probe_model, subset
from .io.attrs import attributes, json_attr, verify
from .io.journal import read_fingerprint
from .io.outputs import claim, is_scores_file, lock, output_path
from .io.store import HDF5ScoresWriter, ReusableRows, damage_named, put, read_dataset, read_group
from .losses import resolve_loss
from .scorer import Scorer
from .scores import datadiet, registry
from .scores.costate import CostateConfig, CostateFile, beside_checkpoints, compute_costate
from .scores.registry import Window


def _window_text(epochs_upto: float | None, steps: str | None) -> str:
    """"epoch <= 12 and step in 100:500", for messages."""
    return " and ".join(x for x in (epochs_upto is not None and f"epoch <= {epochs_upto:g}",
                                    steps and f"step in {steps}") if x)


def window(epochs: np.ndarray, steps: np.ndarray, epochs_upto: float | None, step_range: str | None) -> np.ndarray:
    """(T,) bool: the checkpoints with epoch <= ``epochs_upto`` and step in ``step_range``
    ("A:B"), each constraint only where given; ConfigError when none is left."""
    select = np.ones(len(epochs), dtype=bool)
    if epochs_upto is not None:
        select &= epochs <= epochs_upto
    if step_range is not None:
        a, b = parse_range(step_range, "steps")
        select &= (steps >= (a or 0)) & (steps < (b if b is not None else np.iinfo(np.int64).max))
    if not select.any():
        raise ConfigError(f"invalid value for 'epochs_upto/steps': {_window_text(epochs_upto, step_range)} selects "
                          f"no checkpoint (epochs present: "
                          f"{sorted(set(epochs.tolist()))}; steps present: {sorted(set(steps.tolist()))})")
    return select


#: what a per-checkpoint row holds; a new metric (2: margin) makes older rows not reusable
ROWS_VERSION = 2
#: the settings that change a per-checkpoint row's numbers (beyond the data and the pass)
ROW_SETTINGS = ("engine", "dtype", "batch_size", "chunk_size", "chunk_bytes", "lm_reduction", "params",
                "store_logits")


def rows_key(config: RunConfig, device: str, data: dict, costate: dict | None, code: dict | None) -> dict[str, Any]:
    """What a per-checkpoint row depends on besides its checkpoint: the data, the pass that
    made it (forward, gradients, or dots with the co-states), the numeric settings and the
    code (:func:`gradscore.imports.code_fingerprint`).
    Rows with equal keys and checkpoints are bit-identical, so a new run may reuse them."""
    kind = (_dots_pass(config, costate) if config.needs_target else "gradients" if config.needs_gradients
            else "forward")
    settings = config.to_dict()
    return {"rows_version": ROWS_VERSION, "data": data, "pass": kind, "device": device, "costate": costate,
            "settings": {k: settings[k] for k in ROW_SETTINGS}, "code": code}


def _dots_pass(config: RunConfig, costate: dict | None) -> str:
    """The dots a target pass makes: "dots" with ∇J(θ_t) and λ_{t+1} (what pds needs, and
    what a co-state file with λ gives), "target_dots" with ∇J(θ_t) alone."""
    full = "pds" in config.scores or ((costate or {}).get("config") or {}).get("costates", True)
    return "dots" if full else "target_dots"


def _target_part(costate: dict | None) -> dict | None:
    """A co-state fingerprint without what only the co-states depend on (the proxy set and
    whether λ was computed): what ∇J(θ_t), and so target_dot and target_cos, depend on."""
    if not isinstance(costate, dict):
        return costate
    config = {k: v for k, v in (costate.get("config") or {}).items() if k != "costates"}
    return {**{k: v for k, v in costate.items() if k != "proxy"}, "config": config}


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
        # a file of target scores only (its co-state file without λ) takes pds as an addition
        if "pds" in a["scores"] or _target_part(old["costate"]) != _target_part(new.get("costate")):
            return False
    return all(old.get(k) == new.get(k) for k in (set(old) | set(new)) - {"config", "costate"})


#: names of the per-checkpoint dots with the reference vectors, in order
REF_METRICS = ("dot_target", "dot_costate")


def score_chunk(scorer: Scorer, x: Inputs, y: torch.Tensor, *, batch_size: int,
                gradients: bool, blocks: list[torch.Tensor] | None = None,
                logits: bool = False) -> dict[str, np.ndarray]:
    """Per-example metrics (n,) for one chunk: loss, el2n, p_gold, correct, margin
    [, sq_grad_norm][, dot_target, dot_costate when ``blocks`` = ref_blocks((∇J(θ_t),
    λ_{t+1})) are given; dot_target alone for ref_blocks((∇J(θ_t),))][, logits (n, C)
    float16 with ``logits``]."""
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, batch_len(x), batch_size):
        yb = y[i:i + batch_size]
        out = scorer.score_batch(take(x, i, i + batch_size), yb, refs=blocks, gradients=gradients)
        metrics = {"loss": out.loss}
        metrics.update(datadiet.classification_metrics(scorer.loss, out.logits, yb.to(out.logits.device)))
        if out.sq_norm is not None:
            metrics["sq_grad_norm"] = out.sq_norm
        if out.dots is not None:
            metrics.update({name: out.dots[:, k] for k, name in zip(range(out.dots.shape[1]), REF_METRICS)})
        if logits:
            metrics["logits"] = out.logits.to(torch.float16)
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
    out = output_path(out)   # before the lock, which makes the output's folder
    with process_group(resolve_device(config.device), required=distributed) as ranks:
        with lock(out) if ranks.main else contextlib.nullcontext():   # one writer per output
            return _run(config, out, overwrite, progress, ranks)


@dataclass
class _Plan:
    """What a run has resolved and checked before any work: its inputs, the checkpoints
    it scores (``scored``, indices into ``ckpts``), and what identifies its output."""

    config: RunConfig
    out: Path
    ckpts: CheckpointStore
    ds: Dataset
    select: np.ndarray          # (T_all,) bool: the checkpoints the scores average over
    scored: np.ndarray          # (T,) int: the checkpoints scored (every one for PDS)
    device: str
    costate_path: Path
    costates: bool              # compute λ_t in the co-state file (pds, or a given file holds them)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, Any] = field(default_factory=dict)


def _run(config: RunConfig, out: Path, overwrite: bool, progress: bool, ranks: Ranks) -> Path:
    """The phases of a run, in order; every rank runs them, rank 0 alone writes ``out``."""
    plan = _plan(config, out, overwrite, progress)             # 1. inputs checked, output claimed
    costate = _costate(plan, ranks, progress, overwrite)       # 2. co-states (rank 0 computes)
    writer = _open_writer(plan, costate, ranks, overwrite)     # 3. a new, resumed or finished journal
    failed = None
    if not writer.complete:                                    # 4. score (or reuse) every missing chunk
        reusable = ReusableRows(out, plan.rows["key"])
        try:
            _score_chunks(plan, writer, costate, reusable, ranks.share(writer.n_chunks), progress and ranks.main)
        except GradscoreError as e:   # bad data in one rank's range: every rank stops, in one line
            failed = e
        finally:
            reusable.close()
    raise_everywhere(failed)
    path = ranks.on_main(lambda: _assemble(plan, writer, costate))   # 5. rows -> scores file
    return path if ranks.main else writer.out


def _plan(config: RunConfig, out: Path, overwrite: bool, progress: bool = False) -> _Plan:
    """Phase 1: open and check the checkpoints and data, claim ``out``; no work yet."""
    ckpts = CheckpointStore(config.checkpoints)
    if resolve_loss(ckpts.loss).output == "tokens" and (refused := sorted(CLASS_SCORES & set(config.scores))):
        raise ConfigError(f"invalid value for 'scores': {', '.join(refused)} "
                          f"need{'s' if len(refused) == 1 else ''} class probabilities; the loss '{ckpts.loss}' of "
                          f"{config.checkpoints} "
                          f"is a language-modelling loss (use loss, grand, pds, target_dot, target_cos)")
    # target_dot and target_cos need ∇J(θ_t) alone: no co-states (their Hessian products over the data)
    given = _costate_kind(Path(config.costate)) if config.costate else None
    costates = "pds" in config.scores or given is True
    costate_path = (Path(config.costate) if config.costate else
                    Path(config.checkpoints) / ("costate.h5" if costates else "target_gradient.h5"))
    if "pds" in config.scores and given is False and not overwrite:   # overwrite: recomputed (_costate)
        raise ConfigError(f"{costate_path}: holds ∇J(θ_t) alone (made for target_dot and target_cos), not the "
                          f"co-states pds needs; leave out --costate (default CHECKPOINTS/costate.h5), give "
                          f"another path, or pass --overwrite to recompute it with the co-states")
    claim(out, "scores", overwrite=overwrite, resumable=True, inputs={
        "the --data file": [config.data], "the --target file": [config.target],
        "the co-state file": [costate_path if config.needs_target else None],
        "a checkpoint": [info.path for info in ckpts.infos]})
    ds = subset(load_dataset(config.data), ids=config.ids, index_range=config.index_range)
    if len(ds) == 0:
        raise DataError(f"{config.data}: has no examples; there is nothing to score")
    select = window(np.array([i.epoch for i in ckpts], dtype=np.float64),
                    np.array([i.step for i in ckpts], dtype=np.int64), config.epochs_upto, config.steps)
    scored = np.arange(len(ckpts)) if config.needs_target else np.flatnonzero(select)
    plan = _Plan(config, out, ckpts, ds, select, scored, resolve_device(config.device), costate_path, costates)
    plan.fingerprint = {"config": config.to_dict(), "checkpoints_sha256": ckpts.checksums(),
                        "data": ds.fingerprint(progress),
                        "code": ckpts.code(resolve_loss(ckpts.loss, config.lm_reduction).fn)}
    return plan


def _costate_kind(path: Path) -> bool | None:
    """Whether the finished co-state file ``path`` holds λ_t (True: a target-only run may use
    it as it is; False: ∇J(θ_t) alone, which pds cannot use); None if it is not one."""
    if not path.is_file():
        return None
    try:
        found = CostateFile(path)
    except GradscoreError:
        return None
    try:
        return found.has_costates
    finally:
        found.close()


def _costate(plan: _Plan, ranks: Ranks, progress: bool, overwrite: bool) -> CostateFile | None:
    """Phase 2: the co-states the target scores need, computed (or found) once by rank 0;
    under ``overwrite``, a co-state file made with other settings is recomputed."""
    config = plan.config
    if not config.needs_target:
        return None

    def compute() -> None:
        try:
            with (beside_checkpoints(config.checkpoints, "--costate FILE") if config.costate is None
                  else contextlib.nullcontext()):
                compute_costate(CostateConfig(
                    checkpoints=config.checkpoints, proxy=config.data, target=config.target,
                    batch_size=config.batch_size, dtype=config.dtype, device=config.device,
                    lr_scale_steps=config.lr_scale_steps, lm_reduction=config.lm_reduction, costates=plan.costates),
                    plan.costate_path, replace=overwrite, progress=progress)
        except ConfigMismatchError as e:   # the co-state file's own fix, in run's options
            if e.differ is None:
                raise
            raise ConfigMismatchError(f"{plan.costate_path}: was computed with other settings ({e.differ}); "
                                      f"pass --overwrite to recompute it, or --costate FILE to keep it and write "
                                      f"these to FILE") from None
    ranks.on_main(compute)
    costate = CostateFile(plan.costate_path)
    plan.fingerprint["costate"] = json.loads(costate.fingerprint)
    return costate


def _open_writer(plan: _Plan, costate: CostateFile | None, ranks: Ranks, overwrite: bool) -> HDF5ScoresWriter:
    """Phase 3: the journal of ``out``: resumed, started, or already complete. A run that
    only adds scores to ``out`` may replace it without ``overwrite``."""
    fp = plan.fingerprint
    plan.rows = {"key": rows_key(plan.config, plan.device, fp["data"], fp.get("costate"), fp["code"]),
                 "checkpoints_sha256": [fp["checkpoints_sha256"][t] for t in plan.scored]}
    replace = plan.out.exists() and adds_to(read_fingerprint(plan.out), fp)

    def open_writer(discard: bool) -> HDF5ScoresWriter:
        return HDF5ScoresWriter(plan.out, fp, n=len(plan.ds), T=len(plan.scored), chunk_size=plan.config.chunk_size,
                                overwrite=discard, replace=replace)
    writer = ranks.on_main(lambda: open_writer(overwrite))   # rank 0 sets up (or discards) the journal first
    return writer if ranks.main else open_writer(False)


def _assemble(plan: _Plan, writer: HDF5ScoresWriter, costate: CostateFile | None) -> Path:
    """Phase 5: the per-checkpoint rows, the scores the registry aggregates from them, the
    checkpoints' facts and the run's attributes (with the warnings of the co-states and of
    the scorers' first batches, those of earlier processes too), into ``out``."""
    infos = [plan.ckpts[t] for t in plan.scored]
    checkpoints: dict[str, np.ndarray] = {
        "step": np.array([i.step for i in infos], dtype=np.int64),
        "epoch": np.array([i.epoch for i in infos]), "lr": np.array([i.lr for i in infos]),
        "selected": plan.select[plan.scored]}
    if costate is not None:  # ‖v_t‖ of the references of checkpoint t, for `diagnose`
        checkpoints.update(eta=costate.eta, ref_norm_target=costate.grad_target_norm)
        if costate.has_costates:   # ‖λ_{t+1}‖, 0 at the last
            checkpoints["ref_norm_costate"] = np.append(costate.costate_norm[1:], 0.0)
    found = (costate.warnings if costate is not None else []) + writer.notes()   # the co-states', the scorers'
    return write_scores(writer, plan.config, ids=plan.ds.ids(), noisy=plan.ds.noisy(), checkpoints=checkpoints,
                        loss=plan.ckpts.loss, rows=plan.rows, checksums=plan.fingerprint["checkpoints_sha256"],
                        warnings=list(dict.fromkeys(found)))


def _within(old_epochs: float | None, old_steps: str | None, epochs: float | None, steps: str | None) -> bool:
    """True when the window (epochs, steps) lies inside the window (old_epochs, old_steps)."""
    if old_epochs is not None and (epochs is None or epochs > old_epochs):
        return False
    if old_steps is None:
        return True
    if steps is None:
        return False
    (a0, b0), (a, b) = parse_range(old_steps), parse_range(steps)
    return (a or 0) >= (a0 or 0) and (b0 is None or (b is not None and b <= b0))


def write_scores(writer: HDF5ScoresWriter, config: RunConfig, *, ids: np.ndarray, noisy: np.ndarray | None,
                 checkpoints: dict[str, np.ndarray], loss: str, rows: dict[str, Any], checksums: list[str],
                 warnings: list[str]) -> Path:
    """The scores file from ``writer``'s finished rows: the scores ``config`` asks for
    (aggregated by the registry over ``checkpoints["selected"]``; with ``eta`` there, the
    PDS scores and their variants too), the checkpoints' facts, ids, the known-noisy mask
    and the run's attributes. ``run`` and ``aggregate`` both end here."""
    extras: dict[str, Any] = {"checkpoints": checkpoints}
    if noisy is not None:
        extras["noisy"] = noisy
    wanted, eta = set(config.scores), checkpoints.get("eta")
    window = Window(checkpoints["selected"], eta, checkpoints.get("ref_norm_target"))

    def whole_dataset(f: h5py.File) -> dict[str, np.ndarray]:
        pc = f["per_checkpoint"]   # read metric by metric, only where a score needs it
        if config.allow_nonfinite:
            put(f, "nonfinite", registry.nonfinite(pc))
        ck = None if eta is None else {k: f["checkpoints"][k][()] for k in ("ref_norm_target", "ref_norm_costate")
                                       if k in f["checkpoints"]}
        return registry.whole_dataset(pc, window, wanted, ck, config.variants, config.clip_quantile)

    return writer.finalize(
        ids=ids, extras=extras, aggregate=lambda pc: registry.aggregate(pc, window, wanted), whole=whole_dataset,
        attrs={"config": config.to_dict(), "gradscore_version": __version__, "loss": loss,
               "checkpoints_sha256": checksums, "rows": rows, "warnings": warnings})


def reaggregate(scores: str | os.PathLike, out: str | os.PathLike, *, epochs_upto: float | None = None,
                steps: str | None = None, wanted: Sequence[str] | None = None, overwrite: bool = False,
                progress: bool = False) -> Path:
    """A scores file for another checkpoint window (and, optionally, other scores of the same
    per-checkpoint pass) from the rows of ``scores``, without a model or the data: the same
    file, bit for bit, as ``gradscore run`` with that window. ``scores`` is never modified.
    ``progress``: a bar on a terminal, once it has taken 5 s.

    Possible where ``scores`` holds every checkpoint the new window needs: all of them, or a
    window at least as wide. Raises :class:`ConfigError` naming what a run must compute.
    Of an in-run recording, ``steps`` ("A:B") keeps the records of those training steps
    (:func:`gradscore.inrun.store.write_window`)."""
    src, out = Path(scores), output_path(out)
    if not src.is_file():
        raise DataError(f"{src}: no such file; give a scores file written by gradscore run")
    if not is_scores_file(src, read=True):
        raise DataError(f"{src}: is not a gradscore scores file; give one written by gradscore run")
    claim(out, "scores", inputs={"the scores file": [src]}, overwrite=overwrite)
    with damage_named(src), h5py.File(src, "r") as f:
        verify(f, src)
        inrun = bool(json_attr(f, src, "config").get("inrun"))
    if inrun:
        return _inrun_window(src, out, epochs_upto, steps, wanted, progress)
    with damage_named(src), h5py.File(src, "r") as f:
        if "rows" not in f.attrs:
            raise ConfigError(f"{src}: has no record of how its rows were made (written by an older gradscore or "
                              f"imported); rerun `gradscore run` with --epochs-upto instead")
        old_fp, rows = json_attr(f, src, "fingerprint"), json_attr(f, src, "rows")
        ck = read_group(f, src, "checkpoints")
        ids = read_dataset(f, src, "ids")
        noisy = read_dataset(f, src, "noisy") if "noisy" in f else None
        loss, warnings = attributes(f)["loss"], json_attr(f, src, "warnings", "[]")
    if rows["key"].get("rows_version") != ROWS_VERSION:
        raise ConfigError(f"{src}: its per-checkpoint rows were written by an older gradscore (without the "
                          f"margin); rerun `gradscore run` with --epochs-upto instead")
    old = RunConfig.from_dict(old_fp["config"])
    wanted = as_names(wanted or ())
    untargeted = sorted(TARGET_SCORES & set(wanted)) if old.target is None else []
    if untargeted:   # RunConfig's own words name --target, an option of run, not of aggregate
        raise ConfigError(f"invalid value for 'scores': {', '.join(untargeted)} need target dots, which a run with "
                          f"--target computes: {src.name} was made without one; use `gradscore run --target FILE`")
    config = RunConfig.from_dict({**old.to_dict(), "epochs_upto": epochs_upto, "steps": steps,
                                  **({"scores": list(wanted)} if wanted else {})})
    if rows_key(config, rows["key"]["device"], rows["key"]["data"], rows["key"]["costate"],
                rows["key"].get("code")) != rows["key"]:
        raise ConfigError(f"invalid value for 'scores': {', '.join(config.scores)} need other per-checkpoint "
                          f"metrics than {src} holds ({rows['key']['pass']} pass); use `gradscore run`")
    every = len(rows["checkpoints_sha256"]) == len(old_fp["checkpoints_sha256"])
    if not (every or _within(old.epochs_upto, old.steps, epochs_upto, steps)):
        raise ConfigError(f"invalid value for 'epochs_upto/steps': {src} holds only the checkpoints with "
                          f"{_window_text(old.epochs_upto, old.steps)}; a wider window needs `gradscore run`")
    select = window(ck["epoch"], ck["step"], epochs_upto, steps)
    keep = np.arange(len(select)) if config.needs_target else np.flatnonzero(select)
    checkpoints = {k: (v if k == "eta" else v[keep]) for k, v in ck.items()}
    checkpoints["selected"] = select[keep]
    fingerprint = {**old_fp, "config": config.to_dict()}
    new_rows = {"key": rows["key"], "checkpoints_sha256": [rows["checkpoints_sha256"][t] for t in keep]}
    with lock(out):
        writer = HDF5ScoresWriter(out, fingerprint, n=len(ids), T=len(keep), chunk_size=config.chunk_size,
                                  overwrite=overwrite)
        if writer.complete:
            return writer.out
        source = ReusableRows(src, rows["key"])   # a chunk of rows at a time, as run reuses them
        bar = tqdm(total=len(keep) * writer.n_chunks, desc=f"writing {out.name}", unit=" chunks", delay=5,
                   disable=None if progress else True)
        try:
            for t, sha in enumerate(new_rows["checkpoints_sha256"]):
                for c in range(writer.n_chunks):
                    writer.write_chunk(t, c, source.read(sha, *writer.chunk_range(c)))
                    bar.update()
        finally:
            bar.close()
            source.close()
        return write_scores(writer, config, ids=ids, noisy=noisy, checkpoints=checkpoints, loss=loss,
                            rows=new_rows, checksums=old_fp["checkpoints_sha256"], warnings=warnings)


def _inrun_window(src: Path, out: Path, epochs_upto: float | None, steps: str | None,
                  wanted: Sequence[str] | None, progress: bool) -> Path:
    """:func:`reaggregate` of an in-run recording: its records at the ``steps`` window."""
    from .inrun.store import write_window
    if epochs_upto is not None or steps is None:
        field = "epochs_upto" if epochs_upto is not None else "steps"
        raise ConfigError(f"invalid value for '{field}': {src} is an in-run recording (gs.InRun), whose records "
                          f"are numbered by training step, not epoch; give the window as --steps A:B")
    with lock(out):
        return write_window(src, out, steps, wanted=as_names(wanted or ()), progress=progress)


def _check_finite(metrics: dict[str, np.ndarray], ds: Dataset, start: int, ckpt: Path) -> None:
    """One line naming the examples and the checkpoint where a metric is NaN or infinite."""
    bad = np.zeros(len(next(iter(metrics.values()))), dtype=bool)
    for v in metrics.values():
        if v.dtype.kind == "f":
            bad |= ~np.isfinite(v).reshape(len(v), -1).all(1)
    if bad.any():
        where = np.flatnonzero(bad)
        names = sorted(k for k, v in metrics.items() if v.dtype.kind == "f" and not np.isfinite(v[where]).all())
        raise ds.nonfinite(start + where, ", ".join(names), ckpt,
                           "fix them, or pass --allow-nonfinite to keep going and record them in /nonfinite")


def _check_refs(refs: list[dict[str, torch.Tensor]], costate: CostateFile, ckpt: Path) -> None:
    """A DataError where a vector ``costate`` holds for checkpoint ``ckpt`` is NaN/Inf (a
    co-state that overflowed going backwards): every example's dot with it would be too."""
    for name, ref in zip(("∇J(θ_t)", "λ_t+1"), refs):
        if not all(bool(torch.isfinite(v).all()) for v in ref.values()):
            raise DataError(f"{costate.path}: {name} of checkpoint {ckpt.name} is not finite (its warnings say why: "
                            f"gradscore info {costate.path}), so every example's dot with it would be NaN; leave "
                            f"the scores that read it out, or pass --allow-nonfinite to record them")


def _refs(costate: CostateFile | None, t: int, T: int) -> list[dict[str, torch.Tensor]] | None:
    """(∇J(θ_t), λ_{t+1}) for checkpoint t; λ_{T+1} does not exist: zeros at the last one.
    (∇J(θ_t),) alone from a file without co-states."""
    if costate is None:
        return None
    g = costate.grad_target(t)
    if not costate.has_costates:
        return [g]
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


def _score_chunks(plan: _Plan, writer: HDF5ScoresWriter, costate: CostateFile | None,
                  reusable: ReusableRows, share: range, progress: bool) -> None:
    """Phase 4: write the chunks of ``share`` that are not done yet, for every scored
    checkpoint (row ``t`` of the writer is checkpoint ``plan.scored[t]``): taken from
    ``reusable`` where it has them, else computed."""
    config, ckpts, ds = plan.config, plan.ckpts, plan.ds
    checksums, dtype = plan.rows["checkpoints_sha256"], getattr(torch, config.dtype)
    todo = [[c for c in share if not writer.is_done(t, c)] for t in range(len(plan.scored))]
    size = lambda c: writer.chunk_range(c)[1] - writer.chunk_range(c)[0]   # noqa: E731
    total = sum(size(c) for c in share) * len(plan.scored)
    bar = tqdm(total=total, initial=total - sum(size(c) for cs in todo for c in cs),
               desc="scoring", unit="ex", unit_scale=True, disable=None if progress else True,
               dynamic_ncols=True)  # None: shown only on a terminal
    with bar:
        for t, chunks in enumerate(todo):
            if not chunks:
                continue
            k, sha = int(plan.scored[t]), checksums[t]
            if reusable.has(sha):
                writer.note(t, chunks[0], reusable.warnings)   # given when they were made
                for c in chunks:
                    metrics = reusable.read(sha, *writer.chunk_range(c))
                    if not config.allow_nonfinite:
                        _check_finite(metrics, ds, writer.chunk_range(c)[0], ckpts[k].path)
                    writer.write_chunk(t, c, metrics)
                    bar.update(size(c))
                continue
            model = ckpts.build_model(k, dtype=dtype, device=plan.device)
            scorer = Scorer(model, loss=resolve_loss(ckpts.loss, config.lm_reduction),
                            engine=config.engine, chunk_bytes=config.chunk_bytes, params=config.params or None)
            refs = _refs(costate, k, len(ckpts))
            if refs is not None and not config.allow_nonfinite:
                _check_refs(refs, costate, ckpts[k].path)
            blocks = scorer.ref_blocks(refs) if refs is not None else None
            n_classes, given = None, 0   # the Scorer's own warnings (params) go with its first chunk's
            for c, (a, b, x, y) in zip(chunks, _prefetched(ds, [writer.chunk_range(c) for c in chunks])):
                if n_classes is None:
                    n_classes = probe_model(model, ds, x, ckpts[k].path)
                check_targets(ds, scorer.loss, a, y, n_classes)
                metrics = score_chunk(scorer, x, y, batch_size=config.batch_size,
                                      gradients=config.needs_gradients, blocks=blocks, logits=config.store_logits)
                if not config.allow_nonfinite:
                    _check_finite(metrics, ds, a, ckpts[k].path)
                writer.note(t, c, scorer.warnings[given:])
                given = len(scorer.warnings)
                writer.write_chunk(t, c, metrics)
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
    config = RunConfig(checkpoints=checkpoints, data=data, scores=scores, **options)
    path = run(config, out, overwrite=overwrite, progress=progress)
    from .reports.info import loss_trend
    trend = loss_trend(path)
    if trend is not None and trend[1] is not None:   # examples saved otherwise than trained on? (a hint)
        warn(trend[1])
    return path
