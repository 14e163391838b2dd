"""Writing an in-run scores file from its journal: time and peak memory for 10^6 and 10^7 records.

    python -m bench.inrun_store [--records 1000000,10000000] [--json bench/results/inrun_store_cpu.json]

Makes (in a temporary directory) the journal a recording of a classifier leaves: M
records of 50,000 examples, batches of 256, two ranks, each flushing row files of
131,072 records (a minute of a fast training), a target gradient every other step; then, in a fresh process per size, times
``gradscore.inrun.store.write`` (what ``InRun.flush`` and ``close`` run) and reports its
peak resident memory above the process's after imports, next to the bytes the records
take in memory. The write streams the row files, so its memory should not grow with M
(per-example arrays and about one row file per rank).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.engines import device_name, parsed, run_script, saved
from gradscore.inrun.store import FIELDS, RowJournal
from gradscore.io.journal import Journal

EXAMPLES, BATCH, RANKS, FILE_RECORDS = 50_000, 256, 2, 1 << 17
CHILD = """
import resource, sys, time
from pathlib import Path
from gradscore.inrun import store
from gradscore.io.journal import Journal
from gradscore.scores.inrun import NEEDS
def rss(): return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
out, base = Path(sys.argv[1]), rss()
t0 = time.perf_counter()
store.write(out, Journal.attach(out, {"inrun": 1}), config={"every": 2}, fingerprint={"inrun": 1},
            loss="cross_entropy", wanted=set(NEEDS), complete=True)
print("RESULT", time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
"""


def make_journal(out: Path, records: int) -> int:
    """The row files of ``records`` records (:data:`EXAMPLES`, :data:`RANKS`, files of
    :data:`FILE_RECORDS`) beside ``out``; returns the bytes the records take in memory."""
    journal = Journal(out, {"inrun": 1}, overwrite=True)
    journal.open()
    (journal.partial / "meta.json").write_text(json.dumps({"inrun": 1}))
    rng, steps, size = np.random.default_rng(0), records // (BATCH * RANKS), 0
    per_file = FILE_RECORDS // BATCH
    for rank in range(RANKS):
        rows = RowJournal(journal, rank)
        for first in range(0, steps, per_file):
            step = np.repeat(np.arange(first, min(steps, first + per_file)), BATCH)
            m, target = len(step), step % 2 == 0
            part = {"ids": rng.integers(0, EXAMPLES, m), "step": step, "lr": np.full(m, 0.1),
                    "loss": rng.exponential(1, m), "share": np.full(m, 1 / BATCH),
                    "share_sq_norm": rng.exponential(1, m), "sq_norm": rng.exponential(1, m),
                    "el2n": rng.random(m), "p_gold": rng.random(m), "correct": rng.random(m) > 0.3,
                    "margin": rng.standard_normal(m), "dot": np.where(target, rng.standard_normal(m), np.nan),
                    "target_norm": np.where(target, 1.0, np.nan)}
            size += 8 * m + sum(m * np.dtype(FIELDS[k]).itemsize for k in part if k != "ids")
            rows.append([part])
    return size


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="1000000,10000000", help="comma-separated record counts M")
    args = parsed(ap, argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in (int(float(s)) for s in args.records.split(",")):
            out = Path(tmp) / f"inrun_{m}.h5"
            size = make_journal(out, m)
            done = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, check=True)
            seconds, peak = (float(v) for v in done.stdout.split("RESULT")[1].split())
            row = {"records": m, "examples": EXAMPLES, "row_files": len(list(out.with_name(out.name + ".partial")
                                                                             .glob("rank*.npz"))), "seconds": seconds,
                   "records_per_second": m / seconds, "peak_above_base_bytes": int(peak), "records_bytes": size,
                   "peak_over_records": peak / size, "file_bytes": out.stat().st_size}
            rows.append(row)
            print(f"M={m:>11,}: {seconds:6.1f} s  {m / seconds:>10,.0f} records/s  peak {peak / 2**20:6.0f} MB "
                  f"above base, {peak / size:.2f}× the records' {size / 2**20:.0f} MB")
    return saved(args, {"device": device_name(), "rows": rows})


if __name__ == "__main__":
    run_script(main)
