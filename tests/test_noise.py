"""The noise experiment: each generator's exact counts, kind and determinism; the tiny run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gradscore.cli import main
from gradscore.demos.experiments.common import digits_splits
from gradscore.demos.experiments.noise import make_noise


@pytest.mark.parametrize("kind, rate", [("symmetric", 0.2), ("pair", 0.3), ("instance", 0.2)])
def test_noise_generators_flip_exactly_their_share_to_a_wrong_class(kind, rate):
    d = digits_splits()
    x, y = d["x_train"], d["y_train"]
    y_noisy, noisy = make_noise(kind, x, y, rate)
    assert noisy.sum() == round(rate * len(y)) and (y_noisy[noisy] != y[noisy]).all()
    assert (y_noisy[~noisy] == y[~noisy]).all()
    again = make_noise(kind, x, y, rate)
    assert np.array_equal(again[0], y_noisy) and np.array_equal(again[1], noisy)
    if kind == "pair":
        assert (y_noisy[noisy] == (y[noisy] + 1) % 10).all()
    if kind == "symmetric":
        assert len(np.unique((y_noisy[noisy] - y[noisy]) % 10)) == 9   # spread over every wrong class
    with pytest.raises(ValueError, match="unknown noise kind"):
        make_noise("random", x, y, rate)


def test_instance_noise_flips_the_confusable_examples():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    d = digits_splits()
    x, y = d["x_train"], d["y_train"]
    _, noisy = make_noise("instance", x, y, 0.2)
    probs = cross_val_predict(LogisticRegression(max_iter=2000), x.reshape(len(x), -1), y, cv=5, method="predict_proba")
    given = probs[np.arange(len(y)), y]
    assert given[noisy].mean() < given[~noisy].mean() - 0.2


def test_noise_experiment_tiny(tmp_path, capsys):
    assert main(["experiment", "noise", "--mode", "tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "noise.json").read_text())
    assert [r["kind"] for r in res["rows"]] == ["symmetric", "pair", "instance"]
    for row in res["rows"]:
        assert {"mislabel", "aum", "el2n", "knn", "el2n_early"} <= set(row["detection"])
        assert "gradscore flag (mislabel)" in row["counts"] and "all data" in row["test_accuracy"]
        assert isinstance(row["counts"]["gradscore flag (mislabel)"]["rough"], bool)
    assert (tmp_path / "noise.md").exists() and (tmp_path / "noise.png").exists()
