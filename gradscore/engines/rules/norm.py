"""Ghost rules for the affine parameters of LayerNorm, RMSNorm, GroupNorm, InstanceNorm and
eval-mode BatchNorm, and Hugging Face's RMSNorm classes, LayerNorm classes of their own
(Cohere's, DeBERTa's), MobileBERT's NoNorm (x · γ + β) and norm subclasses with a forward
of their own (timm's BatchNormAct2d, GroupNormAct, LayerNormAct: the norm, then a
dropout and an activation; GroupNorm1; LayerNorm2d over the channels): matched by
structure and checked on the first batch, in value and gradient (``register_structural``).
After an activation, the output gradient is taken back through it before the affine
rule (:func:`norm_act`).

y = x̂·γ + β with x̂ the normalized input, recomputed here from the captured input and
the layer's own statistics (running statistics for BatchNorm, and for InstanceNorm with
``track_running_stats`` in eval mode; RMSNorm: x̂ = x / √(mean(x²) + eps), no β). Per example:
g_b(γ) = Σ_positions δ_b ⊙ x̂_b and g_b(β) = Σ_positions δ_b, vectors of the size of
one channel/feature row, formed explicitly and reduced with ``norm_dot``. LayerNorm and
RMSNorm over the last dimension, on CPU under the numba kernels, form them in one fused
pass (``kernels.norm_affine_numba``) instead of x̂ and a product.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ...kernels import acc_dtype
from ...kernels.dispatch import numba_on_cpu
from .registry import computes, reduce_per_example, register_rule, register_structural, zeros_like_result


def _standardize(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """(x − mean) / √(var + eps) over ``dims``, two passes (centre, then the centred square's
    mean): faster on CPU than ``var_mean`` (``bench.norm_rules``)."""
    centred = x - x.mean(dims, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps)


def _affine(x_hat: torch.Tensor, d: torch.Tensor, sum_dims: tuple[int, ...], refs, K):
    grads = {}
    if "weight" in refs:
        grads["weight"] = (d * x_hat).sum(sum_dims) if sum_dims else d * x_hat
    if "bias" in refs:
        grads["bias"] = d.sum(sum_dims) if sum_dims else d
    return grads


def _reduce(per_call: list[dict[str, torch.Tensor]], refs, K, like):
    if not per_call or not per_call[0]:
        return zeros_like_result(like, K)
    total = {k: sum(c[k] for c in per_call) for k in per_call[0]}  # calls add up
    return reduce_per_example(total, refs, K)


def _affine_rule(acts, grads, refs, K, normalize: Callable[[torch.Tensor], torch.Tensor],
                 summed: Callable[[torch.Tensor], tuple[int, ...]]):
    """Each call's x̂ = normalize(x) in the accumulation dtype, its γ and β gradients summed
    over the dimensions ``summed(x)``; the calls add up."""
    per_call = []
    for x, d in zip(acts, grads):
        acc = acc_dtype(x.dtype)
        x, d = x.to(acc), d.to(acc)
        per_call.append(_affine(normalize(x), d, summed(x), refs, K))
    return _reduce(per_call, refs, K, grads[0])


def _last(n: int) -> Callable[[torch.Tensor], tuple[int, ...]]:
    """A row-wise norm over the last n dimensions: the leading ones but the batch are summed."""
    return lambda x: tuple(range(1, x.dim() - n))


def _spatial(x: torch.Tensor) -> tuple[int, ...]:
    """A channel-wise norm: γ per channel (dimension 1), summed over the positions."""
    return tuple(range(2, x.dim()))


def _fused_rows(acts, grads, refs, K, eps: float, centred: bool, last: bool = True):
    """(sq, dots) by the fused numba kernel for one call of a norm over the last dimension
    (``last``) on CPU in float32 (or narrower) under the numba kernels; None elsewhere."""
    x, d = acts[0], grads[0]
    if (len(acts) != 1 or not last or x.device.type != "cpu"
            or acc_dtype(x.dtype) != torch.float32 or not numba_on_cpu()):
        return None
    from ...kernels.norm_affine_numba import norm_affine_numba
    rows = (x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])   # not -1: B may be 0
    gw, gb = norm_affine_numba(x.reshape(rows).float(), d.reshape(rows).float(), eps, centred)
    scored = {k: g for k, g in (("weight", gw), ("bias", gb)) if k in refs}
    return reduce_per_example(scored, refs, K) if scored else zeros_like_result(d, K)


@register_rule(nn.LayerNorm, supports=lambda m: None if m.elementwise_affine else "LayerNorm without affine",
               batch_dims=(0, 1))
def layer_norm(layer: nn.LayerNorm, acts, grads, refs, K):
    fused = _fused_rows(acts, grads, refs, K, layer.eps, True, len(layer.normalized_shape) == 1)
    if fused is not None:
        return fused
    n = len(layer.normalized_shape)

    def normalize(x):   # torch's fused kernel: fewer passes and temporaries than any composite
        return F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
    return _affine_rule(acts, grads, refs, K, normalize, _last(n))


def _rms_eps(layer: nn.RMSNorm, dtype: torch.dtype) -> float:
    """RMSNorm's eps; None means the machine epsilon of the dtype torch computes in."""
    if layer.eps is not None:
        return layer.eps
    return torch.finfo(dtype if dtype in (torch.float32, torch.float64) else torch.float32).eps


@register_rule(nn.RMSNorm, supports=lambda m: None if m.elementwise_affine else "RMSNorm without affine",
               batch_dims=(0, 1))
def rms_norm(layer: nn.RMSNorm, acts, grads, refs, K):
    n, eps = len(layer.normalized_shape), _rms_eps(layer, acts[0].dtype)
    fused = _fused_rows(acts, grads, refs, K, eps, False, n == 1)
    if fused is not None:
        return fused
    return _affine_rule(acts, grads, refs, K,
                        lambda x: x * torch.rsqrt(x.pow(2).mean(tuple(range(x.dim() - n, x.dim())), keepdim=True) + eps),
                        _last(n))


def _hf_eps(layer: nn.Module) -> float | None:
    """A Hugging Face norm's eps (``variance_epsilon`` in Llama's RMSNorm, ``eps`` in Gemma's)."""
    eps = getattr(layer, "variance_epsilon", getattr(layer, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None


def _row_affine(layer: nn.Module, *names: set[str]) -> bool:
    """Whether ``layer`` has no submodules and its own parameters are one of the sets
    ``names``, each a 1-D vector of one size (a norm's γ, β over the last dimension)."""
    own = dict(layer.named_parameters(recurse=False))
    return (set(own) in names and next(layer.children(), None) is None
            and all(p.dim() == 1 and p.shape == own["weight"].shape for p in own.values()))


def _computes_rowwise(layer: nn.Module, x: torch.Tensor, expected, what: str) -> str | None:
    """:func:`registry.computes` for a layer whose weight spans its input's last dimension."""
    n = layer.weight.numel()
    if x.shape[-1:] != (n,):   # SqueezeBERT's LayerNorm normalizes the channels of (B, C, T)
        return f"does not compute {what}: its weight has {n} elements, its input's last dimension {x.shape[-1]}"
    return computes(layer, x, expected, what)


def _like_hf_rms_norm(layer: nn.Module) -> bool:
    """Named like a Hugging Face RMSNorm (LlamaRMSNorm and its copies, GemmaRMSNorm,
    T5LayerNorm and its copies: MT5LayerNorm, UMT5LayerNorm, LongT5LayerNorm), with one 1-D
    ``weight``, no submodules and an eps; what it computes is checked by :func:`_computes_rms_norm`."""
    name = type(layer).__name__
    return ((name.endswith("RMSNorm") or name.endswith("T5LayerNorm")) and _row_affine(layer, {"weight"})
            and _hf_eps(layer) is not None)


def _rms_hat(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / √(mean(x²) + eps) over the last dimension, in the accumulation dtype."""
    x = x.to(acc_dtype(x.dtype))
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _computes_rms_norm(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """None if the layer gives w ⊙ x̂ (Llama) or (1 + w) ⊙ x̂ (Gemma) over its input's last
    dimension, in value and gradient (both have the gradient δ ⊙ x̂ in w); else why not."""
    eps = _hf_eps(layer)
    what = ("weight · x / √(mean(x²) + eps) over its last dimension (or (1 + weight) · …, an RMSNorm, "
            "as its name suggests)")
    llama = _computes_rowwise(layer, x, lambda x, w: w["weight"].to(acc_dtype(x.dtype)) * _rms_hat(x, eps), what)
    if llama is None:
        return None
    gemma = _computes_rowwise(layer, x, lambda x, w: (1 + w["weight"].to(acc_dtype(x.dtype))) * _rms_hat(x, eps),
                              what)
    return None if gemma is None else llama


@register_structural(_like_hf_rms_norm, verify=_computes_rms_norm, batch_dims=(0, 1), params=("weight",))
def hf_rms_norm(layer: nn.Module, acts, grads, refs, K):
    eps = _hf_eps(layer)
    return _affine_rule(acts, grads, refs, K, lambda x: _rms_hat(x, eps), _last(1))


def _like_hf_layer_norm(layer: nn.Module) -> bool:
    """Named like a LayerNorm of a class of its own (Cohere's without β, DeBERTa's), with a
    1-D ``weight`` (and ``bias`` of its size), no submodules and an eps, and not over the
    channels (:func:`_channels_first`: the norm-act rule's); what it computes is checked by
    :func:`_computes_layer_norm`."""
    return (type(layer).__name__.endswith("LayerNorm") and _row_affine(layer, {"weight"}, {"weight", "bias"})
            and _hf_eps(layer) is not None and not _channels_first(layer))


def _computes_layer_norm(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """None if the layer gives γ ⊙ x̂ + β over its input's last dimension, in value and gradient."""
    eps = _hf_eps(layer)
    return _computes_rowwise(layer, x, lambda x, w: F.layer_norm(x, x.shape[-1:], w["weight"], w.get("bias"), eps),
                             "weight · (x − mean) / √(var + eps) + bias over its input's last dimension (a LayerNorm)")


@register_structural(_like_hf_layer_norm, verify=_computes_layer_norm, batch_dims=(0, 1))
def hf_layer_norm(layer: nn.Module, acts, grads, refs, K):
    eps = _hf_eps(layer)
    fused = _fused_rows(acts, grads, refs, K, eps, True)
    if fused is not None:
        return fused
    return _affine_rule(acts, grads, refs, K, lambda x: F.layer_norm(x, x.shape[-1:], eps=eps), _last(1))


def _like_no_norm(layer: nn.Module) -> bool:
    """Named like MobileBERT's ``NoNorm`` (x · γ + β, no normalization), with a 1-D ``weight``
    and ``bias`` of its size and no submodules; what it computes is checked by
    :func:`_computes_no_norm`."""
    return type(layer).__name__.endswith("NoNorm") and _row_affine(layer, {"weight", "bias"})


def _computes_no_norm(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """None if the layer gives x ⊙ γ + β over its input's last dimension, in value and gradient."""
    return _computes_rowwise(layer, x, lambda x, w: x * w["weight"] + w["bias"],
                             "x · weight + bias over its input's last dimension (MobileBERT's NoNorm)")


@register_structural(_like_no_norm, verify=_computes_no_norm, batch_dims=(0, 1))
def no_norm(layer: nn.Module, acts, grads, refs, K):
    """An elementwise affine map: the affine rule with x̂ = x."""
    return _affine_rule(acts, grads, refs, K, lambda x: x, _last(1))


def _grouped(layer: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """x standardized over each of the layer's groups of channels (and the positions)."""
    return _standardize(x.reshape(x.shape[0], layer.num_groups, -1), (2,), layer.eps).reshape(x.shape)


@register_rule(nn.GroupNorm, supports=lambda m: None if m.affine else "GroupNorm without affine")
def group_norm(layer: nn.GroupNorm, acts, grads, refs, K):
    return _affine_rule(acts, grads, refs, K, lambda x: _grouped(layer, x), _spatial)


def _bn_supports(m: nn.Module) -> str | None:
    if not m.affine:
        return f"{type(m).__name__} without affine"
    if m.running_mean is None:
        return f"{type(m).__name__} without running statistics (uses batch statistics)"
    return None


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector v (C,) broadcast against x (B, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def _running(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x normalized per channel (dimension 1) by the layer's running statistics."""
    return ((x - _per_channel(layer.running_mean.to(x.dtype), x))
            / torch.sqrt(_per_channel(layer.running_var.to(x.dtype), x) + layer.eps))


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, supports=_bn_supports)
def batch_norm(layer: nn.modules.batchnorm._BatchNorm, acts, grads, refs, K):
    return _affine_rule(acts, grads, refs, K, lambda x: _running(layer, x), _spatial)


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
               supports=lambda m: None if m.affine else f"{type(m).__name__} without affine")
def instance_norm(layer: nn.modules.instancenorm._InstanceNorm, acts, grads, refs, K):
    """Each example's own statistics per channel; the running ones where tracked, in eval mode
    only (torch's ``use_input_stats``; the mode is the forward's, unchanged until its backward)."""
    def own(x):
        return _standardize(x, _spatial(x), layer.eps)
    running = layer.track_running_stats and not layer.training
    return _affine_rule(acts, grads, refs, K, (lambda x: _running(layer, x)) if running else own, _spatial)


# A norm subclass with a forward of its own: timm's BatchNormAct2d, GroupNormAct and
# LayerNormAct (the norm, then a dropout and an activation), GroupNorm1, LayerNorm2d (a
# LayerNorm over the channels of (B, C, H, W)). Matched by structure, checked on the first
# batch against the parent's normalization followed by the layer's own ``drop`` and ``act``.
_NORM_PARENTS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def _channels_first(layer: nn.Module) -> bool:
    """A LayerNorm over dimension 1 (its class named ``…2d``, as timm's LayerNorm2d, or its
    ``data_format`` "channels_first", as Hugging Face's ConvNeXt LayerNorm), not the last
    dimension(s); the name only picks what the first batch's check then confirms."""
    return isinstance(layer, nn.LayerNorm) and (type(layer).__name__.lower().endswith("2d")
                                                or getattr(layer, "data_format", None) == "channels_first")


#: what the norm-act layers name their activation: timm's ``act``, Hugging Face's ``activation`` (BiT's)
_ACT_NAMES = ("act", "activation")


def _parts(layer: nn.Module) -> dict[str, nn.Module | None]:
    """The layer's ``drop`` and activation submodules (None where it has none), in the order
    its forward applies them."""
    drop = getattr(layer, "drop", None)
    return {"drop": drop if isinstance(drop, nn.Module) else None,
            "act": next((m for n in _ACT_NAMES if isinstance(m := getattr(layer, n, None), nn.Module)), None)}


def _like_norm_act(layer: nn.Module) -> bool:
    """A subclass of a BatchNorm, GroupNorm or LayerNorm (whose own forward kept it from its
    parent's rule), with ``weight`` (and ``bias``) as its only parameters and, as its only
    submodules, a parameter-free ``drop`` and ``act`` (or ``activation``); what it computes
    is checked by :func:`_computes_norm_act`."""
    children = dict(layer.named_children())
    return (isinstance(layer, _NORM_PARENTS) and type(layer) not in _NORM_PARENTS
            and set(children) <= {"drop", *_ACT_NAMES} and sum(n in children for n in _ACT_NAMES) <= 1
            and not any(True for c in children.values() for _ in c.parameters())
            and {n for n, _ in layer.named_parameters(recurse=False)} in ({"weight"}, {"weight", "bias"})
            and (not _channels_first(layer) or len(layer.normalized_shape) == 1))


def _norm_act_supports(layer: nn.Module) -> str | None:
    """Why the rule cannot recompute the layer's output gradient before its activation now:
    a BatchNorm in training mode (its batch's statistics), or a dropout or RReLU that draws
    anew in training mode."""
    name = type(layer).__name__
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        if layer.running_mean is None:
            return f"{name} without running statistics (uses batch statistics)"
        if layer.training:
            return f"{name} in training mode (uses its batch's statistics)"
    for part, m in _parts(layer).items():
        if m is None or not m.training or isinstance(m, nn.Identity):
            continue
        if isinstance(m, nn.RReLU) or (part == "drop" and not (isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0)):
            return f"{name}'s {part} ({type(m).__name__}) draws anew in training mode, which its rule cannot redraw"
    return None


def _norm_of(layer: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable]:
    """(x ↦ x̂, x ↦ the dimensions γ's gradient sums over) for the layer's parent norm."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return (lambda x: _running(layer, x)), _spatial
    if isinstance(layer, nn.GroupNorm):
        return (lambda x: _grouped(layer, x)), _spatial
    if _channels_first(layer):
        return (lambda x: F.layer_norm(x.movedim(1, -1), layer.normalized_shape, eps=layer.eps).movedim(-1, 1),
                _spatial)
    n = len(layer.normalized_shape)
    return (lambda x: F.layer_norm(x, layer.normalized_shape, eps=layer.eps)), _last(n)


def _forward_pre_act(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """γ ⊙ x̂ + β as the layer's forward computes it, by its parent's own functional on x (as
    timm's layers call it): the same values to the last bit, so an activation's kink is
    taken on the forward's side (a group without variance normalizes to rounding noise,
    which a zero bias leaves at a ReLU's kink)."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return F.batch_norm(x, layer.running_mean, layer.running_var, weight, bias, False, 0.0, layer.eps)
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    if _channels_first(layer):
        return F.layer_norm(x.movedim(1, -1), layer.normalized_shape, weight, bias, layer.eps).movedim(-1, 1)
    return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)


def _computes_norm_act(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """None if the layer gives act(drop(γ ⊙ x̂ + β)) with its parent's x̂, in value and gradient."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training:   # never run: it would update the statistics
        return f"{type(layer).__name__} in training mode (uses its batch's statistics)"
    drop, act = (nn.Identity() if m is None else m for m in _parts(layer).values())

    def expected(x, w):
        return act(drop(_forward_pre_act(layer, x, w["weight"], w.get("bias"))))
    parent = next(c for c in type(layer).__mro__ if c in _NORM_PARENTS).__name__
    over_last = isinstance(layer, nn.LayerNorm) and not _channels_first(layer)
    where = "its last dimension(s)" if over_last else "its channels (dimension 1)"
    why = computes(layer, x, expected, f"a {parent} over {where}, then its own drop and act")
    if why is None or any(m is not None and not isinstance(m, nn.Identity) for m in _parts(layer).values()):
        return why
    # (1 + γ) ⊙ x̂ + β (Nemotron's LayerNorm1P): γ's gradient is δ ⊙ x̂ too; an act would take its kink elsewhere
    one_plus = computes(layer, x, lambda x, w: _forward_pre_act(layer, x, 1 + w["weight"], w.get("bias")), "")
    return None if one_plus is None else why


def _before_act(layer: nn.Module, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """δ before the layer's ``drop`` and ``act``: their backward at the forward's γ ⊙ x̂ + β
    (:func:`_forward_pre_act` of its input x), in the dtype they ran in (their output's, that
    of ``d``: float32 after an autocast LayerNorm or GroupNorm of a half input), applied to
    the output gradient ``d``."""
    parts = [m for m in _parts(layer).values()
             if m is not None and not isinstance(m, nn.Identity)]
    if not parts:
        return d
    with torch.no_grad():
        pre = _forward_pre_act(layer, x.to(d.dtype), layer.weight, layer.bias)
    pre = pre.requires_grad_()
    with torch.enable_grad():
        out = pre.clone()   # an in-place activation changes the copy, not the point of the derivative
        for m in parts:
            out = m(out)
        return torch.autograd.grad(out, pre, d)[0]


@register_structural(_like_norm_act, verify=_computes_norm_act, supports=_norm_act_supports,
                     batch_dims=lambda m: (0, 1) if isinstance(m, nn.LayerNorm) and not _channels_first(m) else (0,))
def norm_act(layer: nn.Module, acts, grads, refs, K):
    """The parent's affine rule on the output gradient taken back through ``act`` and ``drop``."""
    normalize, summed = _norm_of(layer)
    per_call = []
    for x, d in zip(acts, grads):
        acc = acc_dtype(x.dtype)
        x_hat = normalize(x.to(acc))
        per_call.append(_affine(x_hat, _before_act(layer, x, d).to(acc), summed(x), refs, K))
    return _reduce(per_call, refs, K, grads[0])
