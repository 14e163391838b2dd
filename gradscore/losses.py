"""Per-example losses and how to read a model's output as class probabilities.

A loss maps ``(output (B, ...), target (B, ...)) -> (B,)`` per-example losses. Built-ins:

- ``cross_entropy``: output = logits (B, C), target = class index (B,) int.
- ``nll``: output = log-probabilities (B, C), target = class index (B,) int.
- ``mse``: ``sum((output - target)**2)`` over non-batch dims (regression; no class metrics).
- ``"module:fn"``: any callable with the signature above; classification metrics are
  computed from ``softmax(output)`` when the output is (B, C) and targets are integers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .exceptions import EngineError
from .imports import import_ref

PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Loss:
    """A per-example loss with the knowledge of what its model output means.

    ``fn(output, target) -> (B,)``; ``probs(output) -> (B, C)`` or None for regression.
    """

    name: str
    fn: PerExampleLoss
    output: str  # "logits", "log_probs" or "regression"

    @property
    def is_classification(self) -> bool:
        return self.output != "regression"

    def probs(self, output: torch.Tensor) -> torch.Tensor | None:
        """Class probabilities (B, C) from the model output, None for regression losses."""
        if self.output == "logits":
            return torch.softmax(output, dim=-1)
        if self.output == "log_probs":
            return output.exp()
        return None


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(out, y, reduction="none")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y.to(out.dtype)).pow(2).reshape(out.shape[0], -1).sum(1)


_BUILTIN = {
    "cross_entropy": Loss("cross_entropy", _cross_entropy, "logits"),
    "nll": Loss("nll", _nll, "log_probs"),
    "mse": Loss("mse", _mse, "regression"),
}


def resolve_loss(loss: str | Loss | PerExampleLoss) -> Loss:
    """Turn a loss name, ``"module:fn"`` reference, callable or :class:`Loss` into a Loss."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss in _BUILTIN:
            return _BUILTIN[loss]
        if ":" in loss:
            return Loss(loss, import_ref(loss, "loss", EngineError), "logits")
        raise EngineError(f"unknown loss '{loss}'; use one of {', '.join(_BUILTIN)} "
                          f"or a 'module:fn' reference to a per-example loss")
    if callable(loss):
        return Loss(getattr(loss, "__name__", "custom"), loss, "logits")
    raise EngineError(f"loss must be a name, 'module:fn' or a callable, got {type(loss).__name__}")
