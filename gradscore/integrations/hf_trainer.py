"""Hugging Face ``Trainer``: callbacks that record gradscore checkpoints, or in-run scores
(:class:`GradscoreInRunCallback`), while training.

>>> cb = GradscoreCallback.for_model("ckpts/", model, task="causal_lm", every_n_steps=100)  # doctest: +SKIP
>>> Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()              # doctest: +SKIP

θ_step is saved at the beginning of optimizer step ``state.global_step`` with the
learning rate that step uses (the scheduler steps after the optimizer), every
``every_n_steps`` steps, and once more at the end. :meth:`GradscoreCallback.for_model`
stores the model's config, so ``gradscore.integrations.hf:from_config`` rebuilds it.
"""
from __future__ import annotations

import json
from typing import Any

from transformers import TrainerCallback

from ..inrun.recorder import checked_recorder, step_lr
from ..io.checkpoints import CheckpointWriter, checkpoint_filename
from ..losses import TOKEN_LOSSES, check_head, resolve_loss

FACTORY = "gradscore.integrations.hf:from_config"


class GradscoreCallback(TrainerCallback):
    """Save gradscore checkpoints every ``every_n_steps`` optimizer steps (and at the end).
    ``overwrite``: replace an earlier run's checkpoints in ``directory`` from this run's
    first step on (:class:`~gradscore.io.checkpoints.CheckpointWriter`); a run resumed
    from a Trainer checkpoint starts at its step, so it needs it where the stopped run
    saved that step or later."""

    def __init__(self, directory: str, *, model_factory: str, model_kwargs: dict | None = None,
                 loss: str = "causal_lm", every_n_steps: int = 1, overwrite: bool = False) -> None:
        self.writer = CheckpointWriter(directory, model_factory=model_factory, model_kwargs=model_kwargs,
                                       loss=loss, optimizer="transformers.Trainer", overwrite=overwrite)
        self.record = self.writer.every(every_n_steps)

    @classmethod
    def for_model(cls, directory: str, model: Any, *, task: str = "causal_lm", loss: str | None = None,
                  every_n_steps: int = 1, attn_implementation: str | None = None,
                  overwrite: bool = False) -> "GradscoreCallback":
        """A callback whose checkpoints rebuild ``model`` from its config (no weights download).
        ``loss``: default the task's token loss (``causal_lm``, ``masked_lm``), else
        ``cross_entropy``; one that does not score what the model's head predicts is refused."""
        kwargs: dict[str, Any] = {"config": json.loads(model.config.to_json_string(use_diff=False)), "task": task}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        loss = loss or (task if task in TOKEN_LOSSES else "cross_entropy")
        check_head(model, resolve_loss(loss))   # now, not when the checkpoints are scored
        return cls(directory, model_factory=FACTORY, model_kwargs=kwargs, loss=loss,
                   every_n_steps=every_n_steps, overwrite=overwrite)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.record(model, step=int(state.global_step), lr=step_lr(optimizer), epoch=float(state.epoch or 0.0))

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        name = checkpoint_filename(state.global_step)
        if not self.writer.saved or self.writer.saved[-1].name != name:
            self.writer.save(model, step=int(state.global_step), lr=step_lr(optimizer),
                             epoch=float(state.epoch or 0.0))


class GradscoreInRunCallback(TrainerCallback):
    """Record in-run scores (:class:`gradscore.InRun`) of every training step of a ``Trainer``,
    from the step's own backward, with no change to the Trainer (or a subclass of it).

    >>> rec = gs.InRun(model, loss="causal_lm", out="inrun.h5", targets=(val_inputs, val_labels))  # doctest: +SKIP
    >>> args = TrainingArguments(..., remove_unused_columns=False)                                 # doctest: +SKIP
    >>> Trainer(model=model, args=args, train_dataset=ds, callbacks=[GradscoreInRunCallback(rec)]).train()  # doctest: +SKIP

    The training examples carry their id in a column ``ids_key`` (kept with
    ``remove_unused_columns=False``; the recorder removes it before the model sees it) and
    their targets in ``labels_key``. Each micro-batch of gradient accumulation is one
    recorded step at the optimizer step's number and learning rate. Under ``bf16=True`` or
    ``fp16=True`` the recorder reads the half-precision logits the model's loss used (not
    the float32 copies Accelerate returns); under ``fp16=True`` it is given the Trainer's
    loss scaler, under DDP its world size, and with ``gs.InRun(..., optimizer="adam")`` the
    Trainer's AdamW. The file is written when training ends.
    """

    def __init__(self, recorder: Any, *, ids_key: str = "ids", labels_key: str = "labels") -> None:
        self.recorder, self.keys = checked_recorder(recorder), {"ids_key": ids_key, "labels_key": labels_key}

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        # Accelerate's optimizer wraps the torch one and holds fp16's GradScaler
        self.recorder.from_trainer(
            scaler=getattr(optimizer, "scaler", None), optimizer=getattr(optimizer, "optimizer", optimizer),
            world_size=args.world_size,
            clipping=f"TrainingArguments(max_grad_norm={args.max_grad_norm})" if args.max_grad_norm else None)
        self.recorder.attach(**self.keys)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.recorder.set_step(int(state.global_step), step_lr(optimizer))

    def on_substep_end(self, args, state, control, **kwargs):
        self.recorder.end_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.recorder.end_step()

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.close()
