"""Fused per-example squared norm and dot products: ``‖g_b‖²`` and ``⟨g_b, v_k⟩``.

``G`` is the per-example gradient block (B, P) or the list of per-parameter blocks
``[(B, *shape_i)]`` that ``torch.func.vmap(grad)`` returns; ``V`` is (K, P) or the
matching list ``[(K, *shape_i)]`` (None or K = 0 for no references). Blocks are reduced
one by one and accumulated; nothing is concatenated.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .dispatch import backend_for, forced_name
from .reference import norm_dot_reference

Blocks = torch.Tensor | Sequence[torch.Tensor]

#: on CPU, under the default backend, a block of at most this many elements takes the
#: torch reference: the numba kernel's fixed cost per call outweighs one pass over it
#: (``python -m bench.kernels`` shows where the two meet)
SMALL_BLOCK = 16384
#: on CUDA, a block of at most this many elements takes the torch reference: there a call
#: costs its launch, and the Triton kernel's (its Python launcher, partial sums, their sum)
#: costs more than the reference's; ``bench.gpu_check``'s bandwidth rows time small shapes
#: beside large ones (figures in CHANGELOG.md)
CUDA_SMALL_BLOCK = 2**22


def takes_reference(G: torch.Tensor, V: torch.Tensor | None, forced: str | None) -> bool:
    """Whether the default backend hands the block G (B, P) with V (K, P) to the torch
    reference: an empty batch (the kernels' launch grids assume rows); on CPU a block of at
    most :data:`SMALL_BLOCK` elements; on CUDA a block of at most :data:`CUDA_SMALL_BLOCK`
    (float64 takes the reference in every backend)."""
    if G.shape[0] == 0:
        return True
    if forced is not None:
        return False
    if G.device.type == "cpu":
        return G.numel() <= SMALL_BLOCK
    return G.device.type == "cuda" and G.numel() <= CUDA_SMALL_BLOCK


def norm_dot(G: Blocks, V: Blocks | None = None, *, backend: str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``sq_norm (B,)`` and ``dots (B, K)`` of G against V, fused.

    G: (B, P) or list of (B, *shape_i); V: (K, P), list of (K, *shape_i) or None.
    Accumulation is float32 for fp16/bf16/fp32 G and float64 for float64 G.
    ``backend`` forces "torch", "numba" or "triton" (default: by device, see dispatch).
    """
    blocks = [G] if isinstance(G, torch.Tensor) else list(G)
    if not blocks:
        raise ValueError("norm_dot: G has no blocks")
    if V is None:
        vblocks: list[torch.Tensor | None] = [None] * len(blocks)
    else:
        vblocks = [V] if isinstance(V, torch.Tensor) else list(V)
        if len(vblocks) != len(blocks):
            raise ValueError(f"norm_dot: G has {len(blocks)} blocks but V has {len(vblocks)}")
    B = blocks[0].shape[0]
    forced, kind = forced_name(backend), blocks[0].device.type
    impl = backend_for(kind, forced)
    sq_total = dots_total = None
    for g, v in zip(blocks, vblocks):
        g2 = g.reshape(B, math.prod(g.shape[1:]))   # not (B, -1): B may be 0
        if v is not None and math.prod(v.shape[1:]) != g2.shape[1]:
            raise ValueError(f"norm_dot: block of G has {g2.shape[1]} columns but V has "
                             f"{math.prod(v.shape[1:])}")
        v2 = None if v is None else v.reshape(v.shape[0], g2.shape[1])
        sq, dots = (norm_dot_reference(g2, v2) if takes_reference(g2, v2, forced) else impl.norm_dot(g2, v2))
        sq_total = sq if sq_total is None else sq_total + sq
        dots_total = dots if dots_total is None else dots_total + dots
    return sq_total, dots_total
