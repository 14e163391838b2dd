"""The sketch file: every example's gradient sketch at every checkpoint, written once.

``gradscore sketch`` / :func:`sketch`. Layout (HDF5, a scores file's conventions):

- ``/sketch`` (T, N, dim) float16 or float32: Φ g_n(θ_t), one Φ for every checkpoint;
- ``/per_checkpoint/{loss, p_gold, sq_sketch}`` (T, N): the loss, the probability of the
  given label (TRAK's out-to-loss weight 1 − p) and ‖Φ g_n(θ_t)‖²;
- ``/scores/self_influence`` (N,): Σ_t η_t ‖Φ g_n(θ_t)‖² (TracIn's self-influence);
- ``/ids``, ``/checkpoints/{step, epoch, lr}``;
- attrs ``config`` (:class:`SketchConfig`), ``sketch`` (the :class:`SketchSpec`: seed,
  dim, per-parameter blocks), ``fingerprint`` (config, checkpoints, data).

Written through the score store's journal (:class:`~gradscore.io.store.HDF5ScoresWriter`):
one atomically renamed file per (checkpoint, chunk), so a killed run resumes and the
final file is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..batch import batch_len, take
from ..config import SELF_INFLUENCE, SketchConfig, resolve_device
from ..exceptions import CheckpointError, ConfigError, DataError, OutputError, warn
from ..io.checkpoints import CheckpointStore, not_plain_steps
from ..io.datasets import Dataset, check_targets, load_dataset, probe_model
from ..io.outputs import claim, is_sketch_file, lock, output_path
from ..io.attrs import json_attr, verify
from ..io.store import HDF5ScoresWriter, damage_named, read_dataset
from ..losses import resolve_loss
from ..scorer import Scorer
from ..scores.datadiet import classification_metrics
from .projection import Projection, SketchSpec


def sketch_chunk(scorer: Scorer, projection: Projection, x, y: torch.Tensor, batch_size: int,
                 store_dtype: str) -> dict[str, np.ndarray]:
    """{sketch (n, dim) in ``store_dtype``, loss, p_gold, sq_sketch (n,)} of one chunk."""
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, batch_len(x), batch_size):
        yb = y[i:i + batch_size]
        out = scorer.sketch_batch(take(x, i, i + batch_size), yb, projection, getattr(torch, store_dtype))
        p_gold = classification_metrics(scorer.loss, out.logits, yb.to(out.logits.device)).get("p_gold")
        metrics = {"sketch": out.dots.to(getattr(torch, store_dtype)), "loss": out.loss,
                   "p_gold": out.loss.new_full(out.loss.shape, float("nan")) if p_gold is None else p_gold,
                   "sq_sketch": out.dots.double().pow(2).sum(1)}
        for k, v in metrics.items():
            parts.setdefault(k, []).append(v.detach().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def check_finite(metrics: dict[str, np.ndarray], ds: Dataset, start: int, ckpt: Path, store_dtype: str) -> None:
    """One DataError naming the examples of ``ds`` from ``start`` on whose loss or sketch
    (in ``store_dtype``) is NaN or infinite at ``ckpt``."""
    bad = ~np.isfinite(metrics["sq_sketch"]) | ~np.isfinite(metrics["loss"])
    if bad.any():
        fix = ("fix them, or use --store-dtype float32 (float16 holds values up to 65504)" if store_dtype == "float16"
               else "fix them")
        raise ds.nonfinite(start + np.flatnonzero(bad), "loss or gradient sketch", ckpt, fix)


def run_sketch(config: SketchConfig, out: str | os.PathLike, *, overwrite: bool = False,
               progress: bool = True) -> Path:
    """Sketch every example of ``config.data`` at every checkpoint; write ``out``."""
    out = output_path(out)   # before the lock, which makes the output's folder
    with lock(out):
        return _run(config, out, overwrite, progress)


def _run(config: SketchConfig, out: Path, overwrite: bool, progress: bool) -> Path:
    ckpts = CheckpointStore(config.checkpoints)
    claim(out, "sketch", overwrite=overwrite, resumable=True, inputs={
        "the --data file": [config.data], "a checkpoint": [info.path for info in ckpts.infos]})
    ds = load_dataset(config.data)
    if len(ds) == 0:
        raise DataError(f"{config.data}: has no examples; there is nothing to sketch")
    loss = resolve_loss(ckpts.loss)
    if loss.output == "tokens":
        raise DataError(f"{config.checkpoints}: the loss '{ckpts.loss}' is a language-modelling loss; "
                        f"sketches need a classification loss in this version")
    device, dtype = resolve_device(config.device), getattr(torch, config.dtype)
    fingerprint = {"config": config.to_dict(), "checkpoints_sha256": ckpts.checksums(), "data": ds.fingerprint(progress),
                   "code": ckpts.code(loss.fn)}
    writer = HDF5ScoresWriter(out, fingerprint, n=len(ds), T=len(ckpts), chunk_size=config.chunk_size,
                              overwrite=overwrite)
    ids, projection = ds.ids(), None
    size = lambda c: writer.chunk_range(c)[1] - writer.chunk_range(c)[0]   # noqa: E731
    todo = [[c for c in range(writer.n_chunks) if not writer.is_done(t, c)] for t in range(len(ckpts))]
    total = len(ds) * len(ckpts)
    with tqdm(total=total, initial=total - sum(size(c) for cs in todo for c in cs), desc="sketching", unit="ex",
              unit_scale=True, disable=None if progress else True, dynamic_ncols=True) as bar:
        for t in range(len(ckpts)):
            if not todo[t] and projection is not None:
                continue
            model = ckpts.build_model(t, dtype=dtype, device=device)
            scorer = Scorer(model, loss=loss, params=config.params or None)
            if projection is None:   # one Φ for every checkpoint: its matrices are drawn once
                projection = Projection.for_model(model, scorer.param_names, config.dim, config.seed)
            n_out, given = None, 0   # the Scorer's own warnings (params) go with its first chunk's
            for c in todo[t]:
                a, b = writer.chunk_range(c)
                x, y = ds.read(a, b)
                n_out = n_out or probe_model(model, ds, x, ckpts[t].path)
                check_targets(ds, loss, a, y, n_out)
                metrics = sketch_chunk(scorer, projection, x, y, config.batch_size, config.store_dtype)
                check_finite(metrics, ds, a, ckpts[t].path, config.store_dtype)
                writer.note(t, c, scorer.warnings[given:])
                given = len(scorer.warnings)
                writer.write_chunk(t, c, metrics)
                bar.update(b - a)
    lr = np.array([i.lr for i in ckpts], dtype=np.float64)
    found = not_plain_steps([i.optimizer for i in ckpts], "TracIn's self-influence Σ_t η_t ‖Φ g_n(θ_t)‖²",
                            "its self_influence is")
    path = writer.finalize(
        ids=ids, extras={"checkpoints": {"step": np.array([i.step for i in ckpts], dtype=np.int64),
                                         "epoch": np.array([i.epoch for i in ckpts]), "lr": lr}},
        aggregate=lambda m: {SELF_INFLUENCE: (lr[:, None] * m["sq_sketch"]).sum(0)},
        attrs={"config": config.to_dict(), "sketch": projection.spec.to_dict(), "gradscore_version": __version__,
               "loss": ckpts.loss, "warnings": list(dict.fromkeys(found + writer.notes()))})
    for text in found:
        warn(f"{path}: {text}")
    return path


def sketch(checkpoints: str | os.PathLike, data: str | os.PathLike, *, out: str | os.PathLike,
           dim: int = 8192, seed: int = 0, overwrite: bool = False, progress: bool = True, **options: Any) -> Path:
    """Sketch every example of ``data`` at every checkpoint in ``checkpoints`` (see
    :mod:`gradscore.sketches.store`); ``options``: the other :class:`SketchConfig` fields
    (store_dtype, params, device, dtype, batch_size, chunk_size). Returns the file's path."""
    config = SketchConfig(checkpoints=checkpoints, data=data, dim=dim, seed=seed, **options)
    return run_sketch(config, out, overwrite=overwrite, progress=progress)


@dataclass
class SketchFile:
    """A finished sketch file, opened for reading: its spec, config, ids and checkpoints."""

    path: Path
    spec: SketchSpec
    config: dict[str, Any]
    fingerprint: dict[str, Any]
    ids: np.ndarray
    lr: np.ndarray
    _projection: Projection | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "SketchFile":
        path = Path(path)
        if not path.is_file():
            raise OutputError(f"{path}: no such sketch file; write one with `gradscore sketch`")
        if not is_sketch_file(path, read=True):
            raise OutputError(f"{path}: is not a gradscore sketch file (written by `gradscore sketch`)")
        with damage_named(path), h5py.File(path, "r") as f:
            verify(f, path)
            return cls(path, SketchSpec.from_dict(json_attr(f, path, "sketch")), json_attr(f, path, "config"),
                       json_attr(f, path, "fingerprint"), read_dataset(f, path, "ids"),
                       read_dataset(f, path, "checkpoints/lr"))

    def projection(self, model: torch.nn.Module, param_names: list[str], where: str | os.PathLike) -> Projection:
        """The file's Φ for ``model`` (checkpoint ``where``), made once per file; one
        clear error if the model's parameters would give another split."""
        found = Projection.for_model(model, param_names, self.config["dim"], self.spec.seed).spec
        if found != self.spec:
            raise ConfigError(f"{self.path}: its projection (seed {self.spec.seed}, dim {self.spec.dim}) does not "
                              f"match the model of {where} (dim {found.dim}): the parameters differ; sketch again "
                              f"with these checkpoints")
        if self._projection is None:
            self._projection = Projection(self.spec)
        return self._projection

    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, N, dim)."""
        with damage_named(self.path), h5py.File(self.path, "r") as f:
            return tuple(f["sketch"].shape)

    def read(self, t: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of checkpoint t's sketches, (n, dim) float32."""
        with damage_named(self.path), h5py.File(self.path, "r") as f:
            return f["sketch"][t, start:stop].astype(np.float32)


class SketchTarget:
    """A target set given by its sketch file (``run --target T.sketch.h5``): ∇J(θ_t) is
    Φᵀ m_t, m_t the mean of its sketches at checkpoint t, an unbiased estimate of the
    target gradient (E[ΦᵀΦ] = I) whose dot with any example's exact gradient is that
    example's sketch dot with m_t. The checkpoints must be those it was sketched at."""

    def __init__(self, path: str | os.PathLike, checksums: list[str], where: str) -> None:
        self.file = SketchFile.open(path)
        if self.file.fingerprint["checkpoints_sha256"] != checksums:
            raise CheckpointError(f"{path}: was sketched at other checkpoints than those in {where}; sketch the "
                                  f"target set with these checkpoints (gradscore sketch --checkpoints {where})")
        if self.file.config["params"]:
            raise ConfigError(f"{path}: sketches only the parameters {self.file.config['params']}; a target "
                              f"gradient needs every trainable parameter: sketch it without --params")

    def fingerprint(self, progress: bool = False) -> dict[str, Any]:
        return {"sketch": self.file.fingerprint}

    def gradient(self, t: int, model: torch.nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Φᵀ m_t {name: tensor like params[name]} for the model at checkpoint t."""
        proj = self.file.projection(model, list(params), f"checkpoint {t}")
        _, N, dim = self.file.shape
        m = torch.zeros(dim, dtype=torch.float64)
        for a in range(0, N, 65536):
            m += torch.from_numpy(self.file.read(t, a, min(N, a + 65536))).double().sum(0)
        back = proj.unapply(m / N)
        return {n: back[n].to(device=p.device, dtype=p.dtype) for n, p in params.items()}
