"""Ghost rule for Hugging Face's mixture-of-experts layers: the ``…Experts`` modules that
``transformers.integrations.moe.use_experts_implementation`` builds (Mixtral, Qwen-MoE,
OLMoE, DeepSeek, GPT-OSS and some 70 families), matched by that structure.

Such a layer holds every expert's weights stacked, ``gate_up_proj`` (E, 2I, d) (or
``up_proj``) and ``down_proj`` (E, d, I), biases (E, ·) where ``has_bias``, transposed
where ``is_transposed``, and is called on token rows with the router's choice:
``(hidden (N, d), top_k_index (N, k), top_k_weights (N, k)) -> (N, d)``. Row n's output is
Σ_p w_np · down_e(gate(up_e(x_n))) over its k experts e = top_k_index[n, p]: rows are
independent. So expert e's per-example gradient is a Linear's, Σ over the example's rows
routed to e of δ aᵀ (:mod:`.linear`), given each row's input a and δ at the expert's two
projections. The rule replays the experts on the call's rows (the layer's own gate,
``_apply_gate`` or ``act_fn``) with the up projection's output as a leaf; one backward of
the replay, from the layer's output gradient times the routing weight, gives both δ's.
The replay is checked on the first batch against the layer's own forward, in value and in
every weight's gradient (:func:`.registry.computes`), whatever implementation that forward
dispatches to. The rows may be the batch's tokens merged, (B·T, d): the layout's check
shows they are, example by example. A norm after each expert, or experts split over
devices, falls back.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ...kernels import acc_dtype
from .linear import weight_and_bias
from .registry import computes, register_structural, zeros_like_result


def _up(layer: nn.Module) -> str:
    return "gate_up_proj" if layer.has_gate else "up_proj"


def like_experts(m: nn.Module) -> bool:
    """Whether ``m`` has the structure ``use_experts_implementation`` gives a layer."""
    if not all(hasattr(m, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")):
        return False
    weights = [getattr(m, name, None) for name in (_up(m), "down_proj")]
    return all(isinstance(w, nn.Parameter) and w.dim() == 3 for w in weights)


def _supports(m: nn.Module) -> str | None:
    if getattr(m, "has_post_expert_norm", False):
        return f"{type(m).__name__} with a norm after each expert, which its rule does not replay"
    if getattr(m, "_is_expert_parallel", False):
        return f"{type(m).__name__} with its experts split over devices"
    return None


def _params(m: nn.Module) -> tuple[str, ...]:
    up = _up(m)
    return (up, f"{up}_bias", "down_proj", "down_proj_bias")


def _bind(layer: nn.Module, call) -> list[torch.Tensor]:
    """A call's hidden states, top-k expert indices and weights: the forward's first three
    arguments, by position or by name (GPT-OSS names them ``router_indices``, ``routing_weights``)."""
    bound = inspect.signature(layer.forward).bind(*call[0], **call[1])
    bound.apply_defaults()
    return list(bound.arguments.values())[:3]


def _affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ w if transposed else x @ w.T
    return y if b is None else y + b


def _routes(index: torch.Tensor, E: int):
    """(expert, its rows n, their top-k slots p) for each expert the call routes rows to;
    an index E is no expert (the sentinel the layer's forward skips)."""
    for e in index[index < E].unique().tolist():
        n, p = torch.where(index == e)
        yield e, n, p


def _expert(layer: nn.Module, w: dict[str, torch.Tensor], e: int, x: torch.Tensor, leaf: bool = False) -> tuple:
    """Expert e of the parameters ``w`` (local names) on rows x, in x's dtype: its up
    projection z (a leaf needing a gradient where ``leaf``), gated h, and output y."""
    up = _up(layer)
    bias = {n: w[f"{n}_bias"][e].to(x.dtype) if layer.has_bias else None for n in (up, "down_proj")}
    z = _affine(x, w[up][e].to(x.dtype), bias[up], layer.is_transposed)
    z = z.detach().requires_grad_() if leaf else z
    h = layer._apply_gate(z) if layer.has_gate else layer.act_fn(z)
    return z, h, _affine(h, w["down_proj"][e].to(x.dtype), bias["down_proj"], layer.is_transposed)


def _replay(layer: nn.Module, w: dict[str, torch.Tensor], hidden: torch.Tensor, index: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
    """The layer's output (N, d) from its parameters ``w``, as the rule assumes it computes."""
    out = torch.zeros_like(hidden, dtype=torch.promote_types(hidden.dtype, w["down_proj"].dtype))
    for e, n, p in _routes(index, layer.num_experts):
        y = _expert(layer, w, e, hidden[n].to(w["down_proj"].dtype))[2] * weights[n, p, None]
        out = out.index_add(0, n, y.to(out.dtype))
    return out.to(hidden.dtype)


def _computes_experts(layer: nn.Module, call, output) -> str | None:
    try:
        args = _bind(layer, call)
    except TypeError:
        args = []
    if (len(args) < 3 or not all(isinstance(t, torch.Tensor) for t in args) or args[0].dim() != 2
            or args[1].is_floating_point()):
        return "is not called as (rows (N, d), top-k indices, top-k weights), which its rule assumes"
    hidden, index, weights = args
    return computes(layer, call, lambda _, w: _replay(layer, w, hidden, index, weights),
                    "its experts' gated projections of the routed rows, weighed and summed")


def _pad(example: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """(B, L, ·): each example's rows in order, zero-padded to the most any example has."""
    order = torch.argsort(example, stable=True)
    example, rows = example[order], rows[order]
    counts = torch.bincount(example, minlength=B)
    position = torch.arange(len(example), device=example.device) - (counts.cumsum(0) - counts)[example]
    out = rows.new_zeros((B, int(counts.max()) if len(example) else 0, rows.shape[-1]))
    out[example, position] = rows
    return out


@register_structural(like_experts, verify=_computes_experts, supports=_supports, call=True,
                     batch_dims=(0, 1), params=_params)
def experts(layer: nn.Module, calls, grads, refs, K):
    """Per expert e, its up projection's (a, δ) and its down projection's (h, w·δ_out) rows,
    each example's laid out as a sequence: the Linear rule on each (:func:`.linear.weight_and_bias`).
    Rows of several calls add up, as the per-example gradient does."""
    acc = acc_dtype(grads[0].dtype)
    B = grads[0].shape[0]
    if B == 0:
        return zeros_like_result(grads[0], K)
    live = {n: p.detach() for n, p in layer.named_parameters(recurse=False)}
    rows: dict[int, list[list[torch.Tensor]]] = {}   # expert -> [examples, a_up, δ_up, a_down, δ_down]
    for call, delta in zip(calls, grads):
        hidden, index, weights = _bind(layer, call)
        per = len(hidden) // B    # rows per example: k where merged (δ viewed as (B, k, d)), else 1
        delta = delta.reshape(-1, delta.shape[-1]).to(acc)
        for e, n, p in _routes(index, layer.num_experts):
            x = hidden[n].to(acc)
            with torch.enable_grad():
                z, h, y = _expert(layer, live, e, x, leaf=True)   # each expert's weights cast as it is used
                d_y = delta[n] * weights[n, p, None].to(acc)
                d_z, = torch.autograd.grad(y, z, d_y)
            for part, t in zip(rows.setdefault(e, [[] for _ in range(5)]), (n // per, x, d_z, h.detach(), d_y)):
                part.append(t)
    sq, dots = grads[0].new_zeros(B, dtype=acc), grads[0].new_zeros((B, K), dtype=acc)
    up = _up(layer)
    for e, parts in rows.items():
        example, a_up, d_up, a_down, d_down = (torch.cat(t) for t in parts)
        for name, a, d in ((up, a_up, d_up), ("down_proj", a_down, d_down)):
            sub = {local: refs[full][:, e] if K else None
                   for local, full in (("weight", name), ("bias", f"{name}_bias")) if full in refs}
            if sub:
                s, k = weight_and_bias([_pad(example, a, B)], [_pad(example, d, B)], sub, K,
                                       transposed=layer.is_transposed)
                sq, dots = sq + s, dots + k.to(dots.dtype)
    return sq, dots
