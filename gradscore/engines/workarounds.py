"""Temporary hooks that route gradscore's own backwards around torch bugs (wrong gradients,
a crash); on the model only while the ``with`` block runs.

- torch's CPU InstanceNorm backward is wrong for a batch of one example whose output
  gradient comes in channels_last (a model in ``memory_format=torch.channels_last``, a
  channels_last max-pool after the norm): the weight, bias and input gradients are all
  off (10–100% in tests/test_engines.py). The per-example loop and the co-states'
  ``torch.func.grad`` run on one example. The norm's output passes through an identity
  whose backward makes the gradient contiguous first (which torch handles right);
  ``torch.func`` transforms (grad, jvp, vmap) see it as the identity it is.

- torch's CPU GroupNorm backward crashes the process (a segfault) when its input is
  channels_last and the input's gradient is not asked for: the loop scoring only the
  norm and the layers after it (``params=``), or a norm on the model's input. The norm
  reads a row-major copy of any CPU input with other strides: the same values, so the
  same function.

Both are module hooks: ``F.instance_norm`` and ``F.group_norm`` called in a forward are not
covered. The in-run recorder does not use these on the training step: the step must stay what
the user's loop computes. There :func:`wrong_in_torch` only notes an InstanceNorm whose
backward torch gets wrong, and the recorder refuses that step.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward passes the gradient on contiguous."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        return tangent


def _contiguous_grad(module: nn.Module, args, output):
    return _ContiguousGrad.apply(output) if isinstance(output, torch.Tensor) and output.requires_grad else None


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a freshly allocated contiguous tensor of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def row_major(x: torch.Tensor) -> torch.Tensor:
    """x itself if its strides are row-major, else a row-major copy. Strides, not
    ``is_contiguous()``: where an axis has length 1, channels_last strides pass as
    contiguous, yet torch's CPU kernels still take them for channels_last (GroupNorm's
    backward crashes, a convolution's weight gradient refuses its own output)."""
    return x if x.stride() == _row_major_strides(x.shape) else x.clone(memory_format=torch.contiguous_format)


def _contiguous_input(module: nn.Module, args):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.device.type == "cpu":
        y = row_major(x)
        return None if y is x else (y, *args[1:])
    return None


@contextlib.contextmanager
def torch_workarounds(model: nn.Module) -> Iterator[None]:
    """While inside, the model's InstanceNorm layers hand their backward a contiguous output
    gradient and its GroupNorm layers read a contiguous input on CPU (module docstring)."""
    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            handles.append(m.register_forward_hook(_contiguous_grad))
        elif isinstance(m, nn.GroupNorm):
            handles.append(m.register_forward_pre_hook(_contiguous_input))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _channels_last_only(g: torch.Tensor) -> bool:
    """Whether ``g`` (B, C, *spatial) is laid out channels_last and not also contiguous."""
    if g.dim() not in (4, 5) or g.is_contiguous():
        return False
    return g.is_contiguous(memory_format=torch.channels_last if g.dim() == 4 else torch.channels_last_3d)


def wrong_in_torch(model: nn.Module, found: list[str]) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks (the caller removes them) that append to ``found`` the name of each CPU
    InstanceNorm whose backward in this forward's graph torch computes wrong: a batch of one
    example whose output gradient comes channels_last. They change nothing: the gradient
    passes on as it came."""
    def watch(name: str):
        def hook(module, args, output):
            if (isinstance(output, torch.Tensor) and output.requires_grad and output.device.type == "cpu"
                    and output.dim() in (4, 5) and output.shape[0] == 1):
                output.register_hook(lambda g: found.append(name) if _channels_last_only(g) else None)
        return hook
    return [m.register_forward_hook(watch(name)) for name, m in model.named_modules()
            if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
