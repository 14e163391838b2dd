"""Registry of ghost rules, keyed by module class, filled by the ``register_rule`` decorator.

A rule turns what one ordinary batched forward/backward captured for a layer into that
layer's share of the per-example ‖g_b‖² and ⟨g_b, V_k⟩:

    fn(layer, acts, grads, refs, K) -> (sq (B,), dots (B, K))

- ``acts``: the layer's input, one tensor per call of the layer (batch dim first);
- ``grads``: ∂(Σ_b ℓ_b)/∂(layer output) per call, so row b is example b's output gradient;
- ``refs``: {local parameter name: V block (K, *param.shape) or None} for the layer's
  scored parameters only (a frozen weight is simply absent);
- sums are in float32 (float64 for float64 inputs), whatever the model dtype.

``supports(layer)`` returns None when the rule applies, else the reason it does not
(the engine then falls back to vmap for that layer's parameters and says why).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ...kernels import norm_dot

RuleFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Rule:
    name: str
    fn: RuleFn
    supports: Callable[[nn.Module], Optional[str]]


_RULES: dict[type[nn.Module], Rule] = {}


def register_rule(*types: type[nn.Module], supports: Callable[[nn.Module], Optional[str]] = lambda m: None
                  ) -> Callable[[RuleFn], RuleFn]:
    """Decorator: use ``fn`` as the ghost rule for every class in ``types``."""
    def deco(fn: RuleFn) -> RuleFn:
        for t in types:
            _RULES[t] = Rule(fn.__name__, fn, supports)
        return fn
    return deco


def find_rule(module: nn.Module) -> tuple[Rule | None, str | None]:
    """(rule, None) if ``module`` has an applicable rule, else (None, reason)."""
    rule = _RULES.get(type(module))
    if rule is None:
        return None, f"no ghost rule for {type(module).__name__}"
    reason = rule.supports(module)
    return (None, reason) if reason else (rule, None)


def registered_types() -> list[type[nn.Module]]:
    return list(_RULES)


def reduce_per_example(grads: dict[str, torch.Tensor], refs: dict[str, torch.Tensor | None], K: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """sq (B,), dots (B, K) of small per-example gradients {name: (B, *shape)} (bias, norms).

    These are O(B·d) like one activation row, so they are formed explicitly.
    """
    names = list(grads)
    V = None if K == 0 else [refs[n] for n in names]
    return norm_dot([grads[n] for n in names], V)


def zeros_like_result(like: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    B = like.shape[0]
    return like.new_zeros(B, dtype=acc), like.new_zeros((B, K), dtype=acc)


def bias_term(per_example_bias: torch.Tensor, refs: dict[str, torch.Tensor | None], K: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """sq, dots of a bias whose per-example gradient is ``per_example_bias`` (B, d);
    zeros when the bias is not scored (frozen or absent)."""
    if "bias" not in refs:
        return zeros_like_result(per_example_bias, K)
    return reduce_per_example({"bias": per_example_bias}, refs, K)
