"""Per-query attribution from a sketch file: which training examples most raised (or
lowered) each query's loss, by TracIn-CP or a TRAK-style estimator.

With S_t (N, dim) the training sketches Φ ∇ℓ_n(θ_t) and Q_t (M, dim) the queries':

- ``tracin``: τ(n, q) = Σ_t η_t ⟨S_t[n], Q_t[q]⟩ over every checkpoint (TracIn-CP with
  the learning rates η_t saved with the checkpoints). Positive: a gradient step on n
  lowers q's loss (a proponent); negative: an opponent.
- ``trak``: features x = Φ ∇f of the margin f = log(p/(1−p)), which for cross-entropy is
  −Φ∇ℓ/(1−p); τ(n, q) = x_qᵀ (XᵀX + λI)⁻¹ x_n (1 − p_n) = S_t[q]ᵀ K⁻¹ S_t[n] / (1 − p_q)
  with K = Σ_n x_n x_nᵀ + λI, λ = ``ridge`` × the mean of K's diagonal, averaged over
  the ``trak_checkpoints`` (the last by default; TRAK proper averages over independently
  trained models). 1 − p is clipped at 1e-6.

The N × M scores are computed in blocks of training rows (blocked GEMMs), so they need
never fit in memory; the top ``top`` proponents and opponents of each query are kept as
the blocks go by, and the whole matrix is written only when asked (``full``). Their mean
over the queries, ``/target_dot`` (N,), scores every training example against the query
set as one target: for TracIn, Σ_t η_t ⟨Φ g_n, Φ ∇J(θ_t)⟩ with J the queries' mean loss.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..config import AttributeConfig, resolve_device
from ..exceptions import CheckpointError, DataError, warn
from ..interrupts import stop_if_interrupted
from ..losses import resolve_loss
from ..io.atomic import atomic_h5
from ..io.attrs import write_attrs
from ..io.checkpoints import CheckpointStore, not_plain_steps, without_version
from ..io.journal import code_parts
from ..io.datasets import check_targets, load_dataset, probe_model
from ..io.outputs import claim
from ..io.store import damage_named, put, write_ids
from ..scorer import Scorer
from .store import SketchFile, check_finite, sketch_chunk

MIN_ONE_MINUS_P = 1e-6


def _checked_checkpoints(config: AttributeConfig, sf: SketchFile) -> CheckpointStore:
    """The checkpoints the sketch file was made from, or one clear error naming the difference."""
    where = config.checkpoints or sf.config["checkpoints"]
    ckpts = CheckpointStore(where)
    want, have = sf.fingerprint["checkpoints_sha256"], ckpts.checksums()
    if len(want) != len(have):
        raise CheckpointError(f"{where}: has "
                              f"{len(have)} checkpoints; {sf.path} was sketched at {len(want)}: give the checkpoints "
                              f"it was made from")
    for t, (a, b) in enumerate(zip(want, have)):
        if a != b:
            raise CheckpointError(f"{ckpts[t].path}: differs from the checkpoint {sf.path} was sketched at "
                                  f"(its sha256 changed); give the checkpoints it was made from")
    then, now = sf.fingerprint.get("code"), ckpts.code(resolve_loss(ckpts.loss).fn)
    if then is not None and without_version(then) != without_version(now):   # the queries: by the same model
        what = code_parts(then, now)
        raise CheckpointError(f"{sf.path}: was sketched with other model code than now ({what}); restore that code, "
                              f"or sketch again")
    return ckpts


def sketch_queries(config: AttributeConfig, sf: SketchFile, ckpts: CheckpointStore, steps: list[int],
                   progress: bool) -> tuple[np.ndarray, dict[int, np.ndarray], dict[int, np.ndarray], list[str]]:
    """(query ids, {t: sketches (M, dim) float32}, {t: p_gold (M,)}, the scorers' warnings, each
    once) with the sketch file's Φ."""
    ds = load_dataset(config.query)
    if len(ds) == 0:
        raise DataError(f"{config.query}: has no examples; there is nothing to attribute")
    device, dtype = resolve_device(config.device), getattr(torch, config.dtype)
    x, y = ds.read(0, len(ds))
    sketches, p_gold, given = {}, {}, []
    for t in tqdm(steps, desc="sketching queries", disable=None if progress else True, dynamic_ncols=True):
        model = ckpts.build_model(t, dtype=dtype, device=device)
        scorer = Scorer(model, loss=ckpts.loss, params=tuple(sf.config["params"]) or None)
        projection = sf.projection(model, scorer.param_names, ckpts[t].path)
        check_targets(ds, scorer.loss, 0, y, probe_model(model, ds, x, ckpts[t].path, role="query"))
        chunk = sketch_chunk(scorer, projection, x, y, config.batch_size, "float32")
        check_finite(chunk, ds, 0, ckpts[t].path, "float32")
        sketches[t], p_gold[t] = chunk["sketch"], chunk["p_gold"]
        given += scorer.warnings
    return ds.ids(), sketches, p_gold, list(dict.fromkeys(given))


class TopK:
    """The ``k`` largest and smallest scores of each of M queries, with their training rows,
    kept as blocks of scores go by."""

    def __init__(self, M: int, k: int) -> None:
        self.k = k
        empty = (torch.zeros((M, 0)), torch.zeros((M, 0), dtype=torch.int64))
        self.hi, self.lo = empty, empty

    def add(self, scores: torch.Tensor, start: int) -> None:
        """``scores`` (n, M) of the training rows start : start + n."""
        s = scores.T
        rows = torch.arange(start, start + s.shape[1]).expand_as(s)
        for side, largest in (("hi", True), ("lo", False)):
            vals, idx = getattr(self, side)
            vals, idx = torch.cat([vals, s], 1), torch.cat([idx, rows], 1)
            v, i = torch.topk(vals, min(self.k, vals.shape[1]), dim=1, largest=largest)
            setattr(self, side, (v, idx.gather(1, i)))


def block_scores(rows: list[np.ndarray], weights: list[torch.Tensor]) -> torch.Tensor:
    """Σ_t rows_t (n, dim) @ weights_t (dim, M), float32 GEMMs: (n, M)."""
    out = None
    for r, w in zip(rows, weights):
        s = torch.from_numpy(np.asarray(r, dtype=np.float32)) @ w
        out = s if out is None else out.add_(s)
    return out


def _trak_weights(sf: SketchFile, t: int, queries: np.ndarray, p_q: np.ndarray, config: AttributeConfig,
                  progress: bool) -> np.ndarray:
    """K⁻¹ S_t[q]ᵀ / (1 − p_q) (dim, M): one pass over the training sketches for K."""
    T, N, dim = sf.shape
    K = np.zeros((dim, dim))
    with damage_named(sf.path), h5py.File(sf.path, "r") as f:
        p_all = f["per_checkpoint/p_gold"][t]
        for a in tqdm(range(0, N, config.block_size), desc="TRAK kernel", disable=None if progress else True):
            b = min(N, a + config.block_size)
            x = f["sketch"][t, a:b].astype(np.float64) / np.maximum(1 - p_all[a:b], MIN_ONE_MINUS_P)[:, None]
            K += x.T @ x
    K[np.diag_indices(dim)] += config.ridge * max(np.trace(K) / dim, np.finfo(float).tiny)
    L = np.linalg.cholesky(K)
    W = np.linalg.solve(L.T, np.linalg.solve(L, queries.T.astype(np.float64)))
    return W / np.maximum(1 - p_q, MIN_ONE_MINUS_P)[None, :]


def run_attribute(config: AttributeConfig, out: str | os.PathLike, *, overwrite: bool = False,
                  progress: bool = True) -> Path:
    """Attribute every query of ``config.query`` to the training examples of ``config.sketch``."""
    sf = SketchFile.open(config.sketch)
    claim(out, "attribution", overwrite=overwrite, inputs={
        "the --sketch file": [config.sketch], "the --query file": [config.query]})
    ckpts = _checked_checkpoints(config, sf)
    T, N, dim = sf.shape
    steps = list(range(T)) if config.method == "tracin" or config.trak_checkpoints == "all" else [T - 1]
    query_ids, Q, p_q, given = sketch_queries(config, sf, ckpts, steps, progress)
    M = len(query_ids)
    found: list[str] = []
    if config.method == "tracin":
        weights = [sf.lr[t] * Q[t].T.astype(np.float64) for t in steps]          # (dim, M) each
        found = not_plain_steps([ckpts[t].optimizer for t in steps], "TracIn-CP's Σ_t η_t ⟨g_n, g_q⟩",
                                "its scores are")
    else:
        weights = [_trak_weights(sf, t, Q[t], p_q[t], config, progress) / len(steps) for t in steps]
    weights = [torch.from_numpy(w.astype(np.float32)) for w in weights]
    top = TopK(M, min(config.top, N))
    out = Path(out)
    with damage_named(sf.path), atomic_h5(out) as f, h5py.File(sf.path, "r") as src:   # damage: the sketch's
        full = put(f, "scores", shape=(N, M), dtype=np.float32, chunks=(min(N, 4096), M)) if config.full else None
        mean = put(f, "target_dot", shape=(N,), dtype=np.float64)
        for a in tqdm(range(0, N, config.block_size), desc="attributing", disable=None if progress else True):
            stop_if_interrupted()   # Ctrl-C stops here, not after the last block
            b = min(N, a + config.block_size)
            scores = block_scores([src["sketch"][t, a:b] for t in steps], weights)
            top.add(scores, a)
            mean[a:b] = scores.double().mean(1).numpy()
            if full is not None:
                full[a:b] = scores.numpy()
        train_ids = sf.ids
        write_ids(f, "query_ids", query_ids)
        write_ids(f, "train_ids", train_ids)
        for side, name in (("hi", "proponents"), ("lo", "opponents")):
            s, r = (v.numpy() for v in getattr(top, side))
            g = f.create_group(name)
            write_ids(g, "ids", train_ids[r])
            put(g, "rows", r)
            put(g, "scores", s)
        write_attrs(f, {"config": config.to_dict(), "gradscore_version": __version__, "warnings": given + found,
                        "attribution": {"method": config.method, "checkpoints": steps, "dim": dim,
                                        "seed": sf.spec.seed, "n_train": N, "n_query": M}})
    for text in found:
        warn(f"{out}: {text}")
    return out


def attribute(sketch: str | os.PathLike, query: str | os.PathLike, *, out: str | os.PathLike,
              method: str = "tracin", top: int = 20, overwrite: bool = False, progress: bool = True,
              **options: Any) -> Path:
    """Top proponents and opponents of every query (see :mod:`gradscore.sketches.attribute`);
    ``options``: the other :class:`AttributeConfig` fields. Returns the file's path."""
    config = AttributeConfig(sketch=sketch, query=query, method=method, top=top, **options)
    return run_attribute(config, out, overwrite=overwrite, progress=progress)
