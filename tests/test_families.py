"""Every layer family over its option grid, against the per-example loop in float64.

For each configuration: ``auto`` returns numbers equal to the loop's (K = 0 and 2) and
never raises; ``ghost`` and ``vmap`` either return the same numbers or raise a
:class:`gradscore.GradscoreError` (never a raw torch error, never a wrong number); B = 0
gives empty results.
"""
from __future__ import annotations

import copy
import itertools
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import gradscore as gs
from gradscore.engines.rules import recurrent as recurrent_rule
from helpers import (ExpertsNet, FreeNet, MyStdConv2d, NormActNet, PositionsNet, RelativeBias, ScaleNet, Windows,
                     compare_with_loop)

B, T, D = 3, 4, 5


class Recurrent(nn.Module):
    """RNN/GRU/LSTM (``kind``, "RNN_relu": the RNN with ReLU, "LSTM_proj": the LSTM with
    ``proj_size`` 3, its hidden size 4) on batch-first inputs (B, T, D) whose zero rows are
    padding; the head reads the mean output, the final states (``use="state"``) or both;
    ``hx``: an initial state made from the input."""

    def __init__(self, kind: str, layers: int, bidirectional: bool, bias: bool, batch_first: bool,
                 packed: bool, use: str = "output", hx: bool = False):
        super().__init__()
        self.batch_first, self.packed, self.use, self.hx = batch_first, packed, use, hx
        cls, relu = getattr(nn, kind.removesuffix("_relu").removesuffix("_proj")), kind.endswith("_relu")
        self.rnn = cls(D, 4, num_layers=layers, bidirectional=bidirectional, bias=bias, batch_first=batch_first,
                       **({"nonlinearity": "relu"} if relu else {"proj_size": 3} if kind == "LSTM_proj" else {}))
        n, h = layers * (2 if bidirectional else 1), self.rnn.proj_size or 4
        self.head = nn.Linear(h * (2 if bidirectional else 1) + n * (h + (4 if kind.startswith("LSTM") else 0)), 3)

    def forward(self, x):
        h = x if self.batch_first else x.transpose(0, 1)
        if self.packed:
            lengths = (x.abs().sum(-1) > 0).sum(1).clamp(min=1).cpu()
            h = pack_padded_sequence(h, lengths, batch_first=self.batch_first, enforce_sorted=False)
        n = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        h0 = None
        if self.hx:
            h0 = torch.tanh(x[:, 0, :4]).unsqueeze(0).expand(n, -1, -1).contiguous()
            h0 = (h0[..., :self.rnn.proj_size or 4], -h0) if isinstance(self.rnn, nn.LSTM) else h0
        out, state = self.rnn(h, h0)
        if self.packed:
            out, _ = pad_packed_sequence(out, batch_first=self.batch_first, total_length=x.shape[1])
        out = out if self.batch_first else out.transpose(0, 1)
        states = state if isinstance(state, tuple) else (state,)
        final = torch.cat([s.transpose(0, 1).flatten(1) for s in states], 1)
        feats = torch.cat([out.mean(1) * (self.use != "state"), final * (self.use != "output")], 1)
        return self.head(feats)


def attention_masks(x: torch.Tensor, kind: str | None, s: int) -> dict:
    """MultiheadAttention's mask arguments for queries at x's n positions and keys at its
    first s, 2 heads: ``kind`` None, ``"padding"`` (keys whose first feature is negative
    are masked, never the first), ``"float_padding"`` (a float key_padding_mask),
    ``"causal"`` (a float causal (n, n) mask), ``"bool"`` (a boolean (n, s) one), ``"3d"``
    (a float mask per example and head, (B·heads, n, s)), or ``"is_causal"`` with a boolean
    mask that is not causal, which torch replaces by the causal one (``"is_causal"``), keeps
    where the weights are asked for (``"is_causal_weights"``) and adds the padding mask to
    (``"is_causal_padding"``)."""
    n, kw = x.shape[1], {}
    padding = (x[:, :s, 0] < 0) & (torch.arange(s, device=x.device) > 0)
    if kind == "padding":
        kw["key_padding_mask"] = padding
    elif kind == "float_padding":
        kw["key_padding_mask"] = x[:, :s, 0]
    elif kind == "causal":
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(n, device=x.device, dtype=x.dtype)
    elif kind == "bool":
        kw["attn_mask"] = torch.ones(n, s, dtype=torch.bool, device=x.device).triu(1)
    elif kind == "3d":   # example b's rows are b·heads ... b·heads + heads - 1
        kw["attn_mask"] = -(x[..., None, :s, 1] - x[..., :, None, 2]).square().repeat_interleave(2, 0)
    elif kind and kind.startswith("is_causal"):
        kw["attn_mask"] = torch.ones(n, s, dtype=torch.bool, device=x.device).triu(2)
        kw["is_causal"] = True
        if kind == "is_causal_padding":
            kw["key_padding_mask"] = padding
    return kw


class Cells(nn.Module):
    """An RNNCell (tanh or ReLU), GRUCell or LSTMCell (``kind``) in a loop over the steps of
    x (B, T, D); the head reads the last state (``use="last"``), the mean of all, or the
    LSTM's last hidden and cell states ("state"); ``hx``: the first state made from the
    input, else none. ``form``: "seq_first" (the steps of x's (T, B, D) view), "shared"
    (the same cell runs on over the reversed steps), "stacked" (a second cell reads the
    first's states), "changed" (each state scaled in place after the call), "T1" (one
    step), "TB" (T == B on the grid's batch), "per_example" (each example's steps alone, 1-D inputs)."""

    def __init__(self, kind: str, bias: bool, hx: bool, use: str, form: str = "loop"):
        super().__init__()
        cls = {"RNN": nn.RNNCell, "RNN_relu": nn.RNNCell, "GRU": nn.GRUCell, "LSTM": nn.LSTMCell}[kind]
        extra = {"nonlinearity": "relu"} if kind == "RNN_relu" else {}
        self.cell = cls(D, 4, bias=bias, **extra)
        self.cell2 = cls(4, 4, bias=bias, **extra) if form == "stacked" else None
        self.lstm, self.hx, self.use, self.form = kind == "LSTM", hx, use, form
        self.head = nn.Linear(8 if use == "state" else 4, 3)

    def _first(self, x):
        if not self.hx:
            return None
        h = torch.tanh(x[..., 0, :4])
        return (h, -h) if self.lstm else h

    def _run(self, steps, state):
        """The states after each step (the hidden one, or (h, c)), from ``state``."""
        out = []
        for x_t in steps:
            state = self.cell(x_t, state)
            if self.form == "changed":
                (state[0] if self.lstm else state).mul_(0.9)
            out.append(state)
        return out

    def _features(self, x):
        steps = list(x.transpose(0, 1) if self.form == "seq_first" else x.unbind(-2))
        states = self._run(steps, self._first(x))
        if self.form == "shared":
            states += self._run(steps[::-1], states[-1])
        if self.cell2 is not None:
            upper, state = [], None
            for s in states:
                state = self.cell2(s[0] if self.lstm else s, state)
                upper.append(state)
            states = upper
        hs = [s[0] if self.lstm else s for s in states]
        if self.use == "state":
            return torch.cat(states[-1], -1)
        return hs[-1] if self.use == "last" else torch.stack(hs).mean(0)

    def forward(self, x):
        x = x[:, :1] if self.form == "T1" else x[:, :B] if self.form == "TB" else x
        if self.form == "per_example":
            return self.head(torch.stack([self._features(row) for row in x]) if len(x) else x.new_zeros(0, 4))
        return self.head(self._features(x))


class Attention(nn.Module):
    """MultiheadAttention on q = Linear(x) and k = v = q or x's first kdim features;
    ``mask``: a kind of :func:`attention_masks`; ``twice``: called again on its own output."""

    def __init__(self, batch_first: bool, bias: bool, add_bias_kv: bool, kdim: int | None,
                 mask: str | None = None, zero_attn: bool = False, twice: bool = False):
        super().__init__()
        self.batch_first, self.mask, self.twice = batch_first, mask, twice
        self.attn = nn.MultiheadAttention(D + 1, 2, bias=bias, add_bias_kv=add_bias_kv, kdim=kdim,
                                          vdim=kdim, batch_first=batch_first, add_zero_attn=zero_attn)
        self.q = nn.Linear(D, D + 1)
        self.head = nn.Linear(D + 1, 3)

    def forward(self, x):
        q = self.q(x)
        kv = x[..., :self.attn.kdim] if self.attn.kdim != D + 1 else q
        kw = attention_masks(x, self.mask, x.shape[1])
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        need_weights = self.mask is None or self.mask == "is_causal_weights"
        out = self.attn(q, kv, kv, need_weights=need_weights, **kw)[0]
        if self.twice and self.attn.kdim == D + 1:
            out = self.attn(out, out, out, need_weights=False, **kw)[0]
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1))


class CrossAttention(nn.Module):
    """MultiheadAttention from all T positions to the first S = T - 2 (query and key
    lengths differ); ``mask``: a kind of :func:`attention_masks`."""

    def __init__(self, batch_first: bool, mask: str | None, zero_attn: bool, need_weights: bool):
        super().__init__()
        self.batch_first, self.mask, self.need_weights = batch_first, mask, need_weights
        self.attn = nn.MultiheadAttention(D + 1, 2, batch_first=batch_first, add_zero_attn=zero_attn)
        self.q, self.kv, self.head = nn.Linear(D, D + 1), nn.Linear(D, D + 1), nn.Linear(D + 1, 3)

    def forward(self, x):
        s = x.shape[1] - 2
        q, kv = self.q(x), self.kv(x[:, :s])
        kw = attention_masks(x, self.mask, s)
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        out = self.attn(q, kv, kv, need_weights=self.need_weights, **kw)[0]
        return self.head(out.mean(1 if self.batch_first else 0))


class Bag(nn.Module):
    """EmbeddingBag on ids (B, L): as a 2-D batch, or flat with offsets: ``"even"`` (every
    bag L long), ``"ragged"`` (bag b holds its first ids[b, 0] % 5 ids, so some are empty),
    ``"last"`` (ragged, with include_last_offset); ``twice``: the bag is called again on
    the reversed ids, and both outputs are used."""

    def __init__(self, mode: str, weighted: bool, padding_idx: int | None, offsets, twice: bool = False):
        super().__init__()
        self.weighted, self.offsets, self.twice = weighted, offsets, twice
        self.bag = nn.EmbeddingBag(9, 4, mode=mode, padding_idx=padding_idx, include_last_offset=offsets == "last")
        self.head = nn.Linear(4, 3)

    def _call(self, ids):
        w = (ids.to(self.head.weight.dtype) / 7 + 0.5) if self.weighted else None
        if not self.offsets:
            return self.bag(ids, per_sample_weights=w)
        n, L = ids.shape
        lengths = torch.full((n,), L, device=ids.device) if self.offsets == "even" else ids[:, 0] % 5
        keep = torch.arange(L, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        offsets = offsets if self.offsets == "last" else offsets[:-1]
        return self.bag(ids[keep], offsets, per_sample_weights=None if w is None else w[keep])

    def forward(self, ids):
        out = self._call(ids)
        if self.twice:
            out = out * self._call(ids.flip(1)).sigmoid()
        return self.head(torch.tanh(out))


class Convs(nn.Module):
    """A Conv1d/2d/3d of 3-wide kernels (dilation 2 with ``padding="same"``), tanh, a linear head."""

    def __init__(self, dims: int, padding, stride: int, groups: int, bias: bool, padding_mode: str = "zeros"):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = conv(2, 4, 3, padding=padding, stride=stride, groups=groups, bias=bias,
                         dilation=2 if padding == "same" else 1, padding_mode=padding_mode)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class ConvTs(nn.Module):
    """A ConvTranspose1d/2d/3d of 3-wide kernels (padding 1), tanh, a linear head."""

    def __init__(self, dims: int, stride: int, output_padding: int, dilation: int, groups: int, bias: bool):
        super().__init__()
        conv_t = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        self.conv = conv_t(2, 4, 3, stride=stride, padding=1, output_padding=output_padding, dilation=dilation,
                           groups=groups, bias=bias)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Bilinears(nn.Module):
    """nn.Bilinear on the two halves of x (B, 7) or (B, T, 7), the second time by keyword,
    tanh, a linear head; ``seq_first``: on (T, B, ·) (the rule's fallback)."""

    def __init__(self, layout: str, bias: bool, twice: bool):
        super().__init__()
        self.layer, self.head = nn.Bilinear(3, 4, 5, bias=bias), nn.Linear(5, 3)
        self.layout, self.twice = layout, twice

    def forward(self, x):
        x1, x2 = x[..., :3], x[..., 3:]
        if self.layout == "seq_first":
            x1, x2 = x1.transpose(0, 1), x2.transpose(0, 1)
        h = torch.tanh(self.layer(x1, x2))
        if self.twice:
            h = h + torch.tanh(self.layer(input1=x1, input2=2 * x2))
        if self.layout == "seq_first":
            h = h.transpose(0, 1)
        return self.head(h if h.dim() == 2 else h.mean(1))


class Norms(nn.Module):
    def __init__(self, kind: str, affine: bool, track: bool):
        super().__init__()
        if kind.startswith("InstanceNorm"):
            dims = int(kind[-2])
            self.norm = getattr(nn, kind)(2, affine=affine, track_running_stats=track)
            self.shape = (2,) + (4,) * dims
        else:   # RMSNorm over the last one or two dimensions
            shape = (4,) if kind == "RMSNorm" else (3, 4)
            self.norm = nn.RMSNorm(shape, elementwise_affine=affine, eps=1e-3 if track else None)
            self.shape = (3, 4)
        self.head = nn.Linear(int(torch.tensor(self.shape).prod()), 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(x)).flatten(1))


class Affine(nn.Module):
    """nn.Linear or Hugging Face's Conv1D (y = a W + b) on 2-D inputs (B, D) (``T`` None) or
    sequences (B, T, D); ``bias``: the bias is trained; ``frozen``: the weight is not."""

    def __init__(self, kind: str, T: int | None, bias: bool, frozen: bool):
        super().__init__()
        self.T = T
        if kind == "Linear":
            self.layer = nn.Linear(D, 4, bias=bias)
        else:
            Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
            self.layer = Conv1D(4, D)
            self.layer.bias.requires_grad_(bias)
        self.layer.weight.requires_grad_(not frozen)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.layer(x))
        return self.head(h if self.T is None else h.mean(1))


class Merged(nn.Module):
    """A row-wise layer (``kind``: Linear, LayerNorm, RMSNorm, Embedding, Hugging Face's
    Conv1D) on the rows of (B, T, ·) merged into (B·T, ·), as OPT's MLP calls its Linears,
    then back to (B, T, ·), tanh and a head on the mean. ``order``: "example" (a reshape),
    "step" (the steps first: x.transpose(0, 1).reshape(-1, d), rows of all examples
    interleaved), "twice" (the batch stacked on itself changed: (2B·T, ·)); ``T``: the
    steps read (1, the grid's B, or all 4)."""

    def __init__(self, kind: str, order: str, T: int):
        super().__init__()
        self.kind, self.order, self.T = kind, order, T
        if kind == "Conv1D":
            self.layer = pytest.importorskip("transformers.pytorch_utils").Conv1D(4, D)
        else:
            self.layer = {"Linear": lambda: nn.Linear(D, 4), "LayerNorm": lambda: nn.LayerNorm(D),
                          "RMSNorm": lambda: nn.RMSNorm(D), "Embedding": lambda: nn.Embedding(11, D)}[kind]()
        self.head = nn.Linear(D if kind in ("LayerNorm", "RMSNorm", "Embedding") else 4, 3)

    def forward(self, x):
        x = x[:, :self.T]
        B, T = x.shape[:2]
        if self.order == "step":
            rows = x.transpose(0, 1).reshape(B * T, *x.shape[2:])
        elif self.order == "twice":
            rows = torch.cat([x, x.flip(1)]).reshape(2 * B * T, *x.shape[2:])
        else:
            rows = x.reshape(B * T, *x.shape[2:])
        out = self.layer(rows)
        if self.order == "step":
            h = out.reshape(T, B, -1).transpose(0, 1)
        else:
            h = out.reshape(-1, B, T, out.shape[-1]).sum(0) if self.order == "twice" else out.reshape(B, T, -1)
        return self.head(torch.tanh(h).mean(1))


class MyLinear(nn.Linear):
    """A user's subclass with the parent's forward."""


class OwnLinear(nn.Linear):
    """A Linear subclass with a forward of its own: ``form`` "same" computes x Wᵀ + b
    (Falcon's), "scaled" x (2W)ᵀ + b, "detached" the same values with no gradient in W,
    "relu" relu(x) Wᵀ + b, "router" returns (x Wᵀ + b, its top-2 softmax weights, their
    indices), as PhiMoE's router does."""

    def __init__(self, form: str, bias: bool):
        super().__init__(D, D, bias=bias)
        self.form = form

    def forward(self, x):
        if self.form == "router":
            logits = super().forward(x)
            return logits, *torch.topk(logits.softmax(-1), 2)
        w = {"scaled": 2 * self.weight, "detached": self.weight.detach()}.get(self.form, self.weight)
        y = (x.relu() if self.form == "relu" else x) @ w.T
        return y if self.bias is None else y + self.bias


class OwnLayerNorm(nn.Module):
    """A LayerNorm class of its own (DeBERTa's; Cohere's without β) over the last dimension,
    in float32 whatever the input's dtype; ``form`` "rms": an RMSNorm under that name,
    "channels": over dimension 1 of (B, C, T) (SqueezeBERT's)."""

    def __init__(self, form: str, bias: bool):
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, D))
        self.bias = nn.Parameter(torch.linspace(-0.3, 0.2, D)) if bias else None
        self.variance_epsilon = 1e-5

    def forward(self, x):
        h = (x.transpose(1, 2) if self.form == "channels" else x).float()
        mean = 0 if self.form == "rms" else h.mean(-1, keepdim=True)
        h = (h - mean) * torch.rsqrt((h - mean).pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = self.weight.float() * h + (0 if self.bias is None else self.bias.float())
        return (h.transpose(1, 2) if self.form == "channels" else h).to(x.dtype)


class OwnRMSNorm(nn.Module):
    """Hugging Face's RMSNorm copied under a name of one's own: ``form`` "same" (Llama's),
    "gemma" ((1 + w) · x̂), "detached" (Llama's values, no gradient in w)."""

    def __init__(self, form: str, bias: bool):
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, D))
        self.variance_epsilon = 1e-5

    def forward(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        w = {"gemma": 1 + self.weight, "detached": self.weight.detach()}.get(self.form, self.weight)
        return (w.float() * h).to(x.dtype)


class OwnNoNorm(nn.Module):
    """MobileBERT's NoNorm (x · γ + β) under a name of one's own; ``form`` "square": x² · γ + β."""

    def __init__(self, form: str, bias: bool):
        super().__init__()
        self.form = form
        self.bias = nn.Parameter(torch.linspace(-0.3, 0.2, D))
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, D))

    def forward(self, x):
        return (x * x if self.form == "square" else x) * self.weight + self.bias


class Own(nn.Module):
    """An :class:`OwnLinear`, :class:`OwnLayerNorm`, :class:`OwnRMSNorm` or :class:`OwnNoNorm`
    after a Linear, then a head, on ``layout``: "batch" (B, T, D), "seq_first" (the same
    transposed to (T, B, D) inside), "flat" (B, D), "T1" (B, 1, D), "TB" (B, B, D)."""

    def __init__(self, kind: str, form: str, bias: bool, layout: str = "batch"):
        super().__init__()
        self.channels, self.layout = form == "channels", layout
        self.pre = nn.Linear(D, D)
        self.own = {"linear": OwnLinear, "layer_norm": OwnLayerNorm, "rms_norm": OwnRMSNorm,
                    "no_norm": OwnNoNorm}[kind](form, bias)
        self.head = nn.Linear(D, 3)

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's input shape."""
        return {"flat": (D,), "T1": (1, D), "TB": (B, D)}.get(self.layout, (T, D))

    def forward(self, x):
        seq_first = self.layout == "seq_first"
        h = self.pre(x.transpose(0, 1) if seq_first else x)
        h = self.own(h.transpose(1, 2) if self.channels else h)
        if isinstance(h, tuple):   # a router's (logits, top-k weights, their indices)
            h = h[0] * h[1].sum(-1, keepdim=True)
        h = torch.tanh(h.transpose(1, 2) if self.channels else h)
        return self.head(h if self.layout == "flat" else h.mean(0 if seq_first else 1))


RNN_KINDS = ["RNN", "RNN_relu", "GRU", "LSTM", "LSTM_proj"]
RNN_GRID = ([("recurrent", c) for c in itertools.product(RNN_KINDS, [1, 2], [False, True],
                                                         [True, False], [True, False], [False, True])]
            + [("recurrent", (kind, 2, True, True, bf, packed, use, hx))
               for kind, bf, packed, use, hx in itertools.product(RNN_KINDS, [True, False],
                                                                  [False, True], ["state", "both"], [False, True])])
CELL_KINDS = ["RNN", "RNN_relu", "GRU", "LSTM"]
CELL_GRID = ([("cells", c) for c in itertools.product(CELL_KINDS, [True, False], [False, True], ["last", "all"])]
             + [("cells", (kind, True, hx, "all", form)) for kind in CELL_KINDS for hx, form in
                ((False, "seq_first"), (True, "shared"), (False, "stacked"), (True, "T1"), (False, "TB"))]
             + [("cells", ("LSTM", bias, hx, "state", form)) for bias, hx, form in
                ((True, True, "loop"), (False, False, "loop"), (True, True, "shared"), (True, False, "stacked"))]
             + [("cells", (kind, True, True, "all", "changed")) for kind in ("GRU", "LSTM")])
#: a cell on one example's 1-D steps: no batch dimension, the fallback
CELL_UNBATCHED = [("cells", (kind, True, hx, "all", "per_example")) for kind, hx in (("GRU", True), ("LSTM", False))]
MHA_GRID = ([("attention", c) for c in itertools.product([True, False], [True, False], [False, True], [None, 3])]
            + [("attention", (bf, True, False, kdim, mask, zero, twice))
               for bf, kdim, mask, zero, twice in itertools.product([True, False], [None, 3],
                                                                    ["padding", "causal", "bool"],
                                                                    [False, True], [False, True])]
            + [("attention", (bf, True, False, None, mask, zero, False))
               for bf, mask, zero in itertools.product([True, False], ["float_padding", "3d", "is_causal",
                                                                       "is_causal_weights", "is_causal_padding"],
                                                       [False, True])])
CROSS_GRID = [("cross_attention", c) for c in itertools.product([True, False], [None, "padding", "bool", "3d",
                                                                            "is_causal"], [False, True], [False, True])]
BAG_GRID = [("bag", c) for c in [(m, w, p, o, t) for m in ("sum", "mean", "max") for w in (False, True)
                                 for p in (None, 0) for o in (False, "even", "ragged", "last")
                                 for t in (False, True) if not (w and m != "sum")]]
CONV_GRID = ([("conv", c) for c in itertools.product([1, 2, 3], ["same", 1], [1, 2], [1, 2], [True, False])
              if not (c[1] == "same" and c[2] == 2)]
             + [("conv", (dims, padding, stride, 2, True, mode))   # the input padded by the mode, then no padding
                for dims, (padding, stride), mode in itertools.product([1, 2, 3], [("same", 1), (1, 1), (1, 2)],
                                                                       ["reflect", "replicate", "circular"])])
BILINEAR_GRID = [("bilinear", c) for c in itertools.product(["flat", "seq", "seq_first"], [True, False],
                                                              [False, True])]
#: ConvTranspose: stride, output padding (below the stride, or below a larger dilation:
#: the fallback), dilation, groups, bias
CONV_T_GRID = [("conv_t", (dims, *c)) for dims in (1, 2, 3)
               for c in [(1, 0, 1, 1, True), (2, 1, 1, 2, True), (2, 0, 2, 1, False), (2, 1, 2, 2, True),
                         (1, 1, 2, 1, True), (3, 2, 1, 1, False)]]
NORM_GRID = [("norm", c) for c in itertools.product(
    ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm", "RMSNorm2"], [True, False], [False, True])]
AFFINE_GRID = [("affine", c) for c in itertools.product(["Linear", "Conv1D"], [None, 1, T], [True, False],
                                                        [False, True])]
OWN_GRID = [("own", (kind, form, bias)) for kind, forms in (("linear", ["same", "scaled", "detached", "relu",
                                                                        "router"]),
                                                             ("layer_norm", ["same", "rms", "channels"]),
                                                             ("rms_norm", ["same", "gemma", "detached"]),
                                                             ("no_norm", ["same", "square"]))
            for form in forms for bias in ((True, False) if kind in ("linear", "layer_norm") else (False,))]
OWN_GRID += [("own", (kind, "same", True, layout)) for kind in ("linear", "layer_norm", "rms_norm", "no_norm")
             for layout in ("seq_first", "flat", "T1", "TB")]
OWN_GRID += [("own", ("linear", "router", True, layout)) for layout in ("seq_first", "flat", "T1", "TB")]
NORM_ACT_GRID = ([("norm_act", ("bn", act, "batch")) for act in ("none", "relu_inplace", "gelu", "silu")]
                 + [("norm_act", ("gn", act, "batch")) for act in ("none", "hardswish")]
                 + [("norm_act", ("gn1", "none", "batch")), ("norm_act", ("ln_nobias", "none", "batch"))]
                 + [("norm_act", ("ln2d", act, "batch")) for act in ("none", "gelu")]
                 + [("norm_act", ("ln", "gelu", layout)) for layout in ("batch", "seq_first", "TB")]
                 + [("norm_act", ("ln2d_last", "none", "batch")), ("norm_act", ("bn_act_first", "silu", "batch"))]
                 + [("norm_act", ("ln1p", "none", layout)) for layout in ("batch", "seq_first", "TB")]
                 + [("norm_act", ("ln1p", "gelu", "batch"))])
SCALE_GRID = ([("scale", ("last", layout)) for layout in ("batch", "seq_first", "TB", "flat")]
              + [("scale", (kind, "batch")) for kind in ("shaped", "2d", "shaped_nchw", "inplace", "squared")])
PRELU_GRID = ([("scale", ("prelu", layout)) for layout in ("batch", "seq_first", "TB", "flat")]
              + [("scale", ("prelu_c", "flat")), ("scale", ("prelu_nchw", "batch"))])
#: (gain, bias, groups, stride, padding, dilation, plain[, padding mode: "_ignored" if the forward pads with zeros])
STD_CONV_GRID = [("std_conv", c) for c in [(False, False, 1, 1, 1, 1, False), (False, True, 2, 2, 0, 1, False),
                                           (True, True, 1, 1, "same", 2, False), (True, False, 2, 1, 1, 1, False),
                                           (True, True, 4, 2, 1, 1, False), (False, True, 1, 1, 1, 1, True),
                                           # padding modes: its forward pads by the mode, or ignores it (zeros)
                                           (False, True, 1, 1, 1, 1, False, "reflect"),
                                           (True, True, 2, 2, 1, 1, False, "circular"),
                                           (False, True, 1, 1, 1, 1, False, "reflect_ignored"),
                                           # timm's ScaledStdConv2dSame: TensorFlow's SAME padding in its forward
                                           (True, True, 1, 2, 0, 1, False, "same_pad"),
                                           (True, False, 2, 2, 0, 2, False, "same_pad"),
                                           (False, True, 1, 2, 0, 1, False, "same_pad_left")]]
#: (how the forward uses pos_embed, layout): see FreeNet
MERGED_KINDS = ["Linear", "LayerNorm", "RMSNorm", "Embedding", "Conv1D"]
#: rows merged with the batch example by example: the rule; in another order: the fallback
MERGED_GRID = [("merged", (kind, "example", steps)) for kind in MERGED_KINDS for steps in (1, B, T)]
MERGED_OTHER_ORDER = [("merged", (kind, order, steps)) for kind in ("Linear", "Embedding")
                      for order in ("step", "twice") for steps in (B, T)]
FREE_GRID = [("free", (kind, layout)) for kind in FreeNet.KINDS for layout in ("batch", "TB", "T1", "seq_first")]
#: (the windows' order, how the bias meets them): see Windows
WINDOWS_GRID = [("windows", (order, kind)) for order in ("example", "step") for kind in ("add", "inplace", "sdpa")]
#: (how the bias meets the scores, layout): see RelativeBias
RELATIVE_GRID = [("relative", (kind, layout)) for kind in RelativeBias.KINDS
                 for layout in ("batch", "seq_first", "T1", "TB")]
#: Hugging Face's experts layers (kind, how the rows meet the batch, implementation): see ExpertsNet
EXPERTS_GRID = [("experts", (kind, layout, impl)) for kind in ("mixtral", "gpt_oss", "nemotron_h")
                for layout in ("merged", "flat", "T1", "TB", "step", "twice") for impl in ("eager", "batched_mm")]
GRID = (AFFINE_GRID + MERGED_GRID + MERGED_OTHER_ORDER + RNN_GRID + CELL_GRID + CELL_UNBATCHED + MHA_GRID
        + CROSS_GRID + BAG_GRID + CONV_GRID
        + CONV_T_GRID + BILINEAR_GRID
        + NORM_GRID + OWN_GRID + NORM_ACT_GRID + SCALE_GRID + STD_CONV_GRID + FREE_GRID + RELATIVE_GRID
        + WINDOWS_GRID + EXPERTS_GRID + [("subclass", ())])


def _build(family, config, n=B):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if family == "experts":
        pytest.importorskip("transformers")
        return ExpertsNet(*config), torch.randn(n, T, D, generator=g, dtype=torch.float64)
    if family == "recurrent":
        x = torch.randn(n, T, D, generator=g, dtype=torch.float64)
        if n > 1:
            x[1, 2:] = 0   # a shorter sequence (padding)
        return Recurrent(*config), x
    if family == "merged":
        if config[0] == "Embedding":
            return Merged(*config), torch.randint(0, 11, (n, T), generator=g)
        return Merged(*config), torch.randn(n, T, D, generator=g, dtype=torch.float64)
    if family == "positions":
        ids = torch.randint(1, 11, (n, T), generator=g)
        if n > 1:
            ids[1, 2:] = 0   # a shorter sequence (padding)
        return PositionsNet(*config), ids
    if family == "cells":
        return Cells(*config), torch.randn(n, T, D, generator=g, dtype=torch.float64)
    if family == "attention":
        return Attention(*config), torch.randn(n, T, D, generator=g, dtype=torch.float64)
    if family == "cross_attention":
        return CrossAttention(*config), torch.randn(n, T, D, generator=g, dtype=torch.float64)
    if family == "bag":
        ids = torch.randint(1, 9, (n, 4), generator=g)
        if n > 1:
            ids[:, 0] = torch.tensor([4, 5, 3])[:n]   # ragged bags of 4, 0 and 3 ids
            ids[1, 1] = ids[0, 1] = 0
            ids[0, 3] = ids[0, 2]
        return Bag(*config), ids
    if family == "conv":
        dims = config[0]
        return Convs(*config), torch.randn(n, 2, *(6,) * dims, generator=g, dtype=torch.float64)
    if family == "bilinear":
        shape = (n, 7) if config[0] == "flat" else (n, T, 7)
        return Bilinears(*config), torch.randn(*shape, generator=g, dtype=torch.float64)
    if family == "conv_t":
        return ConvTs(*config), torch.randn(n, 2, *(4,) * config[0], generator=g, dtype=torch.float64)
    if family == "norm":
        model = Norms(*config)
        if isinstance(model.norm, nn.modules.instancenorm._InstanceNorm) and model.norm.track_running_stats:
            model.norm.running_mean.uniform_(-1, 1)
            model.norm.running_var.uniform_(0.5, 2)
        if getattr(model.norm, "weight", None) is not None:
            with torch.no_grad():
                model.norm.weight.uniform_(0.5, 1.5)
        return model, 2 * torch.randn(n, *model.shape, generator=g, dtype=torch.float64) + 1
    if family == "affine":
        model = Affine(*config)
        shape = (n, D) if model.T is None else (n, model.T, D)
        return model, torch.randn(*shape, generator=g, dtype=torch.float64)
    if family == "subclass":
        return nn.Sequential(MyLinear(D, 4), nn.Tanh(), nn.Linear(4, 3)), torch.randn(n, D, generator=g,
                                                                                       dtype=torch.float64)
    if family == "own":
        model = Own(*config)
        return model, torch.randn(n, *model.shape, generator=g, dtype=torch.float64)
    if family == "norm_act":
        model = NormActNet(*config)
        return model, 2 * torch.randn(n, *model.shape, generator=g, dtype=torch.float64) + 0.5
    if family == "scale":
        model = ScaleNet(*config)
        return model, torch.randn(n, *model.shape, generator=g, dtype=torch.float64)
    if family == "windows":
        return Windows(*config), torch.randn(n, *Windows.shape, generator=g, dtype=torch.float64)
    if family == "relative":
        model = RelativeBias(*config)
        return model, torch.randn(n, *model.shape, generator=g, dtype=torch.float64)
    if family == "free":
        model = FreeNet(*config)
        return model, torch.randn(n, *model.shape, generator=g, dtype=torch.float64)
    if family == "std_conv":
        gain, bias, groups, stride, padding, dilation, plain, *mode = config
        mode = mode[0] if mode else "zeros"
        same = {"same_pad": True, "same_pad_left": "left"}.get(mode, False)
        layer = MyStdConv2d(4, 8, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                            gain=gain, plain=plain, padding_mode="zeros" if same else mode.removesuffix("_ignored"),
                            by_mode=not mode.endswith("_ignored"), same_pad=same)
        return (nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)),
                torch.randn(n, 4, 7, 6, generator=g, dtype=torch.float64))
    raise KeyError(family)


def _prepare(family, config, n=B):
    model, x = _build(family, config, n)
    if any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules()):
        model(_build(family, config, 1)[1].float())   # materialize the lazy head
    model = model.double().eval()
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(2))
    return model, x, y


def _refs(scorer, K):
    return (torch.randn(K, scorer.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
            if K else None)


#: the (family, config, n, engines) that :func:`_agree` compared with the loop in this session: a later test of
#: the same model and batch (one that reads ``explain()``) does not compare them again
_AGREED: set[tuple] = set()


def _agree(family, config, engines=("auto", "vmap"), edit=None, n=B):
    """Each of ``engines`` equals the loop on the family's model (after ``edit(model)``, if
    given, under no_grad) on a batch of ``n``, or refuses it (never ``auto``, the ghost
    engine); returns the model's auto scorer."""
    model, x, y = _prepare(family, config, n)
    key = (family, repr(config), n, engines)
    if edit is None and key in _AGREED:
        return gs.Scorer(model, engine="auto")
    if edit is not None:
        with torch.no_grad():
            edit(model)
    loop = gs.Scorer(model, engine="loop")
    V = _refs(loop, 2)
    ref = loop.score_batch(x, y, refs=V)   # its loss and norms are K = 0's too
    assert float(ref.sq_norm.min()) > 0
    for K in (0, 2):
        for engine in engines:
            scorer = gs.Scorer(model, engine=engine)
            try:
                out = scorer.score_batch(x, y, refs=V if K else None)
            except gs.GradscoreError:
                assert engine != "auto", f"auto raised on {family} {config}"
                continue
            torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(out.sq_norm, ref.sq_norm, rtol=1e-6, atol=1e-12,
                                       msg=lambda m: f"{engine} {family} {config} K={K}: {m}")
            if K:
                torch.testing.assert_close(out.dots, ref.dots, rtol=1e-6, atol=1e-9,
                                           msg=lambda m: f"{engine} {family} {config} K={K}: {m}")
    if edit is None:
        _AGREED.add(key)
    return gs.Scorer(model, engine="auto")


@pytest.mark.parametrize("family,config", GRID, ids=lambda v: str(v))
def test_every_engine_equals_the_loop_or_refuses(family, config):
    _agree(family, config)


@pytest.mark.parametrize("family,config", [c for c in RNN_GRID if c[1][1] == 2 and c[1][2] and c[1][0] != "RNN_relu"
                                           ][::3], ids=lambda v: str(v))
def test_recurrent_layers_with_saturated_gates_equal_the_loop(family, config):
    # recurrent weights 12 times the initial ones drive the gates and tanh to saturation
    # (|tanh c| and |h| above 0.99), where trained layers often sit; the grid's keep |tanh c| below 0.9
    _agree(family, config, edit=lambda model: [p.mul_(12) for p in model.rnn.parameters()])


@pytest.mark.parametrize("family,config", [RNN_GRID[0], RNN_GRID[-1], CELL_GRID[0], CELL_GRID[-1], MERGED_GRID[4],
                                           MHA_GRID[0],
                                           BAG_GRID[-1], FREE_GRID[0], RELATIVE_GRID[4], WINDOWS_GRID[2],
                                           CONV_GRID[0], CONV_T_GRID[1], BILINEAR_GRID[-1], NORM_GRID[0],
                                           EXPERTS_GRID[0], EXPERTS_GRID[-1],
                                           *OWN_GRID[::7],
                                           *NORM_ACT_GRID[::3],
                                           *SCALE_GRID[::2], *PRELU_GRID[::2], *STD_CONV_GRID[::2]],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_an_empty_batch_gives_empty_results(family, config, engine):
    """... and no warning: a first batch of no examples shows nothing of where gradients reach."""
    model, x, y = _prepare(family, config, n=0)
    scorer = gs.Scorer(model, engine=engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gs.GradscoreWarning)
        out = scorer.score_batch(x, y, refs=_refs(scorer, 2))
    assert out.sq_norm.shape == (0,) and out.dots.shape == (0, 2) and out.loss.shape[0] == 0


def test_a_recurrent_kernel_called_on_weights_of_ones_own_takes_the_fallback_and_says_why():
    """torch's LSTM kernel (with a projection) called on weights of one's own: no layer, so
    no rule, and the free-parameter rule does not take the op: the fallback (vmap), equal
    to the loop, with the reason."""
    torch.manual_seed(0)

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_ih, self.w_hh = nn.Parameter(torch.randn(16, D) / 3), nn.Parameter(torch.randn(16, 2) / 3)
            self.w_hr, self.head = nn.Parameter(torch.randn(2, 4) / 3), nn.Linear(2, 3)

        def forward(self, x):
            h0, c0 = x.new_zeros(1, x.shape[0], 2), x.new_zeros(1, x.shape[0], 4)
            out = torch.lstm(x, (h0, c0), [self.w_ih, self.w_hh, self.w_hr], False, 1, 0.0, False, False, True)[0]
            return self.head(out.mean(1))
    m = Functional().double().eval()
    x = torch.randn(B, T, D, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    ref = gs.Scorer(m, engine="loop").score_batch(x, y)
    scorer = gs.Scorer(m)
    torch.testing.assert_close(scorer.score_batch(x, y).sq_norm, ref.sq_norm, rtol=1e-6, atol=1e-12)
    why = scorer.explain()
    assert why["head.weight"].startswith("ghost")
    assert why["w_ih"] == why["w_hr"] == "vmap (no ghost rule for Functional)", why


def test_vmap_on_a_recurrent_model_is_one_gradscore_error():
    model, x, y = _prepare("recurrent", ("GRU", 1, False, True, True, False))
    with pytest.raises(gs.GradscoreError, match="vmap cannot trace this model.*engine='auto'"):
        gs.Scorer(model, engine="vmap").score_batch(x, y)


class ChangedOutput(Recurrent):
    """:class:`Recurrent` whose forward then changes the recurrent layer's output in place
    (``change``), before the head reads it."""

    def __init__(self, *config, change: bool = True):
        super().__init__(*config)
        self.change = change
        self.rnn.register_forward_hook(lambda m, args, out: self.changed(out))

    def changed(self, out):
        if self.change:
            (out[0].data if isinstance(out[0], PackedSequence) else out[0]).mul_(2)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("change", [False, True])
def test_the_recurrent_rule_takes_the_last_layers_states_from_the_calls_output_unless_changed_since(
        kind, packed, change, monkeypatch):
    """Two layers, one run of torch's kernel per call, for the first: the last layer's
    states are the call's output. An output changed in place after the call (here
    doubled) is not the layer's states any more: then both layers run again, and the
    numbers still equal the loop's."""
    _, x, y = _prepare("recurrent", (kind, 2, True, True, True, packed))
    model = ChangedOutput(kind, 2, True, True, True, packed, change=change).double().eval()
    runs = []
    kernel = recurrent_rule._layer_output
    monkeypatch.setattr(recurrent_rule, "_layer_output", lambda *a, **k: runs.append(a[1]) or kernel(*a, **k))
    V = _refs(gs.Scorer(model, engine="loop"), 2)
    scorer = gs.Scorer(model, engine="ghost")
    scorer.score_batch(x, y, refs=V)   # the first batch also checks the sum of the gradients
    runs.clear()
    got = scorer.score_batch(x, y, refs=V)
    want = gs.Scorer(model, engine="loop").score_batch(x, y, refs=V)
    torch.testing.assert_close(got.sq_norm, want.sq_norm, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(got.dots, want.dots, rtol=1e-6, atol=1e-9)
    assert runs == ([0, 1] if change else [0])


def test_a_subclass_with_the_parents_forward_uses_the_parents_rule():
    scorer = _agree("subclass", ())
    scorer.score_batch(*_prepare("subclass", ())[1:])
    assert scorer.explain()["0.weight"].startswith("ghost (linear rule on 0: MyLinear")


@pytest.mark.parametrize("family,config", OWN_GRID, ids=lambda v: str(v))
def test_a_layer_class_of_its_own_takes_the_rule_only_where_it_computes_what_the_rule_assumes(family, config):
    """A Linear subclass with its own forward, or a LayerNorm or RMSNorm class of one's own
    (Falcon's, DeBERTa's, Cohere's, Llama's), takes the Linear or norm rule where it computes
    x Wᵀ + b, γ ⊙ x̂ + β or γ ⊙ x̂ in value and gradient (checked on the first batch, with
    other weights). One that computes anything else (with a weight that gets no gradient
    too), or returns a tuple (PhiMoE's router), is a layer without a rule: the free-parameter
    rule follows its weights' uses (on batch-first rows: sequence-first ones go to the
    fallback, with why)."""
    scorer = _agree(family, config)
    scorer.score_batch(*_prepare(family, config)[1:])
    kind, form = config[:2]
    why = scorer.explain()["own.weight"]
    if form in ("same", "gemma"):
        rule = {"linear": "linear_subclass", "layer_norm": "hf_layer_norm", "rms_norm": "hf_rms_norm",
                "no_norm": "no_norm"}[kind]
        assert why.startswith(f"ghost ({rule} rule on own: "), why
    elif form == "router" and config[3:] == ("seq_first",):   # the free rule takes products of batch-first rows
        assert why.startswith("vmap (OwnLinear 'own' returns a tuple") and "rows do not follow the batch" in why, why
    else:
        assert why == "ghost (free-parameter rule: per example in each use)", why
    assert scorer.explain()["head.weight"].startswith("ghost")


@pytest.mark.parametrize("family,config", NORM_ACT_GRID, ids=lambda v: str(v))
def test_a_norm_subclass_with_its_own_forward_takes_the_norm_act_rule_where_it_computes_it(family, config):
    """A BatchNorm, GroupNorm or LayerNorm subclass with a forward of its own (timm's
    BatchNormAct2d, GroupNormAct, GroupNorm1, LayerNorm2d, LayerNormAct: the norm, then
    its own drop and act) takes the norm-act rule, the output gradient taken back through
    the activation; so does one that scales by 1 + γ without an activation (Nemotron's
    LayerNorm1P: γ's gradient is the same); one that computes something else (a "2d" norm
    over the last dimension, the activation before the norm, 1 + γ before an activation,
    whose kink the rule would take at γ) goes to the fallback with why."""
    scorer = _agree(family, config)
    scorer.score_batch(*_prepare(family, config)[1:])
    why = scorer.explain()
    if config[0] in ("ln2d_last", "bn_act_first") or config[:2] == ("ln1p", "gelu"):
        assert why["norm.weight"].startswith("vmap (") and "does not compute" in why["norm.weight"], why
    else:
        assert why["norm.weight"].startswith("ghost (norm_act rule on norm: "), why
        assert config[0] == "ln_nobias" or why["norm.bias"].startswith("ghost (norm_act rule"), why
    assert why["head.weight"].startswith("ghost")


@pytest.mark.parametrize("kind", ["gn", "ln", "ln2d", "bn"])
@pytest.mark.parametrize("act", ["relu_inplace", "hardswish"])
def test_a_norm_act_at_its_activations_kink_takes_the_side_the_forward_took(kind, act):
    """A group with no variance (an example's positions alike: a repeated token, a padded
    region) normalizes to rounding noise, and a zero bias (its init) puts the activation's
    input at the kink of a ReLU (or of Hardswish, at −3 with a bias of −3): the derivative
    there follows the noise's sign. The rule takes that input from the forward's own
    computation, so its side of the kink is the forward's (found by the random models:
    seed 722, GroupNormAct with ReLU; it recomputed the input by another formula)."""
    from helpers import BatchNormAct, GroupNormAct, LayerNormAct, LayerNormAct2d
    torch.manual_seed(0)
    C = 4
    norm = {"gn": lambda: GroupNormAct(C, C, act), "ln": lambda: LayerNormAct(C, act),
            "ln2d": lambda: LayerNormAct2d(C, act), "bn": lambda: BatchNormAct(C, act)}[kind]()
    with torch.no_grad():
        norm.bias.fill_(-3.0 if act == "hardswish" else 0.0)
        if kind == "bn":   # per channel by its statistics: x at the running mean is the kink
            norm.running_mean.copy_(torch.tensor([0.3, -0.7, 1.1, 0.1]))
    g = torch.Generator().manual_seed(0)
    if kind == "ln":   # (B, T, C), a LayerNorm over C: positions whose C features are alike
        x = torch.randn(5, 3, C, generator=g, dtype=torch.float64)
        x[:, :2] = torch.randn(5, 2, 1, generator=g, dtype=torch.float64) * 3.7 + 0.1
        model = nn.Sequential(norm, nn.Flatten(), nn.Linear(3 * C, 3)).double().eval()
    else:              # (B, C, T, 2): channels alike over the positions (gn), or over the channels (ln2d)
        x = torch.randn(5, C, 3, 2, generator=g, dtype=torch.float64)
        if kind == "gn":
            x[:, :, :, :] = torch.randn(5, C, 1, 1, generator=g, dtype=torch.float64) * 3.7 + 0.1
        elif kind == "ln2d":
            x[:, :, :2] = torch.randn(5, 1, 2, 2, generator=g, dtype=torch.float64) * 3.7 + 0.1
        else:
            x[:, :, 0] = norm.running_mean.double()[None, :, None]
        model = nn.Sequential(norm, nn.Flatten(), nn.Linear(6 * C, 3)).double().eval()
    y = torch.arange(5) % 3
    want = gs.Scorer(model, engine="loop").score_batch(x, y).sq_norm
    scorer = gs.Scorer(model)
    torch.testing.assert_close(scorer.score_batch(x, y).sq_norm, want, rtol=1e-9, atol=1e-12)
    assert scorer.explain()["0.weight"].startswith("ghost (norm_act rule"), scorer.explain()


def test_a_norm_act_batchnorm_in_training_mode_is_never_run_by_its_check():
    """The check of what a layer computes calls it: a BatchNorm in training mode would
    update its running statistics. It is refused unrun; the model's buffers stay as they were."""
    from gradscore.engines.rules.norm import _computes_norm_act, _norm_act_supports
    model = NormActNet("bn", "silu").double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 4, 3, 4, dtype=torch.float64)
    assert "training mode" in _norm_act_supports(model.norm)
    with torch.no_grad():   # as the layout calls it
        assert "training mode" in _computes_norm_act(model.norm, x, None)
        assert _computes_norm_act(model.norm.eval(), x, None) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_norm_act_layer_that_draws_in_training_mode_is_refused_by_its_rule():
    """A dropout of p > 0 (or any other drop module) or an RReLU draws anew in training mode,
    which the rule's recomputed backward cannot redraw: refused then, with why; in eval
    mode, and with a dropout of p = 0, taken."""
    from gradscore.engines.rules.norm import _norm_act_supports
    from helpers import GroupNormAct
    layer = GroupNormAct(4, 2, "silu")
    assert _norm_act_supports(layer.train()) is None   # its dropout has p = 0
    layer.drop = nn.Dropout(0.3)
    assert "drop (Dropout) draws anew in training mode" in _norm_act_supports(layer.train())
    assert _norm_act_supports(layer.eval()) is None
    layer.drop, layer.act = nn.Identity(), nn.RReLU()
    assert "act (RReLU) draws anew" in _norm_act_supports(layer.train())


@pytest.mark.parametrize("family,config", SCALE_GRID, ids=lambda v: str(v))
def test_a_layer_scale_takes_its_rule_where_it_computes_x_times_gamma(family, config):
    """A layer scale (timm's LayerScale and LayerScale2d, MetaFormer's Scale) takes the
    layer-scale rule where it gives x ⊙ γ in its view, on every layout; one that changes
    its input in place goes to the fallback with why; one that computes x² ⊙ γ is a layer
    without a rule: the free-parameter rule follows γ."""
    scorer = _agree(family, config)
    scorer.score_batch(*_prepare(family, config)[1:])
    why = scorer.explain()
    name = "scale.scale" if config[0].startswith("shaped") else "scale.gamma"
    if config[0] == "inplace":
        assert why[name].startswith("vmap (LayerScale with inplace=True"), why
    elif config[0] == "squared":
        assert why[name] == "ghost (free-parameter rule: per example in each use)", why
    else:
        assert why[name].startswith("ghost (layer_scale rule on scale: "), why


@pytest.mark.parametrize("family,config", PRELU_GRID, ids=lambda v: str(v))
def test_prelu_takes_its_rule_on_every_layout(family, config):
    """PReLU's slopes (one, or one per channel) went to vmap after the first batch, and
    in-run scoring refused the model; its rule gives g_b = Σ δ_b ⊙ min(x_b, 0) per
    channel, equal to the loop on every layout (sequence-first, T == B, flat, images)."""
    for n in (1, 2):   # one example; and a batch of 2, where T = 3 differs from B
        _agree(family, config, n=n)
    scorer = _agree(family, config)
    scorer.score_batch(*_prepare(family, config)[1:])
    assert scorer.explain()["scale.weight"].startswith("ghost (prelu rule on scale: PReLU"), scorer.explain()


@pytest.mark.parametrize("family,config", FREE_GRID, ids=lambda v: str(v))
def test_a_parameter_the_forward_broadcasts_over_the_batch_takes_the_free_rule(family, config):
    """A parameter that a forward uses directly (a ViT's class token and position embedding,
    CaiT's and ConvNeXt's γ) takes the free-parameter rule where every use broadcasts it
    over the batch rows in dimension 0, or what the forward makes of it first: a view, a
    slice, a table's rows (repeats included), an elementwise function of it; any other use
    (a matmul, a sum, a sequence-first layout, rows in another order, a custom autograd
    Function, an op with a tuple result or a list argument, a checkpointed region, a copy
    changed in place before its use, a write into another tensor, a tensor made of it
    whose shape follows the batch's) sends it
    to the fallback with why. Either way every engine equals the loop."""
    kind, layout = config
    scorer = _agree(family, config)
    scorer.score_batch(*_prepare(family, config)[1:])
    why = scorer.explain()
    free = "ghost (free-parameter rule"
    if layout == "seq_first":
        assert why["cls_token"].startswith(("vmap (", "loop (")), why
        assert "as a free parameter it is made by expand into a tensor whose shape follows the batch's ([1, 1, 5] " \
               "for one example, [1, 2, 5] for two)" in why["cls_token"], why
        if kind in FreeNet.BATCH_FIRST:
            assert why["pos_embed"].startswith(free), why
        else:
            refused = ("vmap (no ghost rule for FreeNet", "loop (no ghost rule for FreeNet")
            assert why["pos_embed"].startswith(refused), why
        return
    assert why["cls_token"].startswith(free), why
    if kind in FreeNet.TAKEN:
        assert why["pos_embed"].startswith(free), why
    else:
        reordered = "; as a free parameter it is added to rows that are not the batch's examples in order"
        said = {"reorder": reordered, "reorder_table": reordered,
                "function": "; as a free parameter it is used by _AddBackward, which the op watch cannot see",
                "checkpoint": "; as a free parameter it is used by mul under saved-tensor hooks (torch.utils.",
                "setitem_after_use": "; as a free parameter it is changed in place (its copy or view) before its use "
                                     "by mul)",
                "view_before_setitem": "; as a free parameter it is changed in place (its copy or view) before its "
                                       "use by view)",
                "tiled_inplace": "; as a free parameter it is used by mul_ on itself",
                "into": "; as a free parameter it is written into another tensor by __setitem__)",
                "batch_shaped": "; as a free parameter it is made by mul into a tensor whose shape follows the batch's",
                "inplace_after_use": "; as a free parameter it is changed in place (its copy or view) before its use "
                                     "by mul)",
                }.get(kind, ")" if kind != "tuple" else ";")   # no use the rule takes: no ghost rule, nothing added
        assert why["pos_embed"].startswith(("vmap (no ghost rule for FreeNet" + said,   # loop: a Function
                                            "loop (no ghost rule for FreeNet" + said)), why


@pytest.mark.parametrize("family,config", RELATIVE_GRID, ids=lambda v: str(v))
def test_an_embedding_of_the_offsets_one_for_the_batch_takes_the_free_rule_where_it_meets_the_scores(family, config):
    """An Embedding called on the (T, T) relative offsets returns one bias for the whole
    batch (T5's and MPNet's relative attention bias): no batch rows for its rule, and it
    went to vmap. Its weight now takes the free-parameter rule, which follows the
    embedding, the permute and a mask added, to the sum with each example's scores (an
    add, an expand, SDPA's attn_mask; used by two attention layers too), and runs the
    embedding's backward per example there. A bias that meets the values by a matmul
    still goes to vmap, with the layer's reason. Either way every engine equals the loop."""
    kind, layout = config
    scorer = _agree(family, config)
    scorer.score_batch(*_prepare(family, config)[1:])
    why = scorer.explain()
    assert all(v.startswith("ghost (") for n, v in why.items() if n != "rel.weight"), why
    if kind in RelativeBias.TAKEN:
        assert why["rel.weight"].startswith("ghost (free-parameter rule"), why
    else:
        reason = ("returns one row for the whole batch, used by permute" if layout == "T1"
                  else "has no batch dimension in its input or output")
        assert why["rel.weight"].startswith(f"vmap (Embedding 'rel' {reason}"), why


@pytest.mark.parametrize("family,config", [("relative", ("sdpa", "batch")), ("relative", ("add", "TB")),
                                           ("windows", ("example", "sdpa")), ("free", ("embedding", "batch")),
                                           ("free", ("interpolate", "T1")), ("free", ("tiled_bmm", "batch")),
                                           ("free", ("tiled_reshape", "TB")), ("free", ("stacked", "T1")),
                                           ("free", ("slice_zero", "batch")), ("free", ("left", "batch")),
                                           ("free", ("conv1d", "T1")), ("free", ("conv2d", "batch"))],
                         ids=lambda v: str(v))
def test_an_empty_batch_after_the_first_gives_empty_scores_on_the_free_rule(family, config):
    """B == 0 after a first batch: the per-example backward of a parameter's own ops, the
    recomputed scores gradient of SDPA's mask, merged rows, a repeat over the batch (zero
    times) and a stack of matrices give (0,) norms and (0, K) dots, and every parameter
    stays on its ghost path."""
    model, x, y = _prepare(family, config)
    scorer = gs.Scorer(model, engine="auto")
    scorer.score_batch(x, y)
    before = scorer.explain()
    out = scorer.score_batch(x[:0], y[:0], refs=_refs(scorer, 2))
    assert out.sq_norm.shape == (0,) and out.dots.shape == (0, 2)
    assert scorer.explain() == before and all(v.startswith("ghost") for v in before.values()), before


@pytest.mark.parametrize("K", [0, 2])
def test_an_attention_mask_with_a_row_masked_whole_takes_the_free_rule_as_the_loop(K):
    """A (4, 4) table plus a buffer of −inf (one query masked whole, one key for another)
    as SDPA's attn_mask: SDPA gives the row masked whole zeros, and so must the scores'
    gradient recomputed from the output's δ (a plain softmax gives NaN there)."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = nn.Linear(5, 6), nn.Linear(6, 3)
            self.table = nn.Parameter(torch.randn(4, 4))
            block = torch.zeros(4, 4)
            block[2], block[0, 3] = float("-inf"), float("-inf")
            self.register_buffer("block", block)

        def forward(self, x):
            h = self.lin(x).reshape(len(x), 4, 2, 3).transpose(1, 2)
            a = F.scaled_dot_product_attention(h, h, h, attn_mask=self.table + self.block)
            return self.head(torch.tanh(a.transpose(1, 2).reshape(len(x), 4, 6)).mean(1))
    torch.manual_seed(0)
    scorer = compare_with_loop(Masked().double().eval(), torch.randn(B, 4, 5, dtype=torch.float64), K,
                               engine="auto")
    assert scorer.explain()["table"].startswith("ghost (free-parameter rule"), scorer.explain()


@pytest.mark.parametrize("family,config", WINDOWS_GRID, ids=lambda v: str(v))
@pytest.mark.parametrize("n", [B, 2, 1])
def test_a_parameter_added_to_windows_of_the_batch_takes_the_free_rule_where_each_examples_are_together(
        family, config, n):
    """Swin adds its relative position bias to the scores of (B·k, ...) windows, k per
    example: the rule had to see B rows, and the table went to vmap. A use whose result
    has k rows for one example and 2k for two is taken, its δ summed over each example's
    k rows, where each example's windows are together; windows ordered by position
    (every example's first, then every second) fail the order check and go to the
    fallback, as does a first batch of one example, which cannot show the order."""
    order, kind = config
    scorer = _agree(family, config, n=n)
    scorer.score_batch(*_prepare(family, config, n)[1:])
    why = scorer.explain()
    assert all(v.startswith("ghost (") for k, v in why.items() if k != "table"), why
    if order == "example" and n > 1:
        assert why["table"].startswith("ghost (free-parameter rule"), why
    elif n > 1:
        assert why["table"].startswith("vmap (no ghost rule for Windows; as a free parameter it is added to rows "
                                       "that are not the batch's examples in order"), why
    else:
        assert "whose order a first batch of one example cannot show" in why["table"], why


@pytest.mark.parametrize("family,config", STD_CONV_GRID, ids=lambda v: str(v))
def test_a_weight_standardized_conv_takes_its_rule_where_it_standardizes(family, config):
    """A Conv2d whose forward standardizes its weight per output channel (timm's StdConv2d,
    and ScaledStdConv2d with a gain) takes the std-conv rule: its weight's gradient through
    the standardization, its gain's and bias's, with any padding mode, and with TensorFlow's
    SAME padding of its input in its forward (timm's ScaledStdConv2dSame, NFNets: vmap
    before); one named so that does not standardize, or whose forward pads with zeros in
    spite of its padding mode, or pads otherwise than SAME, is a layer without a rule: the
    free-parameter rule follows its weights into the convolution."""
    scorer = _agree(family, config)
    scorer.score_batch(*_prepare(family, config)[1:])
    why = scorer.explain()
    conv = {k: v for k, v in why.items() if k.startswith("0.")}
    if config[6] or config[-1] in ("reflect_ignored", "same_pad_left"):   # not standardizing, or padding otherwise
        assert all(v == "ghost (free-parameter rule: per example in each use)" for v in conv.values()), why
    else:
        assert all(v.startswith("ghost (std_conv rule on 0: ") for v in conv.values()), why
        assert ("0.gain" in conv) == config[0]


class Int8Linear(nn.Linear):
    """A quantized Linear: a frozen int8 weight, dequantized in its own forward."""

    def __init__(self):
        super().__init__(D, 4)
        del self.weight
        self.weight = nn.Parameter(torch.randint(-100, 100, (4, D), dtype=torch.int8), requires_grad=False)

    def forward(self, x):
        return x @ (0.01 * self.weight.to(x.dtype)).T + self.bias


def test_a_quantized_linear_subclass_falls_back_with_why():
    """Its check cannot give an int8 weight a gradient: that layer alone falls back, named."""
    torch.manual_seed(0)
    model = nn.Sequential(Int8Linear(), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(B, D, dtype=torch.float64), torch.tensor([0, 1, 2])
    scorer = gs.Scorer(model)
    got, want = scorer.score_batch(x, y), gs.Scorer(model, engine="loop").score_batch(x, y)
    torch.testing.assert_close(got.sq_norm, want.sq_norm, rtol=1e-6, atol=1e-12)
    why = scorer.explain()
    assert why["0.bias"].startswith("vmap (Int8Linear '0' could not be checked against x Wᵀ + b"), why
    assert why["2.weight"].startswith("ghost")


class OwnScaledWordEmbedding(nn.Embedding):
    """Gemma's scaled embedding under a name of one's own; ``detached``: the same values, no
    gradient in the weight."""

    def __init__(self, detached: bool):
        super().__init__(11, D, padding_idx=0)
        self.embed_scale, self.detached = 2.0 ** 0.5, detached

    def forward(self, ids):
        return F.embedding(ids, self.weight.detach() if self.detached else self.weight, self.padding_idx) * self.embed_scale


@pytest.mark.parametrize("detached", [False, True])
def test_a_scaled_embedding_of_its_own_takes_the_rule_only_where_its_weight_gets_the_gradient(detached):
    torch.manual_seed(0)
    model = nn.Sequential(OwnScaledWordEmbedding(detached), nn.Flatten(), nn.Linear(T * D, 3)).double().eval()
    x = torch.randint(0, 11, (B, T), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    want = gs.Scorer(model, engine="loop").score_batch(x, y)
    scorer = gs.Scorer(model)
    torch.testing.assert_close(scorer.score_batch(x, y).sq_norm, want.sq_norm, rtol=1e-6, atol=1e-12)
    why = scorer.explain()["0.weight"]
    assert why.startswith("ghost (free-parameter rule" if detached else "ghost (scaled_embedding rule"), why


POSITIONS_RULE = [("positions", (kind, steps)) for kind in ("mask", "arange", "expand") for steps in (1, B, T)]
POSITIONS_LOOK_ALIKES = [("positions", (kind, T)) for kind in ("scaled", "twice", "no_padding", "detached")]


@pytest.mark.filterwarnings("ignore:no gradient reaches 'positions.weight'")   # the detached look-alike
@pytest.mark.parametrize("family,config", POSITIONS_RULE + POSITIONS_LOOK_ALIKES, ids=lambda v: str(v))
def test_an_embedding_that_computes_its_own_ids_takes_the_rule_only_where_it_returns_their_rows(family, config):
    """OPT's and BioGPT's position embeddings went to vmap (an Embedding subclass with a
    forward of its own). The rule reads the ids the forward looks up; a forward that does
    more than return those rows falls back and says why."""
    scorer = _agree(family, config)
    model, x, y = _prepare(family, config)
    scorer.score_batch(x, y)
    why = scorer.explain()["positions.weight"]
    if (family, config) in POSITIONS_RULE:
        assert why.startswith("ghost (own_embedding rule"), why
    else:
        reason = {"scaled": "does not compute its weight's rows at the ids its forward computes",
                  "twice": "does not read its weight through one F.embedding",
                  "no_padding": "looks its weight up with other options than its own",
                  "detached": "does not read its weight through one F.embedding"}[config[0]]
        assert why.startswith("vmap (") and reason in why, why
    assert scorer.explain()["tokens.weight"].startswith("ghost (embedding rule"), scorer.explain()


def test_an_embedding_whose_forward_looks_up_otherwise_on_a_later_batch_is_one_gradscore_error():
    """Its rule was checked on the first batch; a later batch whose forward looks the weight
    up twice cannot give its ids: one GradscoreError naming the layer, not a raw error."""
    torch.manual_seed(0)
    model = PositionsNet("twice_later", 6, most=6).double().eval()
    scorer = gs.Scorer(model)
    ids = torch.randint(1, 11, (3, 6), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    scorer.score_batch(ids[:, :4], y)
    assert scorer.explain()["positions.weight"].startswith("ghost (own_embedding rule"), scorer.explain()
    with pytest.raises(gs.GradscoreError, match="OwnPositions does not read its weight through one F.embedding"):
        scorer.score_batch(ids, y)


def test_bad_targets_are_one_gradscore_error_from_every_engine():
    model, x, _ = _prepare("recurrent", ("GRU", 1, False, True, True, False))
    for engine in ("auto", "vmap", "loop"):
        with pytest.raises(gs.GradscoreError, match="fails on this batch|failed on this batch"):
            gs.Scorer(model, engine=engine).score_batch(x, torch.tensor([0, 7, 1]))


def _output_padding_reaches_stride(config) -> bool:
    dims, stride, output_padding, *_ = config
    return output_padding >= stride


@pytest.mark.parametrize("family,config", BAG_GRID + CONV_GRID + NORM_GRID + RNN_GRID + CELL_GRID + MERGED_GRID
                         + [(f, c) for f, c in MHA_GRID if not c[2]]
                         + [(f, c) for f, c in CONV_T_GRID if not _output_padding_reaches_stride(c)]
                         + [(f, c) for f, c in BILINEAR_GRID if c[0] != "seq_first"],
                         ids=lambda v: str(v))
def test_families_with_a_rule_take_it(family, config):
    """The agreement above is the rule's own, not the fallback's."""
    model, x, y = _prepare(family, config)
    scorer = gs.Scorer(model, engine="auto")
    scorer.score_batch(x, y)
    assert all(v.startswith("ghost") for v in scorer.explain().values()), scorer.explain()


@pytest.mark.parametrize("family,config", [(f, c) for f, c in CONV_T_GRID if _output_padding_reaches_stride(c)],
                         ids=lambda v: str(v))
def test_a_transposed_conv_whose_output_padding_reaches_its_stride_falls_back_and_says_why(family, config):
    """Its adjoint convolution's output would be longer than its input: vmap, with the reason
    (the values equal the loop: the grid above)."""
    model, x, y = _prepare(family, config)
    scorer = gs.Scorer(model, engine="auto")
    scorer.score_batch(x, y)
    why = scorer.explain()
    assert why["conv.weight"].startswith("vmap (output_padding") and "reaches the stride" in why["conv.weight"], why
    assert why["head.weight"].startswith("ghost"), why


@pytest.mark.parametrize("family,config", CELL_UNBATCHED, ids=lambda v: str(v))
def test_a_cell_on_one_examples_unbatched_steps_falls_back_and_says_why(family, config):
    """A model that runs each example's steps alone (1-D inputs) calls the cell B·T times
    with no batch dimension: the fallback, with the reason (the values equal the loop: the
    grid above)."""
    model, x, y = _prepare(family, config)
    scorer = gs.Scorer(model, engine="auto")
    scorer.score_batch(x, y)
    why = scorer.explain()
    assert re.match(r"(vmap|loop) \(\w+Cell 'cell' was called with non-tensor or varying inputs",
                    why["cell.weight_ih"]), why
    assert why["head.weight"].startswith("ghost"), why


@pytest.mark.parametrize("family,config", MERGED_OTHER_ORDER, ids=lambda v: str(v))
def test_rows_merged_with_the_batch_in_another_order_fall_back_and_say_why(family, config):
    """(B·T, ·) rows of the steps first, or of the batch stacked on itself, double with the
    batch as example-by-example rows do: the batch's first and last examples alone show
    the order, and the layer goes to the fallback (the values equal the loop: the grid)."""
    model, x, y = _prepare(family, config)
    scorer = gs.Scorer(model, engine="auto")
    scorer.score_batch(x, y)
    why = scorer.explain()
    assert why["layer.weight"].startswith("vmap ("), why
    assert "its rows are not the batch's examples" in why["layer.weight"], why
    assert why["head.weight"].startswith("ghost"), why


class StepsFirstAfterTwoFeatureNorm(nn.Module):
    """A LayerNorm over 2 features (every row near (1, −1) where x₀ > x₁), then a Linear on
    the rows of the steps first, (T·B, 2): rows whose values barely differ between
    examples, which a comparison of values in float32 cannot tell apart."""

    def __init__(self):
        super().__init__()
        self.norm, self.layer, self.head = nn.LayerNorm(2, elementwise_affine=False), nn.Linear(2, 4), nn.Linear(4, 3)

    def forward(self, x):
        rows = self.norm(x).transpose(0, 1).reshape(-1, 2)
        return self.head(torch.tanh(self.layer(rows)).reshape(x.shape[1], len(x), 4).mean(0))


def test_rows_of_the_steps_first_whose_values_look_alike_are_found_out_of_order():
    """Found by the random models: in float32 the order check's comparison of values took
    these rows for each example's own, and the rule gave wrong numbers (16% off). Changing
    one example's rows changes the other's output: the fallback."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, 2, generator=g)
    x[..., 0] = x[..., 1] + 1 + torch.rand(B, T, generator=g)   # x₀ > x₁ everywhere
    y = torch.tensor([0, 1, 2])
    model = StepsFirstAfterTwoFeatureNorm()
    want = gs.Scorer(copy.deepcopy(model).double(), engine="loop").score_batch(x.double(), y)
    scorer = gs.Scorer(model, engine="auto")
    got = scorer.score_batch(x, y)
    torch.testing.assert_close(got.sq_norm.double(), want.sq_norm, rtol=1e-4, atol=0)
    assert "its rows are not the batch's examples" in scorer.explain()["layer.weight"], scorer.explain()


def test_rows_merged_with_the_batch_on_a_first_batch_of_one_example_fall_back_and_say_why():
    """One example cannot show the order of merged rows (its k rows, or k rows of another
    order, look alike): the fallback, with the reason, and the loop's values."""
    model, x, y = _prepare("merged", ("Linear", "example", T))
    scorer = gs.Scorer(model, engine="auto")
    torch.testing.assert_close(scorer.score_batch(x[:1], y[:1]).sq_norm,
                               gs.Scorer(model, engine="loop").score_batch(x[:1], y[:1]).sq_norm, rtol=1e-6, atol=0)
    why = scorer.explain()["layer.weight"]
    assert why.startswith("vmap (") and "a first batch of one example cannot show" in why, why


class RowNorm(nn.Module):
    """LayerNorm (with or without bias) or RMSNorm over the last dimension, on (B, D),
    (B, T, D) or a sequence-first (T, B, D) input, then a linear head on the mean."""

    def __init__(self, kind: str, layout: str):
        super().__init__()
        self.layout = layout
        self.norm = (nn.RMSNorm(D, eps=1e-4) if kind == "RMSNorm" else
                     nn.LayerNorm(D, bias=kind == "LayerNorm", eps=1e-4))
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        if self.layout == "seq_first":
            return self.head(torch.tanh(self.norm(x.transpose(0, 1))).mean(0))
        h = torch.tanh(self.norm(x))
        return self.head(h if self.layout == "2d" else h.mean(1))


@pytest.mark.parametrize("kind", ["LayerNorm", "LayerNorm_no_bias", "RMSNorm"])
@pytest.mark.parametrize("layout", ["2d", "batch_first", "seq_first"])
def test_float32_row_norms_take_the_fused_kernel_and_equal_the_loop(kind, layout, monkeypatch, default_kernels):
    """On CPU in float32 the LayerNorm and RMSNorm rules form γ's and β's per-example
    gradients in one fused numba pass: the same numbers as the float64 loop, K = 0 and 2."""
    from gradscore.kernels import norm_affine_numba as kernel
    calls = []
    fused = kernel.norm_affine_numba
    monkeypatch.setattr(kernel, "norm_affine_numba", lambda *a, **k: calls.append(1) or fused(*a, **k))
    torch.manual_seed(0)
    model = RowNorm(kind, layout).eval()
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(*((4, D) if layout == "2d" else (4, T, D)), generator=g) + 1
    y = torch.randint(0, 3, (4,), generator=g)
    loop = gs.Scorer(copy.deepcopy(model).double(), engine="loop")
    ghost = gs.Scorer(model, engine="ghost")
    ghost.score_batch(x, y)   # the first batch, and its check's pass
    calls.clear()
    for K in (0, 2):
        V = _refs(loop, K)
        ref = loop.score_batch(x.double(), y, refs=V)
        out = ghost.score_batch(x, y, refs=None if V is None else V.float())
        torch.testing.assert_close(out.sq_norm.double(), ref.sq_norm, rtol=1e-5, atol=0)
        if K:
            torch.testing.assert_close(out.dots.double(), ref.dots, rtol=1e-4, atol=1e-6)
    assert len(calls) == 2


@pytest.mark.parametrize("family,config", EXPERTS_GRID, ids=lambda v: str(v))
def test_hugging_face_experts_take_their_rule_where_the_rows_are_each_examples_own(family, config):
    """Mixtral's, GPT-OSS's and Nemotron-H's experts (gated, interleaved and transposed with
    biases, ungated) take the experts rule on merged rows, one row per example, T = 1, T = B
    and two calls; rows of the steps first go to the fallback, saying why (the values equal
    the loop: the grid above)."""
    model, x, y = _prepare(family, config)
    scorer = gs.Scorer(model, engine="auto")
    scorer.score_batch(x, y)
    why = scorer.explain()
    for name in ("experts.down_proj", "experts.gate_up_proj" if config[0] != "nemotron_h" else "experts.up_proj"):
        if config[1] == "step":
            assert "rows are not the batch's examples in order" in why[name], why
        else:
            assert why[name].startswith("ghost (experts rule on experts"), why
    assert all(v.startswith("ghost") for n, v in why.items() if n.startswith("head.")), why
    assert why["router.weight"].startswith("ghost") == (config[1] != "step"), why


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_experts_in_float32_on_hugging_faces_grouped_matmul_equal_the_float64_loop(kind):
    """Hugging Face's grouped matmul takes float32 and half types only: the model in float32
    on it, scored by ``auto`` (the rule, checked against that forward), against the float64
    loop on the eager experts, K = 0 and 2."""
    torch.manual_seed(0)
    model = ExpertsNet(kind, D=8, I=8).double().eval()
    x, y = torch.randn(5, 4, 8, dtype=torch.float64), torch.arange(5) % 3
    loop = gs.Scorer(model, engine="loop")
    m32 = copy.deepcopy(model).float()
    m32.experts.config._experts_implementation = "grouped_mm"
    scorer = gs.Scorer(m32, engine="auto")
    for K in (0, 2):
        V = _refs(loop, K)
        ref = loop.score_batch(x, y, refs=V)
        out = scorer.score_batch(x.float(), y, refs=None if V is None else V.float())
        torch.testing.assert_close(out.sq_norm.double(), ref.sq_norm, rtol=1e-4, atol=0)
        if K:
            torch.testing.assert_close(out.dots.double(), ref.dots, rtol=1e-4, atol=1e-4 * float(ref.dots.abs().max()))
    assert scorer.explain()["experts.down_proj"].startswith("ghost (experts rule"), scorer.explain()


def test_experts_of_the_same_structure_that_compute_otherwise_fall_back_and_say_why():
    """A look-alike of Mixtral's experts whose own forward doubles the routing weights is
    not what the rule replays: its check on the first batch sends it to the fallback, with
    the reason, and the values equal the loop."""
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")

    class Doubled(mixtral.MixtralExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return super().forward(hidden_states, top_k_index, 2 * top_k_weights)

    model, x, y = _prepare("experts", ("mixtral", "merged", "eager"))
    model.experts.__class__ = Doubled
    want = gs.Scorer(model, engine="loop").score_batch(x, y)
    scorer = gs.Scorer(model, engine="auto")
    got = scorer.score_batch(x, y)
    torch.testing.assert_close(got.sq_norm, want.sq_norm, rtol=1e-10, atol=0)
    why = scorer.explain()["experts.down_proj"]
    assert why.startswith(("vmap", "loop")) and "does not compute its experts' gated projections" in why, why
