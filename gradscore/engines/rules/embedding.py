"""Ghost rule for ``nn.Embedding``: the per-example gradient is sparse in the rows.

g_b = Σ_t e_{id_bt} δ_btᵀ, so ‖g_b‖² = Σ_{t,s: id_bt = id_bs} δ_bt·δ_bs (equal token ids
add up) and ⟨g_b, V_k⟩ = Σ_t δ_bt·V_k[id_bt]. Tokens equal to ``padding_idx`` get no
gradient. ``max_norm`` (renormalizes the weight in the forward) and
``scale_grad_by_freq`` fall back to vmap. Hugging Face's scaled embedding (Gemma's rows
times √d, in a forward of its own) takes the rule with δ scaled back, matched by
structure and checked on the first batch (``register_structural``).

An Embedding subclass whose own forward computes the ids it looks up (OPT's and BioGPT's
learned position embeddings: positions from the attention mask, plus an offset, then
``super().forward``) takes the rule on those ids: the rule runs the layer's forward
again on each call, without gradient, and reads the ids of its one ``F.embedding`` of
the weight (ids of one row for the whole batch, BioGPT's, expanded to the batch's). On
the first batch the forward must look its weight up once, with the layer's own options,
and return those rows, in value and gradient.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ...exceptions import EngineError
from ...kernels import acc_dtype
from ...kernels.ghost_linear import cancellation_checked
from .registry import Factor, computes, register_rule, register_structural


def _supports(m: nn.Embedding | nn.EmbeddingBag) -> str | None:
    if m.max_norm is not None:
        return f"{type(m).__name__} with max_norm"
    if m.scale_grad_by_freq:
        return f"{type(m).__name__} with scale_grad_by_freq"
    return None


def _ids_and_grads(layer: nn.Embedding, acts, grads) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and their output gradients (B, T, dim), calls along T, padding zeroed."""
    ids = torch.cat([i.reshape(i.shape[0], -1) for i in acts], 1)
    acc = acc_dtype(grads[0].dtype)
    d = torch.cat([g.reshape(g.shape[0], -1, g.shape[-1]) for g in grads], 1).to(acc)
    if layer.padding_idx is not None:
        d = d * (ids != layer.padding_idx).unsqueeze(-1).to(acc)
    return ids, d


def embedding_factors(layer: nn.Embedding, acts, grads) -> dict[str, Factor]:
    """weight (num_embeddings, dim): g_b = Σ_t e_{id_bt} δ_btᵀ (one-hot rows)."""
    ids, d = _ids_and_grads(layer, acts, grads)
    return {"weight": Factor(ids, d, left_ids=True)}


def sq_norms_by_pairs(ids: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(B,) ‖g_b‖² = Σ_{t,s: id_bt = id_bs} δ_bt·δ_bs for ids (B, T) and δ (B, T, dim):
    O(B·T²·dim), a batched product (deterministic on CUDA, where index_add is not); rows
    whose terms cancel are made again (``kernels.ghost_linear.cancellation_checked``)."""
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(d.dtype)                      # (B, T, T)
    D = torch.bmm(d, d.transpose(1, 2))

    def again(rows: torch.Tensor) -> torch.Tensor:
        return (sq_norms_by_rows if d.dtype == torch.float64 else sq_norms_by_pairs)(ids[rows], d[rows].double())
    return cancellation_checked((D * same).sum((1, 2)), D.diagonal(0, 1, 2).sum(1), again)


def sq_norms_by_rows(ids: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(B,) ‖g_b‖² = Σ_u ‖Σ_{t: id_bt = u} δ_bt‖², the δ's summed by (example, id): the
    gradient's nonzero rows, O(B·T·dim)."""
    B, T, dim = d.shape
    if not d.numel():
        return d.new_zeros(B)
    ids = ids.to(torch.int64)
    rows = int(ids.max()) + 1
    key = (torch.arange(B, device=ids.device)[:, None] * rows + ids).reshape(-1)
    rows_of, at = torch.unique(key, return_inverse=True)                          # each (example, id) once
    sums = d.new_zeros((len(rows_of), dim)).index_add_(0, at, d.reshape(B * T, dim))
    return d.new_zeros(B).index_add_(0, rows_of // rows, sums.pow(2).sum(1))


@register_rule(nn.Embedding, supports=_supports, factors=embedding_factors, batch_dims=(0, 1))
def embedding(layer: nn.Embedding, acts, grads, refs, K):
    ids, d = _ids_and_grads(layer, acts, grads)
    acc = d.dtype
    sq = (sq_norms_by_rows if d.device.type == "cpu" else sq_norms_by_pairs)(ids, d)
    if not K:
        return sq, sq.new_zeros((sq.shape[0], 0))
    rows = refs["weight"].to(acc)[:, ids]                                           # (K, B, T, dim)
    return sq, torch.einsum("kbtd,btd->bk", rows, d)


def _bags(layer: nn.EmbeddingBag, call, B: int, acc: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One call's bags as ids (B, L), their weights in the bag's sum (B, L) (0 where there
    is no entry: padding, past a bag's end; 1/size for ``mean``) and a mask of entries."""
    args, kwargs = call
    bound = dict(zip(("input", "offsets", "per_sample_weights"), args)) | kwargs
    ids, offsets, weights = bound["input"], bound.get("offsets"), bound.get("per_sample_weights")
    if ids.dim() == 2:
        valid = torch.ones_like(ids, dtype=torch.bool)
    else:   # flat ids, a bag from each offset to the next (the last to the end, or a closing offset)
        n = ids.shape[0]
        ends = offsets[1:] if layer.include_last_offset else torch.cat([offsets[1:], offsets.new_tensor([n])])
        starts = offsets[:B]
        L = max(1, int((ends - starts).max()) if B else 1)
        steps = torch.arange(L, device=ids.device)
        valid = steps < (ends - starts).unsqueeze(1)
        at = (starts.unsqueeze(1) + steps).clamp(max=max(n - 1, 0))
        ids = ids[at] if n else ids.new_zeros((B, L))
        weights = None if weights is None else weights[at]
    if layer.padding_idx is not None:
        valid = valid & (ids != layer.padding_idx)
    coef = valid.to(acc) if weights is None else weights.to(acc) * valid
    if layer.mode == "mean":
        coef = coef / valid.sum(1, keepdim=True).clamp(min=1)
    return ids, coef, valid


def _embed_scale(layer: nn.Module) -> float | None:
    """The factor a Hugging Face scaled embedding multiplies its rows by (Gemma's √d), in
    the weight's dtype, as its forward applies it."""
    scale = getattr(layer, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return float(scale.to(layer.weight.dtype))
    return float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None


def _like_scaled_embedding(layer: nn.Module) -> bool:
    """An Embedding subclass named like Hugging Face's scaled one (Gemma's), with one
    ``weight`` and an ``embed_scale``; what it computes is checked by
    :func:`_computes_scaled_embedding`."""
    return (isinstance(layer, nn.Embedding) and type(layer).__name__.endswith("ScaledWordEmbedding")
            and list(dict(layer.named_parameters(recurse=False))) == ["weight"] and _embed_scale(layer) is not None)


def _computes_scaled_embedding(layer: nn.Embedding, ids: torch.Tensor, y: torch.Tensor) -> str | None:
    """None if the layer gives embed_scale · (the rows of its weight at ``ids``), in value and
    gradient; else why not."""
    return computes(layer, ids, lambda ids, w: F.embedding(ids, w["weight"], layer.padding_idx) * _embed_scale(layer),
                    "embed_scale · its weight's rows (a scaled embedding, as its name suggests)")


def _scaled(layer: nn.Module, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients at the embedding's rows, before its scale: embed_scale · δ."""
    scale = _embed_scale(layer)
    return [g * scale for g in grads]


@register_structural(_like_scaled_embedding, verify=_computes_scaled_embedding, supports=_supports,
                     factors=lambda layer, acts, grads: embedding_factors(layer, acts, _scaled(layer, grads)),
                     batch_dims=(0, 1), params=("weight",))
def scaled_embedding(layer: nn.Embedding, acts, grads, refs, K):
    return embedding(layer, acts, _scaled(layer, grads), refs, K)


class _Lookups(TorchFunctionMode):
    """Records each op that makes a tensor of ``weight``: (the op, its bound arguments for
    F.embedding); a read of a property (``weight.device``) makes none."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.seen = weight, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and any(a is self.weight for a in (*args, *kwargs.values())):
            bound = inspect.signature(F.embedding).bind(*args, **kwargs).arguments if func is F.embedding else None
            self.seen.append((func, bound))
        return out


def _lookup_of(layer: nn.Embedding, call) -> tuple[torch.Tensor | None, str | None]:
    """(the ids the layer's forward looks its weight up at, on ``call``, or None; why not):
    its forward run again without gradient, the ops on its weight recorded."""
    (args, kwargs), mode = call, _Lookups(layer.weight)
    with torch.no_grad(), mode:
        type(layer).forward(layer, *args, **kwargs)
    if len(mode.seen) != 1 or mode.seen[0][1] is None:
        ops = ", ".join(getattr(f, "__name__", str(f)) for f, _ in mode.seen) or "none"
        return None, f"does not read its weight through one F.embedding (its forward's ops on it: {ops})"
    bound = mode.seen[0][1]
    options = (bound.get("padding_idx"), bound.get("max_norm"), bound.get("scale_grad_by_freq", False))
    if options != (layer.padding_idx, layer.max_norm, layer.scale_grad_by_freq):
        return None, "looks its weight up with other options than its own (padding_idx, max_norm, scale_grad_by_freq)"
    return bound["input"], None


def _like_own_embedding(layer: nn.Module) -> bool:
    """An Embedding subclass with a forward of its own, one ``weight``, no submodules (its
    forward is run again alone), and not the scaled one (:func:`_like_scaled_embedding`)."""
    return (isinstance(layer, nn.Embedding) and type(layer).forward is not nn.Embedding.forward
            and not _like_scaled_embedding(layer) and not any(True for _ in layer.children())
            and list(dict(layer.named_parameters(recurse=False))) == ["weight"])


def _looks_up_its_rows(layer: nn.Embedding, call, output: torch.Tensor) -> str | None:
    """None if the layer's forward on ``call`` returns its weight's rows at the ids it looks
    up, in value and gradient; else why not."""
    try:
        ids, why = _lookup_of(layer, call)
    except Exception as e:  # noqa: BLE001 - the layer's own forward, run again
        return f"could not be run again on its call ({type(e).__name__}: {e})"
    if why is not None:
        return why
    return computes(layer, call, lambda _, w: F.embedding(ids, w["weight"], layer.padding_idx),
                    "its weight's rows at the ids its forward computes")


def _ids_of(layer: nn.Embedding, calls, grads) -> list[torch.Tensor]:
    """Each call's looked-up ids, with as many rows as its output gradient (one row for the
    whole batch, BioGPT's (1, T) positions, expanded); an EngineError where a later batch's
    forward no longer looks its weight up as the first batch's did."""
    out = []
    for call, g in zip(calls, grads):
        ids, why = _lookup_of(layer, call)
        if ids is None:
            raise EngineError(f"{type(layer).__name__} {why} on this batch, unlike on the first, where its rule was "
                              f"checked; score with engine='vmap'")
        out.append(ids.expand(len(g), *ids.shape[1:]) if len(ids) == 1 else ids)
    return out


@register_structural(_like_own_embedding, verify=_looks_up_its_rows, supports=_supports, call=True, expands=True,
                     factors=lambda layer, calls, grads: embedding_factors(layer, _ids_of(layer, calls, grads), grads),
                     params=("weight",))
def own_embedding(layer: nn.Embedding, calls, grads, refs, K):
    return embedding(layer, _ids_of(layer, calls, grads), grads, refs, K)


@register_rule(nn.EmbeddingBag, supports=_supports, call=True)
def embedding_bag(layer: nn.EmbeddingBag, calls, grads, refs, K):
    """Per call c, bag b: sum/mean: g_bc = Σ_j c_j e_{id_j} δ_bcᵀ; max: feature d's gradient
    δ_bcd goes to the row that won its max. Calls add up, so
    ‖g_b‖² = Σ_{c,c'} ⟨g_bc, g_bc'⟩, with ⟨g_bc, g_bc'⟩ = ⟨δ_bc, δ_bc'⟩ Σ_{j,k: id_j = id_k} c_j c'_k
    (sum/mean) or Σ_d δ_bcd δ_bc'd [row_bcd = row_bc'd] (max); ⟨g_b, V⟩ is linear in the calls."""
    acc = acc_dtype(grads[0].dtype)
    B, dim = grads[0].shape
    feat = torch.arange(dim, device=grads[0].device)
    V = refs["weight"].to(acc) if K else None
    dots = grads[0].new_zeros((B, K), dtype=acc)
    parts = []
    for call, d in zip(calls, grads):
        d = d.to(acc)
        ids, coef, valid = _bags(layer, call, B, acc)
        if layer.mode == "max":   # the row each feature's max came from, and whether the bag had one
            vals = layer.weight.detach().to(acc)[ids].masked_fill(~valid.unsqueeze(-1), float("-inf"))
            d = d * valid.any(1, keepdim=True)
            rows = ids.gather(1, vals.argmax(1))                                          # (B, dim)
            parts.append((rows, d))
            if K:
                dots = dots + torch.einsum("kbd,bd->bk", V[:, rows, feat], d)
        else:
            parts.append((ids, coef, d))
            if K:
                dots = dots + torch.einsum("kbjd,bj,bd->bk", V[:, ids], coef, d)
    sq = grads[0].new_zeros(B, dtype=acc)
    for i, p in enumerate(parts):
        for j, q in enumerate(parts[i:], i):
            if layer.mode == "max":
                term = (p[1] * q[1] * (p[0] == q[0])).sum(1)
            else:
                same = (p[0].unsqueeze(2) == q[0].unsqueeze(1)).to(acc)
                term = (p[2] * q[2]).sum(1) * torch.einsum("bj,bjk,bk->b", p[1], same, q[1])
            sq = sq + (term if i == j else 2 * term)
    return sq, dots
