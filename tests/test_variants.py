"""Dot-score decomposition and variants on hand-made inputs."""
from __future__ import annotations

import numpy as np

from gradscore.scores.pds import decompose, variants


def test_decomposition_reproduces_dots():
    rng = np.random.default_rng(0)
    dot, sq = rng.normal(size=(3, 5)), rng.uniform(0.5, 4, size=(3, 5))
    ref = np.array([2.0, 0.5, 1.0])
    g, cos = decompose(dot, sq, ref)
    np.testing.assert_allclose(g * ref[:, None] * cos, dot, rtol=1e-12)
    g0, cos0 = decompose(dot, sq, np.array([0.0, 0.5, 1.0]))
    assert (cos0[0] == 0).all()


def test_variants_hand_made():
    # two checkpoints, three examples; ‖v‖ = (1, 2); weights η = (1, 0.5)
    sq = np.array([[1.0, 4.0, 100.0], [1.0, 4.0, 100.0]])      # ‖g‖ = 1, 2, 10
    cos = np.array([[0.5, -0.5, 0.1], [0.5, -0.5, 0.1]])
    ref, w = np.array([1.0, 2.0]), np.array([1.0, 0.5])
    dot = np.sqrt(sq) * ref[:, None] * cos
    out = variants(dot, sq, ref, w, clip_quantile=0.5)
    np.testing.assert_allclose(out["cos"], 1.5 * cos[0])
    # the median of all ‖g‖ is 2: example 3's norm 10 is clipped to 2
    np.testing.assert_allclose(out["clip"], [1 * 0.5 * (1 + 0.5 * 2), 2 * -0.5 * (1 + 0.5 * 2), 2 * 0.1 * (1 + 0.5 * 2)])
    # dots at both t: ex1 0.5·‖v‖, ex2 −1·‖v‖, ex3 1.0·‖v‖ (norm 10 × cos 0.1: the inflation)
    np.testing.assert_allclose(out["rank"], [0.5, 0.0, 1.0])
    raw = (w[:, None] * dot).sum(0)
    logg = np.log([1.0, 2.0, 10.0])
    slope, intercept = np.polyfit(logg, raw, 1)
    np.testing.assert_allclose(out["resid"], raw - (slope * logg + intercept), atol=1e-12)
