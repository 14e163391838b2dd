"""Scores for finding mislabeled examples.

- ``aum``, the area under the margin (Pleiss et al. 2020): the mean over the selected
  checkpoints of margin_t = f(x_n; θ_t)[y_n] − max_{c ≠ y_n} f(x_n; θ_t)[c], on logits.
  Units: logit differences. **Low = suspicious**: an example whose given label keeps losing
  to another class has a negative AUM. The paper averages over training epochs, as
  here over checkpoints; ``epochs_upto`` restricts it to the early ones.
"""
from __future__ import annotations

import numpy as np


def aggregate(per_checkpoint: dict[str, np.ndarray], select: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) float64 ``aum`` from (T, N) per-checkpoint ``margin``; ``select`` (T,) bool."""
    if "margin" not in per_checkpoint:
        return {}
    return {"aum": per_checkpoint["margin"][select].astype(np.float64).mean(0)}
