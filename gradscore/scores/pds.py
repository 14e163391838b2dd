"""Optimal-control (PDS) scores and their dot-product relatives (see gradscore/scores/costate.py).

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

from typing import Any, Iterator

import numpy as np

from .quantile import streamed_quantile


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


#: the per-checkpoint dots and the reference norms (in /checkpoints) behind each dot score
DOT_SCORES = {"pds": ("dot_costate", "ref_norm_costate"), "target_dot": ("dot_target", "ref_norm_target")}

#: variants of a dot-product score that remove or bound the gradient norm's influence
VARIANTS = ("cos", "clip", "rank", "resid")


def decompose(dot: np.ndarray, sq_norm: np.ndarray, ref_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dot_nt = ‖g_nt‖·‖v_t‖·cos_nt: returns (‖g‖ (T, N), cos (T, N)), cos = 0 where a norm is 0."""
    g = np.sqrt(np.maximum(sq_norm.astype(np.float64), 0.0))
    denom = g * ref_norm[:, None]
    cos = np.divide(dot.astype(np.float64), denom, out=np.zeros_like(denom), where=denom > 0)
    return g, cos


def dot_terms(dot: Any, sq_norm: Any, ref_norm: np.ndarray, weight: np.ndarray, *,
              clip_quantile: float = 0.9) -> dict[str, np.ndarray]:
    """A dot score s_n = Σ_t w_t·dot_nt read as norm × direction, per example (N,) float64:

    - ``raw``: s_n; the variants that remove or bound the norm's influence:
    - ``cos``: Σ_t w_t cos_nt, the direction only;
    - ``clip``: Σ_t w_t min(‖g_nt‖, c)·‖v_t‖·cos_nt with c the ``clip_quantile`` of all ‖g_nt‖;
    - ``rank``: Σ_t w_t r_nt / Σ_t w_t with r_nt the rank of dot_nt among examples at t, in [0, 1];
    - ``resid``: s_n minus its least-squares fit on log mean_t ‖g_nt‖ (the part the norm explains);
    - ``mean_grad_norm`` (mean_t ‖g_nt‖), ``mean_cos`` (Σ_t w_t cos_nt / Σ_t w_t), and the
      decomposition's check: ``abs_error`` max_t |‖g_nt‖·‖v_t‖·cos_nt − dot_nt|, ``abs_dot`` max_t |dot_nt|.

    dot, sq_norm: (T, N) arrays or HDF5 datasets, read a checkpoint row (N,) at a time (the
    norms a few times more for the quantile, :func:`streamed_quantile`): memory is O(N), not
    O(T·N). ref_norm: (T,) ‖v_t‖; weight: (T,) w_t (η_t, 0 where a term is absent).
    """
    T, n = dot.shape
    sums = {k: np.zeros(n) for k in ("raw", "cos", "clip", "rank", "grad_norm")}
    worst = {k: np.zeros(n) for k in ("abs_error", "abs_dot")}

    def norms() -> Iterator[np.ndarray]:
        return (np.sqrt(np.maximum(np.asarray(sq_norm[t], np.float64), 0.0)) for t in range(T))
    c = streamed_quantile(norms, clip_quantile, empty=0.0)
    for t in range(T):   # each sum row by row, as numpy sums a (T, N) array over axis 0
        d = dot[t]
        g, cos = (x[0] for x in decompose(d[None], sq_norm[t][None], ref_norm[t:t + 1]))
        d64, w = d.astype(np.float64), weight[t]
        ranks = d64.argsort(kind="stable").argsort(kind="stable") / max(1, n - 1)
        for k, v in (("raw", w * d64), ("cos", w * cos), ("clip", w * np.minimum(g, c) * ref_norm[t] * cos),
                     ("rank", w * ranks), ("grad_norm", g)):
            sums[k] += v
        np.maximum(worst["abs_error"], np.abs(g * ref_norm[t] * cos - d), out=worst["abs_error"])
        np.maximum(worst["abs_dot"], np.abs(d), out=worst["abs_dot"])
    raw, total = sums["raw"], weight.sum()
    mean_g = sums["grad_norm"] / T if T else np.full(n, np.nan)
    A = np.stack([np.log(np.maximum(mean_g, 1e-300)), np.ones(n)], 1)
    coef, *_ = np.linalg.lstsq(A, raw, rcond=None)
    return {"raw": raw, "cos": sums["cos"], "clip": sums["clip"], "rank": sums["rank"] / max(total, 1e-300),
            "resid": raw - A @ coef, "mean_grad_norm": mean_g, "mean_cos": sums["cos"] / total, **worst}


def variants(dot: Any, sq_norm: Any, ref_norm: np.ndarray, weight: np.ndarray, *,
             clip_quantile: float = 0.9) -> dict[str, np.ndarray]:
    """(N,) ``cos``, ``clip``, ``rank`` and ``resid`` of :func:`dot_terms`: the variants of the
    score s_n = Σ_t w_t·dot_nt."""
    terms = dot_terms(dot, sq_norm, ref_norm, weight, clip_quantile=clip_quantile)
    return {k: terms[k] for k in VARIANTS}
