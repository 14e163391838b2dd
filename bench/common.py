"""Timing and output helpers shared by the benchmarks."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None,
              warmup: bool = True) -> float:
    """Best wall time of ``repeats`` calls, in seconds (``sync`` waits for the device)."""
    if warmup:
        fn()
        sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def save_json(result: dict, path: str | None) -> None:
    """Write ``result`` as indented JSON to ``path`` (if given) and say where."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
        print(f"-> {path}")
