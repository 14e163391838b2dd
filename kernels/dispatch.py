"""Pick a ``norm_dot`` backend by device and availability.

Backends implement :class:`NormDotBackend`. Order: the ``backend=`` argument, then the
``GRADSCORE_KERNELS`` environment variable, then the device default. Only the torch
reference exists in this release; fused numba (CPU) and Triton (CUDA) kernels plug in here.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod

import torch


class NormDotBackend(ABC):
    """Reduce one 2-D block: G (B, P), V (K, P) or None -> (sq_norm (B,), dots (B, K))."""

    name: str

    @abstractmethod
    def norm_dot(self, G: torch.Tensor, V: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchBackend(NormDotBackend):
    name = "torch"

    def norm_dot(self, G: torch.Tensor, V: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        from .norm_dot import norm_dot_reference
        return norm_dot_reference(G, V)


_BACKENDS: dict[str, NormDotBackend] = {"torch": TorchBackend()}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(device: torch.device, name: str | None = None) -> NormDotBackend:
    """The backend for ``device``: ``name`` if given, else $GRADSCORE_KERNELS, else default."""
    name = name or os.environ.get("GRADSCORE_KERNELS") or "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend '{name}'; available: {', '.join(available_backends())}")
    return _BACKENDS[name]


def describe() -> dict[str, str]:
    """Which backend each device kind uses now (for ``gradscore info --env``)."""
    return {dev: get_backend(torch.device(dev)).name for dev in ("cpu", "cuda")}
