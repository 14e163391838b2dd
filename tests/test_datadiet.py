"""EL2N and GraNd against closed forms."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import gradscore as gs
from gradscore.losses import resolve_loss
from gradscore.scores import datadiet


def test_el2n_closed_form_on_hand_made_logits():
    logits = torch.tensor([[0.0, 0.0], [np.log(3.0), 0.0], [0.0, 10.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0])
    m = datadiet.classification_metrics(resolve_loss("cross_entropy"), logits, y)
    # p = (1/2, 1/2): ‖(-1/2, 1/2)‖ = √2/2; p = (3/4, 1/4): ‖(-1/4, 1/4)‖ = √2/4
    p_wrong = 1 / (1 + np.exp(-10.0))
    expected = [np.sqrt(2) / 2, np.sqrt(2) / 4, np.sqrt(2) * p_wrong]
    np.testing.assert_allclose(m["el2n"].numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(m["p_gold"].numpy(), [0.5, 0.75, 1 - p_wrong], rtol=1e-12)
    assert m["correct"].tolist() == [1, 1, 0]  # argmax tie -> first index


def test_el2n_for_nll_uses_log_probs_and_mse_uses_error_norm():
    logp = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    m = datadiet.classification_metrics(resolve_loss("nll"), logp, torch.tensor([1]))
    np.testing.assert_allclose(m["el2n"].numpy(), [np.sqrt(2) * 0.25], rtol=1e-12)
    out, target = torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, 6.0]])
    assert datadiet.classification_metrics(resolve_loss("mse"), out, target)["el2n"].item() == 5.0
    # one output per example against a target vector: |out_b − y_b|, not a broadcast over the batch
    col, vec = torch.tensor([[1.0], [2.0]]), torch.tensor([4.0, 2.5])
    np.testing.assert_allclose(datadiet.classification_metrics(resolve_loss("mse"), col, vec)["el2n"], [3.0, 0.5])
    assert datadiet.classification_metrics(resolve_loss("mse"), out, torch.tensor([4.0])) == {}   # no such pairing


def test_grand_of_linear_softmax_model_is_analytic():
    # for logits = W x + b with cross-entropy: ∇_W ℓ = (p - e_y) xᵀ, ∇_b ℓ = p - e_y
    # so ‖∇ℓ‖² = ‖p - e_y‖² (‖x‖² + 1)
    torch.manual_seed(0)
    model = nn.Linear(7, 4).double().eval()
    x, y = torch.randn(11, 7, dtype=torch.float64), torch.randint(0, 4, (11,))
    out = gs.Scorer(model, engine="vmap").score_batch(x, y)
    with torch.no_grad():
        r = torch.softmax(model(x), 1) - nn.functional.one_hot(y, 4)
    expected = r.pow(2).sum(1) * (x.pow(2).sum(1) + 1)
    torch.testing.assert_close(out.sq_norm, expected, rtol=1e-10, atol=0)


def test_aggregate_means_over_selected_checkpoints():
    pc = {"el2n": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]]),
          "sq_grad_norm": np.array([[4.0, 9.0], [16.0, 1.0], [100.0, 100.0]]),
          "loss": np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])}
    agg = datadiet.aggregate(pc, np.array([True, True, False]))
    np.testing.assert_array_equal(agg["el2n"], [2.0, 3.0])
    np.testing.assert_array_equal(agg["grand"], [3.0, 2.0])  # mean of sqrt, not sqrt of mean
    np.testing.assert_array_equal(agg["loss"], [1.5, 1.5])
