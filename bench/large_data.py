"""`gradscore run` on large HDF5 datasets: throughput and peak memory for 10^5 and 10^6 examples.

    python -m bench.large_data [--sizes 100000,1000000] [--json bench/results/large_data_cpu.json]

Generates (in a temporary directory, never committed) a dataset of N random 64-dim
examples with 10 classes, written in slices so the generator's memory stays small, and
two checkpoints of an MLP 64-256-256-10; then runs `gradscore run` (el2n, grand, loss;
auto engine = ghost) in a fresh process per size and reports wall time, examples ×
checkpoints per second and that process's peak resident memory (ru_maxrss). Memory
should not grow with N: the data is streamed chunk by chunk and the per-checkpoint
results go to the journal, then into the output file chunk by chunk.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

import gradscore as gs
from bench.engines import device_name, parsed, run_script, saved
from gradscore.demos.models import mlp

KW = {"d_in": 64, "hidden": 256, "n_classes": 10, "depth": 2}
CHILD = ("import resource, sys; from gradscore.cli import main; rc = main(sys.argv[1:]); "
         "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def make_data(path: Path, n: int, slice_size: int = 100_000) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        x = f.create_dataset("inputs", (n, 64), dtype=np.float32, chunks=(min(4096, n), 64))
        y = f.create_dataset("targets", (n,), dtype=np.int64, chunks=(min(4096, n),))
        for a in range(0, n, slice_size):
            b = min(n, a + slice_size)
            x[a:b] = rng.standard_normal((b - a, 64), dtype=np.float32)
            y[a:b] = rng.integers(0, 10, b - a)


def make_checkpoints(root: Path) -> Path:
    torch.manual_seed(0)
    model = mlp(**KW)
    with gs.CheckpointWriter(root, model_factory="gradscore.demos.models:mlp", model_kwargs=KW) as w:
        for step in range(2):
            w.save(model, step=step, lr=0.1, epoch=step)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.9)
    return root


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    args = parsed(ap, argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpts = make_checkpoints(root / "ckpts")
        for n in (int(s) for s in args.sizes.split(",")):
            data = root / f"data_{n}.h5"
            make_data(data, n)
            cmd = [sys.executable, "-c", CHILD, "run", "--checkpoints", str(ckpts), "--data", str(data),
                   "--out", str(root / f"scores_{n}.h5"), "--scores", "el2n,grand,loss", "--quiet"]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - t0
            rss = int(done.stdout.split("MAXRSS_KB")[1].split()[0]) * 1024
            row = {"examples": n, "checkpoints": 2, "seconds": wall,
                   "examples_x_checkpoints_per_second": 2 * n / wall, "peak_rss_bytes": rss,
                   "data_bytes": data.stat().st_size}
            rows.append(row)
            print(f"N={n:>9,}: {wall:7.1f}s  {row['examples_x_checkpoints_per_second']:>9.0f} ex·ckpt/s  "
                  f"peak RSS {rss / 2**20:7.1f} MB  (data file {row['data_bytes'] / 2**20:.0f} MB)")
            data.unlink()
    return saved(args, {"device": device_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "model": "mlp 64-256-256-10", "rows": rows})


if __name__ == "__main__":
    run_script(main)
