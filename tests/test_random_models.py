"""Random small sequence models in random layouts against the per-example loop, float64.

Each seed builds a model from a few blocks (Linear, a Linear registered twice, a Linear tied
to an earlier one by its weight, its bias or both, LayerNorm,
RMSNorm, Conv1d with its padding modes, groups and dilation, GroupNorm, multi-head
attention, RNN/GRU/LSTM, uni- or bidirectional, one or two layers, an RNN/GRU/LSTM cell in
the model's loop over the steps, a Linear or LayerNorm on the rows of both leading
dimensions merged (example by example, or step by step: the fallback), and the structural
rules' timm-like GroupNormAct, LayerNormAct and LayerScale, and parameters the forward
uses directly: a γ, a shift, a class token, a position embedding), each applied to the
(B, T, C) sequence or to its (T, B, C) transpose, with residuals and pooling; B and T
drawn so that T == B, T == 1 and T == B + 1 all come up; all parameters scored, or
those from a random block on, or the rest with random blocks frozen. ``auto`` and ``ghost`` must
equal the loop (or take the fallback, which does): a wrong number is a failure, a
refusal is not. This found a Linear registered twice whose Parameters torch's
functional_call replaced (tests/test_engines.py). The same models, in training, go
through the in-run recorder: every record equals the loop at each step's θ_t, or the
recorder refuses the model with one GradscoreError. With every Linear forced into the
Gram form and T from 48 to 520, the same grid checks the Grams formed in blocks.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import (ACTS, GroupNormAct, LayerNormAct, LayerScale, cell_steps, check_random_inrun,
                     check_random_model)


class Block(nn.Module):
    """One layer applied to h (B, T, C), or to its (T, B, C) transpose (``seq_first``)."""

    def __init__(self, layer: nn.Module, kind: str, seq_first: bool, residual: bool, act: bool) -> None:
        super().__init__()
        self.layer, self.kind, self.seq_first, self.residual, self.act = layer, kind, seq_first, residual, act

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.transpose(0, 1) if self.seq_first else h
        if self.kind in ("conv", "groupnorm", "gn_act"):   # channels in dim 1, from (B, T, C)
            y = self.layer(h.transpose(1, 2)).transpose(1, 2)
            y = y.transpose(0, 1) if self.seq_first else y
        elif self.kind == "attention":
            y = self.layer(x, x, x, need_weights=False)[0]
        elif self.kind == "recurrent":
            y = self.layer(x)[0]
        elif self.kind == "cell":   # the model's own loop over the steps
            y = cell_steps(self.layer, x, 0 if self.seq_first else 1)[0]
        elif self.kind == "merged":   # on the rows of both leading dimensions, (B·T, C) or (T·B, C), as OPT's MLP
            y = self.layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1)
        else:
            y = self.layer(x)
        y = y.transpose(0, 1) if self.seq_first else y
        y = torch.tanh(y) if self.act else y
        return h + y if self.residual and y.shape == h.shape else y


class Free(nn.Module):
    """Parameters the forward uses directly (the free-parameter rule) on (B, T, C), or on
    (T, B, C) with ``seq_first``: "gamma" x * γ (C,), "shift" x + β (1, 1, C), "cls" a
    class token put first (expanded to (B, 1, C), or (1, B, C)), "pos" x + a position
    embedding (1, T, C), or (T, 1, C); "slice" x + the middle T of a (T + 2)-token
    embedding; "table" x + rows of a (3, C) table picked by token (a relative position
    bias); "gate" x * sigmoid(γ); "embed" x + F.embedding of the tokens' ids into a (3, C)
    table, "interp" x + a position embedding interpolated (both taken through their
    backward, per example); "rel" (x + an nn.Embedding of the tokens' ids, one output for
    the batch) * γ (C,); "rows" x viewed as its (B·T, 1, C) rows (or (T·B, 1, C): the
    fallback) times γ (1, 1, C), merged with the batch."""

    KINDS = ("gamma", "shift", "cls", "pos", "slice", "table", "gate", "embed", "interp", "rel", "rows")

    def __init__(self, kind: str, C: int, T: int, seq_first: bool) -> None:
        super().__init__()
        self.kind, self.seq_first = kind, seq_first
        tokens = (T, 1, C) if seq_first else (1, T, C)
        shape = {"gamma": (C,), "shift": (1, 1, C), "cls": (1, 1, C), "gate": (C,), "table": (3, C), "embed": (3, C),
                 "rel": (C,), "rows": (1, 1, C), "pos": tokens, "interp": tokens,
                 "slice": (T + 2, 1, C) if seq_first else (1, T + 2, C)}[kind]
        self.p = nn.Parameter((1.0 if kind in ("gamma", "rel", "rows") else 0.0) + 0.3 * torch.randn(*shape))
        self.register_buffer("ids", torch.arange(T) % 3, persistent=False)
        if kind == "rel":
            self.rel = nn.Embedding(3, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gamma":
            return x * self.p
        if self.kind == "gate":
            return x * self.p.sigmoid()
        if self.kind in ("shift", "pos"):
            return x + self.p
        if self.kind == "rows":
            return (x.reshape(-1, 1, x.shape[-1]) * self.p).reshape(x.shape)
        if self.kind == "interp":
            return x + F.interpolate(self.p, size=2 * self.p.shape[-1], mode="linear")[..., ::2]
        T = x.shape[0 if self.seq_first else 1]
        if self.kind in ("embed", "rel"):
            picked = self.rel(self.ids[:T]) if self.kind == "rel" else F.embedding(self.ids[:T], self.p)
            picked = picked.unsqueeze(1 if self.seq_first else 0)
            return (x + picked) * self.p if self.kind == "rel" else x + picked
        if self.kind == "slice":
            return x + (self.p[1:T + 1] if self.seq_first else self.p[:, 1:T + 1])
        if self.kind == "table":
            return x + self.p[self.ids[:T]].unsqueeze(1 if self.seq_first else 0)
        if self.seq_first:
            return torch.cat([self.p.expand(1, x.shape[1], -1), x], 0)
        return torch.cat([self.p.expand(x.shape[0], -1, -1), x], 1)


def _layer(rng: random.Random, kind: str, C: int, linears: list[nn.Linear], seq_first: bool) -> tuple[nn.Module, int]:
    """A layer of ``kind`` reading C features, and the features it gives."""
    if kind == "linear":
        layer = nn.Linear(C, rng.choice([C, 3, 5]), bias=rng.random() < 0.7)
        linears.append(layer)
        return layer, layer.out_features
    if kind == "twice":
        return rng.choice([lin for lin in linears if lin.in_features == lin.out_features == C]), C
    if kind == "tied":   # a Linear of its own whose weight (and bias, or the bias alone) is an earlier one's
        lin = rng.choice([lin for lin in linears if lin.in_features == C])
        layer = nn.Linear(C, lin.out_features, bias=lin.bias is not None)
        share = rng.choice(["weight", "both", "bias"] if lin.bias is not None else ["weight"])
        if share != "bias":
            layer.weight = lin.weight
        if share != "weight":
            layer.bias = lin.bias
        linears.append(layer)   # called twice or tied again later: more calls, a third owner
        return layer, lin.out_features
    if kind == "layernorm":
        return nn.LayerNorm(C, bias=rng.random() < 0.5), C
    if kind == "rmsnorm":
        return nn.RMSNorm(C), C
    if kind == "conv":
        k, groups = rng.choice([1, 2, 3]), rng.choice([1, C])
        out = C if groups > 1 else rng.choice([C, 4])
        return nn.Conv1d(C, out, k, padding="same", groups=groups, dilation=rng.choice([1, 2]), bias=rng.random() < 0.7,
                         padding_mode=rng.choice(["zeros", "circular", "reflect"]) if k > 1 else "zeros"), out
    if kind == "groupnorm":
        return nn.GroupNorm(rng.choice([g for g in (1, 2, C) if C % g == 0]), C), C
    if kind == "gn_act":   # the norm-act rule (timm's GroupNormAct): a norm, then an activation
        return GroupNormAct(C, rng.choice([g for g in (1, 2, C) if C % g == 0]), rng.choice(list(ACTS))), C
    if kind == "ln_act":
        return LayerNormAct(C, rng.choice(list(ACTS)), bias=rng.random() < 0.7), C
    if kind == "scale":    # the layer-scale rule (timm's LayerScale)
        return LayerScale(C), C
    if kind == "attention":
        return nn.MultiheadAttention(C, rng.choice([h for h in (1, 2) if C % h == 0]), batch_first=not seq_first, bias=rng.random() < 0.7), C
    if kind == "merged":
        layer = nn.Linear(C, rng.choice([C, 3]), bias=rng.random() < 0.7) if rng.random() < 0.7 else nn.LayerNorm(C)
        return layer, getattr(layer, "out_features", C)
    if kind == "cell":
        H = rng.choice([2, 3])
        return rng.choice([nn.RNNCell, nn.GRUCell, nn.LSTMCell])(C, H, bias=rng.random() < 0.8), H
    cls, bi, H = rng.choice([nn.RNN, nn.GRU, nn.LSTM]), rng.random() < 0.4, rng.choice([2, 3])
    return cls(C, H, num_layers=rng.choice([1, 2]), batch_first=not seq_first, bidirectional=bi,
               bias=rng.random() < 0.8), H * (2 if bi else 1)


class RandomModel(nn.Module):
    KINDS = ("linear", "linear", "layernorm", "rmsnorm", "conv", "groupnorm", "attention", "recurrent", "twice",
             "gn_act", "ln_act", "scale", "free", "cell", "merged", "tied")

    def __init__(self, rng: random.Random, C: int, vocab: int, T: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, C) if vocab else None
        blocks, linears = [], []
        for _ in range(rng.randint(1, 4)):
            kind, seq_first = rng.choice(self.KINDS), rng.random() < 0.5
            if kind == "twice" and not any(lin.in_features == lin.out_features == C for lin in linears):
                kind = "linear"
            if kind == "tied" and not any(lin.in_features == C for lin in linears):
                kind = "linear"
            if kind == "free":
                layer, out = Free(rng.choice(Free.KINDS), C, T, seq_first), C
                T += layer.kind == "cls"
            else:
                layer, out = _layer(rng, kind, C, linears, seq_first)
            blocks.append(Block(layer, kind, seq_first, rng.random() < 0.3, rng.random() < 0.5))
            C = out
        self.blocks = nn.ModuleList(blocks)
        self.pool = rng.choice(["mean", "last", "first"])
        self.head = nn.Linear(C, 3)

    def describe(self) -> str:
        return ", ".join(f"{b.kind if b.kind != 'free' else b.layer.kind}{' (T, B, C)' if b.seq_first else ''}"
                         for b in self.blocks) + f"; pool {self.pool}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) if self.emb is not None else x
        for block in self.blocks:
            h = block(h)
        return self.head({"mean": h.mean(1), "last": h[:, -1], "first": h[:, 0]}[self.pool])


def _draw(seed: int, batches: int = 1, extra: int = 0, lengths: tuple[int, ...] | None = None
          ) -> tuple[RandomModel, torch.Tensor, torch.Tensor, int]:
    """Seed's model (float64), ``batches`` batches of its B examples and ``extra`` more, their
    labels, and B; T from ``lengths`` (default: 1, B, B + 1, 2 or 5)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    B = rng.choice([1, 2, 3, 4])
    T, C, vocab = rng.choice(lengths or [1, B, B + 1, 2, 5]), rng.choice([2, 4]), rng.choice([0, 0, 7])
    model = RandomModel(rng, C, vocab, T).double()
    n = batches * B + extra
    x = torch.randint(0, vocab, (n, T)) if vocab else torch.randn(n, T, C, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (n,)), B


def _check(seed: int) -> bool:
    """Whether the seed's model was compared with the loop (else torch refused it)."""
    model, x, y, B = _draw(seed)
    return check_random_model(seed, model.eval(), x, y, f"B={B} T={x.shape[1]}: {model.describe()}")


@pytest.mark.parametrize("block", range(2))
def test_random_models_equal_the_loop(block):
    assert sum(_check(seed) for seed in range(block * 75, block * 75 + 75)) > 60   # most are compared


@pytest.mark.slow
def test_many_random_models_equal_the_loop():
    assert sum(_check(seed) for seed in range(150, 3300)) > 2500


@pytest.fixture
def gram_form(monkeypatch):
    """Every Linear with a sequence takes the Gram form (at these widths the plan would pick
    the outer one): its Grams in blocks from T = 48 on."""
    from gradscore.kernels import ghost_linear
    plan = ghost_linear.plan
    monkeypatch.setattr(ghost_linear, "plan", lambda T, *args, **kw: "gram" if T > 1 else plan(T, *args, **kw))


@pytest.mark.parametrize("block", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_random_models_in_the_blocked_gram_form_equal_the_loop(gram_form, block, tmp_path):
    """T of 48 to 520 (2 or 4 blocks; a layer called twice joins its calls: 8), every layout
    of the grid, scored and in training."""
    lengths = (48, 50, 97, 520)
    seeds = range(5000 + block * 20, 5000 + block * 20 + 20)
    assert sum(check_random_model(seed, model.eval(), x, y, f"B={B} T={x.shape[1]}: {model.describe()}",
                                  engines=("ghost",))
               for seed in seeds for model, x, y, B in [_draw(seed, lengths=lengths)]) > 15
    assert sum(check_random_inrun(model, x, y, B, tmp_path / f"{seed}.h5")
               for seed in seeds[:8] for model, x, y, B in [_draw(seed, batches=3, extra=3, lengths=lengths)]) > 5


def _check_inrun(seed: int, tmp_path) -> bool:
    """Whether the seed's model was recorded and compared with the loop (else refused)."""
    model, x, y, B = _draw(seed, batches=3, extra=3)
    return check_random_inrun(model, x, y, B, tmp_path / f"{seed}.h5")


@pytest.mark.parametrize("block", range(2))
def test_random_models_in_training_record_what_the_loop_gives(block, tmp_path):
    assert sum(_check_inrun(seed, tmp_path) for seed in range(block * 25, block * 25 + 25)) > 15


@pytest.mark.slow
def test_many_random_models_in_training_record_what_the_loop_gives(tmp_path):
    assert sum(_check_inrun(seed, tmp_path) for seed in range(50, 650)) > 400
