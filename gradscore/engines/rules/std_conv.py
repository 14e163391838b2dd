"""Ghost rule for weight-standardized convolutions (timm's ``StdConv2d`` of BiT ResNets and
``ScaledStdConv2d`` of NFNets): y = conv(x, W_s) + b with, per output channel r,
W_s,r = c_r · ŵ_r, ŵ_r = (w_r − mean(w_r)) / √(var(w_r) + eps) over its d = C_in/g · k…
entries (biased variance), c_r = gain_r · scale (1 without a ``gain``). Matched by
structure and checked on the first batch, in value and gradient (``register_structural``).

With g = an example's gradient of W_s, its gradient of w is, row by row, (c_r/s_r)·P_r g_r,
P = I − 11ᵀ/d − ŵŵᵀ/d (symmetric; s_r = √(var + eps)), so

    ‖g_b(w)‖² = Σ_r (c_r/s_r)² (‖g_r‖² − S1_r²/d − 2 S2_r²/d + S2_r² ‖ŵ_r‖²/d²),
    ⟨g_b(w), V⟩ = ⟨g, (c/s)·P V⟩,   g_b(gain)_r = scale · S2_r,

S1_r = Σ_j g_rj = Σ_t δ_rt (1·a_t) and S2_r = Σ_j g_rj ŵ_rj = Σ_t δ_rt conv(x, ŵ)_rt: two
convolutions of the input. The first terms are the convolution rule's on δ scaled by c/s
per channel, with the references P V; the bias is the convolution's own. A layer with
``same_pad`` (timm's ``ScaledStdConv2dSame``: NFNets) pads its input TensorFlow's "SAME"
way in its forward first; the rule pads it so too (:func:`_padded`), which the check of
the first batch confirms.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...kernels import acc_dtype
from .conv import conv
from .registry import bias_term, computes, reduce_per_example, register_structural


def _like_std_conv(layer: nn.Module) -> bool:
    """A Conv2d subclass named like a weight-standardized conv (``…StdConv…``, Hugging Face's
    ``WeightStandardizedConv2d``) with an eps, no submodules (a dynamic padding is one), and
    ``weight``, maybe ``bias`` and a per-channel ``gain`` (with a ``scale``) as its parameters."""
    own = {n for n, _ in layer.named_parameters(recurse=False)}
    gain = getattr(layer, "gain", None)
    name = type(layer).__name__.lower()
    return (isinstance(layer, nn.Conv2d) and ("stdconv" in name or "weightstandardized" in name)
            and isinstance(getattr(layer, "eps", None), float) and next(layer.children(), None) is None
            and own in ({"weight"}, {"weight", "bias"}, {"weight", "gain"}, {"weight", "bias", "gain"})
            and (gain is None or (gain.numel() == layer.out_channels and isinstance(getattr(layer, "scale", None), float))))


def _padded(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The convolution's input: x, or with ``same_pad`` x padded with zeros to ⌈size/stride⌉
    outputs per dimension, half the padding before and the rest (one more where odd) after."""
    if not getattr(layer, "same_pad", False):
        return x
    pads = []
    for size, k, stride, dilation in zip(x.shape[:1:-1], layer.kernel_size[::-1], layer.stride[::-1],
                                         layer.dilation[::-1]):
        total = max((-(-size // stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _standardized(layer: nn.Module, w: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """W_s from the weight w (and gain), as the layer's forward forms it."""
    c = None if gain is None else (gain * layer.scale).reshape(-1)
    return F.batch_norm(w.reshape(1, layer.out_channels, -1), None, None, weight=c, training=True, momentum=0.0,
                        eps=layer.eps).reshape_as(w)


def _computes_std_conv(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """None if the layer gives conv(x, W_s) + b (module docstring), in value and gradient."""
    return computes(layer, x, lambda x, w: layer._conv_forward(_padded(layer, x),
                                                               _standardized(layer, w["weight"], w.get("gain")),
                                                               w.get("bias")),
                    "a convolution with its weight standardized per output channel (a StdConv2d)")


@register_structural(_like_std_conv, verify=_computes_std_conv,
                     params=lambda m: [n for n, _ in m.named_parameters(recurse=False)])
def std_conv(layer: nn.Module, acts, grads, refs, K):
    acts = [_padded(layer, x) for x in acts]
    B, C = acts[0].shape[0], layer.out_channels
    acc = acc_dtype(acts[0].dtype)
    with torch.no_grad():
        w = layer.weight.to(acc).reshape(C, -1)
        d = w.shape[1]
        s = torch.sqrt(w.var(1, unbiased=False) + layer.eps)
        w_hat = (w - w.mean(1, keepdim=True)) / s[:, None]
        gain = getattr(layer, "gain", None)
        k = (1 / s) if gain is None else gain.to(acc).reshape(-1) * layer.scale / s   # c_r / s_r
    per_channel = (1, C) + (1,) * (acts[0].dim() - 2)
    sq, dots = bias_term(sum(dd.to(acc).reshape(B, C, -1).sum(2) for dd in grads), refs, K)
    if "weight" not in refs and "gain" not in refs:
        return sq, dots
    S1 = S2 = 0
    ones = torch.ones_like(layer.weight, dtype=acc)
    for x, dd in zip(acts, grads):   # the calls add up
        x, dd = x.to(acc), dd.to(acc)
        S1 = S1 + (dd * layer._conv_forward(x, ones, None)).reshape(B, C, -1).sum(2)
        S2 = S2 + (dd * layer._conv_forward(x, w_hat.reshape(layer.weight.shape), None)).reshape(B, C, -1).sum(2)
    if "weight" in refs:
        V = refs["weight"]
        projected = None if V is None else _project(V.to(acc).reshape(len(V), C, d), w_hat).reshape(V.shape)
        sq_w, dots_w = conv(layer, acts, [dd * k.reshape(per_channel).to(dd.dtype) for dd in grads],
                            {"weight": projected}, K)
        sq_w = sq_w - ((k ** 2) * (S1 ** 2 / d + 2 * S2 ** 2 / d - S2 ** 2 * (w_hat ** 2).sum(1) / d ** 2)).sum(1)
        sq, dots = sq + sq_w, dots + dots_w
    if "gain" in refs:
        g_sq, g_dots = reduce_per_example({"gain": (layer.scale * S2).reshape(B, *layer.gain.shape)}, refs, K)
        sq, dots = sq + g_sq, dots + g_dots
    return sq, dots


def _project(V: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """P V row by row: V (K, C, d) less its row means and its rows' mean products with ŵ (C, d) times ŵ."""
    d = w_hat.shape[1]
    return V - V.mean(2, keepdim=True) - w_hat * (V * w_hat).sum(2, keepdim=True) / d
