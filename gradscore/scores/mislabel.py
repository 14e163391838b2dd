"""Scores for finding mislabeled examples.

- ``aum``, the area under the margin (Pleiss et al. 2020): the mean over the selected
  checkpoints of margin_t = f(x_n; θ_t)[y_n] − max_{c ≠ y_n} f(x_n; θ_t)[c], on logits.
  Units: logit differences. **Low = suspicious**: an example whose given label keeps losing
  to another class has a negative AUM. The paper averages over training epochs, as
  here over checkpoints; ``epochs_upto`` restricts it to the early ones.
- ``mislabel``: AUM over a window the run chooses, negated. **High = suspicious**; units:
  logit differences. Networks fit the clean labels first and memorize the wrong ones
  later (the early-learning phenomenon behind early-window EL2N, AUM and DivideMix's
  warm-up): once the clean majority is fit, the margins of the two populations part, and
  once the wrong labels are memorized they close again. So the window ends at the
  checkpoint t* where the AUM over checkpoints ≤ t* is most clearly two populations — the
  largest Ashman's D, |μ₁ − μ₂| · √2 / √(σ₁² + σ₂²), of a two-component Gaussian mixture
  fitted to it (on at most 20 000 examples, fixed seed) — among the checkpoints from the
  end of the fast clean fit on: the knee of the training accuracy on the given labels (the
  checkpoint farthest above the chord from its first value to its last). Before the knee,
  unlearned classes make two populations of their own. No window is asked of the user; on
  a run that never memorizes, t* is the last checkpoint, and ``mislabel`` is −AUM.
"""
from __future__ import annotations

import numpy as np


def aggregate(per_checkpoint: dict[str, np.ndarray], select: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) float64 ``aum`` from (T, N) per-checkpoint ``margin``; ``select`` (T,) bool."""
    if "margin" not in per_checkpoint:
        return {}
    return {"aum": per_checkpoint["margin"][select].astype(np.float64).mean(0)}


def clean_fit_end(accuracy: np.ndarray) -> int:
    """Index of the checkpoint that ends the fast fit of the clean majority: the knee of the
    (T,) training accuracy curve, the point farthest above the chord from its first value
    to its last (T − 1 when no point is above it, e.g. a straight or concave-up curve)."""
    T = len(accuracy)
    if T < 3:
        return T - 1
    chord = accuracy[0] + (accuracy[-1] - accuracy[0]) * np.arange(T) / (T - 1)
    above = accuracy - chord
    return int(np.argmax(above)) if above.max() > 0 else T - 1


def separation(values: np.ndarray, seed: int = 0) -> float:
    """Ashman's D of a two-component Gaussian mixture fitted to (N,) ``values``: how far
    apart two populations are, in units of their spread (above 2: clearly two)."""
    from sklearn.mixture import GaussianMixture
    x = values.reshape(-1, 1).astype(np.float64)
    if len(x) > 20_000:
        x = x[np.random.default_rng(seed).choice(len(x), 20_000, replace=False)]
    gm = GaussianMixture(2, random_state=seed, n_init=2).fit(x)
    (m1, m2), (v1, v2) = gm.means_[:, 0], gm.covariances_.reshape(2)
    return float(abs(m1 - m2) * np.sqrt(2) / np.sqrt(v1 + v2 + 1e-12))


def window_end(margin: np.ndarray, correct: np.ndarray) -> int:
    """t*: the index of the last checkpoint of the window, the one from the
    :func:`clean_fit_end` of the training accuracy on whose cumulative AUM (mean margin over
    checkpoints ≤ t*) has the largest :func:`separation`. margin, correct: (T, N)."""
    first = clean_fit_end(correct.astype(np.float64).mean(1))
    cumulative = np.cumsum(margin.astype(np.float64), 0) / np.arange(1, len(margin) + 1)[:, None]
    return first + int(np.argmax([separation(c) for c in cumulative[first:]]))


def mislabel(per_checkpoint: dict[str, np.ndarray], select: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) ``mislabel`` (see the module docstring) from (T, N) ``margin`` and ``correct``
    over every example, on the selected checkpoints; {} without them."""
    if not {"margin", "correct"} <= set(per_checkpoint):
        return {}
    rows = np.flatnonzero(select)
    margin = per_checkpoint["margin"][()][rows]
    end = window_end(margin, per_checkpoint["correct"][()][rows])
    return {"mislabel": -margin[:end + 1].astype(np.float64).mean(0)}
