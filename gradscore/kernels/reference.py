"""The torch reference every kernel is tested against, and the accumulation dtype rule.

A leaf module: the dispatcher, the kernels and the engines import it; it imports none
of them.
"""
from __future__ import annotations

import contextlib

import torch


def _autocast_on(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device)
    except TypeError:   # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()


def autocast_dtypes() -> list[torch.dtype]:
    """The half types of the autocast regions active here (CPU, CUDA); empty outside one."""
    out = []
    for device in ("cpu", "cuda"):
        if _autocast_on(device):
            try:
                out.append(torch.get_autocast_dtype(device))
            except AttributeError:   # torch < 2.4
                out.append(torch.get_autocast_cpu_dtype() if device == "cpu" else torch.get_autocast_gpu_dtype())
    return out


def autocast_off() -> contextlib.ExitStack:
    """A context with autocast switched off where it is on (CPU, CUDA): what runs inside
    computes in the dtypes it chooses, not in the region's half type."""
    stack = contextlib.ExitStack()
    for device in ("cpu", "cuda"):
        if _autocast_on(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise (fp16, bf16 too)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_dot_reference(G: torch.Tensor, V: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference. G: (B, P), V: (K, P) or None -> sq_norm (B,), dots (B, K).

    Accumulates in :func:`acc_dtype` of G's dtype.
    """
    Ga = G.to(acc_dtype(G.dtype))
    sq = torch.linalg.vecdot(Ga, Ga)
    if V is None or V.shape[0] == 0:
        return sq, Ga.new_zeros((G.shape[0], 0))
    return sq, Ga @ V.to(Ga.dtype).T


def softmax_ce_rows_reference(z: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Torch reference of ``softmax_ce_numba.softmax_ce_rows_numba``, in float64: z, δ (R, V),
    labels (R,) (−1: no loss) -> (R, 4): loss, ‖d‖², ⟨δ, d⟩, ‖δ‖² with d = softmax(z) − onehot(y)."""
    z, delta = z.double(), delta.double()
    has = labels >= 0
    at = labels.clamp(min=0).to(torch.int64)[:, None]
    d = torch.softmax(z, 1).scatter_add(1, at, -torch.ones_like(z[:, :1])) * has[:, None]
    loss = (torch.logsumexp(z, 1) - z.gather(1, at)[:, 0]) * has
    return torch.stack([loss, (d * d).sum(1), (delta * d).sum(1), (delta * delta).sum(1)], 1)


def classifier_rows_reference(z: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Torch reference of ``softmax_ce_numba.classifier_rows_numba``, in float64: z, δ (B, C),
    labels (B,) in [0, C) -> (B, 7): loss, ‖d‖², ⟨δ, d⟩, ‖δ‖², margin, p_y, correct."""
    at = labels.to(torch.int64)[:, None]
    z64, delta = z.double(), delta.double()
    log_p = torch.log_softmax(z64, 1)
    d = log_p.exp().scatter_add(1, at, -torch.ones_like(z64[:, :1]))
    other = z64.scatter(1, at, -torch.inf).amax(1)
    return torch.stack([-log_p.gather(1, at)[:, 0], (d * d).sum(1), (delta * d).sum(1), (delta * delta).sum(1),
                        z64.gather(1, at)[:, 0] - other, log_p.gather(1, at)[:, 0].exp(),
                        (z.argmax(1) == labels).double()], 1)
