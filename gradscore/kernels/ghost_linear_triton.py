"""Triton kernels for the Linear-layer ghost reductions (see ghost_linear.py).

- ``gram_sq_triton``: grid (B, T tiles); a program builds the (BT, BT) blocks of a·aᵀ
  and δ·δᵀ for its row tile against every column tile with ``tl.dot`` over d_in / d_out
  and accumulates Σ (a·aᵀ)⊙(δ·δᵀ).
- ``outer_triton``: grid (B, d_out tiles × d_in tiles); a program forms its (BO, BI)
  tile of g_b = Σ_t δ_btᵀ a_bt and reduces it against itself and the K tiles of V.
Both write one partial per program and torch sums the partials in a fixed order, so
results are run-to-run identical. All products in IEEE float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gram_tile(X, b, rows, cols, T, DK, s_b, s_t, s_k, BT: tl.constexpr, BK: tl.constexpr):
    """(BT, BT) block rows x cols of X_b X_bᵀ for X (B, T, DK), summed over DK in tiles."""
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    for k0 in range(0, DK, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(X + b * s_b + rows[:, None] * s_t + ks[None, :] * s_k,
                    mask=(rows[:, None] < T) & (ks[None, :] < DK), other=0.0).to(tl.float32)
        y = tl.load(X + b * s_b + cols[None, :] * s_t + ks[:, None] * s_k,
                    mask=(cols[None, :] < T) & (ks[:, None] < DK), other=0.0).to(tl.float32)
        acc += tl.dot(x, y, input_precision="ieee")
    return acc


@triton.jit
def _gram_sq_kernel(A, D, OUT, T, DI, DO, s_ab, s_at, s_ai, s_db, s_dt, s_do, n_t,
                    BT: tl.constexpr, BK: tl.constexpr):
    b = tl.program_id(0)
    ti = tl.program_id(1)
    rows = ti * BT + tl.arange(0, BT)
    total = tl.zeros((BT, BT), dtype=tl.float32)
    for s0 in range(0, T, BT):
        cols = s0 + tl.arange(0, BT)
        total += (_gram_tile(A, b, rows, cols, T, DI, s_ab, s_at, s_ai, BT, BK)
                  * _gram_tile(D, b, rows, cols, T, DO, s_db, s_dt, s_do, BT, BK))
    tl.store(OUT + b * n_t + ti, tl.sum(tl.sum(total, axis=1), axis=0))


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


def gram_sq_triton(a: torch.Tensor, d: torch.Tensor, *, BT: int = 16, BK: int = 32) -> torch.Tensor:
    """‖g_b‖² (B,) float32 by the Gram form; a (B, T, d_in), δ (B, T, d_out)."""
    B, T, DI = a.shape
    DO = d.shape[2]
    n_t = triton.cdiv(T, BT)
    out = torch.empty((B, n_t), dtype=torch.float32, device=a.device)
    _gram_sq_kernel[(B, n_t)](a, d, out, T, DI, DO, *a.stride(), *d.stride(), n_t, BT=BT, BK=BK)
    return out.sum(1)


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
