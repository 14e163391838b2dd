"""The scores that need every example at once, over T checkpoints: time and peak memory.

    python -m bench.whole_dataset [--examples 1000000] [--checkpoints 10,50] [--json bench/results/whole_dataset_cpu.json]

Makes (in a temporary directory) the per-checkpoint rows a `gradscore run` with a target
writes: (T, N) float32 ``dot_target``, ``sq_grad_norm`` and ``loss``, chunked a checkpoint's
row of 4096 examples at a time; then, in a fresh process per size, times what the run's
last step computes on them (the four variants of ``target_dot`` and the non-finite scan,
``scores.registry.whole_dataset`` and ``nonfinite``) and what ``gradscore diagnose``
computes (``scores.pds.dot_terms``), and reports each one's peak resident memory above
the process's after imports, next to the bytes of one (T, N) float64 array. Both read a
checkpoint's row at a time, so their memory should grow with N, not with T.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from bench.engines import device_name, parsed, run_script, saved

CHILD = """
import resource, sys, time
import h5py, numpy as np
from gradscore.scores import pds, registry
def rss(): return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
path, what = sys.argv[1], sys.argv[2]
with h5py.File(path, "r") as f:
    pc = f["per_checkpoint"]
    T = pc["loss"].shape[0]
    eta, ref = np.full(T - 1, 0.1), np.linspace(1.0, 2.0, T)
    base, t0 = rss(), time.perf_counter()
    if what == "run":
        window = registry.Window(np.ones(T, bool), eta, ref)
        registry.whole_dataset(pc, window, {"target_dot"}, {"ref_norm_target": ref}, pds.VARIANTS)
        registry.nonfinite(pc)
    else:
        pds.dot_terms(pc["dot_target"], pc["sq_grad_norm"], ref, np.append(eta, 0.0))
    print("RESULT", time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
"""


def make_rows(path: Path, n: int, T: int) -> None:
    """(T, n) float32 rows as a run writes them, a checkpoint at a time."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for k in ("dot_target", "sq_grad_norm", "loss"):
            d = f.create_dataset(f"per_checkpoint/{k}", (T, n), np.float32, chunks=(1, min(n, 4096)))
            for t in range(T):
                x = rng.standard_normal(n, dtype=np.float32)
                d[t] = x * x if k == "sq_grad_norm" else x


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", default="1000000", help="comma-separated example counts N")
    ap.add_argument("--checkpoints", default="10,50", help="comma-separated checkpoint counts T")
    args = parsed(ap, argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(float(s)) for s in args.examples.split(",")):
            for T in (int(s) for s in args.checkpoints.split(",")):
                path = Path(tmp) / f"rows_{n}_{T}.h5"
                make_rows(path, n, T)
                for what in ("run", "diagnose"):
                    done = subprocess.run([sys.executable, "-c", CHILD, str(path), what], capture_output=True,
                                          text=True, check=True)
                    seconds, peak = (float(v) for v in done.stdout.split("RESULT")[1].split())
                    whole = 8 * T * n
                    rows.append({"examples": n, "checkpoints": T, "step": what, "seconds": seconds,
                                 "peak_above_base_bytes": int(peak), "one_TxN_float64_bytes": whole,
                                 "peak_over_one_TxN": peak / whole})
                    print(f"N={n:>10,} T={T:>3} {what:<9}: {seconds:6.1f} s  peak {peak / 2**20:6.0f} MB above "
                          f"base, {peak / whole:.2f}× one (T, N) float64 array ({whole / 2**20:.0f} MB)")
                path.unlink()
    return saved(args, {"device": device_name(), "rows": rows})


if __name__ == "__main__":
    run_script(main)
