"""PyTorch Lightning: callbacks that record gradscore checkpoints, or in-run scores
(:class:`GradscoreInRun`), while training.

>>> trainer = L.Trainer(callbacks=[GradscoreCheckpoint("ckpts/", model_factory="pkg:make_net",
...                                                    model_kwargs={}, every_n_steps=100,
...                                                    attr="net")])          # doctest: +SKIP

θ_step is saved before the optimizer step ``step`` (``trainer.global_step``) with the
learning rate that step uses, every ``every_n_steps`` steps, and once more at the end.
``attr`` names the submodule to save (the network the factory rebuilds); default: the
LightningModule itself. Needs ``lightning`` (``pip install lightning``).
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback

from ..inrun.recorder import checked_recorder, step_lr
from ..io.checkpoints import CheckpointWriter, checkpoint_filename, optimizer_kind
from ..exceptions import ConfigError


class GradscoreCheckpoint(Callback):
    """Save gradscore checkpoints every ``every_n_steps`` optimizer steps (and at the end).
    ``overwrite``: replace an earlier run's checkpoints in ``directory`` from this run's
    first step on (:class:`~gradscore.io.checkpoints.CheckpointWriter`); a fit resumed
    from a Lightning checkpoint starts at its step, so it needs it where the stopped fit
    saved that step or later."""

    def __init__(self, directory: str, *, model_factory: str, model_kwargs: dict | None = None,
                 loss: str = "cross_entropy", every_n_steps: int = 1, attr: str | None = None,
                 overwrite: bool = False) -> None:
        self.writer = CheckpointWriter(directory, model_factory=model_factory, model_kwargs=model_kwargs,
                                       loss=loss, optimizer="lightning", overwrite=overwrite)
        self.record = self.writer.every(every_n_steps)
        self.attr = attr

    def _state(self, trainer: Any, pl_module: Any, batch_idx: int) -> dict[str, Any]:
        module = pl_module
        if self.attr:
            module = getattr(pl_module, self.attr, None)
            if not isinstance(module, torch.nn.Module):
                children = ", ".join(f"'{n}'" for n, _ in pl_module.named_children()) or "none"
                raise ConfigError(f"invalid value for 'attr': the LightningModule has no '{self.attr}'; give the "
                                  f"attribute that holds the network (its submodules: {children})")
        n_batches = trainer.num_training_batches or 1
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if optimizer is not None:   # what PDS and target_dot need to know: plain steps, or not (a warning)
            self.writer.optimizer = optimizer_kind(optimizer, clipped=bool(trainer.gradient_clip_val))
        return {"model": module, "step": int(trainer.global_step), "lr": step_lr(optimizer),
                "epoch": trainer.current_epoch + batch_idx / n_batches}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        state = self._state(trainer, pl_module, batch_idx)
        self.record(state.pop("model"), **state)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        state = self._state(trainer, pl_module, 0)
        state["epoch"] = float(trainer.current_epoch)
        if not self.writer.saved or self.writer.saved[-1].name != checkpoint_filename(state["step"]):
            self.writer.save(state.pop("model"), **state)


def _kind(obj: Any) -> str:
    """``obj``'s type, and its length where it is a tuple, list or dict: "a tuple of 3"."""
    return f"a {type(obj).__name__}" + (f" of {len(obj)}" if isinstance(obj, (tuple, list, dict)) else "")


class GradscoreInRun(Callback):
    """Record in-run scores (:class:`gradscore.InRun`) of every training step, from the
    step's own backward, with no change to the LightningModule.

    >>> rec = gs.InRun(module.net, out="inrun.h5", targets=(x_val, y_val))                 # doctest: +SKIP
    >>> L.Trainer(callbacks=[GradscoreInRun(rec, ids_and_targets=lambda b: (b[0], b[2]))])  # doctest: +SKIP

    ``ids_and_targets(batch)`` gives the batch's example ids (B,) and targets (B, ...)
    (default: a batch ``(ids, x, y)``). Each batch (each micro-batch under gradient
    accumulation) is one recorded step, from ``on_train_batch_start`` to
    ``on_after_backward``, at ``trainer.global_step`` and the first optimizer's learning
    rate; under ``precision="16-mixed"`` the recorder is given the loss scaler, under DDP
    the world size, and with ``gs.InRun(..., optimizer="adam")`` the first optimizer. The
    file is written when training ends.
    """

    def __init__(self, recorder: Any, *, ids_and_targets: Any = None) -> None:
        self.recorder = checked_recorder(recorder)
        if ids_and_targets is not None and not callable(ids_and_targets):
            raise ConfigError(f"invalid value for 'ids_and_targets': {ids_and_targets!r}; give a function of the "
                              f"batch that returns (ids, y), e.g. lambda batch: (batch['idx'], batch['y'])")
        self.ids_and_targets = ids_and_targets or (lambda batch: (batch[0], batch[-1]))
        self._step: Any = None

    def _pair(self, batch: Any) -> tuple[Any, Any]:
        """(ids, y) of ``batch`` from ``ids_and_targets``; one ConfigError where it fails or
        gives something else."""
        fix = "pass ids_and_targets=, a function of the batch that returns (ids, y)"
        try:
            pair = self.ids_and_targets(batch)
        except Exception as e:  # noqa: BLE001 - the user's function (or the default) on the user's batch
            raise ConfigError(f"invalid value for 'ids_and_targets': it failed on the batch ({_kind(batch)}): "
                              f"{type(e).__name__}: {e}; {fix}") from e
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ConfigError(f"invalid value for 'ids_and_targets': on the batch ({_kind(batch)}) it returned "
                              f"{_kind(pair)}; it must return the pair (ids, y); {fix}")
        return pair[0], pair[1]

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        clip = trainer.gradient_clip_val
        self.recorder.from_trainer(   # "16-mixed": the precision plugin holds the GradScaler
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            optimizer=trainer.optimizers[0] if trainer.optimizers else None, world_size=trainer.world_size,
            clipping=f"Trainer(gradient_clip_val={clip})" if clip else None)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        ids, y = self._pair(batch)
        self._step = self.recorder.step(ids, y, lr=step_lr(trainer.optimizers[0]), step=int(trainer.global_step))
        self._step.__enter__()

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        step, self._step = self._step, None
        if step is not None:
            step.__exit__(None, None, None)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        step, self._step = self._step, None
        if step is not None:
            step.__exit__(type(exception), exception, None)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.recorder.close()
