"""The probe: an identity on a tensor whose backward hands its gradient δ to a callback.

The ghost engine probes each ruled layer's output (and the free-parameter rule each use's
expanded parameter); a backward of the zero leaf z reaches z only through the probes.
"""
from __future__ import annotations

import torch


class _Probe(torch.autograd.Function):
    """Identity on a layer's output y whose backward hands δ = ∂L/∂y to a callback: the
    backward reaches the zero leaf z only through it. No copy of y in the forward and no
    reduction of δ in the backward (``y + z`` cost one of each). The output is ``y.detach()``,
    a new tensor on y's storage and version counter rather than a view of y, so in-place
    ops downstream (``ReLU(inplace=True)``) stay allowed and are checked as on y itself."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, z: torch.Tensor, on_grad, contiguous: bool) -> torch.Tensor:
        ctx.on_grad, ctx.contiguous = on_grad, contiguous
        return output.detach()

    @staticmethod
    def backward(ctx, delta: torch.Tensor):
        ctx.on_grad(delta)
        return (delta.contiguous() if ctx.contiguous else delta), None, None, None


def probe(output: torch.Tensor, z: torch.Tensor, on_grad, contiguous: bool = False) -> torch.Tensor:
    """``output`` through a :class:`_Probe`: ``on_grad(δ)`` is called with ∂L/∂output when
    a backward asks for the gradient of the zero leaf z. ``contiguous``: pass δ on in a
    contiguous layout, not the one it came in (the engines' own backwards: torch's CPU
    instance-norm backward is wrong for the (T, B, C) layout a batch-first RNN's input
    gradient has); the in-run recorder passes δ on exactly as it came, so that training
    stays bit for bit what it is without it."""
    return _Probe.apply(output, z, on_grad, contiguous)
