"""gradscore.kernels: fused reductions over per-example gradient blocks."""
from .dispatch import NormDotBackend, available_backends, describe, get_backend
from .norm_dot import norm_dot
from .reference import acc_dtype, norm_dot_reference

__all__ = ["norm_dot", "norm_dot_reference", "acc_dtype", "NormDotBackend", "get_backend",
           "available_backends", "describe"]
