"""Fixtures (a tiny training run; the helpers themselves are in helpers.py) and the CUDA skip.

Without a CUDA device, Triton kernels run in its interpreter on CPU tensors; that needs
TRITON_INTERPRET=1 before triton is first imported, hence before anything else here.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from helpers import make_run


@pytest.fixture
def tiny_run(tmp_path: Path) -> tuple[Path, Path]:
    return make_run(tmp_path)


@pytest.fixture
def default_kernels(monkeypatch) -> None:
    """The default kernel backends, whatever $GRADSCORE_KERNELS the suite runs under: for
    the tests of a path only the default CPU backend (numba) takes."""
    monkeypatch.delenv("GRADSCORE_KERNELS", raising=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
