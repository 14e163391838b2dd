"""Scores for finding mislabeled examples.

- ``aum``, the area under the margin (Pleiss et al. 2020): the mean over the selected
  checkpoints of margin_t = f(x_n; θ_t)[y_n] − max_{c ≠ y_n} f(x_n; θ_t)[c], on logits.
  Units: logit differences. **Low = suspicious**: an example whose given label keeps losing
  to another class has a negative AUM. The paper averages over training epochs, as
  here over checkpoints; ``epochs_upto`` restricts it to the early ones.
- ``mislabel``: minus the mean, over every window end t, of the running AUM (the AUM over
  checkpoints 0..t). **High = suspicious**; units: logit differences. Networks fit the clean
  labels first and memorize the wrong ones later (the early-learning phenomenon behind
  early-window EL2N, AUM and DivideMix's warm-up), so an early window separates the two
  populations best; but where memorization starts depends on the noise and the run, and
  no rule read from the run alone picked it well on every noise kind (docs/experiments.md).
  Averaging over all window ends needs no choice: it is one weighted mean of the margins,
  w_j = (1/T) Σ_{t ≥ j} 1/(t + 1), which decreases with j (early checkpoints, in every
  window, weigh most; the last weighs 1/T²) and sums to 1 (:func:`window_weights`).
"""
from __future__ import annotations

import numpy as np


def aggregate(per_checkpoint: dict[str, np.ndarray], select: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) float64 ``aum`` and ``mislabel`` from (T, N) per-checkpoint ``margin``, on the
    selected checkpoints (``select`` (T,) bool); {} without margins."""
    if "margin" not in per_checkpoint:
        return {}
    margin = per_checkpoint["margin"][()][np.flatnonzero(select)].astype(np.float64)
    running = np.cumsum(margin, 0) / np.arange(1, len(margin) + 1)[:, None]
    return {"aum": margin.mean(0), "mislabel": -running.mean(0)}


def window_weights(T: int) -> np.ndarray:
    """(T,) float64 weights of the checkpoints in ``mislabel``: the mean over window ends t of
    the running mean over checkpoints ≤ t, as one weighted mean (decreasing, sum 1)."""
    return np.cumsum((1.0 / np.arange(1, T + 1))[::-1])[::-1] / T
