"""The benchmark's memory count: the peak of live tensor bytes during a call."""
from __future__ import annotations

import torch

from gradscore.bench import _Memory


def _one_after_another():
    for _ in range(3):
        torch.ones(2**20).sum()          # 4 MiB, freed before the next


def _three_at_once():
    return [torch.ones(2**20) for _ in range(3)]


def test_cpu_peak_counts_live_tensors_not_total_allocations():
    memory = _Memory("cpu")
    peaks = []
    for fn in (_one_after_another, _three_at_once):
        with memory.measure() as out:
            fn()
        peaks.append(out["peak_bytes"])
    assert 4 * 2**20 <= peaks[0] < 5 * 2**20
    assert 12 * 2**20 <= peaks[1] < 13 * 2**20
