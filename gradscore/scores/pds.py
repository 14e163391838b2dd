"""Optimal-control (PDS) scores and their dot-product relatives (see gradscore/costate.py).

From the per-checkpoint dots of every example's gradient g_nt = ∇ℓ_n(θ_t):
- ``pds``: Σ_{t=0..T−1} η_t ⟨λ_{t+1}, g_nt⟩ = −∂J_total/∂γ_n (larger = more helpful);
- ``target_dot``: Σ_{t=0..T−1} η_t ⟨∇J(θ_t), g_nt⟩ (TracIn-like first-order influence of
  example n on the target loss; larger = more helpful);
- ``target_cos``: mean over t = 0..T of cos(g_nt, ∇J(θ_t)), the direction alone.
Units: pds and target_dot are in target-loss units (a change of J_total per unit of γ_n);
target_cos is in [−1, 1]. A mislabeled example has a large ‖g‖ and therefore a large
|pds| and |target_dot| even when its cosine is small: compare with target_cos.
"""
from __future__ import annotations

import numpy as np


def aggregate(per_checkpoint: dict[str, np.ndarray], eta: np.ndarray, grad_target_norm: np.ndarray
              ) -> dict[str, np.ndarray]:
    """(N,) float64 pds, target_dot, target_cos from (T+1, N) per-checkpoint arrays.

    eta: (T,) step sizes η_0 … η_{T−1}; grad_target_norm: (T+1,) ‖∇J(θ_t)‖.
    """
    out: dict[str, np.ndarray] = {}
    T = len(eta)
    if "dot_costate" in per_checkpoint:
        out["pds"] = (eta[:, None] * per_checkpoint["dot_costate"][:T].astype(np.float64)).sum(0)
    if "dot_target" in per_checkpoint:
        dot = per_checkpoint["dot_target"].astype(np.float64)
        out["target_dot"] = (eta[:, None] * dot[:T]).sum(0)
        if "sq_grad_norm" in per_checkpoint:
            denom = np.sqrt(per_checkpoint["sq_grad_norm"].astype(np.float64)) * grad_target_norm[:, None]
            cos = np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)
            out["target_cos"] = cos.mean(0)
    return out
