"""Random small image models in random memory layouts against the per-example loop, float64.

Each seed builds a model from a few blocks (Conv2d with stride, padding modes and groups,
ConvTranspose2d, a Linear over the channels of a channels-last permute or over the width
axis, LayerNorm over the channels, GroupNorm, eval BatchNorm2d, InstanceNorm2d with and
without affine, max and average pooling), each reading its input as it comes or
converted to ``torch.channels_last``, with residuals; B from 1 to 3 and sizes down to 1,
so W == B, one channel and 1 × 1 images come up. The parameters scored are drawn as in
``test_random_models.py``: all, those from a random block on, or the rest of a model
with random blocks frozen. ``auto``, ``ghost`` and ``vmap`` must equal the loop: a wrong
number is a failure, a refusal by torch is not. This found torch's CPU InstanceNorm
backward wrong for one example with a channels_last gradient, and its GroupNorm
backward crashing on a channels_last input (``engines/workarounds.py``).

The seeds run in a child process that names each seed before it runs: a crash inside
torch fails the test that ran it and says which seed, rather than ending the session.
"""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import check_random_inrun, check_random_model, python_child


class Block(nn.Module):
    """One layer on h (B, C, H, W): on a channels-last permute (``kind`` "linear", "layernorm"),
    along the width ("linear_w"), or on h itself, converted to channels_last first if
    ``channels_last``."""

    def __init__(self, layer: nn.Module, kind: str, channels_last: bool, act: bool, residual: bool) -> None:
        super().__init__()
        self.layer, self.kind, self.channels_last, self.act, self.residual = layer, kind, channels_last, act, residual

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind in ("linear", "layernorm"):
            y = self.layer(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        elif self.kind == "linear_w":
            y = self.layer(h)
        else:
            y = self.layer(h.contiguous(memory_format=torch.channels_last) if self.channels_last else h)
        y = torch.tanh(y) if self.act else y
        return h + y if self.residual and y.shape == h.shape else y


def _layer(rng: random.Random, kind: str, C: int, H: int, W: int) -> tuple[nn.Module, int, int, int] | None:
    """A layer of ``kind`` reading (C, H, W) and the (C, H, W) it gives, or None where it
    does not fit."""
    if kind == "conv":
        groups = rng.choice([g for g in (1, C) if C % g == 0])
        out = C if groups > 1 else rng.choice([C, 3])
        k, stride, pad = rng.choice([1, 2, 3]), rng.choice([1, 1, 2]), rng.choice([0, 1])
        H2, W2 = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
        if H2 < 1 or W2 < 1:
            return None
        return nn.Conv2d(C, out, k, stride=stride, padding=pad, groups=groups, bias=rng.random() < 0.7,
                         padding_mode=rng.choice(["zeros", "circular"]) if pad else "zeros"), out, H2, W2
    if kind == "conv_transpose":
        return nn.ConvTranspose2d(C, 2, 2), 2, H + 1, W + 1
    if kind == "linear":
        out = rng.choice([C, 3])
        return nn.Linear(C, out, bias=rng.random() < 0.7), out, H, W
    if kind == "linear_w":
        out = rng.choice([W, 2])
        return nn.Linear(W, out), C, H, out
    if kind == "layernorm":
        return nn.LayerNorm(C), C, H, W
    if kind == "groupnorm":
        return nn.GroupNorm(rng.choice([g for g in (1, C) if C % g == 0]), C), C, H, W
    if kind == "batchnorm":
        layer = nn.BatchNorm2d(C)
        layer.running_mean.uniform_(-0.5, 0.5)
        layer.running_var.uniform_(0.5, 2.0)
        return layer, C, H, W
    if kind == "instancenorm":
        return nn.InstanceNorm2d(C, affine=rng.random() < 0.7), C, H, W
    if H < 2 or W < 2:   # a pool
        return None
    return (nn.MaxPool2d(2) if kind == "maxpool" else nn.AvgPool2d(2)), C, H // 2, W // 2


class RandomImageModel(nn.Module):
    KINDS = ("conv", "conv", "conv_transpose", "linear", "linear_w", "layernorm", "groupnorm", "batchnorm",
             "instancenorm", "maxpool", "avgpool")

    def __init__(self, rng: random.Random, C: int, H: int, W: int, kinds: tuple[str, ...] = KINDS) -> None:
        super().__init__()
        blocks = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(kinds)
            made = _layer(rng, kind, C, H, W)
            if made is None:
                continue
            layer, C, H, W = made
            blocks.append(Block(layer, kind, rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.3))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(C * H * W, 3)

    def describe(self) -> str:
        return ", ".join(f"{b.kind}{' (channels_last)' if b.channels_last else ''}" for b in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.flatten(1))


def _draw(seed: int, batches: int = 1, extra: int = 0, kinds: tuple[str, ...] = RandomImageModel.KINDS
          ) -> tuple[RandomImageModel, torch.Tensor, torch.Tensor, int, str]:
    """Seed's model (float64) of layers from ``kinds``, ``batches`` batches of its B images and
    ``extra`` more, their labels, B, and what they are."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    B = rng.choice([1, 2, 3])
    C, H, W = rng.choice([1, 2, 4]), rng.choice([1, 2, 3, 5]), rng.choice([1, B, 4])
    model = RandomImageModel(rng, C, H, W, kinds).double()
    n = batches * B + extra
    x, y = torch.randn(n, C, H, W, dtype=torch.float64), torch.randint(0, 3, (n,))
    return model, x, y, B, f"B={B} C={C} H={H} W={W}: {model.describe()}"


def _check(seed: int) -> bool:
    """Whether the seed's model was compared with the loop (else torch refused it)."""
    model, x, y, _, what = _draw(seed)
    return check_random_model(seed, model.eval(), x, y, what, engines=("auto", "ghost", "vmap"))


def _check_inrun(seed: int) -> bool:
    """Whether the seed's model in training was recorded and compared with the loop (else
    refused). No ConvTranspose2d (no ghost rule, which in-run needs) nor BatchNorm (refused
    in training). The step's input requires grad: torch's own GroupNorm backward crashes
    on a channels_last input that does not, in training too."""
    kinds = tuple(k for k in RandomImageModel.KINDS if k not in ("conv_transpose", "batchnorm"))
    model, x, y, B, _ = _draw(seed, batches=3, extra=3, kinds=kinds)
    with tempfile.TemporaryDirectory() as work:
        return check_random_inrun(model, x, y, B, Path(work) / "inrun.h5", input_grad=True)


def compared(check: str, first: int, last: int) -> int:
    """How many of the seeds first..last-1 ``check`` (a function's name here) compared; each
    seed is named before it runs."""
    count = 0
    for seed in range(first, last):
        print(f"seed {seed}", flush=True)
        count += globals()[check](seed)
    return count


def _in_a_child(check: str, first: int, last: int) -> int:
    """:func:`compared` in a child process (a torch crash fails the test, not the session)."""
    proc = python_child("import warnings; warnings.simplefilter('ignore'); import test_random_images as t; "
                        f"print('compared', t.compared({check!r}, {first}, {last}))")
    last_seed = next((line for line in reversed(proc.stdout.splitlines()) if line.startswith("seed ")), "no seed")
    assert proc.returncode == 0, f"{check} died at {last_seed} (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return int(proc.stdout.splitlines()[-1].split()[1])


def test_random_image_models_equal_the_loop():
    assert _in_a_child("_check", 0, 60) > 45   # most are compared


def test_random_image_models_in_training_record_what_the_loop_gives():
    assert _in_a_child("_check_inrun", 0, 40) > 25


@pytest.mark.slow
def test_many_random_image_models_equal_the_loop():
    assert _in_a_child("_check", 60, 2060) > 1600


@pytest.mark.slow
def test_many_random_image_models_in_training_record_what_the_loop_gives():
    assert _in_a_child("_check_inrun", 40, 640) > 400
