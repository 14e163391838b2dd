"""Odd layouts against the per-example loop, float64: a ruled layer's batch dimension is
established from evidence, never from a size that happens to equal B.

Every model takes batch-first inputs (B, ...) and moves to a sequence-first layout
inside, where a layer sees (T, B, d): with T == B the first dimension has the batch's
size without being the batch. Each case runs T == B, T == 1 and T != B, for ghost and
auto, K = 0 and 2, and for B = 0 (empty results from every engine).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscore as gs
from helpers import FreeNet, Reversed, compare_with_loop

B = 4


class SeqFirstLinear(nn.Module):
    """The issue's repro: head(lin(x.transpose(0, 1)).transpose(0, 1).flatten(1))."""

    def __init__(self, T: int, d: int = 5):
        super().__init__()
        self.lin, self.head = nn.Linear(d, d), nn.Linear(T * d, 3)

    def forward(self, x):
        return self.head(self.lin(x.transpose(0, 1)).transpose(0, 1).flatten(1))


class SeqFirstEmbedding(nn.Module):
    def __init__(self, T: int):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 4, padding_idx=0), nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids.t())).mean(0))


class SeqFirstLayerNorm(nn.Module):
    def __init__(self, T: int, d: int = 5):
        super().__init__()
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):
        return self.head((self.ln(x.transpose(0, 1)) ** 2).mean(0))


class LlamaLikeRMSNorm(nn.Module):
    """A Hugging Face-style RMSNorm (Llama's forward, under a name of its own): the
    structural rule, checked on the first batch."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(1 + 0.3 * torch.randn(d)), eps

    def forward(self, x):
        h = x.to(torch.float32)
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


class SeqFirstRMSNorm(nn.Module):
    def __init__(self, T: int, d: int = 5):
        super().__init__()
        self.norm, self.head = LlamaLikeRMSNorm(d), nn.Linear(d, 3)

    def forward(self, x):
        return self.head((self.norm(x.transpose(0, 1)) ** 2).mean(0))


class SeqFirstAttention(nn.Module):
    """nn.MultiheadAttention in its default layout (T, B, d)."""

    def __init__(self, T: int, d: int = 6):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(d, 2), nn.Linear(d, 3)

    def forward(self, x):
        h = x.transpose(0, 1)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(0))


class SeqFirstEncoder(nn.Module):
    def __init__(self, T: int, d: int = 6):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d, 2, dim_feedforward=8, dropout=0.0, batch_first=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.enc(x.transpose(0, 1)).mean(0))


class ResidualNotBatch(nn.Module):
    """Sequence-first x + lin(x), mean-pooled: with T = 1 the Linear's first dimension is 1
    and its output is added to rows that are time steps, not examples."""

    def __init__(self, T: int, d: int = 5):
        super().__init__()
        self.lin, self.head = nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        h = x.transpose(0, 1)
        return self.head(torch.tanh(h + self.lin(h)).mean(0))


class PositionsAddedToBatch(nn.Module):
    """One positional row for the whole batch, added to batch rows: the exact broadcast case."""

    def __init__(self, T: int, d: int = 4):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(9, d), nn.Embedding(T, d), nn.Linear(d, 3)

    def forward(self, ids):
        pos = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))        # (1, T, d)
        return self.head(torch.tanh(self.tok(ids) + pos).mean(1))


class PositionsSeqFirst(nn.Module):
    """Positions (T, d) broadcast along a sequence-first batch: (T, 1, d) + (T, B, d)."""

    def __init__(self, T: int, d: int = 4):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(9, d), nn.Embedding(T, d), nn.Linear(d, 3)

    def forward(self, ids):
        pos = self.pos(torch.arange(ids.shape[1]).unsqueeze(1))        # (T, 1, d)
        return self.head(torch.tanh(self.tok(ids.t()) + pos).mean(0))


FLOAT_CASES = [SeqFirstLinear, SeqFirstLayerNorm, SeqFirstRMSNorm, SeqFirstAttention, SeqFirstEncoder,
               ResidualNotBatch]
TOKEN_CASES = [SeqFirstEmbedding, PositionsAddedToBatch, PositionsSeqFirst]


def _inputs(cls, T: int, n: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(T)
    if cls in TOKEN_CASES:
        return torch.randint(1, 7, (n, T), generator=g)
    d = 6 if cls in (SeqFirstAttention, SeqFirstEncoder) else 5
    return torch.randn(n, T, d, generator=g, dtype=torch.float64)


def _score(model, x, engine, K):
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    scorer = gs.Scorer(model, engine=engine)
    V = (torch.randn(K, scorer.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
         if K else None)
    return scorer, scorer.score_batch(x, y, refs=V)


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("engine", ["auto"])
@pytest.mark.parametrize("T", [B, 1, 3])
@pytest.mark.parametrize("cls", FLOAT_CASES + TOKEN_CASES, ids=lambda c: c.__name__)
def test_odd_layouts_equal_the_loop(cls, T, engine, K):
    torch.manual_seed(0)
    model = cls(T).double().eval()
    x = _inputs(cls, T)
    _, ref = _score(model, x, "loop", K)
    scorer, out = _score(model, x, engine, K)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.sq_norm, ref.sq_norm, rtol=1e-6, atol=1e-12)
    if K:
        torch.testing.assert_close(out.dots, ref.dots, rtol=1e-6, atol=1e-9)
    assert float(ref.sq_norm.min()) > 0
    assert set(scorer.explain()) == set(scorer.param_names)


@pytest.mark.parametrize("T", [B, 1, 3])
def test_sequence_first_linear_is_ghost_with_its_batch_in_dimension_one(T):
    """A sequence-first Linear, LayerNorm or Embedding whose batch is established in
    dimension 1 keeps its ghost rule (transposed), whatever T is."""
    for cls, name in [(SeqFirstLinear, "lin.weight"), (SeqFirstLayerNorm, "ln.weight"),
                      (SeqFirstRMSNorm, "norm.weight"), (SeqFirstEmbedding, "emb.weight")]:
        model = cls(T).double().eval()
        scorer, _ = _score(model, _inputs(cls, T), "auto", 0)
        assert scorer.explain()[name].startswith("ghost"), (cls.__name__, scorer.explain()[name])
        assert "batch in dimension 1" in scorer.explain()[name]


def test_a_broadcast_row_added_to_time_steps_is_not_expanded():
    """T = 1: the Linear sees (1, B, d); its batch is dimension 1, not a shared row."""
    model = ResidualNotBatch(1).double().eval()
    scorer, _ = _score(model, _inputs(ResidualNotBatch, 1), "ghost", 0)
    assert "batch in dimension 1" in scorer.explain()["lin.weight"]
    model = PositionsSeqFirst(B).double().eval()
    scorer, _ = _score(model, _inputs(PositionsSeqFirst, B), "ghost", 0)
    assert not scorer.explain()["pos.weight"].startswith("ghost"), scorer.explain()["pos.weight"]
    model = PositionsAddedToBatch(B).double().eval()
    scorer, _ = _score(model, _inputs(PositionsAddedToBatch, B), "ghost", 0)
    assert scorer.explain()["pos.weight"].startswith("ghost"), scorer.explain()["pos.weight"]


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("cls", [SeqFirstLinear, SeqFirstEncoder, SeqFirstEmbedding, SeqFirstRMSNorm],
                         ids=lambda c: c.__name__)
def test_an_empty_batch_gives_empty_results(cls, engine, K):
    model = cls(3).double().eval()
    x = _inputs(cls, 3, n=0)
    scorer, out = _score(model, x, engine, K)
    assert out.loss.shape == (0,) and out.sq_norm.shape == (0,)
    assert out.dots is None if not K else out.dots.shape == (0, K)
    # and the same scorer still scores a real batch afterwards
    _, ref = _score(model, _inputs(cls, 3), "loop", K)
    y = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(1))
    V = (torch.randn(K, scorer.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
         if K else None)
    torch.testing.assert_close(scorer.score_batch(_inputs(cls, 3), y, refs=V).sq_norm, ref.sq_norm,
                               rtol=1e-6, atol=1e-12)


class BatchCentred(nn.Module):
    """Subtracts the batch mean: an example's output depends on the rest of its batch, so
    only an engine that runs each example alone (vmap, the loop) is per-example."""

    def __init__(self, T: int = 0):
        super().__init__()
        self.lin, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return self.head(torch.tanh(h - h.mean(0, keepdim=True)))


class PositionsOfTheBatch(nn.Module):
    """Positions indexed along dimension 0 of batch-first ids (a sequence-first model fed
    batch-first data): an example's output depends on its place in the batch, which the
    first example, at place 0 in both, does not show."""

    def __init__(self, T: int = 0, d: int = 4):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(9, d), nn.Embedding(B, d), nn.Linear(d, 3)

    def forward(self, ids):
        pos = self.pos(torch.arange(ids.shape[0])).unsqueeze(1)        # (B, 1, d): the batch's places
        return self.head(torch.tanh(self.tok(ids) + pos).mean(1))


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("cls", [BatchCentred, PositionsOfTheBatch], ids=lambda c: c.__name__)
def test_a_model_that_couples_examples_is_scored_per_example(cls, K):
    model = cls().double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 5, dtype=torch.float64, generator=g) if cls is BatchCentred else torch.randint(1, 7, (B, 3), generator=g)
    scorer = compare_with_loop(model, x, K, engine="auto")
    assert all("depends on the rest of its batch" in v for v in scorer.explain().values()), scorer.explain()


class SortedByLength(nn.Module):
    """Older NLP code: sort the batch by length, pack (enforce_sorted), run an LSTM, unsort
    its final states. Each example's output is its own, but the embedding, the Linear and
    the LSTM see the batch's rows in another order."""

    def __init__(self, T: int = 0, d: int = 4):
        super().__init__()
        self.emb, self.pre = nn.Embedding(9, d), nn.Linear(d, d)
        self.rnn, self.head = nn.LSTM(d, d, batch_first=True), nn.Linear(d, 3)

    def forward(self, ids):
        from torch.nn.utils.rnn import pack_padded_sequence
        lengths, order = (ids != 0).sum(1).sort(descending=True)
        h = self.pre(self.emb(ids[order]))
        _, (hn, _) = self.rnn(pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=True))
        return self.head(hn[-1][order.argsort()])


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("cls", [SortedByLength, Reversed], ids=lambda c: c.__name__)
def test_layers_that_see_the_batch_reordered_go_to_the_fallback(cls, K):
    """Their rows are not the examples in order (row 0 of the batch is not the first
    example's row alone): the rule would give example b another example's gradient."""
    model = cls().double().eval()
    g = torch.Generator().manual_seed(3)
    if cls is Reversed:
        x = torch.randn(B, 5, dtype=torch.float64, generator=g)
    else:
        x = torch.randint(1, 9, (B, 6), generator=g)
        for b, length in enumerate([2, 6, 3, 5]):   # the longest is not first
            x[b, length:] = 0
    why = compare_with_loop(model, x, K, engine="auto").explain()
    moved = ["emb.weight", "pre.weight", "rnn.weight_ih_l0"] if cls is SortedByLength else ["lin.weight"]
    for name in moved:
        assert "rows are not the batch's examples in order" in why[name], (name, why[name])
    assert why["head.weight"].startswith("ghost"), why["head.weight"]


@pytest.mark.parametrize("K", [0, 2])
def test_a_reversed_batch_whose_first_and_last_examples_are_the_same_goes_to_the_fallback(K):
    """Duplicate examples are common in real data. With the first and last the same, their
    rows alone equal rows 0 and B − 1 of the reversed batch, and the comparison of values
    saw no reordering: the rule gave the middle examples each other's gradients (an error
    of 0.99 on the Linear's). Changing one of the two examples' rows in a pair of them
    changes the other's output: the fallback."""
    model = Reversed().double().eval()
    x = torch.randn(B, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[-1] = x[0]
    why = compare_with_loop(model, x, K, engine="auto").explain()
    assert "rows are not the batch's examples in order" in why["lin.weight"], why["lin.weight"]


@pytest.mark.parametrize("kind", ["reorder", "reorder_table"])
@pytest.mark.parametrize("K", [0, 2])
def test_a_parameter_added_to_a_reversed_batch_whose_ends_are_the_same_goes_to_the_fallback(kind, K):
    """The same for the free-parameter rule: a position embedding added to the batch's rows
    reversed, first and last examples the same. Its uses' rows 0 and B − 1 equal the
    examples' alone, and the rule gave the middle examples each other's gradients (1.5596
    for 1.5957). Changing the rows of one example of a pair in each use's result changes
    the other's output: the fallback."""
    model = FreeNet(kind).double().eval()
    x = torch.randn(4, *model.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[-1] = x[0]
    why = compare_with_loop(model, x, K, engine="auto").explain()
    assert "rows that are not the batch's examples in order" in why["pos_embed"], why["pos_embed"]
    assert why["cls_token"].startswith("ghost"), why["cls_token"]


class Chunked(nn.Module):
    """A Linear called on chunks of 2 examples: no call sees the whole batch, so the row
    order check has nothing to compare (it raised an IndexError for a while); the scoring
    pass sends the layer to the fallback ("called without the batch in dimension 0")."""

    def __init__(self, T: int = 0):
        super().__init__()
        self.lin, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(torch.cat([self.lin(c) for c in x.split(2)])))


@pytest.mark.parametrize("K", [0, 2])
def test_a_layer_called_on_parts_of_the_batch_equals_the_loop(K):
    model = Chunked().double().eval()
    x = torch.randn(B + 1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scorer = compare_with_loop(model, x, K, engine="auto")
    assert "called without the batch in dimension 0" in scorer.explain()["lin.weight"]


class _CachedBias(nn.Module):
    """timm's LeViT and EfficientFormer in eval mode: a table's rows picked once, then kept
    for every later call."""

    def __init__(self):
        super().__init__()
        self.pre, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.table = nn.Parameter(torch.randn(3, 4))
        self.register_buffer("ids", torch.tensor([2, 0, 1, 2, 0]), persistent=False)
        self.cache = None

    def forward(self, x):
        if self.cache is None:
            self.cache = self.table[self.ids]
        return self.head(torch.tanh(self.pre(x) + self.cache).mean(1))


def test_a_tensor_made_of_a_parameter_and_kept_between_calls_is_not_followed():
    """The first batch's runs of 2 examples and then 1 see the table picked once: the
    free-parameter rule does not take it (nor would a later batch's gradient reach it
    through this call's ops), and says why."""
    from gradscore.engines.layout import establish
    model = _CachedBias().double().eval()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    found, coupled, strays, free, plan = establish(model, {}, x, {}, {"table": model.table})
    assert free["table"].startswith("is made into other tensors for one example than for two (0 and 1 ops"), free
    assert "table" not in plan


class _NormedAdapter(nn.Module):
    """DoRA's form (peft's ``use_dora``) on tokens (B, T, 5): a frozen Linear plus a low-rank
    adapter B·A, whose weight is also formed by calling A and B on an identity matrix (for
    the norm of the adapted weight, detached: that call gets no gradient), and a magnitude
    m scaling each output by m / ‖W + BA‖."""

    def __init__(self, d: int = 5, r: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(d, d).requires_grad_(False)
        self.A, self.B = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        self.m = nn.Parameter(1 + 0.3 * torch.randn(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        eye = torch.eye(self.A.in_features, dtype=x.dtype)
        adapted = self.B(self.A(eye)).T
        norm = (self.base.weight + adapted.detach()).norm(dim=1).detach()
        scale = (self.m / norm).view(1, -1)
        h = (scale - 1) * self.base(x) + scale * self.B(self.A(x))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("T", [4, 3, 1])
def test_a_layer_call_that_gets_no_gradient_is_left_out_of_its_layout(T):
    """A call of a layer whose output reaches the loss by no path (DoRA's adapters called
    on an identity matrix for a detached norm) has no batch to find and adds nothing to
    any example's gradient: the rule takes the layer's other calls. T == B == 3 too."""
    torch.manual_seed(0)
    model = _NormedAdapter()
    x = torch.randn(3, T, 5, dtype=torch.float64)
    for K in (0, 2):
        scorer = compare_with_loop(model, x, K, engine="auto")
    paths = scorer.explain()
    assert paths["A.weight"].startswith("ghost (linear rule on A"), paths
    assert paths["B.weight"].startswith("ghost (linear rule on B"), paths
    assert paths["m"].startswith("ghost (free-parameter rule"), paths
