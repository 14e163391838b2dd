"""Training-dynamics scores against hand-computed values."""
from __future__ import annotations

import numpy as np

from gradscore.scores import dynamics


def test_dynamics_hand_computed():
    p_gold = np.array([[0.9, 0.2, 0.1, 0.6],
                       [0.8, 0.7, 0.2, 0.4],
                       [0.7, 0.3, 0.3, 0.8],
                       [0.9, 0.6, 0.1, 0.3]])
    correct = np.array([[1, 0, 0, 1],
                        [1, 1, 0, 0],
                        [1, 0, 0, 1],
                        [1, 1, 0, 0]], dtype=np.int8)
    out = dynamics.aggregate({"p_gold": p_gold, "correct": correct}, np.ones(4, bool))
    np.testing.assert_allclose(out["confidence"], [0.825, 0.45, 0.175, 0.525])
    np.testing.assert_allclose(out["variability"], np.std(p_gold, axis=0))  # population std
    np.testing.assert_allclose(out["variability"][0], np.sqrt(((p_gold[:, 0] - 0.825) ** 2).mean()))
    np.testing.assert_allclose(out["correctness"], [1.0, 0.5, 0.0, 0.5])
    # always correct: 0; 0->1->0->1: one forgetting; never learned: T = 4; 1->0->1->0: two
    np.testing.assert_array_equal(out["forgetting"], [0, 1, 4, 2])
    np.testing.assert_allclose(out["threshold_closeness"], out["confidence"] * (1 - out["confidence"]))
    early = dynamics.aggregate({"p_gold": p_gold, "correct": correct}, np.array([1, 1, 0, 0], bool))
    np.testing.assert_allclose(early["confidence"], [0.85, 0.45, 0.15, 0.5])
    assert dynamics.aggregate({"loss": p_gold}, np.ones(4, bool)) == {}
