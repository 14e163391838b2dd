"""Ghost rule for ``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding, dilation, groups).

The input is unfolded (im2col, as a strided view) to (B, L, C_in·k) and the output
gradient viewed as (B, C_out, L); each group is then a Linear layer over L positions:
g_b(W_g) = Σ_l δ_bl a_blᵀ (``kernels.ghost_linear``), g_b(bias) = Σ_l δ_bl. Calls of
one layer are concatenated along l. Non-zero padding modes and string padding other
than 'valid' fall back to vmap.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.norm_dot import acc_dtype
from ...kernels.ghost_linear import ghost_linear, plan, workspace_bytes
from .linear import cat_calls
from .registry import bias_term, register_rule


def _supports(m: nn.Module) -> str | None:
    if m.padding_mode != "zeros":
        return f"{type(m).__name__} with padding_mode='{m.padding_mode}'"
    if isinstance(m.padding, str) and m.padding != "valid":
        return f"{type(m).__name__} with padding='{m.padding}'"
    return None


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """im2col of one call's input as a (B, L, C_in·k) view of a (B, C_in·k, L) tensor, whose
    rows are (channel, kernel offset) in the order of the weight. Made from a strided
    view of the zero-padded input with one copy that reads along the output width;
    Conv1d is a Conv2d of height 1."""
    if isinstance(layer, nn.Conv1d):
        x, k, dil, stride = x.unsqueeze(2), (1, *layer.kernel_size), (1, *layer.dilation), (1, *layer.stride)
        pad = (0, 0) if isinstance(layer.padding, str) else (0, *layer.padding)
    else:
        k, dil, stride = layer.kernel_size, layer.dilation, layer.stride
        pad = (0, 0) if isinstance(layer.padding, str) else layer.padding
    x = F.pad(x, (pad[1], pad[1], pad[0], pad[0])).contiguous()
    B, C, H, W = x.shape
    Ho = (H - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    Wo = (W - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    sB, sC, sH, sW = x.stride()
    view = x.as_strided((B, C, k[0], k[1], Ho, Wo),
                        (sB, sC, dil[0] * sH, dil[1] * sW, stride[0] * sH, stride[1] * sW))
    return view.reshape(B, C * k[0] * k[1], Ho * Wo).transpose(1, 2)


def _conv_slice(layer: nn.Module, acts, grads, refs, K, budget: int):
    a_all = cat_calls([_patches(layer, x) for x in acts], 1)                         # (b, L, C_in·k)
    d_all = cat_calls([d.reshape(d.shape[0], layer.out_channels, -1) for d in grads], 2)  # (b, C_out, L)
    sq, dots = bias_term(d_all.sum(2), refs, K)
    if "weight" in refs:
        G = layer.groups
        d_in, d_out = a_all.shape[2] // G, layer.out_channels // G
        for g in range(G):
            a = a_all[:, :, g * d_in:(g + 1) * d_in]                                   # (b, L, d_in)
            d = d_all[:, g * d_out:(g + 1) * d_out].transpose(1, 2)                    # (b, L, d_out)
            V = refs["weight"][:, g * d_out:(g + 1) * d_out].reshape(K, d_out, d_in) if K else None
            w_sq, w_dots = ghost_linear(a, d, V, workspace=budget)
            sq, dots = sq + w_sq, dots + w_dots
    return sq, dots


def _slice_bytes(layer: nn.Module, acts, grads, K: int) -> int:
    """Bytes of one example's transient blocks: its im2col patches, plus its per-example
    weight gradient (outer form) or its two (L, L) Grams (gram form), for one group."""
    k = math.prod(layer.kernel_size)
    L = sum(d[0].numel() for d in grads) // layer.out_channels
    d_in, d_out = layer.in_channels // layer.groups * k, layer.out_channels // layer.groups
    block = d_in * d_out if plan(L, d_in, d_out, K) == "outer" else 2 * L * L
    return (sum(x[0].numel() for x in acts) * k + block) * torch.finfo(acc_dtype(acts[0].dtype)).bits // 8


@register_rule(nn.Conv1d, nn.Conv2d, supports=_supports)
def conv(layer: nn.Module, acts, grads, refs, K):
    # im2col makes prod(kernel_size) copies of the input: the examples go in slices whose
    # patches and blocks fit the workspace (the size of the layer's input and δ)
    B = acts[0].shape[0]
    budget = workspace_bytes(*acts, *grads)
    step = max(1, budget // _slice_bytes(layer, acts, grads, K))
    parts = [_conv_slice(layer, [x[i:i + step] for x in acts], [d[i:i + step] for d in grads], refs, K, budget)
             for i in range(0, B, step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
