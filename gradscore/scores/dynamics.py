"""Training-dynamics scores: Dataset Cartography (Swayamdipta et al. 2020) and forgetting
events (Toneva et al. 2019), from the per-checkpoint p_gold and correct of a run.

Over the selected checkpoints t = 1..T (in step order), per example n:
- ``confidence`` = mean_t p_t(y_n), the probability of the gold label;
- ``variability`` = std_t p_t(y_n), population std (ddof 0, as the cartography code);
- ``correctness`` = fraction of checkpoints where argmax = y_n;
- ``forgetting`` = number of correct → incorrect transitions between consecutive
  checkpoints; an example never predicted correctly gets T, more than any real count
  (Toneva et al. rank never-learned examples as the most forgotten);
- ``threshold_closeness`` = confidence·(1 − confidence).
Regions of the data map: easy-to-learn = highest confidence, hard-to-learn = lowest
confidence, ambiguous = highest variability.
"""
from __future__ import annotations

import numpy as np

NAMES = ("confidence", "variability", "correctness", "forgetting", "threshold_closeness")


def aggregate(per_checkpoint: dict[str, np.ndarray], select: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) float64 dynamics scores from (T, N) ``p_gold`` and ``correct``; ``select`` (T,) bool."""
    if "p_gold" not in per_checkpoint or "correct" not in per_checkpoint:
        return {}
    p = per_checkpoint["p_gold"][select].astype(np.float64)
    c = per_checkpoint["correct"][select].astype(bool)
    confidence = p.mean(0)
    forgetting = (c[:-1] & ~c[1:]).sum(0).astype(np.float64)
    forgetting[~c.any(0)] = c.shape[0]
    return {"confidence": confidence, "variability": p.std(0), "correctness": c.mean(0),
            "forgetting": forgetting, "threshold_closeness": confidence * (1 - confidence)}
