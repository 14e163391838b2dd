"""The benchmark's CPU memory count follows live tensors, as the bench's child measures it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gradscore.bench import MMAP_THRESHOLD

CHILD = """
import json, torch
from gradscore.bench import _Memory
def one_after_another():
    for _ in range(3):
        torch.ones(2**20).sum()          # 4 MiB, freed before the next
def three_at_once():
    return [torch.ones(2**20) for _ in range(3)]
memory, peaks = _Memory("cpu"), []
for fn in (one_after_another, three_at_once):
    fn()
    with memory.measure() as out:
        fn()
    peaks.append(out.get("peak_bytes"))
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_cpu_peak_counts_live_tensors_not_total_allocations():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    sequential, together = json.loads(done.stdout.strip().splitlines()[-1])
    assert 3.5 * 2**20 <= sequential < 6 * 2**20          # one 4 MiB tensor at a time
    assert 11.5 * 2**20 <= together < 14 * 2**20          # three alive together
