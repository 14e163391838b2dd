"""Co-states λ_t of the optimal-control (PDS) data scores.

Conventions (also in the README):

- Training on the proxy set with weights γ (γ_n = 1/N): θ_{t+1} = θ_t − η_t Σ_n γ_n ∇ℓ_n(θ_t),
  η_t = the ``lr`` attribute of checkpoint t (times the number of optimizer steps to the
  next checkpoint with ``lr_scale_steps``).
- Target J(θ) = mean loss over the target set; J_total = Σ_{t=1..T} J(θ_t), with
  checkpoints θ_0 … θ_T. A target given as a sketch file (``gradscore sketch``) has
  ∇J(θ_t) = Φᵀ m_t, m_t the mean of its sketches: an unbiased estimate
  (:class:`gradscore.sketches.store.SketchTarget`); the recursion below is then exact
  given that estimate.
- λ_T = ∇J(θ_T); λ_t = ∇J(θ_t) + (I − η_t H_t) λ_{t+1} for t = T−1 … 1, with
  H_t = ∇²(Σ_n γ_n ℓ_n)(θ_t) applied as Hessian-vector products (``jvp`` of ``grad``,
  streamed over the proxy set; the Hessian is never formed).
- pds_n = Σ_{t=0..T−1} η_t ⟨λ_{t+1}, ∇ℓ_n(θ_t)⟩ = −∂J_total/∂γ_n: larger = more helpful.
  Exact when every optimizer step of full-batch gradient descent is a checkpoint; with
  sparser checkpoints, or minibatches, it is an approximation.
- When PDS is not meaningful: an optimizer whose update is not the plain gradient step
  (momentum, Adam: the recursion above is not its adjoint), or a recursion that diverges
  (η_t above 2 / the largest Hessian eigenvalue makes I − η_t H_t expand). Both are
  checked (:func:`stability_warnings`): the checkpoints' recorded optimizer kinds, and
  ‖λ_t‖ growing more than ``GROWTH_BOUND``× in one step backwards, or non-finite. The
  warnings are stored in the file's ``warnings`` attribute (JSON list), copied into the
  scores file, printed by the CLI and reported by ``diagnose``.

The file (default ``<checkpoints>/costate.h5``) holds ``/t_<t>/grad_target/<name>`` for
every checkpoint and ``/t_<t>/costate/<name>`` for t ≥ 1 (none with ``costates=False``:
what target_dot and target_cos need, without the Hessian-vector products over the proxy
set that cost most of the file's time), parameter names as in the
checkpoints, plus ``/eta`` (T,), ``/step``, ``/grad_target_norm`` and ``/costate_norm``
(T+1,; 0 for t = 0). The
computation runs backwards from θ_T, one journaled checkpoint at a time, so a killed run
resumes and reproduces λ bit for bit.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import torch
from torch.func import grad, jvp
from tqdm.auto import tqdm

from ..io.atomic import atomic_h5
from ..io.checkpoints import CheckpointStore, not_plain_steps
from ..batch import Inputs, call_functional, call_model, move
from ..engines.base import dense_embeddings
from ..engines.layout import refuse_random_in_eval
from ..engines.workarounds import torch_workarounds
from ..config import (DEVICES, DTYPES, EXAMPLES_PATH, LM_REDUCTIONS, absolute_paths, path_fields, resolve_device,
                      whole_field)
from ..io.datasets import Dataset, check_targets, load_dataset, probe_model
from ..exceptions import (CheckpointError, ConfigError, DataError, EngineError, GradscoreError, OutputError,
                          warn)
from ..losses import BatchLosses, Loss, resolve_loss
from ..io.outputs import claim, lock
from ..io.journal import Journal, read_fingerprint
from ..io.attrs import attributes, verify, write_attrs
from ..io.store import damage_named, put
from .forward_forms import forward_forms

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CostateConfig:
    """What determines the co-states; saved in the file and checked on resume.
    ``costates``: compute λ_t (False: only ∇J(θ_t), and the proxy set is not read)."""

    checkpoints: str
    proxy: str
    target: str
    batch_size: int = 256
    dtype: str = "float32"
    device: str = "auto"
    lr_scale_steps: bool = False
    lm_reduction: str | None = None   # the checkpoints' own (causal_lm: mean; causal_lm_sum: sum)
    costates: bool = True

    def __post_init__(self) -> None:
        path_fields(self, ("checkpoints",))
        path_fields(self, ("proxy", "target"), EXAMPLES_PATH)
        whole_field(self, "batch_size", 1)
        if self.dtype not in DTYPES:
            raise ConfigError(f"invalid value for 'dtype': '{self.dtype}' is not one of {DTYPES}")
        if self.device not in DEVICES:
            raise ConfigError(f"invalid value for 'device': '{self.device}' is not one of {DEVICES}")
        if self.lm_reduction is not None and self.lm_reduction not in LM_REDUCTIONS:
            raise ConfigError(f"invalid value for 'lm_reduction': '{self.lm_reduction}' is not one of {LM_REDUCTIONS}")


def _fingerprinted(config: CostateConfig) -> dict:
    """The config as fingerprinted: ``costates`` only where False, so that the files made
    before it existed (all with co-states) keep their fingerprints."""
    d = absolute_paths(asdict(config), ("checkpoints", "proxy", "target"))
    if d.pop("costates"):
        return d
    return {**d, "costates": False}


def step_sizes(ckpts: CheckpointStore, lr_scale_steps: bool = False) -> np.ndarray:
    """η_t for t = 0 … T−1 (float64): the ``lr`` of checkpoint t, times the number of
    optimizer steps to checkpoint t+1 when ``lr_scale_steps``."""
    lr = np.array([i.lr for i in ckpts][:-1], dtype=np.float64)
    if lr_scale_steps:
        steps = np.array([i.step for i in ckpts], dtype=np.float64)
        lr = lr * np.diff(steps)
    return lr


class _Objective:
    """Σ_b w·ℓ_b over chunks of a dataset, as a function of the scored parameters; each
    ℓ_b alone where a user's loss reads the other rows of its batch (:class:`BatchLosses`,
    decided on the first chunk, outside the function transforms)."""

    def __init__(self, model: torch.nn.Module, loss: Loss, ds: Dataset, batch_size: int, weight: float) -> None:
        self.model, self.loss, self.ds, self.batch, self.weight = model, loss, ds, batch_size, weight
        self.like = next(model.parameters())   # device and dtype of the inputs
        self.fixed = dict(model.named_buffers())
        self.losses = BatchLosses(loss)

    def _moved(self) -> Iterator[tuple[int, Inputs, torch.Tensor]]:
        """(start, x, y) of each chunk on the model's device (x in its dtype, class labels as int64)."""
        for start, x, y in self.ds.chunks(self.batch):
            yield start, move(x, self.like), self.loss.class_indices(y.to(self.like.device))

    def _chunks(self):
        for _, x, y in self._moved():
            if self.losses.alone is None and not self.loss.per_example:
                with torch.no_grad(), torch_workarounds():
                    self.losses.check(call_model(self.model, x), y)
            yield x, y

    def _f(self, params: Params, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        out = call_functional(self.model, (params, self.fixed), x)
        return self.losses(out, y).sum() * self.weight

    def _accumulate(self, fn: Callable[[torch.Tensor, torch.Tensor], Params]) -> Params:
        total: Params | None = None
        with torch_workarounds(), dense_embeddings(self.model):
            for x, y in self._chunks():
                part = fn(x, y)
                total = part if total is None else {k: total[k] + part[k] for k in total}
        return total

    def check_finite(self, what: str, ckpt: Path) -> None:
        """A DataError naming the examples whose loss is NaN or infinite at the model's
        parameters (checkpoint ``ckpt``): one makes this set's ``what`` non-finite."""
        rows = [np.zeros(0, dtype=np.int64)]
        with torch.no_grad(), torch_workarounds():
            for start, x, y in self._moved():
                losses = self.losses(call_model(self.model, x), y)
                rows.append(start + np.flatnonzero(~torch.isfinite(losses).cpu().numpy()))
        bad = np.concatenate(rows)
        if len(bad):
            raise self.ds.nonfinite(bad, "losses", ckpt, f"fix or drop them: one such example makes the {what} of "
                                                         f"the whole set non-finite")

    def finite(self, v: Params, what: str, ckpt: Path) -> Params:
        """``v``, this set's ``what`` at ``ckpt``, checked (:meth:`check_finite`) where it is
        not finite; with finite losses, a co-state that overflows, which its warning names."""
        if not all(bool(torch.isfinite(t).all()) for t in v.values()):
            self.check_finite(what, ckpt)
        return v

    def gradient(self, params: Params) -> Params:
        """∇_θ Σ_b w·ℓ_b."""
        return self._accumulate(lambda x, y: grad(self._f)(params, x, y))

    def hvp(self, params: Params, v: Params) -> Params:
        """(∇²_θ Σ_b w·ℓ_b) v, forward-over-reverse, chunk by chunk."""
        try:
            with warnings.catch_warnings(), forward_forms(self.model):
                # torch's own jvp decompositions call its deprecated jit.script
                warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
                return self._accumulate(lambda x, y: jvp(lambda p: grad(self._f)(p, x, y), (params,), (v,))[1])
        except NotImplementedError as e:
            what = str(e).splitlines()[0][:160]
            if "grouped_mm" in what:
                fix = "for a Hugging Face mixture of experts put 'experts_implementation': 'eager' in its config"
            elif "attention" in what or "flash" in what:
                fix = "for Hugging Face models pass attn_implementation='eager' in model_kwargs"
            else:
                fix = "write that op another way, or leave pds out of the scores"
            raise EngineError(f"the co-states need Hessian-vector products, i.e. forward-mode derivatives of "
                              f"every op of the model and loss, and torch lacks one here ({what}); {fix}") from e


def hvp(model: torch.nn.Module, loss: str | Loss, ds: Dataset, v: Params, *, batch_size: int = 256,
        weight: float = 1.0) -> Params:
    """Hessian-vector product of Σ_n weight·ℓ_n over ``ds`` at the model's parameters."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return _Objective(model, resolve_loss(loss), ds, batch_size, weight).hvp(params, v)


def _save_unit(path: Path, grad_target: Params, costate: Params | None) -> None:
    with atomic_h5(path) as f:
        for group, tensors in (("grad_target", grad_target), ("costate", costate)):
            if tensors is not None:
                g = f.create_group(group)
                for name, t in tensors.items():
                    put(g, name, t.detach().cpu().numpy())


def _load_group(f: h5py.Group, name: str, device, dtype) -> Params | None:
    if name not in f:
        return None
    return {k: torch.as_tensor(f[name][k][()]).to(device=device, dtype=dtype) for k in f[name]}


#: errors for want of the right to write a folder (a read-only one, a read-only file system)
_CANNOT_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def beside_checkpoints(checkpoints: str | os.PathLike, option: str) -> Iterator[None]:
    """For a co-state file going to its default place, the ``checkpoints`` folder: an error
    for want of the right to write there (a read-only folder, an archive) is one
    :class:`OutputError` naming ``option``, the way to put the file elsewhere."""
    try:
        yield
    except OSError as e:
        folder = os.path.realpath(checkpoints)
        where = os.path.realpath(os.fspath(e.filename)) if e.filename else ""
        if e.errno not in _CANNOT_WRITE or not (
                where == folder or where.startswith(os.path.join(folder, ""))):
            raise
        raise OutputError(f"{checkpoints}: cannot write the co-state file there ({e.strerror}), where it goes "
                          f"by default; pass {option} in a folder you can write") from None


def compute_costate(config: CostateConfig, out: str | Path | None = None, *, overwrite: bool = False,
                    replace: bool = False, progress: bool = True) -> Path:
    """Compute ∇J(θ_t) for every checkpoint and (``config.costates``) λ_t for t ≥ 1; write the
    costate file. An existing one made with these settings is kept (resumed if interrupted);
    one made with others is refused (:class:`ConfigMismatchError`), recomputed with
    ``replace``; ``overwrite`` recomputes it whatever it holds."""
    ckpts = CheckpointStore(config.checkpoints)
    if len(ckpts) < 2:
        raise CheckpointError(f"{config.checkpoints}: PDS needs at least two checkpoints (θ_0 and θ_1)")
    out = claim(out if out is not None else Path(config.checkpoints) / "costate.h5", "costate",
                overwrite=overwrite, resumable=True,
                inputs={"the proxy set": [config.proxy], "the target set": [config.target],
                        "a checkpoint": [info.path for info in ckpts.infos]})
    try:
        with lock(out):   # one writer per co-state file
            return _compute(config, out, ckpts, overwrite, replace, progress)
    except OSError as e:
        # a folder this process may not write (an archived run) refuses the lock: a finished
        # file with these settings is only read, which needs none
        if e.errno not in _CANNOT_WRITE or overwrite or not out.exists():
            raise
        if read_fingerprint(out) != _Inputs(config, ckpts, progress).fingerprint:
            raise
        return out


class _Inputs:
    """What a co-state file is computed from: the proxy and target sets (a sketch file as
    target), the last checkpoint's model, the loss and η_t; and the file's fingerprint."""

    def __init__(self, config: CostateConfig, ckpts: CheckpointStore, progress: bool) -> None:
        from ..io.outputs import is_sketch_file
        from ..sketches.store import SketchTarget
        self.sketched = is_sketch_file(Path(config.target), read=True)
        self.proxy = load_dataset(config.proxy) if config.costates else None   # only the Hessian products read it
        self.target = (SketchTarget(config.target, ckpts.checksums(), config.checkpoints) if self.sketched
                       else load_dataset(config.target))
        for ds, role in [(self.proxy, config.proxy), (None if self.sketched else self.target, config.target)]:
            if ds is not None and len(ds) == 0:
                raise DataError(f"{role}: has no examples; the co-states need a non-empty proxy and target set")
        self.device, self.dtype = resolve_device(config.device), getattr(torch, config.dtype)
        self.eta = step_sizes(ckpts, config.lr_scale_steps)
        self.last = ckpts.build_model(len(ckpts) - 1, dtype=self.dtype, device=self.device)
        self.loss = resolve_loss(ckpts.loss, config.lm_reduction)
        self.fingerprint = {"config": _fingerprinted(config), "checkpoints_sha256": ckpts.checksums(),
                            "proxy": self.proxy and self.proxy.fingerprint(progress),
                            "target": self.target.fingerprint(progress), "code": ckpts.code(self.loss.fn, self.last)}


def _compute(config: CostateConfig, out: Path, ckpts: CheckpointStore, overwrite: bool, replace: bool,
             progress: bool) -> Path:
    """:func:`compute_costate` once ``out`` is claimed and locked."""
    inputs = _Inputs(config, ckpts, progress)
    sketched, proxy, target, last, loss = inputs.sketched, inputs.proxy, inputs.target, inputs.last, inputs.loss
    device, dtype, eta, fingerprint = inputs.device, inputs.dtype, inputs.eta, inputs.fingerprint
    T = len(ckpts) - 1
    if not sketched:   # bad input fails before anything is written
        _check_fits(last, target, "target", ckpts[T].path, loss)
    if proxy is not None:   # its first Hessian product comes after the journal's first unit: its losses now
        _check_fits(last, proxy, "proxy", ckpts[T].path, loss)
        _Objective(last, loss, proxy, config.batch_size, 1.0).check_finite("Hessian product", ckpts[T].path)
    journal = Journal(out, fingerprint, overwrite=overwrite, replace=replace, discard=replace)
    if journal.complete:
        return out
    lam_next: Params | None = None
    with tqdm(total=T + 1, desc="co-state", unit="ckpt", disable=None if progress else True) as bar:
        for t in range(T, -1, -1):
            unit = journal.unit(f"t{t:05d}.h5")
            if unit.exists():
                if config.costates:
                    with damage_named(unit, CostateFile.FIX), h5py.File(unit, "r") as f:
                        lam_next = _load_group(f, "costate", device, dtype)
                bar.update()
                continue
            model = ckpts.build_model(t, dtype=dtype, device=device)
            params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            if sketched:
                g_target = target.gradient(t, model, params)
            else:
                objective = _Objective(model, loss, target, config.batch_size, 1.0 / len(target))
                g_target = objective.finite(objective.gradient(params), "target gradient", ckpts[t].path)
            if not config.costates:
                lam = None
            elif t == T:
                lam = g_target
            elif t >= 1:
                v = {k: lam_next[k] for k in params}  # the tangent must mirror params' structure
                objective = _Objective(model, loss, proxy, config.batch_size, 1.0 / len(proxy))
                h = objective.finite(objective.hvp(params, v), "Hessian product", ckpts[t].path)
                lam = {k: g_target[k] + lam_next[k] - eta[t] * h[k] for k in params}
            else:
                lam = None  # λ_0 is never used: only ∇J(θ_0), for target_dot
            journal.open()
            _save_unit(unit, g_target, lam)
            lam_next = lam
            bar.update()
    with atomic_h5(out) as f:
        write_attrs(f, {"fingerprint": fingerprint, "config": asdict(config), "conventions":
                        "pds_n = sum_t eta_t <lambda_{t+1}, grad l_n(theta_t)>; see gradscore.scores.costate"})
        put(f, "eta", eta)
        put(f, "step", np.array([i.step for i in ckpts], dtype=np.int64))
        norms: dict[str, list[float]] = {"grad_target": [], "costate": []}
        for t in range(T + 1):
            unit = journal.unit(f"t{t:05d}.h5")
            with damage_named(unit, CostateFile.FIX), h5py.File(unit, "r") as u:
                for group in norms:
                    if group in u:
                        u.copy(u[group], f, name=f"t_{t:05d}/{group}")
                    norms[group].append(_norm(u[group]) if group in u else 0.0)
        put(f, "grad_target_norm", np.array(norms["grad_target"]))
        put(f, "costate_norm", np.array(norms["costate"]))
        kinds = [i.optimizer for i in ckpts]
        found = (stability_warnings(kinds, norms["costate"]) if config.costates else
                 not_plain_steps(kinds, "target_dot, Σ_t η_t ⟨∇J(θ_t), g_n(θ_t)⟩,", "its first-order change of J is"))
        write_attrs(f, {"warnings": found})
    for text in found:
        warn(f"{out}: {text}")
    journal.finish()
    return out


#: ‖λ_t‖ / ‖λ_{t+1}‖ above this in one step backwards: the recursion diverges
GROWTH_BOUND = 10.0


def stability_warnings(optimizers: list[str], costate_norms: list[float]) -> list[str]:
    """Why the PDS co-states of a run may not be meaningful (an empty list if none).

    optimizers: each checkpoint's recorded optimizer kind; costate_norms: ‖λ_t‖ for
    t = 0..T (0 at t = 0)."""
    found = not_plain_steps(optimizers, "PDS", "these co-states are")
    norms = np.asarray(costate_norms[1:], dtype=np.float64)            # t = 1 … T
    if not np.isfinite(norms).all():
        found.append("the co-state diverged to NaN/Inf going backwards; PDS scores are not meaningful "
                     "(lower the learning rate, or use checkpoints of plain gradient descent)")
    elif len(norms) > 1 and norms[1:].min() > 0:
        growth = norms[:-1] / norms[1:]                                   # ‖λ_t‖ / ‖λ_t+1‖
        t = int(np.argmax(growth))
        if growth[t] > GROWTH_BOUND:
            found.append(f"the co-state diverges going backwards: ‖λ‖ grows {growth[t]:.3g}× in one step "
                         f"(t = {t + 1}) and from {norms[-1]:.3g} at the last checkpoint to {norms.max():.3g}; "
                         f"η_t exceeds 2 / the largest Hessian eigenvalue, and PDS scores are not meaningful")
    return found


def _norm(group: h5py.Group) -> float:
    """‖v‖₂ of a vector stored as one dataset per parameter."""
    return float(np.sqrt(sum(float((group[k][()].astype(np.float64) ** 2).sum()) for k in group)))


def _check_fits(model: torch.nn.Module, ds: Dataset, role: str, ckpt: Path, loss: Loss) -> None:
    """Inputs that do not fit the model, or labels outside its outputs: one DataError; a model
    random in eval mode (:func:`.engines.layout.refuse_random_in_eval`): one EngineError."""
    n_out = None
    for start, x, y in ds.chunks():  # streamed: the data need not fit in memory
        if n_out is None:
            n_out = probe_model(model, ds, x, ckpt, role)
            refuse_random_in_eval(model, x, ", so the co-states would be of a random draw of the losses",
                                  where=f"the model of {ckpt}: ")
        check_targets(ds, loss, start, y, n_out)


class CostateFile:
    """Read a costate file: ``grad_target(t)``, ``costate(t)``, ``eta``, ``grad_target_norm``,
    ``config`` (:class:`CostateConfig`'s fields); ``has_costates``: whether it holds λ_t (a
    file made for target_dot/target_cos only does not)."""

    #: a co-state file is made again where it is missing
    FIX = "delete it and rerun: it is computed again"
    _HEADER = ("eta", "grad_target_norm", "costate_norm", "step")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise GradscoreError(f"{self.path}: not a gradscore costate file ({e}); "
                                 f"compute it with `gradscore costate`") from e
        try:
            with damage_named(self.path, self.FIX):
                self._read_header()
        except GradscoreError:
            self._f.close()
            raise

    def _read_header(self) -> None:
        verify(self._f, self.path, self.FIX)
        missing = [k for k in self._HEADER if k not in self._f] + [
            f"attribute {k}" for k in ("fingerprint",) if k not in self._f.attrs]
        if missing:
            raise GradscoreError(f"{self.path}: not a gradscore costate file (no {', '.join(missing)}); "
                                 f"compute it with `gradscore costate`")
        self.eta, self.grad_target_norm, self.costate_norm, self.steps = (self._f[k][()] for k in self._HEADER)
        attrs = attributes(self._f)
        self.fingerprint = attrs["fingerprint"]
        self.warnings: list[str] = json.loads(attrs.get("warnings", "[]"))
        self.config: dict = json.loads(attrs.get("config", "{}"))
        self.has_costates = bool(self.config.get("costates", True))

    def _group(self, t: int, name: str) -> dict[str, torch.Tensor] | None:
        key = f"t_{t:05d}/{name}"
        with damage_named(self.path, self.FIX):
            if key not in self._f:
                return None
            return {k: torch.as_tensor(self._f[f"{key}/{k}"][()]) for k in self._f[key]}

    def grad_target(self, t: int) -> dict[str, torch.Tensor]:
        """∇J(θ_t) as {parameter name: tensor}."""
        return self._group(t, "grad_target")

    def costate(self, t: int) -> dict[str, torch.Tensor] | None:
        """λ_t as {parameter name: tensor}; None for t = 0."""
        return self._group(t, "costate")

    def close(self) -> None:
        """Close the file (also on leaving a ``with CostateFile(path) as c:`` block)."""
        self._f.close()

    def __enter__(self) -> "CostateFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
