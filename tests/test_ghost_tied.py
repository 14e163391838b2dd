"""Weights tied across modules (GPT-2's embedding and head): the per-example gradient is the
sum of both uses, and the cross term of its norm is computed, never dropped."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradscore as gs
from helpers import SharedBias, check_random_inrun, compare_with_loop


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


class SharedVocabulary(nn.Module):
    """A seq2seq model's vocabulary as Hugging Face's T5 and BART hold it: a ``shared``
    Embedding that is never called, whose weight the encoder's and decoder's embeddings and
    the LM head use (``head``: tied too)."""

    def __init__(self, head: bool):
        super().__init__()
        self.shared, self.enc, self.dec = nn.Embedding(9, 4), nn.Embedding(9, 4), nn.Embedding(9, 4)
        self.enc.weight = self.dec.weight = self.shared.weight
        self.head = nn.Linear(4, 9, bias=False)
        if head:
            self.head.weight = self.shared.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.enc(ids) + self.dec(ids.flip(1)))).mean(1)


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("K", [0, 2])
def test_an_owner_of_a_tied_weight_that_is_never_called_adds_nothing(K, head):
    """T5's and BART's ``shared`` embedding sent the vocabulary to vmap ("was not called"),
    and the in-run recorder refused the models. Its share is nothing: the owners that are
    called take their rules, with the exact cross terms."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (5, 6))
    why = compare_with_loop(SharedVocabulary(head), ids, K).explain()["shared.weight"]
    assert why.startswith("ghost (embedding rule on enc: Embedding + embedding rule on dec: Embedding"), why
    assert "tied, exact cross term" in why, why


class UsedOutside(SharedVocabulary):
    """The same, with the vocabulary also read by ``F.linear`` outside every owner's call."""

    def forward(self, ids):
        h = torch.tanh(self.enc(ids) + self.dec(ids.flip(1)))
        return (self.head(h) + nn.functional.linear(h, self.shared.weight)).mean(1)


def test_a_tied_weight_also_used_outside_its_owners_falls_back():
    """The uncalled owner is left out only where every use of the weight is a call of an
    owner: a use outside them sends it to the fallback, with the reason."""
    torch.manual_seed(0)
    why = compare_with_loop(UsedOutside(head=False), torch.randint(0, 9, (5, 6)), 2).explain()["shared.weight"]
    assert why.startswith("vmap (used outside"), why


class SharedSometimes(SharedVocabulary):
    """The same, calling ``shared`` itself too on batches of more than 6 tokens."""

    def forward(self, ids):
        h = self.enc(ids) + self.dec(ids.flip(1))
        if ids.shape[1] > 6:
            h = h + self.shared(ids)
        return self.head(torch.tanh(h)).mean(1)


def test_an_uncalled_owner_called_on_a_later_batch_sends_its_weight_to_the_fallback():
    """Its share was taken to be nothing on the first batch; a later batch that calls it is
    scored again with the weight in the fallback, and says why."""
    torch.manual_seed(0)
    model = SharedSometimes(head=True).double().eval()
    scorer, loop = gs.Scorer(model), gs.Scorer(model, engine="loop")
    for T in (6, 8):
        ids = torch.randint(0, 9, (5, T), generator=torch.Generator().manual_seed(T))
        y = torch.randint(0, 9, (5,), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(scorer.score_batch(ids, y).sq_norm, loop.score_batch(ids, y).sq_norm,
                                   rtol=1e-9, atol=0)
    why = scorer.explain()["shared.weight"]
    assert why.startswith("vmap (Embedding 'shared' was called on this batch, but not on the first"), why


class HeldBias(nn.Module):
    """An MLM head as BERT's: it registers its decoder's bias as its own (``self.decoder.bias
    = self.bias``) and never uses it itself; ``uses``: it also adds it to the output."""

    def __init__(self, uses: bool = False):
        super().__init__()
        self.emb, self.decoder, self.uses = nn.Embedding(9, 4), nn.Linear(4, 9), uses
        self.bias = nn.Parameter(torch.randn(9))
        self.decoder.bias = self.bias

    def forward(self, ids):
        out = self.decoder(torch.tanh(self.emb(ids))).mean(1)
        return out + self.bias if self.uses else out


@pytest.mark.parametrize("K", [0, 2])
def test_a_bias_that_its_layers_parent_only_holds_takes_the_layers_rule(K, tmp_path):
    """BERT's, RoBERTa's and ALBERT's MLM heads register the decoder's bias as their own:
    the bias went to the per-example loop (vmap cannot trace BERT), and the recorder refused
    the models. The head only holds it: the decoder's rule takes it, in training too."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (12, 6))
    why = compare_with_loop(HeldBias(), ids[:5], K).explain()["bias"]
    assert why.startswith("ghost (linear rule on decoder: Linear)"), why
    y = torch.randint(0, 9, (12,), generator=torch.Generator().manual_seed(1))
    assert check_random_inrun(HeldBias().double(), ids, y, 3, tmp_path / "r.h5")


def test_a_held_bias_that_its_holder_also_uses_falls_back(tmp_path):
    """Where the holder also uses the bias in its own forward, that use is outside the
    decoder's calls: the bias goes to the fallback (the recorder refuses it), never to the
    decoder's rule alone."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (12, 6))
    why = compare_with_loop(HeldBias(uses=True), ids[:5], 2).explain()["bias"]
    assert why.startswith("vmap (used outside Linear 'decoder'"), why
    y = torch.randint(0, 9, (12,), generator=torch.Generator().manual_seed(1))
    assert not check_random_inrun(HeldBias(uses=True).double(), ids, y, 3, tmp_path / "r.h5")


@pytest.mark.parametrize("K", [0, 2])
def test_a_bias_tied_across_layers_keeps_the_cross_term(K, tmp_path):
    """A bias tied across layers failed the batch (KeyError 'bias': the Linear rule gave
    factors of its weight only); it takes the rules with the exact cross term, in training too."""
    torch.manual_seed(0)
    why = compare_with_loop(SharedBias(), torch.randn(5, 4), K).explain()["a.bias"]
    assert why.startswith("ghost (linear rule on a: Linear + linear rule on b: Linear; tied"), why
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    assert check_random_inrun(SharedBias().double(), x, y, 3, tmp_path / "r.h5")


class TwoUses(nn.Module):
    """One weight applied to two inputs, the second's output subtracted: where the inputs
    are near, the uses' gradients δ aᵀ and −δ a'ᵀ cancel."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 512, bias=False), nn.Linear(64, 512, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.a(x[:, 0]) - self.b(x[:, 1])


@pytest.mark.parametrize("dtype, least", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_a_tied_weight_whose_uses_cancel_is_exact(dtype, least):
    """Inputs a and a + εn, ε from 10⁻¹ down to ``least``: ‖g_b‖² = ε²‖δ‖²‖n‖² within 10⁻⁴ of
    the float64 loop's (the cross term's rounding gave 20× off in float32, or −0.06)."""
    torch.manual_seed(0)
    model = TwoUses().to(dtype).eval()
    v = torch.randn(8, 64, dtype=torch.float64) * 100
    eps = torch.logspace(-1, math.log10(least), 8, dtype=torch.float64)[:, None]
    x = torch.stack([v, v + eps * torch.randn(8, 64, dtype=torch.float64) * 100], 1).to(dtype)
    y = torch.randint(0, 512, (8,))
    scorer = gs.Scorer(model, "cross_entropy", engine="ghost")
    got = scorer.score_batch(x, y).sq_norm
    assert "tied, exact cross term" in scorer.explain()["a.weight"]
    want = gs.Scorer(model.double(), "cross_entropy", engine="loop").score_batch(x.double(), y).sq_norm
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


def test_a_tied_weight_is_picked_by_any_of_its_names():
    """``params="head.*"`` on a head tied to the embedding matched no parameter (named_parameters
    names the tensor once, ``emb.weight``): any of its names picks it, with a warning that
    its gradient is the sum of all its uses, scored under its first name."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (5, 6))
    with pytest.warns(gs.GradscoreWarning, match=r"'head.weight' is the tensor 'emb.weight' \(tied"):
        scorer = compare_with_loop(Tied(), ids, 2, params=["head.*"])
    assert list(scorer.explain()) == ["emb.weight"]
    y, V = torch.randint(0, 3, (5,)), torch.randn(9, 4, dtype=torch.float64)   # references keyed by any name
    want = gs.Scorer(scorer.model, engine="loop", params="emb.*").score_batch(ids, y, refs=[{"emb.weight": V}])
    got = scorer.score_batch(ids, y, refs=[{"head.weight": V}])
    torch.testing.assert_close(got.dots, want.dots, rtol=1e-10, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the tensor's first name: nothing to say
        assert gs.Scorer(Tied(), params="emb.*,head.*").param_names == ["emb.weight"]
    with pytest.raises(gs.EngineError, match="matches no parameter"):
        gs.Scorer(Tied(), params=["tail.*"])


@pytest.mark.parametrize("wrap, prefix", [(torch.nn.DataParallel, "module."), (torch.compile, "_orig_mod.")])
def test_a_tied_weight_picked_by_a_wrappers_name_says_so_too(wrap, prefix):
    """The wrapper's name of a tied head (``_orig_mod.head.weight``, ``module.head.weight``)
    picked the embedding without the warning its inner name gives; the wrapper's name of
    the tensor's first owner still says nothing."""
    with pytest.warns(gs.GradscoreWarning, match=rf"'{prefix}head.weight' is the tensor 'emb.weight' \(tied"):
        assert gs.Scorer(wrap(Tied()), params=[prefix + "head.*"]).param_names == ["emb.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", gs.GradscoreWarning)
        assert gs.Scorer(wrap(Tied()), params=[prefix + "emb.*"]).param_names == ["emb.weight"]
