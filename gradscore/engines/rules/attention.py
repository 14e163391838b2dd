"""Ghost rule for ``nn.MultiheadAttention`` (batch-first or not, packed or separate q/k/v
projections, masks, ``add_zero_attn``), including its ``out_proj``.

Its parameters are four Linear maps, used functionally: q = query W_qᵀ + b_q (likewise k,
v), and out = ctx W_oᵀ + b_o with ctx the attention of q, k, v. Each one's per-example
gradient is a sequence-Linear form Σ_t δ_t a_tᵀ (:mod:`.linear`), given its input and
output gradient. The rule has the layer's call (query, key, value, masks) and δ_out;
it replays the attention alone, with q, k, v as leaves, through torch's own
``F.multi_head_attention_forward`` with identity projections (which multiply exactly),
and one backward of that replay gives δ_q, δ_k, δ_v and ctx: one extra forward and
backward of the attention, nothing of the rest of the model. ``add_bias_kv`` falls back,
and so does attention dropout in training mode (its masks are drawn inside the kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import acc_dtype
from .linear import weight_and_bias
from .registry import kernel_dropout, register_rule

_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
         "is_causal")


def _supports(m: nn.MultiheadAttention) -> str | None:
    if m.bias_k is not None:
        return "MultiheadAttention with add_bias_kv"
    return kernel_dropout(m)


def _projections(layer: nn.MultiheadAttention, acc: torch.dtype):
    """[(weight name, row slice, bias slice or None)] for q, k, v, and the weights (acc)."""
    E = layer.embed_dim
    if layer._qkv_same_embed_dim:
        W = layer.in_proj_weight.detach().to(acc)
        weights = [("in_proj_weight", slice(i * E, (i + 1) * E), W[i * E:(i + 1) * E]) for i in range(3)]
    else:
        weights = [(name, slice(None), getattr(layer, name).detach().to(acc))
                   for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
    bias = None if layer.in_proj_bias is None else layer.in_proj_bias.detach().to(acc)
    return [(name, rows, w, None if bias is None else slice(i * E, (i + 1) * E), None if bias is None else
             bias[i * E:(i + 1) * E]) for i, (name, rows, w) in enumerate(weights)]


def _replay(layer: nn.MultiheadAttention, call, delta: torch.Tensor, acc: torch.dtype):
    """One call's [(input (B, T, d_in), its projection's δ (B, T, E))] for q, k, v, and
    (ctx (B, T, E), δ_out (B, T, E)) for out_proj."""
    args, kwargs = call
    bound = {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True,
             "is_causal": False}
    bound.update(zip(_ARGS, args))
    bound.update(kwargs)
    inputs = [bound[n].to(acc) for n in ("query", "key", "value")]
    if layer.batch_first:          # F works sequence-first: (T, B, E)
        inputs = [x.transpose(0, 1) for x in inputs]
    E = layer.embed_dim
    eye = torch.eye(E, dtype=acc, device=delta.device)
    proj = _projections(layer, acc)
    with torch.enable_grad():
        leaves = [F.linear(x, w, b).detach().requires_grad_() for x, (_, _, w, _, b) in zip(inputs, proj)]
        ctx, _ = F.multi_head_attention_forward(
            *leaves, E, layer.num_heads, None, None, None, None, layer.add_zero_attn, 0.0, eye, None,
            training=False, key_padding_mask=bound["key_padding_mask"], need_weights=bound["need_weights"],
            attn_mask=bound["attn_mask"], use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
            v_proj_weight=eye, average_attn_weights=bound["average_attn_weights"], is_causal=bound["is_causal"])
        d_out = delta.to(acc)                                               # (B, T, E)
        d_ctx = (d_out @ layer.out_proj.weight.detach().to(acc)).transpose(0, 1)
        d_qkv = torch.autograd.grad(ctx, leaves, d_ctx, allow_unused=True)
    as_batch = lambda t: t.transpose(0, 1)                                  # noqa: E731  (T, B, .) -> (B, T, .)
    pairs = [(as_batch(x), as_batch(torch.zeros_like(leaf) if d is None else d))
             for x, leaf, d in zip(inputs, leaves, d_qkv)]
    return pairs, (as_batch(ctx.detach()), d_out)


@register_rule(nn.MultiheadAttention, supports=_supports, call=True, output_item=0, children=("out_proj",),
               batch_dims=lambda m: (0,) if m.batch_first else (1,),
               params=("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                       "out_proj.weight", "out_proj.bias"))
def attention(layer: nn.MultiheadAttention, calls, grads, refs, K):
    acc = acc_dtype(grads[0].dtype)
    per_proj: list[tuple[list, list]] = [([], []) for _ in range(4)]   # q, k, v, out: inputs and δ per call
    for call, delta in zip(calls, grads):
        pairs, out = _replay(layer, call, delta, acc)
        for i, (a, d) in enumerate([*pairs, out]):
            per_proj[i][0].append(a)
            per_proj[i][1].append(d)
    sq, dots = None, None
    for i, (name, rows, _, bias_rows, _) in enumerate(_projections(layer, acc)):
        sub = {}
        if name in refs:
            sub["weight"] = refs[name][:, rows] if K else None
        if "in_proj_bias" in refs:
            sub["bias"] = refs["in_proj_bias"][:, bias_rows] if K else None
        if sub:
            s, d = weight_and_bias(*per_proj[i], sub, K)
            sq, dots = (s, d) if sq is None else (sq + s, dots + d)
    sub = {local: refs[f"out_proj.{local}"] for local in ("weight", "bias") if f"out_proj.{local}" in refs}
    s, d = weight_and_bias(*per_proj[3], sub, K)
    return (s, d) if sq is None else (sq + s, dots + d)
