"""Ghost rules for per-channel elementwise parameters: layer scales and ``nn.PReLU``.

Layer scales: y = x ⊙ γ with one 1-D γ broadcast against x (timm's
``LayerScale`` over the last dimension, ``LayerScale2d`` over the channels, MetaFormer's
``Scale`` viewed as its ``shape``). Matched by structure and checked on the first batch,
in value and gradient (``register_structural``).

γ takes its view V, right-aligned against x without its batch: (C,) over the last
dimension, (C, 1, 1) for a class named ``…2d``, or the layer's own ``shape`` attribute
where it has one of C elements. Per example, g_b(γ) = δ_b ⊙ x_b summed to V, formed
explicitly (C numbers) and reduced with ``norm_dot``. A scale that multiplies its input
in place (``inplace=True``) is refused: the captured input would be its output.

PReLU: y = max(x, 0) + a ⊙ min(x, 0), with one slope a for every element, or one per
channel (dimension 1 of x). Per example, g_b(a) = δ_b ⊙ min(x_b, 0) summed to a's
elements, formed explicitly and reduced with ``norm_dot``. One slope lets the batch be in
dimension 0 or 1 (a sequence-first input); slopes per channel take the batch in dimension 0.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...kernels import acc_dtype
from .registry import computes, reduce_per_example, register_rule, register_structural, zeros_like_result


def _gamma(layer: nn.Module) -> tuple[str, nn.Parameter]:
    """The layer's one parameter, (name, tensor)."""
    return next(iter(layer.named_parameters(recurse=False)))


def _like_layer_scale(layer: nn.Module) -> bool:
    """Named like a scale (``…Scale…``), no submodules and one 1-D floating parameter; what it
    computes is checked by :func:`_computes_scale`."""
    own = list(layer.parameters(recurse=False))
    return ("scale" in type(layer).__name__.lower() and next(layer.children(), None) is None
            and len(own) == 1 and own[0].dim() == 1 and own[0].is_floating_point())


def _view(layer: nn.Module) -> tuple[int, ...]:
    """γ's view V against x less its batch (module docstring)."""
    C = _gamma(layer)[1].numel()
    shape = getattr(layer, "shape", None)
    if isinstance(shape, tuple) and all(isinstance(n, int) for n in shape) and math.prod(shape) == C:
        return shape
    return (C, 1, 1) if type(layer).__name__.lower().endswith("2d") else (C,)


def _supports(layer: nn.Module) -> str | None:
    if getattr(layer, "inplace", False):
        return f"{type(layer).__name__} with inplace=True (its input, which the rule reads, becomes its output)"
    return None


def _computes_scale(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """None if the layer gives x ⊙ γ with γ viewed as :func:`_view`, in value and gradient."""
    name, V = _gamma(layer)[0], _view(layer)
    return computes(layer, x, lambda x, w: x * w[name].reshape(V), f"x · {name} viewed as {V} (a layer scale)")


def _summed_to(prod: torch.Tensor, V: tuple[int, ...]) -> torch.Tensor:
    """prod (B, *rest) summed over the dimensions of ``rest`` that V (right-aligned) leaves out
    or holds as 1: (B, C)."""
    lead = prod.dim() - 1 - len(V)
    dims = list(range(1, 1 + lead)) + [1 + lead + i for i, n in enumerate(V) if n == 1]
    return (prod.sum(dims) if dims else prod).reshape(len(prod), -1)


@register_structural(_like_layer_scale, verify=_computes_scale, supports=_supports,
                     batch_dims=lambda m: (0, 1) if len(_view(m)) == 1 else (0,),
                     params=lambda m: (_gamma(m)[0],))
def layer_scale(layer: nn.Module, acts, grads, refs, K):
    name, V = _gamma(layer)[0], _view(layer)
    if name not in refs:
        return zeros_like_result(grads[0], K)
    acc = acc_dtype(acts[0].dtype)
    per_example = sum(_summed_to(d.to(acc) * x.to(acc), V) for x, d in zip(acts, grads))   # calls add up
    return reduce_per_example({name: per_example}, refs, K)


def _slope_view(slopes: int, dims: int) -> tuple[int, ...]:
    """PReLU's slopes viewed against an input of ``dims`` dimensions less its batch, for
    :func:`_summed_to`: one slope for every element, or one per channel (the first)."""
    return (1,) * dims if slopes == 1 else (slopes,) + (1,) * (dims - 1)


@register_rule(nn.PReLU, batch_dims=lambda m: (0, 1) if m.num_parameters == 1 else (0,), params=("weight",))
def prelu(layer: nn.PReLU, acts, grads, refs, K):
    if "weight" not in refs:
        return zeros_like_result(grads[0], K)
    acc = acc_dtype(acts[0].dtype)
    per_example = sum(_summed_to(d.to(acc) * x.to(acc).clamp(max=0), _slope_view(layer.weight.numel(), x.dim() - 1))
                      for x, d in zip(acts, grads))   # calls add up
    return reduce_per_example({"weight": per_example}, refs, K)
