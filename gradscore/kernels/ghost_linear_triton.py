"""Triton kernel for the Linear-layer ghost reductions' outer form (see ghost_linear.py).

``outer_triton``: grid (B, d_out tiles × d_in tiles); a program forms its (BO, BI) tile
of g_b = Σ_t δ_btᵀ a_bt and reduces it against itself and the K tiles of V, so g_b is
never written out. Each program writes one partial and torch sums the partials in a
fixed order, so results are run-to-run identical. All products in IEEE float32.

The Gram form has no kernel here: its two (T, T) Grams are batched matrix products,
which cuBLAS does 4 to 8 times faster than a Triton kernel did on the H200
(``bench.gpu_check``; figures in CHANGELOG.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _outer_kernel(A, D, V, SQ, DOTS, T, DI, DO, K, n_i, n_tiles,
                  s_ab, s_at, s_ai, s_db, s_dt, s_do, s_vk, s_vo, s_vi,
                  BO: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr, HAS_V: tl.constexpr):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    os_ = (tile // n_i) * BO + tl.arange(0, BO)
    is_ = (tile % n_i) * BI + tl.arange(0, BI)
    g = tl.zeros((BO, BI), dtype=tl.float32)
    for t0 in range(0, T, BT):
        ts = t0 + tl.arange(0, BT)
        dT = tl.load(D + b * s_db + ts[None, :] * s_dt + os_[:, None] * s_do,
                     mask=(ts[None, :] < T) & (os_[:, None] < DO), other=0.0).to(tl.float32)
        a = tl.load(A + b * s_ab + ts[:, None] * s_at + is_[None, :] * s_ai,
                    mask=(ts[:, None] < T) & (is_[None, :] < DI), other=0.0).to(tl.float32)
        g += tl.dot(dT, a, input_precision="ieee")
    tl.store(SQ + b * n_tiles + tile, tl.sum(tl.sum(g * g, axis=1), axis=0))
    if HAS_V:
        vmask = (os_[:, None] < DO) & (is_[None, :] < DI)
        for k in range(0, K):
            v = tl.load(V + k * s_vk + os_[:, None] * s_vo + is_[None, :] * s_vi,
                        mask=vmask, other=0.0).to(tl.float32)
            tl.store(DOTS + (b * n_tiles + tile) * K + k, tl.sum(tl.sum(g * v, axis=1), axis=0))


def outer_triton(a: torch.Tensor, d: torch.Tensor, V: torch.Tensor | None, *, BO: int = 32,
                 BI: int = 32, BT: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """‖g_b‖² (B,) and ⟨g_b, V_k⟩ (B, K) float32 by tiles of the outer product."""
    B, T, DI = a.shape
    DO = d.shape[2]
    K = 0 if V is None else V.shape[0]
    n_i = triton.cdiv(DI, BI)
    n_tiles = triton.cdiv(DO, BO) * n_i
    sq = torch.empty((B, n_tiles), dtype=torch.float32, device=a.device)
    dots = torch.empty((B, n_tiles, max(K, 1)), dtype=torch.float32, device=a.device)
    Vt = a if V is None else V  # placeholder pointer when there is no V
    vs = (0, 0, 0) if V is None else V.stride()
    _outer_kernel[(B, n_tiles)](a, d, Vt, sq, dots, T, DI, DO, K, n_i, n_tiles,
                                *a.stride(), *d.stride(), *vs, BO=BO, BI=BI, BT=BT, HAS_V=K > 0)
    return sq.sum(1), dots.sum(1)[:, :K]
