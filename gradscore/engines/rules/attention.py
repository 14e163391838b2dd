"""Ghost rule for ``nn.MultiheadAttention`` (batch-first or not, packed or separate q/k/v
projections, masks, ``is_causal``, ``add_zero_attn``), including its ``out_proj``.

Its parameters are four Linear maps, used functionally: q = query W_qᵀ + b_q (likewise k,
v), and out = ctx W_oᵀ + b_o with ctx the attention of q, k, v. Each one's per-example
gradient is a sequence-Linear form Σ_t δ_t a_tᵀ (:mod:`.linear`), given its input and
output gradient. The rule has the layer's call (query, key, value, masks) and δ_out;
it replays the attention alone, with q, k, v as leaves: the mask that torch's
``F.multi_head_attention_forward`` builds from the call's arguments (:func:`_mask`, its
own rules), then ``F.scaled_dot_product_attention``, and one backward of that replay
gives δ_q, δ_k, δ_v and ctx: one extra forward and backward of the attention core,
nothing of the rest of the model. ``add_bias_kv`` falls back, and so does attention
dropout in training mode (its masks are drawn inside the kernel).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import acc_dtype
from ...kernels.ghost_linear import SharedGrams, sharing
from .linear import as_sequence, weight_and_bias
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


def _mask(bound: dict, B: int, H: int, T: int, S: int, acc: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """The additive mask (broadcastable to (B, H, T, S)) and causal flag that torch's
    ``F.multi_head_attention_forward`` applies for the call's arguments: boolean masks as
    -inf, ``key_padding_mask`` added to ``attn_mask``, and ``is_causal`` used as such only
    where neither a padding mask nor the weights are asked for (else ``attn_mask`` is)."""
    attn_mask, padding = (None if m is None else m.detach() for m in (bound["attn_mask"], bound["key_padding_mask"]))
    with warnings.catch_warnings():   # mismatched mask types: the layer's own call has warned the user
        warnings.simplefilter("ignore", UserWarning)
        padding = F._canonical_mask(mask=padding, mask_name="key_padding_mask",
                                    other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=acc)
    causal = bool(bound["is_causal"])
    if causal and padding is None and not bound["need_weights"]:
        return None, True
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=acc, check_other=False)
    mask = None if attn_mask is None else attn_mask.to(acc).reshape((T, S) if attn_mask.dim() == 2 else (B, H, T, S))
    if padding is not None:
        padding = padding.to(acc).reshape(B, 1, 1, S)
        mask = padding if mask is None else mask + padding
    return mask, False


def _replay(layer: nn.MultiheadAttention, call, delta: torch.Tensor, acc: torch.dtype):
    """One call's [(input (B, T, d_in), its projection's δ (B, T, E))] for q, k, v, and
    (ctx (B, T, E), δ_out (B, T, E)) for out_proj; δ_out (B, T, E) is batch-first."""
    args, kwargs = call
    bound = {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True,
             "is_causal": False}
    bound.update(zip(_ARGS, args))
    bound.update(kwargs)
    laid_out: dict[int, torch.Tensor] = {}   # one (B, T, d) per tensor: q, k and v of one input share it
    for x in (bound[n] for n in ("query", "key", "value")):   # (and its Gram), cast once
        if id(x) not in laid_out:
            laid_out[id(x)] = x.to(acc) if layer.batch_first else x.to(acc).transpose(0, 1)
    inputs = [laid_out[id(bound[n])] for n in ("query", "key", "value")]
    (B, T, _), S, H, E = inputs[0].shape, inputs[1].shape[1], layer.num_heads, layer.embed_dim
    mask, causal = _mask(bound, B, H, T, S, acc)
    with torch.enable_grad():
        leaves = [F.linear(x, w, b).detach().requires_grad_()
                  for x, (_, _, w, _, b) in zip(inputs, _projections(layer, acc))]
        q, k, v = leaves
        if layer.add_zero_attn:   # a zero key and value after the projections; the masks let them in
            k, v = (F.pad(t, (0, 0, 0, 1)) for t in (k, v))
            mask = None if mask is None else F.pad(mask, (0, 1))
        heads = [t.unflatten(-1, (H, E // H)).transpose(1, 2) for t in (q, k, v)]   # (B, H, T, E / H)
        ctx = F.scaled_dot_product_attention(*heads, attn_mask=mask, is_causal=causal).transpose(1, 2).flatten(2)
        d_out = delta.to(acc)
        d_qkv = torch.autograd.grad(ctx, leaves, d_out @ layer.out_proj.weight.detach().to(acc), allow_unused=True)
    pairs = [(x, torch.zeros_like(leaf) if d is None else d) for x, leaf, d in zip(inputs, leaves, d_qkv)]
    return pairs, (ctx.detach(), d_out)


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
    sequences: dict[tuple, torch.Tensor] = {}   # one (B, T, d_in) per input the projections read
    grams = SharedGrams()                       # ... and its Gram, formed once for q, k and v
    subs = []
    for i, (name, rows, _, bias_rows, _) in enumerate(_projections(layer, acc)):
        sub = {}
        if name in refs:
            sub["weight"] = refs[name][:, rows] if K else None
        if "in_proj_bias" in refs:
            sub["bias"] = refs["in_proj_bias"][:, bias_rows] if K else None
        acts, key = per_proj[i][0], tuple(map(id, per_proj[i][0]))
        if key not in sequences:   # several calls: one concatenation for the projections that read it
            sequences[key] = as_sequence(acts)
        seq = sequences[key]
        if "weight" in sub:
            grams.note(seq)
        subs.append((sub, seq))
    with sharing(grams):
        for i, (sub, seq) in enumerate(subs):
            if sub:
                s, d = weight_and_bias([seq], per_proj[i][1], sub, K)
                sq, dots = (s, d) if sq is None else (sq + s, dots + d)
            if "weight" in sub:
                grams.used(seq)
    sub = {local: refs[f"out_proj.{local}"] for local in ("weight", "bias") if f"out_proj.{local}" in refs}
    s, d = weight_and_bias(*per_proj[3], sub, K)
    return (s, d) if sq is None else (sq + s, dots + d)
