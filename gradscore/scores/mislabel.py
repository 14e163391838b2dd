"""Scores for finding mislabeled examples.

- ``aum``, the area under the margin (Pleiss et al. 2020): the mean over the selected
  checkpoints of margin_t = f(x_n; θ_t)[y_n] − max_{c ≠ y_n} f(x_n; θ_t)[c], on logits.
  Units: logit differences. **Low = suspicious**: an example whose given label keeps losing
  to another class has a negative AUM. The paper averages over training epochs, as
  here over checkpoints; ``epochs_upto`` restricts it to the early ones.
- ``mislabel``, a ranking that needs no choice of window from the user. **High =
  suspicious**, in [0, 1]. Networks fit the clean labels first and memorize the wrong ones
  later (the early-learning phenomenon behind early-window EL2N, AUM and DivideMix's
  warm-up), so the window is taken from the run itself: the checkpoints up to the
  *memorization onset*, the knee of the training accuracy on the given labels over the
  selected checkpoints (the checkpoint farthest above the chord from the first accuracy
  to the last, the "kneedle" rule; all of them when the curve has no knee). Over that
  window, ``mislabel`` is the mean of the percentile ranks of −AUM and of EL2N, two
  views that agree on symmetric noise and differ on confusable pairs (the margin sees the
  competing class, EL2N the whole probability vector).
"""
from __future__ import annotations

import numpy as np


def aggregate(per_checkpoint: dict[str, np.ndarray], select: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) float64 ``aum`` from (T, N) per-checkpoint ``margin``; ``select`` (T,) bool."""
    if "margin" not in per_checkpoint:
        return {}
    return {"aum": per_checkpoint["margin"][select].astype(np.float64).mean(0)}


def memorization_onset(accuracy: np.ndarray) -> int:
    """Index of the last checkpoint before memorization: the knee of the (T,) training
    accuracy curve, the point farthest above the chord from its first value to its last
    (T − 1 when no point is above it, e.g. a straight or concave-up curve)."""
    T = len(accuracy)
    if T < 3:
        return T - 1
    chord = accuracy[0] + (accuracy[-1] - accuracy[0]) * np.arange(T) / (T - 1)
    above = accuracy - chord
    return int(np.argmax(above)) if above.max() > 0 else T - 1


def _percentile_rank(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties share their mean rank)."""
    from scipy.stats import rankdata
    return (rankdata(x) - 1) / max(1, len(x) - 1)


def mislabel(per_checkpoint: dict[str, np.ndarray], select: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) ``mislabel`` (see the module docstring) and the window it used, from (T, N)
    ``correct``, ``margin`` and ``el2n`` over every example; {} without them."""
    if not {"correct", "margin", "el2n"} <= set(per_checkpoint):
        return {}
    rows = np.flatnonzero(select)
    accuracy = per_checkpoint["correct"][rows].astype(np.float64).mean(1)
    window = rows[:memorization_onset(accuracy) + 1]
    aum = per_checkpoint["margin"][window].astype(np.float64).mean(0)
    el2n = per_checkpoint["el2n"][window].astype(np.float64).mean(0)
    return {"mislabel": (_percentile_rank(-aum) + _percentile_rank(el2n)) / 2}
