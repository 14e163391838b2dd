"""Ghost rule for ``nn.Linear``: 2-D inputs (B, d) and sequences (B, ..., d).

g_b(W) = Σ_t δ_bt a_btᵀ through ``kernels.ghost_linear`` (Gram or outer form by cost);
g_b(bias) = Σ_t δ_bt. Several calls of one layer (shared weights) are concatenated
along t, since the per-example gradient sums over calls too. A subclass with a forward
of its own (Falcon's ``x @ W.T + b``) takes the rule where it computes x Wᵀ + b, checked
on the first batch in value and gradient (``register_structural``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...kernels import norm_dot
from ...kernels.ghost_linear import ghost_linear, ghost_linear_dots
from .registry import Factor, FactoredRef, bias_factor, bias_term, computes, register_rule, register_structural


def cat_calls(xs: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate the calls of a layer along ``dim`` (no copy for a single call)."""
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=dim)


def as_sequence(xs: list[torch.Tensor]) -> torch.Tensor:
    """Calls as one (B, T, d): middle dims flattened into T, calls along T."""
    return cat_calls([x.reshape(x.shape[0], -1, x.shape[-1]) for x in xs], 1)


def sequence_view(x: torch.Tensor) -> torch.Tensor | None:
    """One call's input as the (B, T, d) sequence :func:`as_sequence` gives, if that is a
    view of it (None where it would be a copy)."""
    try:
        return x.view(x.shape[0], -1, x.shape[-1])
    except RuntimeError:
        return None


def linear_factors(layer: nn.Linear, acts, grads) -> dict[str, Factor]:
    """weight (d_out, d_in): g_b = Σ_t δ_bt a_btᵀ; bias: Σ_t δ_bt."""
    d = as_sequence(grads)
    return {"weight": Factor(d, as_sequence(acts)), "bias": bias_factor(d)}


def weight_and_bias(acts, grads, refs, K, *, transposed: bool = False):
    """sq (B,), dots (B, K) of an affine map y = W a + b (``transposed``: y = a W + b)."""
    a, d = as_sequence(acts), as_sequence(grads)
    if a.shape[1] == 1:
        return _one_position(a[:, 0], d[:, 0], refs, K, transposed)
    sq, dots = bias_term(d.sum(1), refs, K)
    if "weight" in refs:
        w_sq, w_dots = _weight_term(a, d, refs["weight"] if K else None, transposed, with_sq=True)
        sq, dots = sq + w_sq, dots + w_dots.to(sq.dtype)
    return sq, dots


def _one_position(a: torch.Tensor, d: torch.Tensor, refs, K, transposed: bool):
    """One position per example (a 2-D input, or a sequence of length 1), a (B, d_in),
    δ (B, d_out): g_b(W) = δ_b a_bᵀ and g_b(bias) = δ_b, so ‖g_b‖² = ‖δ_b‖² (‖a_b‖² + 1)
    from two row norms; the bias needs no pass of its own."""
    d_sq = norm_dot(d)[0]
    sq = d_sq * norm_dot(a)[0] if "weight" in refs else torch.zeros_like(d_sq)
    if "bias" in refs:
        sq = sq + d_sq
    dots = bias_term(d, refs, K)[1] if K and "bias" in refs else sq.new_zeros((len(sq), K))
    if K and "weight" in refs:
        dots = dots + _weight_term(a[:, None], d[:, None], refs["weight"], transposed, with_sq=False)[1]
    return sq, dots


def _weight_term(a: torch.Tensor, d: torch.Tensor, V, transposed: bool, with_sq: bool):
    """sq (B,) (None unless ``with_sq``), dots (B, K) of the weight, for a (B, T, d_in), δ (B, T, d_out)
    and V its reference block (K, *weight.shape), a :class:`FactoredRef` or None."""
    if isinstance(V, FactoredRef):   # a small batch's gradient in factored form: the Gram form
        w_sq = ghost_linear(a, d, None)[0] if with_sq else None
        return w_sq, V.dot(Factor(a, d) if transposed else Factor(d, a))
    if V is not None and transposed:  # (K, d_in, d_out) -> (K, d_out, d_in)
        V = V.transpose(1, 2)
    if with_sq:
        return ghost_linear(a, d, V)
    return None, ghost_linear_dots(a, d, V)


@register_rule(nn.Linear, factors=linear_factors, batch_dims=(0, 1), gram_input=sequence_view)
def linear(layer: nn.Linear, acts, grads, refs, K):
    return weight_and_bias(acts, grads, refs, K)


def _computes_linear(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> str | None:
    return computes(layer, x, lambda x, w: F.linear(x, w["weight"], w.get("bias")), "x Wᵀ + b (a Linear)")


@register_structural(lambda m: isinstance(m, nn.Linear), verify=_computes_linear, factors=linear_factors,
                     batch_dims=(0, 1), gram_input=sequence_view)
def linear_subclass(layer: nn.Linear, acts, grads, refs, K):
    """A Linear subclass whose own forward computes x Wᵀ + b (checked on the first batch)."""
    return weight_and_bias(acts, grads, refs, K)


def _bilinear_inputs(call) -> tuple[torch.Tensor, torch.Tensor]:
    """A Bilinear call's two inputs, given by position or by name."""
    args, kwargs = call
    return (args[0] if args else kwargs["input1"]), (args[1] if len(args) > 1 else kwargs["input2"])


@register_rule(nn.Bilinear, call=True)
def bilinear(layer: nn.Bilinear, calls, grads, refs, K):
    """y = x1ᵀ W x2 + b is a Linear layer on the outer product x1 ⊗ x2 (d1·d2 features), so
    g_b(W) = Σ_t δ_bt (x1_bt ⊗ x2_bt)ᵀ: the Linear rule on it, W viewed as (d_out, d1·d2)."""
    acts = [(x1.unsqueeze(-1) * x2.unsqueeze(-2)).flatten(-2) for x1, x2 in map(_bilinear_inputs, calls)]
    if refs.get("weight") is not None:
        refs = {**refs, "weight": refs["weight"].flatten(-2)}
    return weight_and_bias(acts, grads, refs, K)
