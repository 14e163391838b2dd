"""Weights tied across modules (GPT-2's embedding and head): the per-example gradient is the
sum of both uses, and the cross term of its norm is computed, never dropped."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import gradscore as gs
from helpers import compare_with_loop


class Tied(nn.Module):
    """Input embedding reused as the output layer (tied weights, as in GPT-2)."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(9, 4), nn.Linear(4, 4), nn.Linear(4, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids)))).mean(1)


@pytest.mark.parametrize("K", [0, 2])
def test_tied_weights_keep_the_cross_term(K):
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (5, 6))
    ids[:, 3] = ids[:, 0]
    scorer = compare_with_loop(Tied(), ids, K)   # fails if either use, or the cross term, is dropped
    why = scorer.explain()
    assert why["emb.weight"].startswith("ghost (embedding rule on emb") and "tied, exact cross term" in why["emb.weight"]
    assert gs.Scorer(Tied().eval()).engine_name == "ghost"   # auto: every parameter has a rule


def test_dropping_the_tied_cross_term_is_caught(monkeypatch):
    """The comparison above can fail: without the cross term the norms differ."""
    from gradscore.engines import ghost
    monkeypatch.setattr(ghost._BatchSums, "add_cross_terms", lambda self: None)
    with pytest.raises(AssertionError):
        compare_with_loop(Tied(), torch.randint(0, 9, (5, 6)), 0)


class OwnHead(nn.Module):
    """An output layer of one's own class, ``x @ W.T``: no rule."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight.T


class PlainLinear(nn.Linear):
    """A Linear subclass whose forward is its own (Falcon's): it takes the Linear rule where
    the first batch shows it computes x Wᵀ + b."""

    def forward(self, x):
        return x @ self.weight.T


def test_tied_to_a_layer_without_rule_falls_back():
    model = Tied()
    model.head = OwnHead(model.emb.weight)
    scorer = compare_with_loop(model, torch.randint(0, 9, (5, 6)), 2)
    why = scorer.explain()
    assert "shared by modules emb and head" in why["emb.weight"] and why["emb.weight"].startswith("vmap")
    assert why["mid.weight"].startswith("ghost")
    assert "no ghost rule for OwnHead" in why["emb.weight"], why["emb.weight"]


def test_tied_to_a_linear_subclass_of_its_own_keeps_the_cross_term():
    model = Tied()
    model.head = PlainLinear(4, 9, bias=False)
    model.head.weight = model.emb.weight
    why = compare_with_loop(model, torch.randint(0, 9, (5, 6)), 2).explain()["emb.weight"]
    assert why.startswith("ghost (embedding rule on emb: Embedding + linear_subclass rule on head: PlainLinear; "
                          "tied, exact cross term)"), why
