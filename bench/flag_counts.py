"""`flag`'s count against the true number of flipped labels, over noise kinds, rates and
seeds: the evidence for ``reports.flag.CLEAR_SEPARATION`` and ``COUNT_SHIFT`` (a count is
called rough where the two components overlap, or a third component moves it by over a
quarter).

    python -m bench.flag_counts [--epochs 40] [--rates 0.05,0.1,0.2,0.35] [--seeds 2] [--json FILE]

Each run trains the noise experiment's digits CNN (``gradscore experiment noise``) on one
noise kind, rate and seed, scores ``mislabel`` and calls ``reports.flag.estimate``; the
table gives the true count, the count, the three-component count, the separation, whether
the count is rough, and its error. Instance noise takes the most confusable examples, so
its seeds are one run.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.engines import parsed, run_script, saved
from gradscore.demos.experiments.common import Setup, digits_setup, reference_run
from gradscore.demos.experiments.noise import SCORES, make_noise
from gradscore.reports.flag import COUNT_SHIFT, estimate, suspicion


def one_run(kind: str, rate: float, seed: int, epochs: int, work: Path) -> dict:
    """The count of one training run with ``rate`` of its labels flipped by ``kind``."""
    base = digits_setup(0.0, None)
    y_noisy, noisy = make_noise(kind, base.x_train, base.y_train, rate, seed=seed)
    setup = Setup(base.x_train, y_noisy, base.x_val, base.y_val, base.x_test, base.y_test, noisy=noisy)
    ref = reference_run(setup, work, epochs=epochs, scores=tuple(SCORES))
    est = estimate(suspicion(ref["scores"], "mislabel"))
    true, count = int(noisy.sum()), est["count"]
    return {"kind": kind, "rate": rate, "seed": seed, "true": true, "count": count, "count_three": est["count_three"],
            "separation": est["separation"], "finding": est["finding"], "rough": est["rough"],
            "relative_error": None if count is None else abs(count - true) / true}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40, help="training epochs per run")
    ap.add_argument("--rates", default="0.05,0.1,0.2,0.35", help="noise rates, comma-separated")
    ap.add_argument("--seeds", type=int, default=2, help="noise seeds per kind and rate")
    ap.add_argument("--kinds", default="symmetric,pair,instance", help="noise kinds, comma-separated")
    args = parsed(ap, argv)
    rows, t0 = [], time.perf_counter()
    for kind in args.kinds.split(","):
        for rate in (float(r) for r in args.rates.split(",")):
            for seed in range(args.seeds if kind != "instance" else 1):
                with tempfile.TemporaryDirectory() as tmp:
                    row = one_run(kind, rate, seed, args.epochs, Path(tmp))
                rows.append(row)
                print(f"{kind:9s} {rate:4.2f} seed {seed}: true {row['true']:4d}  count {row['count']}  "
                      f"three {row['count_three']}  separation {row['separation']:.2f}  "
                      f"{'rough' if row['rough'] else row['finding']}", flush=True)
    clean = [r["relative_error"] for r in rows if r["count"] is not None and not r["rough"]]
    rough = [r["relative_error"] for r in rows if r["rough"]]
    summary = {"count_shift": COUNT_SHIFT, "runs": len(rows),
               "largest_error_said_without_caution": max(clean, default=None),
               "smallest_error_called_rough": min(rough, default=None), "seconds": time.perf_counter() - t0}
    print(f"largest error of a count given without a caution: {summary['largest_error_said_without_caution']}; "
          f"smallest error of a count called rough: {summary['smallest_error_called_rough']}")
    return saved(args, {"epochs": args.epochs, "rows": rows, **summary, "mean_rough_error":
                        float(np.mean(rough)) if rough else None})


if __name__ == "__main__":
    run_script(main)
