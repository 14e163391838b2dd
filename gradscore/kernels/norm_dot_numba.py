"""numba CPU kernel for ``norm_dot``: one pass over G, parallel over blocks of rows.

Rows are processed in blocks of ``ROWS`` and P in tiles of ``TILE`` elements; for a
tile, every row of the block computes its squared norm and K dot products, so the
(K, TILE) slice of V stays in cache across the block instead of being re-read per row.
Within a tile the sums are float32 with ``fastmath`` (LLVM vectorizes the loops; the
helpers are compiled as functions of their own, since inlining them at numba-IR level
into the parallel loop would drop their fastmath flag and leave them scalar); tile
sums are added in float64. Each row's arithmetic is the same whichever thread runs it,
so results do not depend on the thread count and are bit-identical run to run.

Found while tuning (see bench/kernels.py): indexing ``g[p]`` with ``p`` in
``range(lo, hi)`` keeps numba's negative-index check and blocks vectorization; slicing
first and looping over ``range(len)`` does not.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from .numba_cache import njit_cached

TILE = 4096
ROWS = 16
#: fp16/bf16 inputs are widened to float32 in row blocks of at most this many bytes
_WIDEN_BYTES = 32 * 2**20


@njit_cached(fastmath=True)
def _sq(g: np.ndarray, zero):
    """Σ g², summed in the type of ``zero`` (np.float32(0) here; the conv kernel's dtype)."""
    acc = zero
    for p in range(g.shape[0]):
        acc += g[p] * g[p]
    return acc


@njit_cached(fastmath=True)
def _dot(g: np.ndarray, v: np.ndarray, zero):
    """Σ g·v, summed in the type of ``zero``."""
    acc = zero
    for p in range(g.shape[0]):
        acc += g[p] * v[p]
    return acc


@njit_cached(fastmath=True)
def _total(v: np.ndarray, zero):
    """Σ v, summed in the type of ``zero`` (the conv kernel's bias sums)."""
    acc = zero
    for p in range(v.shape[0]):
        acc += v[p]
    return acc


@njit_cached(parallel=True)
def _norm_dot_blocks(G: np.ndarray, V: np.ndarray, sq: np.ndarray, dots: np.ndarray,
                     tile: int, rows: int) -> None:
    B, P = G.shape
    K = V.shape[0]
    for blk in numba.prange((B + rows - 1) // rows):
        r0 = blk * rows
        r1 = min(B, r0 + rows)
        for b in range(r0, r1):
            sq[b] = 0.0
            for k in range(K):
                dots[b, k] = 0.0
        for lo in range(0, P, tile):
            hi = min(lo + tile, P)
            for b in range(r0, r1):
                grow = G[b]
                g = grow[lo:hi]
                sq[b] += _sq(g, np.float32(0.0))
                for k in range(K):
                    vrow = V[k]
                    dots[b, k] += _dot(g, vrow[lo:hi], np.float32(0.0))


def _run(G: np.ndarray, V: np.ndarray, tile: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    sq = np.empty(G.shape[0], dtype=np.float64)
    dots = np.empty((G.shape[0], V.shape[0]), dtype=np.float64)
    _norm_dot_blocks(G, V, sq, dots, tile, rows)
    return sq, dots


def norm_dot_numba(G: torch.Tensor, V: torch.Tensor | None, *, tile: int = TILE, rows: int = ROWS
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """G: (B, P) float32/fp16/bf16 CPU tensor, V: (K, P) or None -> float32 (B,), (B, K).

    float32 G is read in place (a zero-copy numpy view, strided views included);
    fp16/bf16 G is widened to float32 a block of rows at a time.
    """
    B, P = G.shape
    Vn = (np.zeros((0, P), dtype=np.float32) if V is None
          else V.detach().to(torch.float32).contiguous().numpy())
    G = G.detach()
    if G.dtype == torch.float32:
        sq, dots = _run(G.numpy(), Vn, tile, rows)
    else:
        step = max(rows, _WIDEN_BYTES // max(1, 4 * P))
        parts = [_run(G[i:i + step].to(torch.float32).numpy(), Vn, tile, rows)
                 for i in range(0, B, step)]
        sq = np.concatenate([p[0] for p in parts])
        dots = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(sq.astype(np.float32)), torch.from_numpy(dots.astype(np.float32))
