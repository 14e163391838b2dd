"""Fixtures (a tiny training run; the helpers themselves are in helpers.py), the CUDA skip,
and SIGINT handled as in a terminal (for the Ctrl-C tests, also in a background job).

Without a CUDA device, Triton kernels run in its interpreter on CPU tensors; that needs
TRITON_INTERPRET=1 before triton is first imported, hence before anything else here.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

# The Ctrl-C tests send SIGINT to this process and to commands they start. A shell runs a
# background job (`pytest … &`) with SIGINT ignored, which children inherit through exec:
# Python's own handler restores it here, and exec gives the children the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
