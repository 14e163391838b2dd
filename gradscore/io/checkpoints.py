"""HDF5 checkpoints: one self-describing file per saved θ_t (``step_00001200.h5``).

Layout: ``/params/<name>`` and ``/buffers/<name>`` (state_dict names), attrs ``step``,
``epoch``, ``lr`` (η_t, the step size used for the step *after* θ_t), ``optimizer``,
``model`` (``"package.module:factory"``), ``model_kwargs`` (JSON), ``loss`` and
``format_version``; ``run``, the id of the training run (one per folder, checked); an
imported checkpoint also ``source`` (JSON: the file it was converted from, its size and
modification time); ``model_root``, the folder of a factory in the user's own file;
``model_code`` (JSON: the fingerprint of the code the factory's model runs, compared when
it is scored). Files are written atomically with fletcher32 checksums.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import torch
from torch import nn

from .atomic import atomic_h5
from .attrs import attributes, mismatched, write_attrs
from .store import put
from ..distributed import current_ranks
from ..config import as_path, checked_model, nonnegative, whole
from ..exceptions import CheckpointError, ConfigError, GradscoreError, lock_refused, warn
from ..imports import code_fingerprint, import_ref, import_root
from .journal import code_parts

#: 2: text attributes fixed-length (``io.attrs``); an earlier gradscore refuses it by this number
#: instead of reading its text as bytes ("unknown loss 'b'cross_entropy''")
FORMAT_VERSION = 2
#: the versions this gradscore reads (1: text in HDF5's global heap)
READS_FORMATS = (1, 2)
#: the names a checkpoint folder's files have; any other file in the folder is ignored
CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.h5$")
_REQUIRED_ATTRS = ("format_version", "step", "epoch", "lr", "model", "model_kwargs", "loss")


def checkpoint_filename(step: int) -> str:
    return f"step_{int(step):08d}.h5"


def checkpoint_files(directory: str | Path) -> dict[int, Path]:
    """{step: path} of the files named ``step_<n>.h5`` in ``directory`` (none if it is missing),
    by the step their names give."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    found = ((CHECKPOINT_NAME.match(p.name), p) for p in directory.iterdir())
    return dict(sorted((int(m.group(1)), p) for m, p in found if m))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: store losslessly as float32
        t = t.float()
    return t.numpy()


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{state_dict name: parameter name} for entries that are another name of a parameter
    (tied weights, e.g. GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {name: canonical[id(t)] for name, t in model.state_dict(keep_vars=True).items()
            if id(t) in canonical and canonical[id(t)] != name}


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and (Distributed)DataParallel's wrappers, which
    prefix its state_dict keys (``_orig_mod.``, ``module.``); ``model`` if not wrapped."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):   # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def write_checkpoint(path: str | Path, model: nn.Module, *, step: int, lr: float,
                     epoch: float = 0.0, model_factory: str = "", model_kwargs: dict | None = None,
                     loss: str = "cross_entropy", optimizer: str = "", source: str = "", run: str = "",
                     code: dict | None = None) -> Path:
    """Write ``model``'s parameters and persistent buffers to ``path`` atomically (of the
    model inside a compile or DataParallel wrapper: what its factory rebuilds). ``source``:
    the file an imported checkpoint was converted from (``import-checkpoints``); ``run``:
    the training run's id, the same in every checkpoint of one run; ``code``: the fingerprint
    of the code the factory's model runs (:func:`trained_code`)."""
    path, model = Path(path), unwrapped(model)
    params = dict(model.named_parameters())
    aliases = tied_aliases(model)  # a tied tensor is stored once, under its parameter name
    state = {k: v for k, v in model.state_dict().items() if k not in aliases}
    with atomic_h5(path) as f:
        write_attrs(f, {
            "format_version": FORMAT_VERSION, "step": int(step), "epoch": float(epoch),
            "lr": float(lr), "optimizer": optimizer, "model": model_factory,
            "model_kwargs": json.dumps(model_kwargs or {}, sort_keys=True), "loss": loss,
            **({"source": source} if source else {}), **({"run": run} if run else {}),
            **({"model_root": root} if (root := import_root(model_factory)) else {}),
            **({"model_code": json.dumps(code, sort_keys=True)} if code else {}),
        })
        gp, gb = f.create_group("params"), f.create_group("buffers")
        for name, tensor in state.items():
            group = gp if name in params else gb
            arr = _to_numpy(tensor)
            put(group, name, arr, **({"chunks": True} if arr.ndim else {}))   # scalars cannot be chunked
    return path


def check_rebuildable(model_factory: str, model_kwargs: dict | None, loss: Any) -> Callable[..., Any]:
    """What every checkpoint records so that scoring can rebuild and score it: a loss
    gradscore knows (by name: the file stores it), a factory it can import, ``model_kwargs``
    JSON can hold. One GradscoreError naming the fix, before anything is written; returns
    the factory."""
    from ..losses import resolve_loss
    if not isinstance(loss, str):
        raise ConfigError(f"invalid value for 'loss': the checkpoints store the loss by name; give "
                          f"'cross_entropy' (or another gradscore loss) or a 'module:fn' reference, not a "
                          f"{type(loss).__name__}")
    ref = (f"{getattr(model_factory, '__module__', 'models')}:{getattr(model_factory, '__qualname__', 'net')}"
           if callable(model_factory) else str(model_factory))
    for what, named, module in (("loss", loss, "losses"), ("model_factory", ref, "models")):
        if named.startswith("__main__:"):
            raise ConfigError(f"{what} '{named}' is in __main__ (a notebook or the running script), which scoring "
                              f"cannot import: move it into a module of its own ({module}.py) and give "
                              f"'{module}:{named.split(':', 1)[1]}'")
    resolve_loss(loss)
    if callable(model_factory):
        raise ConfigError(f"model_factory: give the reference '{ref}', which the checkpoints store, not the "
                          f"function itself")
    factory = import_ref(model_factory, "model_factory", CheckpointError)
    try:
        json.dumps(model_kwargs or {}, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid value for 'model_kwargs': the checkpoints store it as JSON, which cannot "
                          f"hold it ({e}); give numbers, strings, lists and dicts (a dtype as its name)") from e
    return factory


def build_model(factory: Callable[..., Any], model_kwargs: dict, ref: str, where: str = "") -> nn.Module:
    """``factory(**model_kwargs)``: one CheckpointError (prefixed by ``where``, naming the
    factory ``ref``) where it rejects the keyword arguments, fails with an error of its own
    (named with the line of the factory's file that raised it) or builds no nn.Module."""
    try:
        model = factory(**model_kwargs)
    except Exception as e:  # noqa: BLE001 - the user's factory: its own error, named
        if isinstance(e, TypeError) and not _takes(factory, model_kwargs):
            raise CheckpointError(f"{where}model factory '{ref}' rejected model_kwargs {kwargs_text(model_kwargs)}: "
                                  f"{e}") from e
        raise CheckpointError(_failed(where, ref, model_kwargs, e, factory)) from e
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{where}factory '{ref}' did not return an nn.Module, but a {type(model).__name__}")
    return model


def kwargs_text(model_kwargs: dict) -> str:
    """``model_kwargs`` for a one-line message: as repr writes it, a value longer than 60
    characters (a Hugging Face config) shortened to ``{...}``."""
    def short(v: Any) -> str:
        text = repr(v)
        if len(text) <= 60:
            return text
        return {dict: "{...}", list: "[...]", tuple: "(...)"}.get(type(v), text[:57] + "...")
    return "{" + ", ".join(f"{k!r}: {short(v)}" for k, v in model_kwargs.items()) + "}"


def _takes(factory: Callable[..., Any], model_kwargs: dict) -> bool:
    """Whether ``factory``'s signature takes these keyword arguments (one it cannot inspect: yes)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(**model_kwargs)
    except TypeError:
        return False
    return True


def _failed(where: str, ref: str, model_kwargs: dict, e: Exception, factory: Callable[..., Any]) -> str:
    """The line for a factory that raised ``e``: its error, and where in the factory's own
    file it was raised (the innermost such frame; else the innermost outside torch and gradscore)."""
    frames = traceback.extract_tb(e.__traceback__)
    try:
        own = inspect.getsourcefile(factory)
    except TypeError:   # a builtin or a C callable: no file of its own
        own = None
    libraries = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules["gradscore"]))
    at = next((f for f in reversed(frames) if own and f.filename == own), None) or next(
        (f for f in reversed(frames) if not f.filename.startswith(libraries)), None)
    place = f"; raised at {at.filename}:{at.lineno}" if at else ""
    return (f"{where}model factory '{ref}' failed on model_kwargs {kwargs_text(model_kwargs)} "
            f"({type(e).__name__}: {e}{place})")


def checked_lr(lr: Any, step: int | None = None) -> float:
    """η_t as a float (numpy's and a 0-d tensor's too): a finite learning rate >= 0, else one
    ConfigError (naming ``step`` where given)."""
    eta = nonnegative(lr)
    if eta is None:
        of = "" if step is None else f" of step {step}"
        raise ConfigError(f"invalid value for 'lr'{of}: {lr!r}; give η_t, the step's learning rate after θ_t, a "
                          f"finite learning rate >= 0")
    return eta


def checked_step(step: Any) -> int:
    """The optimizer step as an int (numpy's and a 0-d integer tensor's too): a whole number
    >= 0, else one ConfigError. A float is refused, not truncated: 1.5 and 1.75 would name
    one file, the second replacing the first."""
    t = whole(step)
    if t is None or t < 0:
        raise ConfigError(f"invalid value for 'step': {step!r}; give the optimizer step, a whole number >= 0")
    return t


def checked_epoch(epoch: Any) -> float:
    """The epoch as a float: a finite number >= 0 (a NaN fell out of every window), else one ConfigError."""
    e = nonnegative(epoch)
    if e is None:
        raise ConfigError(f"invalid value for 'epoch': {epoch!r}; give the epoch θ_t is at, a finite number >= 0")
    return e


class CheckpointWriter:
    """Save θ_t during training, one atomic HDF5 file per call to :meth:`save`.

    >>> with CheckpointWriter("ckpts/", model_factory="gradscore.demos.models:mlp",
    ...                       model_kwargs={}, loss="cross_entropy") as w:
    ...     w.save(model, step=0, lr=0.1, epoch=0)   # doctest: +SKIP

    ``model_factory`` must rebuild the architecture from ``model_kwargs`` so that
    ``gradscore run`` can score the checkpoints without your training script.

    A folder holds one training run, since ``gradscore run`` scores all of its checkpoints
    as one trajectory. The first :meth:`save` at step s (or one at a step before the last
    saved: a new run through the same writer) refuses a folder that already holds
    checkpoints at step s or later (an earlier run's: a rerun of the script would leave
    the longer run's last ones beside its own) unless ``overwrite=True``, which removes
    those checkpoints first. Checkpoints before s stay: a run resumed after a stop
    continues them.

    What ``gradscore run`` would refuse after the training is refused before it: a loss it
    does not know, a factory it cannot import and ``model_kwargs`` JSON cannot hold (here),
    a learning rate that is not a finite η ≥ 0 (at each save), and a model the factory does
    not rebuild (at the first save: the factory's model, built on the meta device, must have
    the saved tensors by name and shape; a factory that cannot build there is not checked).
    """

    def __init__(self, directory: str | Path, *, model_factory: str, model_kwargs: dict | None = None,
                 loss: str = "cross_entropy", optimizer: "str | torch.optim.Optimizer" = "",
                 overwrite: bool = False) -> None:
        self.directory = as_path(directory, "directory")
        self._factory = check_rebuildable(model_factory, model_kwargs, loss)
        self.model_factory = model_factory
        self.model_kwargs = dict(model_kwargs or {})
        self.loss = loss
        self._checked = False   # the first save has compared the model with the factory's
        self._code: dict | None = None   # the fingerprint of the factory's model's code (first save)
        # the kind is what PDS needs to know: plain gradient steps, or momentum/Adam (a warning)
        self.optimizer = optimizer if isinstance(optimizer, str) else optimizer_kind(optimizer)
        self.overwrite = overwrite
        self.saved: list[Path] = []
        self.run: str | None = None   # this run's id, recorded in each checkpoint (set by the first save)
        self._last = -1               # the step of the last save

    def __enter__(self) -> "CheckpointWriter":
        self.directory.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def save(self, model: nn.Module, *, step: int, lr: float, epoch: float = 0.0) -> Path:
        """Write θ_t = ``model`` as ``step_<step>.h5`` (``step`` a whole number >= 0, ``epoch`` a
        finite number >= 0); ``lr`` is η_t used after θ_t. Under torch.distributed only rank 0
        writes (DDP: every rank holds the same θ); the others return the path it writes."""
        step, epoch = checked_step(step), checked_epoch(epoch)
        if current_ranks()[0] != 0:
            self.saved.append(self.directory / checkpoint_filename(step))
            return self.saved[-1]
        checked_lr(lr)
        checked_model(model)
        if not self._checked:
            self._check_model(model)
        if self.run is None or int(step) < self._last:   # a run's first save, or a new run's (back at an earlier step)
            self._start_run(step)
        self._last = int(step)
        path = write_checkpoint(self.directory / checkpoint_filename(step), model, step=step,
                                lr=lr, epoch=epoch, model_factory=self.model_factory,
                                model_kwargs=self.model_kwargs, loss=self.loss,
                                optimizer=self.optimizer, run=self.run, code=self._code)
        self.saved.append(path)
        return path

    def _check_model(self, model: nn.Module) -> None:
        """The factory's model, built on the meta device (no memory, no weights), has the
        tensors ``model`` is saved with, by name and shape: what scoring loads it into; and
        the loss scores what its head predicts (:func:`gradscore.losses.check_head`)."""
        from ..losses import check_head, resolve_loss
        check_head(model, resolve_loss(self.loss))   # at the first save, not when the run is scored
        factory = self._factory
        try:
            with torch.device("meta"):
                built = factory(**self.model_kwargs)
        except TypeError as e:
            if not _takes(factory, self.model_kwargs):
                raise CheckpointError(f"model_factory '{self.model_factory}' rejected model_kwargs "
                                      f"{kwargs_text(self.model_kwargs)}: {e}") from e
            return   # a TypeError of its own on the meta device: not checked
        except Exception:  # noqa: BLE001 - a factory that cannot build on the meta device: not checked
            return
        if not isinstance(built, nn.Module):
            raise CheckpointError(f"model_factory '{self.model_factory}' did not return an nn.Module")
        if any(nn.parameter.is_lazy(t) for t in built.state_dict(keep_vars=True).values()):
            return   # lazy layers (nn.LazyLinear) take their shapes from a first forward: not checked
        shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items() if k not in tied_aliases(m)}
                  for m in (unwrapped(model), built)]
        saved, rebuilt = shapes
        built_by = f"the model that model_factory '{self.model_factory}' builds from its model_kwargs"
        fix = "save the model the factory builds, or give the factory and kwargs that build it"
        extra, missing = [k for k in saved if k not in rebuilt], [k for k in rebuilt if k not in saved]
        if extra:
            raise CheckpointError(f"tensor(s) {', '.join(extra[:5])} of the model saved are not in {built_by}; {fix}")
        if missing:
            raise CheckpointError(f"tensor(s) {', '.join(missing[:5])} of {built_by} are not in the model saved; "
                                  f"{fix}")
        for k, shape in saved.items():
            if rebuilt[k] != shape:
                raise CheckpointError(f"tensor '{k}' has shape {shape}, but in {built_by} {rebuilt[k]}; check "
                                      f"model_kwargs")
        self._code = trained_code(built, factory, resolve_loss(self.loss).fn)
        self._checked = True

    def _start_run(self, first: int) -> None:
        """Before a run's first save, at step ``first``: refuse the folder's checkpoints at
        that step or later (an earlier run's), or remove them under ``overwrite``; never a
        file that is not a gradscore checkpoint. The run's id is that of the checkpoints
        left before ``first`` (a resumed run continues its run), else a new one."""
        found = checkpoint_files(self.directory)
        later = [(s, p) for s, p in found.items() if s >= int(first)]
        earlier = [p for s, p in found.items() if s < int(first)]
        run = (read_info(earlier[-1]).run if earlier else "") or uuid.uuid4().hex
        if not later:
            self.run = run
            return
        steps = f"step {later[0][0]}" if len(later) == 1 else f"steps {later[0][0]} to {later[-1][0]}"
        if not self.overwrite:
            kept = (f" (the checkpoints before step {first} stay: a resumed run continues them)" if earlier else "")
            raise CheckpointError(f"{self.directory}: already holds the checkpoints of an earlier run at {steps}; "
                                  f"this run's, from step {first}, would be scored with them as one trajectory. "
                                  f"Save into a new folder, or pass overwrite=True to remove them first{kept}")
        for _, p in later:
            try:
                read_info(p)
            except CheckpointError:
                raise CheckpointError(f"{p}: is not a gradscore checkpoint, and overwrite=True removes only an "
                                      f"earlier run's checkpoints; move it out of {self.directory}") from None
        for _, p in later:
            p.unlink()
        self.run = run   # set once the folder is this run's: a refused save leaves the next one checked too

    def every(self, n_steps: int) -> "StepRecorder":
        """A recorder for a plain training loop that saves θ every ``n_steps`` optimizer steps.

        >>> rec = writer.every(100)                                   # doctest: +SKIP
        >>> for step, (x, y) in enumerate(loader):                    # doctest: +SKIP
        ...     rec(model, step=step, lr=opt.param_groups[0]["lr"])   # before opt.step()
        ...     loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        """
        if (whole(n_steps) or 0) < 1:
            raise CheckpointError(f"every: n_steps must be a positive integer, got {n_steps!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        return StepRecorder(self, n_steps)


@dataclass
class StepRecorder:
    """Call it before each optimizer step with the number of steps done so far and the
    learning rate that step will use; it saves θ_step when ``step % n_steps == 0``."""

    writer: CheckpointWriter
    n_steps: int

    def __call__(self, model: nn.Module, *, step: int, lr: float, epoch: float = 0.0) -> Path | None:
        if step % self.n_steps:
            return None
        return self.writer.save(model, step=step, lr=lr, epoch=epoch)


@dataclass(frozen=True)
class CheckpointInfo:
    """Attributes of one checkpoint file: its path, the optimizer ``step`` and ``epoch`` it
    was saved at, the learning rate ``lr`` of the step after it (η_t), the model factory
    (``model``, ``model_kwargs``) and ``loss`` that rebuild and score it, the optimizer's
    description, and its training run's id."""

    path: Path
    step: int
    epoch: float
    lr: float
    model: str
    model_kwargs: dict
    loss: str
    optimizer: str
    run: str = ""      # the training run's id ("" in checkpoints written before runs had one)
    source: str = ""   # an imported checkpoint's source file, JSON (``import-checkpoints``)
    model_root: str = ""   # the folder the factory's module was imported from, where it is the user's own file
    model_code: str = ""   # JSON: the fingerprint of the code the factory's model ran (:func:`trained_code`)


def _unreadable(path: Path, e: Exception) -> GradscoreError:
    return lock_refused(path, e) or CheckpointError(f"{path}: not a readable HDF5 file (truncated or corrupt: {e}); "
                                                    f"re-save this checkpoint")


def read_info(path: Path) -> CheckpointInfo:
    """The attributes of the checkpoint file ``path``; one CheckpointError if it is not one."""
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder named as a checkpoint (step_<n>.h5); rename it or move it "
                              f"out of {path.parent}")
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{path}: is a link to a missing file ({os.readlink(path)}); restore that file "
                              f"or remove the link")
    try:
        with h5py.File(path, "r") as f:
            attrs = attributes(f)
            groups = set(f.keys())
            changed = mismatched(f)
    except (OSError, RuntimeError, KeyError) as e:   # KeyError, RuntimeError: HDF5's metadata checksum fails
        raise _unreadable(path, e) from e
    if changed is not None:
        raise CheckpointError(f"{path}: attribute {changed} is damaged (its CRC-32 does not match); re-save this "
                              f"checkpoint or restore it from a copy")
    missing = [a for a in _REQUIRED_ATTRS if a not in attrs]
    if missing:
        raise CheckpointError(f"{path}: missing attribute(s) {', '.join(missing)}; "
                              f"write checkpoints with gradscore.CheckpointWriter")
    if int(attrs["format_version"]) not in READS_FORMATS:
        raise CheckpointError(f"{path}: unknown format_version {attrs['format_version']} "
                              f"(this gradscore reads {' and '.join(map(str, READS_FORMATS))}); upgrade gradscore")
    if "params" not in groups:
        raise CheckpointError(f"{path}: no /params group; write checkpoints with CheckpointWriter")
    try:
        kwargs = json.loads(attrs["model_kwargs"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: attribute model_kwargs is not valid JSON ({e})") from e
    return CheckpointInfo(path=path, step=int(attrs["step"]), epoch=float(attrs["epoch"]),
                          lr=float(attrs["lr"]), model=str(attrs["model"]), model_kwargs=kwargs,
                          loss=str(attrs["loss"]), optimizer=str(attrs.get("optimizer", "")),
                          run=str(attrs.get("run", "")), source=str(attrs.get("source", "")),
                          model_root=str(attrs.get("model_root", "")), model_code=str(attrs.get("model_code", "")))


def _steps(steps: list[int]) -> str:
    """'0, 2, 4' (up to 4), '0, 2, …, 98'."""
    return ", ".join(map(str, steps)) if len(steps) <= 4 else f"{steps[0]}, {steps[1]}, …, {steps[-1]}"


def optimizer_kind(optimizer: object, clipped: bool = False) -> str:
    """What a checkpoint records of the optimizer: its class, with SGD's momentum, the
    learning rates of parameter groups that have their own, and ``clipped`` gradients (a
    step is then not θ − η ∇L)."""
    kind = type(optimizer).__name__
    groups = getattr(optimizer, "param_groups", None) or [{}]
    momentum = groups[0].get("momentum", 0)
    rates = list(dict.fromkeys(float(g["lr"]) for g in groups if "lr" in g))
    notes = ([f"momentum={momentum:g}"] if kind == "SGD" and momentum else []) + (
        [f"lr per group={','.join(f'{r:g}' for r in rates)}"] if len(rates) > 1 else []) + (
        ["clipped"] if clipped else [])
    return f"{kind}({', '.join(notes)})" if notes else kind


#: the files ``import-checkpoints`` reads: torch.save, Lightning, safetensors
SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
#: the optimizer kind ``import-checkpoints`` records: the training's is not known
IMPORTED = "imported"
#: recorded optimizer kinds whose step is not the plain θ − η ∇L (:func:`optimizer_kind`)
_NOT_PLAIN = re.compile(r"adam|momentum|nesterov|rmsprop|adagrad|adadelta|lamb|lion|lars|trainer|per group|clipped",
                        re.I)


def not_plain_steps(optimizers: list[str], method: str, what: str) -> list[str]:
    """[one warning] where a checkpoint was written by an optimizer whose step is not
    θ_t+1 = θ_t − η_t ∇L(θ_t), which ``method`` assumes, so ``what`` is only an
    approximation; [] where every recorded kind is plain (or unrecorded)."""
    assumes = f"{method} assumes θ_t+1 = θ_t − η_t ∇L(θ_t)"
    if IMPORTED in optimizers:
        return [f"the checkpoints were imported, so their optimizer is not recorded; {assumes}, so {what} only an "
                f"approximation unless they were plain gradient steps"]
    odd = sorted({o for o in optimizers if o and _NOT_PLAIN.search(o)})
    if not odd:
        return []
    return [f"the checkpoints were written by {', '.join(odd)}, not plain gradient steps; {assumes}, so {what} only "
            f"an approximation"]


def _param_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of a checkpoint, from its metadata alone."""
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with h5py.File(path, "r") as f:
            f["params"].visititems(lambda name, obj: shapes.__setitem__(name, tuple(obj.shape))
                                   if isinstance(obj, h5py.Dataset) else None)
    except (OSError, RuntimeError, KeyError) as e:   # its metadata fails HDF5's checksum
        raise _unreadable(path, e) from e
    return shapes


def load_state_dict(path: str | Path, model: nn.Module, cast: bool = True) -> dict[str, torch.Tensor]:
    """Read the tensors of checkpoint ``path`` validated against ``model``'s state_dict, in
    the model's dtypes (``cast=False``: as stored).

    Raises :class:`CheckpointError` naming the file and tensor for a missing, extra,
    mis-shaped or corrupt (checksum) tensor.
    """
    path = Path(path)
    aliases = tied_aliases(model)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in aliases}
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    try:
        with h5py.File(path, "r") as f:
            stored = {f"{g}/{k}" for g in ("params", "buffers") if g in f for k in f[g].keys()}
            for name, ref in expected.items():
                key = f"{'params' if name in params else 'buffers'}/{name}"
                if key not in stored:
                    raise CheckpointError(f"{path}: tensor '{name}' of the model is missing "
                                          f"from the file; was it saved from another model?")
                stored.discard(key)
                ds = f[key]
                # a lazy layer's tensor (nn.LazyLinear) takes the stored shape as it loads
                if not nn.parameter.is_lazy(ref) and tuple(ds.shape) != tuple(ref.shape):
                    raise CheckpointError(f"{path}: tensor '{name}' has shape {tuple(ds.shape)} "
                                          f"but the model expects {tuple(ref.shape)}; check "
                                          f"model_kwargs")
                try:
                    arr = ds[()]
                except (OSError, RuntimeError) as e:
                    raise CheckpointError(f"{path}: tensor '{name}' is corrupt ({e}); "
                                          f"re-save this checkpoint") from e
                tensor = torch.as_tensor(np.asarray(arr))
                out[name] = tensor.to(ref.dtype) if cast else tensor
            if stored:
                extra = sorted(k.split("/", 1)[1] for k in stored)
                raise CheckpointError(f"{path}: tensor(s) {', '.join(extra[:5])} are not in "
                                      f"the model; was it saved from another model?")
    except (OSError, RuntimeError, KeyError) as e:   # every name was checked: a KeyError is damage
        raise lock_refused(path, e) or CheckpointError(f"{path}: not a readable HDF5 file ({e})") from e
    out.update({alias: out[name] for alias, name in aliases.items()})
    return out


def trained_code(model: nn.Module, factory: Callable[..., Any], loss_fn: Callable) -> dict:
    """What a checkpoint records of the code that made it: the model's and the loss's
    :func:`~gradscore.imports.code_fingerprint`, without gradscore's version and its own
    losses (a new gradscore scores the same model)."""
    code = without_version(code_fingerprint(model, factory, loss_fn))
    if getattr(loss_fn, "__module__", "").split(".")[0] == "gradscore":
        code.pop("loss", None)
    return code


def without_version(code: dict) -> dict:
    """A code fingerprint without gradscore's version: the user's code alone."""
    return {k: v for k, v in code.items() if k != "gradscore"}


def finer_dtype(state: dict[str, torch.Tensor], model: nn.Module) -> torch.dtype | None:
    """The float dtype to hold ``state`` in ``model`` unrounded, where loading would round
    one of its tensors (float32 weights into a model built in bfloat16, by a config's
    "dtype"): the finest such tensor's. None where loading rounds nothing."""
    own = model.state_dict()
    finer = [t.dtype for name, t in state.items() if name in own and t.is_floating_point()
             and own[name].is_floating_point() and torch.finfo(t.dtype).eps < torch.finfo(own[name].dtype).eps
             and not torch.equal(t.to(own[name].dtype).to(t.dtype), t)]
    return min(finer, key=lambda d: torch.finfo(d).eps, default=None)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes; remembered per (path, size, mtime), so a run that
    fingerprints the same checkpoints and data twice (scores, then co-states) reads them once."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            h.update(chunk)
    return h.hexdigest()


class CheckpointStore:
    """The checkpoints θ_0 … θ_{T-1} of one directory, sorted by step.

    ``len(store)``, ``store[i] -> CheckpointInfo``, iteration, :meth:`load_into` and
    :meth:`build_model`. Files whose names do not match ``step_<n>.h5`` are ignored.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = as_path(directory, "directory")
        if self.directory.is_file():
            raise CheckpointError(f"{self.directory}: is a file, not a checkpoint directory; give the folder of "
                                  f"step_<n>.h5 files")
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: checkpoint directory does not exist")
        files = checkpoint_files(self.directory)
        if not files:
            other = next((p for p in sorted([*self.directory.glob("*"), *self.directory.glob("*/*")])
                          if p.suffix in SUFFIXES and p.is_file()), None)
            if other is not None:
                raise CheckpointError(f"{self.directory}: no checkpoint files (step_<n>.h5) found; it holds "
                                      f"checkpoints of another format ({other.relative_to(self.directory)}): "
                                      f"convert them with gradscore import-checkpoints {self.directory} --model "
                                      f"MODULE:FN --lr LR --out DIR")
            raise CheckpointError(f"{self.directory}: no checkpoint files (step_<n>.h5) found; "
                                  f"save them with gradscore.CheckpointWriter")
        infos = [read_info(p) for p in files.values()]
        for named, info in zip(files, infos):
            if named != info.step:
                raise CheckpointError(f"{info.path}: the file name says step {named} but its 'step' "
                                      f"attribute is {info.step}; rename or re-save it")
        self.infos: list[CheckpointInfo] = infos   # in step order: the names' steps, checked equal
        self._code_said = False   # whether :meth:`code` compared the code with the checkpoints' own
        self._check_one_run()
        for prev, cur in zip(self.infos, self.infos[1:]):
            if cur.epoch < prev.epoch:
                raise CheckpointError(f"{cur.path}: epoch {cur.epoch:g} is before epoch {prev.epoch:g} "
                                      f"of the earlier step {prev.step}; steps and epochs must increase together")

    def _check_one_run(self) -> None:
        """Every checkpoint has the first one's model factory, keyword arguments, loss and
        parameter names and shapes, and one run id (where they record one): a folder holds
        one training run."""
        first = self.infos[0]
        shapes = _param_shapes(first.path)
        for info in self.infos[1:]:
            for field in ("model", "model_kwargs", "loss"):
                a, b = getattr(first, field), getattr(info, field)
                if a != b:
                    raise CheckpointError(f"{info.path}: its {field} {b!r} differs from {a!r} of the first "
                                          f"checkpoint {first.path.name}; a checkpoint folder must hold one "
                                          f"training run")
            other = _param_shapes(info.path)
            if other != shapes:
                name = next(k for k in sorted(set(shapes) | set(other)) if shapes.get(k) != other.get(k))
                raise CheckpointError(f"{info.path}: parameter '{name}' has shape {other.get(name)} but "
                                      f"{shapes.get(name)} in the first checkpoint {first.path.name}; a "
                                      f"checkpoint folder must hold one training run")
        runs: dict[str, list[CheckpointInfo]] = {}
        for info in self.infos:
            if info.run:
                runs.setdefault(info.run, []).append(info)
        if len(runs) > 1:   # the same model and shapes, from two runs (two jobs of a sweep, say)
            a, b, *_ = sorted(runs.values(), key=lambda infos: infos[0].step)
            raise CheckpointError(f"{b[0].path}: is of another training run than {a[0].path.name} (steps "
                                  f"{_steps([i.step for i in a])} of one, {_steps([i.step for i in b])} of the "
                                  f"other), as when two jobs write into one folder at once or two runs' files are "
                                  f"copied together; a checkpoint folder must hold one training run: give each "
                                  f"run a folder of its own")

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, i: int) -> CheckpointInfo:
        return self.infos[i]

    def __iter__(self) -> Iterator[CheckpointInfo]:
        return iter(self.infos)

    @property
    def loss(self) -> str:
        """The loss named by the checkpoints (they must agree)."""
        losses = {i.loss for i in self.infos}
        if len(losses) != 1:
            raise CheckpointError(f"{self.directory}: checkpoints name different losses {losses}")
        return losses.pop()

    def load_into(self, model: nn.Module, i: int) -> nn.Module:
        """Load checkpoint ``i``'s tensors into ``model`` (in place) and return it."""
        model.load_state_dict(load_state_dict(self.infos[i].path, model))
        return model

    def build_model(self, i: int, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
        """Build the model from the checkpoint's factory, load θ_i, put it in eval mode: in
        ``dtype``, else the factory's, or the checkpoint's where that would round θ_i."""
        model = self.new_model(i)
        if dtype is not None:  # cast first, so float64 checkpoints load without rounding
            model = model.to(dtype)
        state = load_state_dict(self.infos[i].path, model, cast=dtype is not None)
        finer = finer_dtype(state, model) if dtype is None else None
        model = model.to(finer) if finer is not None else model
        model.load_state_dict(state)
        return model.to(device).eval()

    def new_model(self, i: int = 0) -> nn.Module:
        """The model checkpoint ``i``'s factory builds, with its own initial weights."""
        info = self.infos[i]
        return build_model(self.factory(i), info.model_kwargs, info.model, f"{info.path}: ")

    def factory(self, i: int = 0) -> Any:
        """Checkpoint ``i``'s model factory (the function its ``model`` attribute names)."""
        info = self.infos[i]
        if not info.model:
            raise CheckpointError(f"{info.path}: no 'model' factory attribute; save with "
                                  f"CheckpointWriter(model_factory='package.module:fn')")
        return import_ref(info.model, f"{info.path}: model factory", CheckpointError, info.model_root)

    def code(self, loss_fn: Any, model: nn.Module | None = None) -> dict[str, str]:
        """:func:`~gradscore.imports.code_fingerprint` of these checkpoints' model (``model``,
        one built already, else :meth:`model_skeleton`), its factory and ``loss_fn``."""
        code = code_fingerprint(self.model_skeleton() if model is None else model, self.factory(), loss_fn)
        if not self._code_said:   # once per store: run, co-states and sketches each ask
            self._code_said, changed = True, {}
            for info in self.infos:
                then = json.loads(info.model_code) if info.model_code else None
                now = {k: code.get(k) for k in then or ()}   # what the checkpoint recorded, as it is now
                if then is not None and then != now:
                    changed.setdefault(code_parts(then, now), []).append(info.step)
            for what, steps in changed.items():
                warn(f"{self.directory}: {what} changed since the checkpoints were written (at steps "
                     f"{_steps(steps)}): the factory rebuilds the model with the code as it is now, so every score "
                     f"is of a model that was not trained; restore that code")
        return code

    def model_skeleton(self) -> nn.Module:
        """The model's structure, for what its classes are (no weights): built on the meta
        device, which allocates nothing (a GPT-2-small in a fraction of a second, not
        seconds); a factory that cannot build there (one that reads a file) is built as usual."""
        factory = self.factory()
        try:
            with torch.device("meta"):
                built = factory(**self.infos[0].model_kwargs)
        except Exception:  # noqa: BLE001 - any failure on the meta device: the ordinary build says what is wrong
            built = None
        return built if isinstance(built, nn.Module) else self.new_model()

    def checksums(self) -> list[str]:
        """SHA-256 of every checkpoint file, in step order."""
        return [file_sha256(i.path) for i in self.infos]
