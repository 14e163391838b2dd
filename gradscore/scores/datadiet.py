"""Data Diet scores (Paul, Ganguli & Dziugaite 2021).

Per checkpoint t and example n:
- ``el2n_t = ‖softmax(f(x_n; θ_t)) − onehot(y_n)‖₂`` (for ``mse``: ``‖f(x_n) − y_n‖₂``);
- ``sq_grad_norm_t = ‖∇_θ ℓ(x_n, y_n; θ_t)‖₂²``.
Aggregated over the chosen checkpoints (default all; ``epochs_upto`` keeps the early
ones, as the paper scores at an early epoch):
- ``el2n = mean_t el2n_t``; ``grand = mean_t sqrt(sq_grad_norm_t)``; ``loss = mean_t loss_t``.
Larger = harder / more important (and, for noisy labels, more likely mislabeled). Units:
EL2N is a probability-space distance in [0, √2]; GraNd is in loss units per parameter unit.
"""
from __future__ import annotations

import numpy as np
import torch

from ..losses import Loss, target_like


def classification_metrics(loss: Loss, logits: torch.Tensor, y: torch.Tensor,
                           probs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-example ``el2n``, ``p_gold``, ``correct`` and ``margin`` (B,) from the model output:
    the margin is the given label's output minus the largest other one (logits, or
    log-probabilities, which give the same margins). ``probs``: the output's class
    probabilities (B, C) where the caller has them already (default: ``loss.probs``).

    For regression losses only ``el2n`` (the error norm, where the target has the output's
    shape) is returned, and for ``cross_entropy`` against class probabilities (soft labels)
    only ``el2n`` of the probabilities. None of them for language modelling (token
    outputs), nor where their meaning is not known: a user's loss function on float
    targets or on one output, per-pixel labels.
    """
    if loss.output == "tokens":
        return {}
    if loss.is_cross_entropy and y.dtype.is_floating_point and y.shape == logits.shape and logits.dim() == 2:
        # class probabilities as targets (soft labels): the error of the probabilities, no single label
        return {"el2n": torch.linalg.vector_norm(loss.probs(logits) - y.to(logits.dtype), dim=1)}
    if probs is None and logits.dim() == 2 and not y.dtype.is_floating_point:
        if logits.shape[1] < 2:   # one output (a user's binary loss on one logit): no classes for a softmax
            return {}
        probs = loss.probs(logits)
    if probs is None:
        target = target_like(logits, y) if loss.output == "regression" else None
        if target is None:   # a user's loss on float targets (regression? soft labels?), per-pixel labels
            return {}
        err = (logits - target.to(logits.dtype)).reshape(logits.shape[0], -1)
        return {"el2n": err.norm(dim=1)}
    column = y[:, None].long()   # an index: uint8 labels, which the loss takes, too
    given = logits.gather(1, column)[:, 0]
    other = logits.scatter(1, column, -torch.inf).max(1).values
    p_gold = probs.gather(1, column)[:, 0]
    error = probs.scatter(1, column, (p_gold - 1)[:, None])   # probs − onehot(y)
    return {
        "el2n": torch.linalg.vector_norm(error, dim=1),
        "p_gold": p_gold,
        "correct": (logits.argmax(1) == y).to(torch.int8),
        "margin": given - other,
    }


def aggregate(per_checkpoint: dict[str, np.ndarray], select: np.ndarray) -> dict[str, np.ndarray]:
    """Aggregated Data Diet scores (N,) float64 from (T, N) per-checkpoint arrays.

    ``select``: (T,) bool, the checkpoints to average over.
    """
    out: dict[str, np.ndarray] = {}
    if "el2n" in per_checkpoint:
        out["el2n"] = per_checkpoint["el2n"][select].astype(np.float64).mean(0)
    if "sq_grad_norm" in per_checkpoint:
        out["grand"] = np.sqrt(per_checkpoint["sq_grad_norm"][select].astype(np.float64)).mean(0)
    if "loss" in per_checkpoint:
        out["loss"] = per_checkpoint["loss"][select].astype(np.float64).mean(0)
    return out
