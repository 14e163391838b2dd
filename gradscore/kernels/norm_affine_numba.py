"""numba CPU kernel: per-example gradients of a row normalization's affine parameters.

For x, δ (B, T, D), with x̂_bt the row x_bt normalized (LayerNorm: (x − mean)/√(var + eps);
RMSNorm, ``centred=False``: x/√(mean(x²) + eps)), it gives g_b(γ) = Σ_t δ_bt ⊙ x̂_bt and
g_b(β) = Σ_t δ_bt (B, D) in one pass over x and δ, parallel over examples: x̂ is never
stored. Row statistics and the sums over t are float64; results float32.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from .numba_cache import njit_cached


@njit_cached(fastmath=True)
def _row_stats(x: np.ndarray, centred: bool):
    """(mean, mean of the squared deviations) of one row; mean 0 when not ``centred``."""
    mean = 0.0
    if centred:
        total = 0.0
        for j in range(x.shape[0]):
            total += x[j]
        mean = total / x.shape[0]
    sq = 0.0
    for j in range(x.shape[0]):
        c = x[j] - mean
        sq += c * c
    return mean, sq / x.shape[0]


@njit_cached(fastmath=True)
def _add_row(x: np.ndarray, d: np.ndarray, mean: float, r: float, gw: np.ndarray, gb: np.ndarray) -> None:
    for j in range(x.shape[0]):
        gw[j] += d[j] * ((x[j] - mean) * r)
        gb[j] += d[j]


@njit_cached(parallel=True)
def _norm_affine(x, d, eps, centred, gw, gb):  # pragma: no cover - numba
    B, T, _ = x.shape
    for b in numba.prange(B):
        gwb, gbb = gw[b], gb[b]
        gwb[:] = 0.0
        gbb[:] = 0.0
        for t in range(T):
            mean, var = _row_stats(x[b, t], centred)
            _add_row(x[b, t], d[b, t], mean, 1.0 / np.sqrt(var + eps), gwb, gbb)


def norm_affine_numba(x: torch.Tensor, d: torch.Tensor, eps: float, centred: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, δ: (B, T, D) float32 CPU tensors -> g(γ), g(β): (B, D) float32."""
    B, _, D = x.shape
    gw, gb = np.empty((B, D), dtype=np.float64), np.empty((B, D), dtype=np.float64)
    _norm_affine(x.detach().contiguous().numpy(), d.detach().contiguous().numpy(), float(eps), bool(centred), gw, gb)
    return torch.from_numpy(gw.astype(np.float32)), torch.from_numpy(gb.astype(np.float32))
