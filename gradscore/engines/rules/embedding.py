"""Ghost rule for ``nn.Embedding``: the per-example gradient is sparse in the rows.

g_b = Σ_t e_{id_bt} δ_btᵀ, so ‖g_b‖² = Σ_{t,s: id_bt = id_bs} δ_bt·δ_bs (equal token ids
add up) and ⟨g_b, V_k⟩ = Σ_t δ_bt·V_k[id_bt]. Tokens equal to ``padding_idx`` get no
gradient. ``max_norm`` (renormalizes the weight in the forward) and
``scale_grad_by_freq`` fall back to vmap.
"""
from __future__ import annotations

import torch
from torch import nn

from ...kernels.norm_dot import acc_dtype
from .registry import Factor, register_rule


def _supports(m: nn.Embedding) -> str | None:
    if m.max_norm is not None:
        return "Embedding with max_norm"
    if m.scale_grad_by_freq:
        return "Embedding with scale_grad_by_freq"
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


@register_rule(nn.Embedding, supports=_supports, factors=embedding_factors, batch_dims=(0, 1))
def embedding(layer: nn.Embedding, acts, grads, refs, K):
    ids, d = _ids_and_grads(layer, acts, grads)
    acc = d.dtype
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(acc)                          # (B, T, T)
    sq = (torch.bmm(d, d.transpose(1, 2)) * same).sum((1, 2))
    if not K:
        return sq, sq.new_zeros((sq.shape[0], 0))
    rows = refs["weight"].to(acc)[:, ids]                                           # (K, B, T, dim)
    return sq, torch.einsum("kbtd,btd->bk", rows, d)
