"""Margins and AUM (Pleiss et al. 2020): the margin per checkpoint is the given label's logit
minus the largest other logit; AUM is its mean over the checkpoints used; low = suspicious."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gradscore as gs
from gradscore.losses import resolve_loss
from gradscore.scores.datadiet import classification_metrics


def test_margin_is_the_given_logit_minus_the_largest_other():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 2.5], [1.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    m = classification_metrics(resolve_loss("cross_entropy"), logits, y)["margin"]
    assert m.tolist() == [1.0, -2.5, 0.0]
    # nll on log-probabilities: the same margins (log_softmax shifts every logit alike)
    m2 = classification_metrics(resolve_loss("nll"), torch.log_softmax(logits, 1), y)["margin"]
    torch.testing.assert_close(m2, m)
    assert "margin" not in classification_metrics(resolve_loss("mse"), logits, torch.zeros(3, 3))


def test_aum_is_the_mean_margin_over_the_checkpoints_used(tiny_run, tmp_path):
    ckpts, data = tiny_run
    res = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "s.h5", scores=["aum", "el2n"], progress=False))
    store, ds = gs.CheckpointStore(ckpts), gs.load_dataset(data)
    x, y = ds.read(0, len(ds))
    margins = []
    for t in range(len(store)):
        with torch.no_grad():
            z = store.build_model(t)(x)
        other = z.clone()
        other[torch.arange(len(y)), y] = -torch.inf
        margins.append((z[torch.arange(len(y)), y] - other.max(1).values).numpy())
    np.testing.assert_allclose(res["per_checkpoint"]["margin"], np.stack(margins), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["scores"]["aum"], np.stack(margins).astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    early = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "e.h5", scores=["aum"], epochs_upto=1, progress=False))
    np.testing.assert_allclose(early["scores"]["aum"], np.stack(margins[:2]).astype(np.float64).mean(0),
                               rtol=1e-5, atol=1e-6)



def test_memorization_onset_is_the_knee_of_the_training_accuracy():
    from gradscore.scores.mislabel import memorization_onset
    fast_then_slow = np.array([0.1, 0.6, 0.78, 0.8, 0.82, 0.86, 0.92, 1.0])   # clean fit, then memorization
    assert memorization_onset(fast_then_slow) == 2
    assert memorization_onset(np.linspace(0.1, 0.9, 6)) == 5                  # no knee: every checkpoint
    assert memorization_onset(np.array([0.1, 0.12, 0.2, 0.9])) == 3           # accelerating: every checkpoint
    assert memorization_onset(np.array([0.5, 0.9])) == 1


def test_mislabel_ranks_early_window_aum_and_el2n():
    from gradscore.scores.mislabel import mislabel
    rng = np.random.default_rng(0)
    T, N = 8, 200
    noisy = np.zeros(N, dtype=bool)
    noisy[:40] = True
    correct = np.zeros((T, N), dtype=np.int8)
    correct[2:, ~noisy] = 1                  # clean examples learned by checkpoint 2
    correct[6:, noisy] = 1                   # the noisy ones memorized from checkpoint 6 on
    margin = np.where(correct == 1, 2.0, -1.0) + rng.normal(0, 0.1, (T, N))
    el2n = np.where(correct == 1, 0.2, 1.2) + rng.normal(0, 0.01, (T, N))
    pc = {"correct": correct, "margin": margin.astype(np.float32), "el2n": el2n.astype(np.float32)}
    score = mislabel(pc, np.ones(T, dtype=bool))["mislabel"]
    assert score.min() >= 0 and score.max() <= 1
    assert score[noisy].min() > score[~noisy].max()      # the early window separates them fully
    window = slice(0, 3)                                  # the knee of the accuracy is checkpoint 2
    aum, e = margin[window].mean(0), el2n[window].mean(0)
    from scipy.stats import rankdata
    want = ((rankdata(-aum) - 1) / (N - 1) + (rankdata(e) - 1) / (N - 1)) / 2
    np.testing.assert_allclose(score, want, rtol=1e-6)


def test_mislabel_through_run_and_flag(tiny_run, tmp_path):
    ckpts, data = tiny_run
    res = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "s.h5", scores=["mislabel", "aum"], progress=False))
    assert res["scores"]["mislabel"].shape == (90,) and 0 <= res["scores"]["mislabel"].min()
    assert gs.flag(tmp_path / "s.h5")["score"] == "mislabel"
