"""Routes gradscore's own backwards around torch bugs (wrong gradients, a crash), and notes
where the training step of the in-run recorder meets one; only while a ``with`` block runs.

- torch's CPU InstanceNorm backward is wrong for a batch of one example whose output
  gradient comes in channels_last (a model in ``memory_format=torch.channels_last``, a
  channels_last max-pool after the norm): the weight, bias and input gradients are all
  off (10–100% in tests/test_engines.py). The per-example loop and the co-states'
  ``torch.func.grad`` run on one example. Its input gradient is wrong for any batch whose
  output gradient comes laid out (T, B, C) (an RNN reading the norm's output as a
  sequence). The norm's output passes through an identity whose backward makes the
  gradient contiguous first (which torch handles right); ``torch.func`` transforms (grad,
  jvp, vmap) see it as the identity it is. Its output is a copy, which a model may change
  in place.

- torch's CPU BatchNorm backward (2-D and 3-D, eval and train mode) is wrong for a batch
  of one example whose output gradient comes channels_last with a batch stride other
  than C·H·W: a ViT-style patch embedding (conv -> BatchNorm -> ``flatten(2).transpose(1,
  2)``, timm's XCiT and LeViT) sends it back so, since a view gives a length-1 axis any
  stride. The per-example loop read XCiT's norms 0.05% off and its dots 34%. The same
  identity fixes it, for outputs of one example.

- torch's CPU GroupNorm backward crashes the process (a segfault) when its input is
  channels_last and the input's gradient is not asked for: the loop scoring only the
  norm and the layers after it (``params=``), or a norm on the model's input. The norm
  reads a row-major copy of any CPU input with other strides: the same values, so the
  same function.

- cuDNN's RNN backward refuses a module in eval mode ("cudnn RNN backward can only be
  called in training mode"), and scoring runs the model in eval mode: on CUDA every engine
  failed on an LSTM, GRU or RNN. Their forwards (``torch._VF.lstm`` / ``gru`` /
  ``rnn_tanh`` / ``rnn_relu``) run with cuDNN off on CUDA inputs, torch's own kernels,
  whose backward has no such limit; other layers keep cuDNN.

The norms reach torch through ``torch.instance_norm``, ``torch.batch_norm`` and
``torch.group_norm``, whether a model holds norm layers or calls ``F.instance_norm`` /
``F.batch_norm`` / ``F.group_norm`` in its forward (style transfer's AdaIN, diffusion
U-Nets). While a block runs, those names in the ``torch`` namespace are functions of this
module that call the ones they replaced and return the same values; those are back when
the last block ends. Functions imported by name before (``from torch import
instance_norm``) are not covered.

The in-run recorder cannot change the training step: it must stay what the user's loop
computes. There :func:`wrong_in_torch` only notes a norm whose backward torch may get
wrong, and the recorder refuses that step.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch
from torch import nn


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward passes the gradient on contiguous. Its output is a copy, not
    a view: a model may change it in place (``ReLU(inplace=True)`` after the norm), which
    torch refuses on a custom Function's view."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        return tangent


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


#: the names in the ``torch`` namespace replaced while a block runs
_NORMS = ("instance_norm", "batch_norm", "group_norm")


class _Active:
    """What the replaced norms do now, process-wide: ``fixing`` (blocks of
    :func:`torch_workarounds` open) and ``watchers`` (callbacks on an instance or batch
    norm's output and the norm's name, from :func:`wrong_in_torch`); ``found``: the
    functions :data:`_NORMS` as they were before, which the replacements call and which
    are put back when both are empty."""

    lock = threading.Lock()
    fixing = 0
    watchers: list[Callable[[torch.Tensor, str], None]] = []
    found: dict[str, Callable] = {name: getattr(torch, name) for name in _NORMS}


def _passed_on(out, norm: str, one_example: bool):
    """A norm's output: through :class:`_ContiguousGrad` while fixing, else shown to the
    watchers; ``one_example``: only an output of one example (a batch norm's: torch gets a
    batch of several right, where an instance norm's backward of a (T, B, C)-laid gradient
    is wrong for any B)."""
    if not (isinstance(out, torch.Tensor) and out.requires_grad and out.dim()) or (one_example and len(out) != 1):
        return out
    if _Active.fixing:
        return _ContiguousGrad.apply(out)
    for watch in list(_Active.watchers):
        watch(out, norm)
    return out


def _instance_norm(*args, **kwargs):
    return _passed_on(_Active.found["instance_norm"](*args, **kwargs), "instance_norm", one_example=False)


def _batch_norm(*args, **kwargs):
    out = _Active.found["batch_norm"](*args, **kwargs)
    return _passed_on(out, "batch_norm", one_example=True) if out.dim() in (4, 5) else out


#: the recurrent layers' kernels, as ``nn.RNNBase`` calls them (``torch._VF.<name>``)
_RNN_KERNELS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def _without_cudnn(kernel: Callable) -> Callable:
    """``kernel`` (one of torch's recurrent kernels) run with cuDNN off where its input is a
    CUDA tensor."""
    def call(*args, **kwargs):
        if not (args and isinstance(args[0], torch.Tensor) and args[0].is_cuda):
            return kernel(*args, **kwargs)
        enabled = torch.backends.cudnn.enabled
        torch.backends.cudnn.enabled = False
        try:
            return kernel(*args, **kwargs)
        finally:
            torch.backends.cudnn.enabled = enabled
    return call


def _group_norm(input, *args, **kwargs):
    if _Active.fixing and isinstance(input, torch.Tensor) and input.device.type == "cpu":
        input = row_major(input)
    return _Active.found["group_norm"](input, *args, **kwargs)


@contextlib.contextmanager
def _replaced(fixing: int = 0, watcher: Callable[[torch.Tensor, str], None] | None = None) -> Iterator[None]:
    """The functions :data:`_NORMS` replaced while inside, with ``fixing`` and ``watcher``
    added to what they do."""
    with _Active.lock:
        if not _Active.fixing and not _Active.watchers:
            _Active.found = {name: getattr(torch, name) for name in _NORMS}
            torch.instance_norm, torch.batch_norm, torch.group_norm = _instance_norm, _batch_norm, _group_norm
        if fixing and not _Active.fixing:
            for name in _RNN_KERNELS:   # an attribute of the _VF module object: its __getattr__ finds torch's
                setattr(torch._VF, name, _without_cudnn(getattr(torch._C._VariableFunctions, name)))
        _Active.fixing += fixing
        if watcher is not None:
            _Active.watchers.append(watcher)
    try:
        yield
    finally:
        with _Active.lock:
            _Active.fixing -= fixing
            if fixing and not _Active.fixing:
                for name in _RNN_KERNELS:
                    torch._VF.__dict__.pop(name, None)
            if watcher is not None:
                _Active.watchers.remove(watcher)
            if not _Active.fixing and not _Active.watchers:
                for name, fn in _Active.found.items():
                    setattr(torch, name, fn)


def torch_workarounds() -> contextlib.AbstractContextManager[None]:
    """While inside, every instance norm, and every batch norm of one example, hands its
    backward a contiguous output gradient, every GroupNorm reads a row-major input on CPU,
    and the recurrent layers run without cuDNN on CUDA, in any thread (module docstring)."""
    return _replaced(fixing=1)


def _channels_last_only(g: torch.Tensor) -> bool:
    """Whether ``g`` (B, C, *spatial) is laid out channels_last and not also contiguous."""
    if g.dim() not in (4, 5) or g.is_contiguous():
        return False
    return g.is_contiguous(memory_format=torch.channels_last if g.dim() == 4 else torch.channels_last_3d)


@contextlib.contextmanager
def wrong_in_torch(model: nn.Module, found: list[tuple[str, str]]) -> Iterator[None]:
    """While inside, each CPU instance or batch norm in a forward of ``model`` whose backward
    torch may compute wrong (a batch of one example whose output gradient comes
    channels_last) appends to ``found`` (the name of the module running it: its own, or the
    one whose forward calls ``F.instance_norm`` / ``F.batch_norm``; the norm,
    ``"instance_norm"`` or ``"batch_norm"``). Nothing changes: the gradient passes on as it
    came. Meant for a training step of one example: it hooks every module to know which runs."""
    running: list[str] = []

    def enter(name: str):
        def hook(module, args):
            running.append(name)
        return hook

    def leave(module, args, output):
        running.pop()

    handles = [h for name, m in model.named_modules()
               for h in (m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave))]

    def watch(out: torch.Tensor, norm: str) -> None:
        if out.device.type == "cpu" and out.dim() in (4, 5) and out.shape[0] == 1 and running:
            where = running[-1]
            out.register_hook(lambda g: found.append((where, norm)) if _channels_last_only(g) else None)

    try:
        with _replaced(watcher=watch):
            yield
    finally:
        for h in handles:
            h.remove()
