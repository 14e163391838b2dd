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

