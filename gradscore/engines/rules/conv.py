"""Ghost rule for ``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding, dilation, groups).

The input is unfolded (im2col) to (B, C_in·k, L) and the output gradient viewed as
(B, C_out, L); each group is then a Linear layer over L positions:
g_b(W_g) = Σ_l δ_bl a_blᵀ (``kernels.ghost_linear``), g_b(bias) = Σ_l δ_bl. Calls of
one layer are concatenated along l. Non-zero padding modes and string padding other
than 'valid' fall back to vmap.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.ghost_linear import ghost_linear
from .registry import bias_term, register_rule


def _supports(m: nn.Module) -> str | None:
    if m.padding_mode != "zeros":
        return f"{type(m).__name__} with padding_mode='{m.padding_mode}'"
    if isinstance(m.padding, str) and m.padding != "valid":
        return f"{type(m).__name__} with padding='{m.padding}'"
    return None


def _unfold(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """im2col of one call's input: (B, C_in·k, L); Conv1d is a Conv2d of height 1."""
    pad = (0,) * len(layer.kernel_size) if isinstance(layer.padding, str) else layer.padding
    if isinstance(layer, nn.Conv1d):
        return F.unfold(x.unsqueeze(2), (1, *layer.kernel_size), dilation=(1, *layer.dilation),
                        padding=(0, *pad), stride=(1, *layer.stride))
    return F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=pad, stride=layer.stride)


@register_rule(nn.Conv1d, nn.Conv2d, supports=_supports)
def conv(layer: nn.Module, acts, grads, refs, K):
    a_all = torch.cat([_unfold(layer, x) for x in acts], 2)                        # (B, C_in·k, L)
    d_all = torch.cat([d.reshape(d.shape[0], layer.out_channels, -1) for d in grads], 2)
    sq, dots = bias_term(d_all.sum(2), refs, K)
    if "weight" in refs:
        G = layer.groups
        d_in, d_out = a_all.shape[1] // G, layer.out_channels // G
        for g in range(G):
            a = a_all[:, g * d_in:(g + 1) * d_in].transpose(1, 2)                  # (B, L, d_in)
            d = d_all[:, g * d_out:(g + 1) * d_out].transpose(1, 2)                # (B, L, d_out)
            V = refs["weight"][:, g * d_out:(g + 1) * d_out].reshape(K, d_out, d_in) if K else None
            w_sq, w_dots = ghost_linear(a, d, V)
            sq, dots = sq + w_sq, dots + w_dots
    return sq, dots
