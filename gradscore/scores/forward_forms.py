"""Forms with a forward-mode derivative of the ops torch has none for, while the co-states'
Hessian-vector products (``jvp`` of ``grad``) run: each the same function, so the same
product, computed another way.

- Hugging Face's mixture-of-experts layers: their eager loop (their grouped and batched
  matmuls have none); the model's config is given its setting back after.
- ``torch._weight_norm(v, g, dim)`` (legacy ``weight_norm`` and
  ``parametrizations.weight_norm`` on CPU): its composite v · (g / ‖v‖ over all but ``dim``).
- ``F.scaled_dot_product_attention`` (``nn.TransformerEncoderLayer``'s attention, Hugging
  Face's "sdpa"): torch's math kernel (its CPU flash kernel has none).
- ``F.hardsigmoid`` (MobileNetV3's gates): clamp(x + 3, 0, 6) / 6 (its backward has none).
- ``torch.cdist`` (prototype classifiers), for p ≥ 1: (Σ|x − y|^p)^(1/p) from the
  differences, with the gradient 0 at a distance of 0, as torch's.
- ``F.huber_loss``, ``F.soft_margin_loss``, ``F.multi_margin_loss`` (a user's per-example
  loss): their definitions (torch's docs) in elementwise ops; the legacy ``size_average``
  and ``reduce`` arguments keep torch's op.
- ``F.embedding_bag`` (``nn.EmbeddingBag``): the rows looked up, weighted
  (``per_sample_weights``), and summed, averaged or maximized per bag with index ops;
  padding rows left out and empty bags 0, as torch's. With ``max_norm`` (it renormalizes
  the weight in place) or ``scale_grad_by_freq`` (it scales the gradient, not the
  function) the op stays torch's, which refuses.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ..engines.rules.experts import like_experts


@contextlib.contextmanager
def _eager_experts(model: torch.nn.Module) -> Iterator[None]:
    """Hugging Face's mixture-of-experts layers of ``model`` run their eager loop meanwhile."""
    configs = {id(m.config): m.config for m in model.modules()
               if like_experts(m) and hasattr(getattr(m, "config", None), "_experts_implementation")}
    kept = {k: c._experts_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._experts_implementation = kept[k]


_BAG = inspect.signature(F.embedding_bag)


def _embedding_bag(*args, **kwargs) -> torch.Tensor | None:
    """``F.embedding_bag(*args, **kwargs)`` with index ops that have forward-mode
    derivatives: (bags, d) of the ``weight`` rows of ``input`` per bag (a row of a 2-D
    ``input``, or ``offsets`` into a 1-D one). None where that would be another function
    (``max_norm``, ``scale_grad_by_freq``) or torch refuses the arguments anyway."""
    a = _BAG.bind(*args, **kwargs)
    a.apply_defaults()
    ids, weight, offsets, psw, mode, pad = (a.arguments[k] for k in ("input", "weight", "offsets",
                                                                     "per_sample_weights", "mode", "padding_idx"))
    if (a.arguments["max_norm"] is not None or a.arguments["scale_grad_by_freq"] or mode not in ("sum", "mean", "max")
            or (psw is not None and mode != "sum") or ids.dim() not in (1, 2) or (ids.dim() == 2) != (offsets is None)):
        return None
    if ids.dim() == 2:   # one bag per row
        bags, bag = len(ids), torch.arange(len(ids), device=ids.device).repeat_interleave(ids.shape[1])
    else:
        starts = offsets[:-1] if a.arguments["include_last_offset"] else offsets
        n = int(offsets[-1]) if a.arguments["include_last_offset"] and len(offsets) else len(ids)
        bags, ids = len(starts), ids[:n]
        bag = torch.searchsorted(starts, torch.arange(n, device=ids.device), right=True) - 1
        psw = None if psw is None else psw[:n]
    ids, keep = ids.reshape(-1), torch.ones(bag.shape, dtype=torch.bool, device=bag.device)
    if pad is not None:
        keep = ids != (pad if pad >= 0 else len(weight) + pad)
    rows = weight.index_select(0, ids[keep])
    if psw is not None:
        rows = rows * psw.reshape(-1)[keep].unsqueeze(1)
    bag = bag[keep]
    out = weight.new_zeros((bags, weight.shape[1]))
    if mode == "max":
        return out.scatter_reduce(0, bag.unsqueeze(1).expand_as(rows), rows, "amax", include_self=False)
    out = out.index_add(0, bag, rows)
    if mode == "mean":
        out = out / torch.bincount(bag, minlength=bags).clamp(min=1).unsqueeze(1).to(out.dtype)
    return out


def _hardsigmoid(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    out = torch.clamp(x + 3, 0, 6) / 6
    return x.copy_(out) if inplace else out


def _cdist(x1: torch.Tensor, x2: torch.Tensor, p: float = 2.0, compute_mode: str | None = None) -> torch.Tensor | None:
    """(…, P, R) distances of the rows of x1 (…, P, M) and x2 (…, R, M); None for p < 1."""
    if not p >= 1:
        return None
    diff = (x1.unsqueeze(-2) - x2.unsqueeze(-3)).abs()
    if p == float("inf"):
        return diff.amax(-1)
    s = diff.pow(p).sum(-1)
    ok = s > 0   # a root's derivative is infinite at 0, where torch's cdist gives 0
    return torch.where(ok, s, 1).pow(1 / p) * ok


def _reduced(loss: torch.Tensor, reduction: str) -> torch.Tensor | None:
    """``loss`` reduced as torch's losses do; None for another ``reduction`` (torch's op says why)."""
    if reduction == "none":
        return loss
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else None


def _huber(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean", delta: float = 1.0,
           weight: torch.Tensor | None = None) -> torch.Tensor | None:
    if weight is not None and weight.size() != input.size():
        return None
    d = input - target
    loss = torch.where(d.abs() < delta, 0.5 * d * d, delta * (d.abs() - 0.5 * delta))
    return _reduced(loss if weight is None else loss * weight, reduction)


def _soft_margin(input: torch.Tensor, target: torch.Tensor, size_average=None, reduce=None,
                 reduction: str = "mean") -> torch.Tensor | None:
    if size_average is not None or reduce is not None:
        return None
    return _reduced(torch.log1p(torch.exp(-target * input)), reduction)


def _multi_margin(input: torch.Tensor, target: torch.Tensor, p: int = 1, margin: float = 1.0,
                  weight: torch.Tensor | None = None, size_average=None, reduce=None,
                  reduction: str = "mean") -> torch.Tensor | None:
    """Σ_{i ≠ y} max(0, w_y (margin − x_y + x_i))^p / C per row of x (C,) or (B, C)."""
    if size_average is not None or reduce is not None or p not in (1, 2) or input.dim() not in (1, 2):
        return None
    x, y = input.reshape(-1, input.shape[-1]), target.reshape(-1, 1)
    z = margin - x.gather(1, y) + x
    if weight is not None:
        z = z * weight[y]
    z = z.clamp(min=0).pow(p).scatter(1, y, 0.0)   # i = y left out
    loss = z.sum(1) / x.shape[1]
    return _reduced(loss.reshape(()) if input.dim() == 1 else loss, reduction)


#: {torch function: its composite form, or None where it cannot take those arguments}
_FORMS = {torch._weight_norm: lambda v, g, dim=0: v * (g / torch.norm_except_dim(v, 2, dim)),
          F.hardsigmoid: _hardsigmoid, torch.cdist: _cdist, F.embedding_bag: _embedding_bag, F.huber_loss: _huber,
          F.soft_margin_loss: _soft_margin, F.multi_margin_loss: _multi_margin}


class _Composites(TorchFunctionMode):
    """The functions of :data:`_FORMS` as their composite forms (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FORMS and (out := _FORMS[func](*args, **kwargs)) is not None:
            return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def forward_forms(model: torch.nn.Module) -> Iterator[None]:
    """While it runs, ``model``'s ops take the forms of the module docstring."""
    with _eager_experts(model), _Composites(), sdpa_kernel(SDPBackend.MATH):
        yield
