"""Variants of the embedded digits built in code, for the out-of-distribution and
spurious-feature experiments.

- :func:`shift`: every test image rotated by 10° (bilinear, about the centre, same
  size), then blurred with a Gaussian of σ = 0.5 pixel (scipy.ndimage, zero outside the
  image), clipped to [0, 1]. Deterministic. A CNN trained on all of digits keeps about
  86% accuracy on it, against 98% in distribution: shifted, not destroyed.
- :func:`spurious`: the binary task "digit ≥ 5", with a bright 2×2 patch (value 1.0) in
  the top-left corner that agrees with the label on exactly ``agree`` of the images
  (patch present ⇔ label 1 there, absent ⇔ label 1 on the rest): 95% of training and
  50% of test images by default. Groups = (label, patch), 4 of them; the minority
  groups are where the patch disagrees with the label.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

ANGLE, SIGMA = 10.0, 0.5


def shift(x: np.ndarray) -> np.ndarray:
    """(N, 1, 8, 8) images rotated, shifted and blurred as documented above."""
    out = np.empty_like(x)
    for i, img in enumerate(x[:, 0]):
        r = ndimage.rotate(img, ANGLE, reshape=False, order=1, mode="constant", cval=0.0)
        out[i, 0] = np.clip(ndimage.gaussian_filter(r, SIGMA, mode="constant"), 0.0, 1.0)
    return out


def spurious(x: np.ndarray, digits: np.ndarray, agree: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images with the patch, binary labels (N,), groups (N,) = 2·label + patch)."""
    y = (digits >= 5).astype(np.int64)
    rng = np.random.default_rng(seed)
    disagree = np.zeros(len(y), dtype=bool)
    disagree[rng.choice(len(y), size=len(y) - int(round(agree * len(y))), replace=False)] = True
    patch = np.where(disagree, 1 - y, y).astype(bool)
    x = x.copy()
    x[patch, 0, :2, :2] = 1.0
    return x, y, 2 * y + patch.astype(np.int64)
