"""Pick a ``norm_dot`` backend by device and availability.

Backends implement :class:`NormDotBackend`. Order: the ``backend=`` argument, then the
``GRADSCORE_KERNELS`` environment variable (``torch``, ``numba`` or ``triton``), then
the device default: Triton on CUDA, numba on CPU. A default backend is imported lazily
and probed once with a tiny call checked against the torch reference; if the import or
the probe fails, the reason is logged and the torch reference is used instead. float64
inputs always take the torch reference (accumulation in float64).
"""
from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from typing import Any, Callable, TypeVar

import torch

from .reference import autocast_off, norm_dot_reference

log = logging.getLogger("gradscore.kernels")
T = TypeVar("T")


class NormDotBackend(ABC):
    """Reduce one 2-D block: G (B, P), V (K, P) or None -> (sq_norm (B,), dots (B, K))."""

    name: str

    @abstractmethod
    def norm_dot(self, G: torch.Tensor, V: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchBackend(NormDotBackend):
    name = "torch"

    def norm_dot(self, G: torch.Tensor, V: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return norm_dot_reference(G, V)


class NumbaBackend(NormDotBackend):
    """numba kernel for CPU fp32/fp16/bf16; the torch reference for float64 or non-CPU."""

    name = "numba"

    def __init__(self) -> None:
        from .norm_dot_numba import norm_dot_numba
        self._kernel = norm_dot_numba

    def norm_dot(self, G: torch.Tensor, V: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if G.dtype == torch.float64 or G.device.type != "cpu":
            return TorchBackend().norm_dot(G, V)
        return self._kernel(G, V)


class TritonBackend(NormDotBackend):
    """Triton kernel for CUDA (or CPU under TRITON_INTERPRET=1); torch for float64, and
    from the first run-time failure of the kernel on (see :func:`guarded`)."""

    name = "triton"

    def __init__(self) -> None:
        from .norm_dot_triton import norm_dot_triton
        self._kernel = norm_dot_triton

    def norm_dot(self, G: torch.Tensor, V: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if G.dtype == torch.float64:
            return TorchBackend().norm_dot(G, V)
        return guarded("the Triton norm_dot kernel", self._kernel, norm_dot_reference, G, V)


#: kernel -> why it failed at run time; from then on its fallback runs
_runtime_failed: dict[str, str] = {}


def guarded(kernel_name: str, kernel: Callable[..., T], fallback: Callable[..., T], *args: Any) -> T:
    """``kernel(*args)``; if it raises (a compiler that breaks on a new shape or dtype
    mid-run), ``fallback(*args)`` now and on every later call, with one logged line naming
    the reason. Running out of memory is not a kernel failure: it propagates."""
    if kernel_name not in _runtime_failed:
        try:
            return kernel(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any compile or launch failure: use the reference
            _runtime_failed[kernel_name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("gradscore.kernels: %s failed (%s); using the torch reference from now on",
                        kernel_name, _runtime_failed[kernel_name])
    return fallback(*args)


_CLASSES: dict[str, type[NormDotBackend]] = {"torch": TorchBackend, "numba": NumbaBackend,
                                             "triton": TritonBackend}
_loaded: dict[str, NormDotBackend] = {}
_failed: dict[str, str] = {}  # (name:device type) -> reason


def available_backends() -> list[str]:
    """Backend names that can be asked for (whether they import here or not)."""
    return sorted(_CLASSES)


def _load(name: str) -> NormDotBackend:
    if name not in _loaded:
        _loaded[name] = _CLASSES[name]()
    return _loaded[name]


def _probe(backend: NormDotBackend, device: torch.device) -> None:
    """The backend's result against the torch reference, in float32 (autocast off: a first
    use inside an autocast region would compare against a half-precision reference)."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 37, generator=g).to(device)
    V = torch.randn(2, 37, generator=g).to(device)
    with autocast_off():
        sq, dots = backend.norm_dot(G, V)
        sq_ref, dots_ref = norm_dot_reference(G, V)
    torch.testing.assert_close(sq, sq_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dots, dots_ref, rtol=1e-4, atol=1e-4)


def default_backend_name(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "numba"


#: (device type, forced name or None) -> the backend chosen for it: the choice is made
#: once (imports, probe), and a call then costs a dictionary lookup
_chosen: dict[tuple[str, str | None], NormDotBackend] = {}


def forced_name(name: str | None = None) -> str | None:
    """The backend asked for: ``name``, else $GRADSCORE_KERNELS, else None (the default)."""
    return name or os.environ.get("GRADSCORE_KERNELS") or None


def get_backend(device: torch.device | str, name: str | None = None) -> NormDotBackend:
    """The backend for ``device``: ``name`` if given, else $GRADSCORE_KERNELS, else default.

    A backend asked for by name must import (else ValueError); the default one falls
    back to the torch reference, with the reason logged once, if it fails to import or
    to pass its probe.
    """
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return backend_for(kind, forced_name(name))


def backend_for(kind: str, forced: str | None) -> NormDotBackend:
    """:func:`get_backend` for a device type and an already resolved :func:`forced_name`."""
    backend = _chosen.get((kind, forced))
    if backend is None:
        backend = _chosen[(kind, forced)] = _choose(torch.device(kind), forced)
    return backend


def numba_on_cpu() -> bool:
    """Whether CPU tensors take the numba kernels now (the default there, unless forced
    otherwise or unavailable): the rules with a numba-only form ask this."""
    return backend_for("cpu", forced_name()).name == "numba"


def _choose(device: torch.device, forced: str | None) -> NormDotBackend:
    if forced is not None:
        if forced not in _CLASSES:
            raise ValueError(f"unknown kernel backend '{forced}'; available: "
                             f"{', '.join(available_backends())}")
        try:
            return _load(forced)
        except ImportError as e:
            raise ValueError(f"kernel backend '{forced}' cannot be imported ({e}); install "
                             f"gradscore[kernels] or use GRADSCORE_KERNELS=torch") from e
    name = default_backend_name(device)
    key = f"{name}:{device.type}"
    if key not in _failed:
        try:
            backend = _load(name)
            if key not in _loaded:
                _probe(backend, device)
                _loaded[key] = backend
            return backend
        except Exception as e:  # noqa: BLE001 - any failure means: use the reference
            _failed[key] = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("gradscore.kernels: %s backend unavailable on %s (%s); using the torch "
                        "reference", name, device.type, _failed[key])
    return _load("torch")


def describe() -> dict[str, str]:
    """Which backend each device kind uses now (for ``gradscore info --env``)."""
    out = {}
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and not torch.cuda.is_available():
            out[dev] = "n/a (no CUDA device)"
            continue
        chosen = get_backend(torch.device(dev)).name
        reason = _failed.get(f"{default_backend_name(torch.device(dev))}:{dev}")
        out[dev] = chosen + (f" (fallback: {reason})" if reason and chosen == "torch" else "")
    out.update({f"failed at run time: {name}": why for name, why in _runtime_failed.items()})
    return out
