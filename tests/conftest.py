"""Shared fixtures: a tiny training run (checkpoints + dataset) made with the public API.

Without a CUDA device, Triton kernels run in its interpreter on CPU tensors; that needs
TRITON_INTERPRET=1 before triton is first imported, hence before anything else here.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

import gradscore as gs
from gradscore.demos.models import mlp

MLP_KWARGS = {"d_in": 12, "hidden": 8, "n_classes": 4, "depth": 1}


def make_run(root: Path, *, n: int = 90, n_ckpts: int = 3, seed: int = 0,
             kwargs: dict | None = None) -> tuple[Path, Path]:
    """Train an MLP a few SGD steps, saving a checkpoint after each; write a dataset."""
    kwargs = dict(MLP_KWARGS if kwargs is None else kwargs)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, kwargs["d_in"], generator=g)
    y = torch.randint(0, kwargs["n_classes"], (n,), generator=g)
    noisy = np.zeros(n, dtype=bool)
    noisy[::7] = True
    data = gs.save_dataset(root / "train.h5", x.numpy(), y.numpy(),
                           ids=np.arange(100, 100 + n), noisy=noisy)
    torch.manual_seed(seed)
    model = mlp(**kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with gs.CheckpointWriter(root / "ckpts", model_factory="gradscore.demos.models:mlp",
                             model_kwargs=kwargs, loss="cross_entropy") as w:
        for t in range(n_ckpts):
            w.save(model, step=t, lr=0.5, epoch=t)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return root / "ckpts", data


@pytest.fixture
def tiny_run(tmp_path: Path) -> tuple[Path, Path]:
    return make_run(tmp_path)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def sigkill_when(cmd: list[str], ready, timeout: float = 120.0) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` is true; fail if it ends first."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    assert proc.poll() is None, f"{cmd[3]} ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
