"""`flag`'s count against the true number of flipped labels, over noise kinds, rates, seeds,
scores and how long the model trained: the evidence for ``reports.flag.CLEAR_SEPARATION``,
``COUNT_SHIFT``, ``FIT_CLEAN`` and ``CALIBRATED`` (a count is called rough where the two
components overlap, where a third component moves it by over a quarter, where the model
predicts under 95% of the examples the count calls clean as labelled, or where the score is
not one whose counts are checked here).

    python -m bench.flag_counts [--epochs 40] [--ends 1,3,6,12,40] [--scores mislabel,aum,el2n,loss]
                                [--rates 0.05,0.1,0.2,0.35] [--seeds 2] [--train-seeds 1] [--inrun]
                                [--json FILE]

Each run trains the noise experiment's digits CNN (``gradscore experiment noise``) on one
noise kind, rate and seed, with a checkpoint per epoch, and scores it once. Each window end
e of ``--ends`` then stands for a run stopped after e epochs: its scores are aggregated over
the first e checkpoints, and the fit is read at checkpoint e. A row gives the true count,
the count, the three-component count, the separation, the fit, whether the count is rough,
and its error. Instance noise takes the most confusable examples, so its noise seeds are
one draw; ``--train-seeds`` trains each draw several times. ``--inrun`` records the same
training with ``gs.InRun`` (training is bit-identical with it) and counts by its AUM too
(score ``inrun_aum``: the mean margin of each example's records in the first e epochs, the
fit read at each example's last record there, as ``flag`` reads a recording).
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.engines import parsed, run_script, saved
import gradscore as gs
from gradscore.demos.experiments.common import Setup, digits_setup, reference_run
from gradscore.demos.experiments.noise import make_noise
from gradscore.io.store import load_inrun_rows
from gradscore.reports.flag import CALIBRATED, COUNT_SHIFT, FIT_CLEAN, count_fields, estimate, suspicion
from gradscore.scores.inrun import aggregate as inrun_aggregate
from gradscore.scores.registry import Window, aggregate


def one_run(kind: str, rate: float, seed: int, train_seed: int, epochs: int, ends: list[int],
            scores: list[str], work: Path, inrun: bool = False) -> list[dict]:
    """The counts of one training run (``train_seed``: its initialization and batch order)
    with ``rate`` of its labels flipped by ``kind`` (``seed``): a row per window end
    (≤ ``epochs``) and score, and with ``inrun`` per end by the recording's AUM."""
    base = digits_setup(0.0, None)
    y_noisy, noisy = make_noise(kind, base.x_train, base.y_train, rate, seed=seed)
    setup = Setup(base.x_train, y_noisy, base.x_val, base.y_val, base.x_test, base.y_test, noisy=noisy)
    recorders: list = []

    def record(model):
        recorders.append(gs.InRun(model, out=work / "inrun.h5", scores=("aum",), overwrite=True))
        return recorders[-1]
    # correctness: the per-checkpoint predictions the fit reads
    ref = reference_run(setup, work, epochs=epochs, scores=(*scores, "correctness"), seed=train_seed,
                        record=record if inrun else None)
    pc = {k: np.asarray(v) for k, v in ref["per_checkpoint"].items()}
    records = load_inrun_rows(recorders[0].close(), ("step", "row", "margin", "correct")) if inrun else None
    rows, true, n = [], int(noisy.sum()), len(noisy)

    def row(end: int, score: str, values: np.ndarray, correct: np.ndarray) -> dict:
        est = estimate(suspicion({score: values}, score))
        fields = count_fields(est, n, score, correct)
        count = fields["estimated_count"]
        return {"kind": kind, "rate": rate, "seed": seed, "train_seed": train_seed, "end": end,
                "score": score, "true": true, "count": count, "count_three": est["count_three"],
                "separation": round(est["separation"], 3), "finding": est["finding"],
                "fit_clean": None if fields["fit_clean"] is None else round(fields["fit_clean"], 4),
                "rough": fields["rough"],
                "relative_error": None if count is None else round(abs(count - true) / true, 4)}
    for end in sorted({e for e in ends if e <= epochs} | {epochs}):
        window = aggregate(pc, Window(select=np.arange(len(pc["correct"])) < end))
        rows += [row(end, score, window[score], pc["correct"][end - 1].astype(np.float64)) for score in scores]
        if records is not None:   # the steps of the first `end` epochs: as many as the checkpoints' steps
            steps = int(ref["checkpoints"]["step"][end - 1])
            at = records["step"] < steps
            aum = inrun_aggregate({k: v[at] for k, v in records.items()}, n, {"aum"})["aum"]
            last = np.full(n, np.nan)
            last[records["row"][at]] = records["correct"][at]   # in step order: the last record wins
            rows.append({**row(end, "aum", aum, last), "score": "inrun_aum"})
    return rows


def largest(rows: list[dict], **where: object) -> float | None:
    """The largest error of a count given without a caution among ``rows`` matching ``where``."""
    errors = [r["relative_error"] for r in rows if r["count"] is not None and not r["rough"]
              and all(r[k] == v for k, v in where.items())]
    return max(errors, default=None)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40, help="training epochs per run (one checkpoint each)")
    ap.add_argument("--ends", default="1,3,6,12,40",
                    help="window ends in epochs, comma-separated: each stands for a run stopped there")
    ap.add_argument("--scores", default=",".join((*CALIBRATED, "el2n", "loss")),
                    help="the scores counted, comma-separated")
    ap.add_argument("--rates", default="0.05,0.1,0.2,0.35", help="noise rates, comma-separated")
    ap.add_argument("--seeds", type=int, default=2, help="noise seeds per kind and rate")
    ap.add_argument("--train-seeds", type=int, default=1,
                    help="training runs per noise draw (initialization and batch order)")
    ap.add_argument("--kinds", default="symmetric,pair,instance", help="noise kinds, comma-separated")
    ap.add_argument("--inrun", action="store_true",
                    help="also record each training with gs.InRun and count by its AUM (score inrun_aum)")
    args = parsed(ap, argv)
    ends, scores = [int(e) for e in args.ends.split(",")], args.scores.split(",")
    rows, runs, t0 = [], 0, time.perf_counter()
    for kind in args.kinds.split(","):
        for rate in (float(r) for r in args.rates.split(",")):
            for seed, train_seed in itertools.product(range(args.seeds if kind != "instance" else 1),
                                                      range(args.train_seeds)):
                with tempfile.TemporaryDirectory() as tmp:
                    run = one_run(kind, rate, seed, train_seed, args.epochs, ends, scores, Path(tmp), args.inrun)
                rows, runs = rows + run, runs + 1
                for r in run:
                    fit = "—" if r["fit_clean"] is None else f"{r['fit_clean']:.3f}"
                    print(f"{kind:9s} {rate:4.2f} seed {seed}/{train_seed} end {r['end']:2d} {r['score']:8s}: "
                          f"true {r['true']:4d}  "
                          f"count {r['count']}  three {r['count_three']}  separation {r['separation']:.2f}  "
                          f"fit {fit}  {'rough' if r['rough'] else r['finding']}", flush=True)
    rough = [r["relative_error"] for r in rows if r["rough"]]
    summary = {"count_shift": COUNT_SHIFT, "fit_clean": FIT_CLEAN, "calibrated": list(CALIBRATED),
               "runs": runs,
               "largest_error_said_without_caution": largest(rows),
               "largest_error_said_without_caution_by_score": {s: largest(rows, score=s) for s in
                                                               [*scores, *(["inrun_aum"] if args.inrun else [])]},
               "largest_error_said_without_caution_by_kind": {k: largest(rows, kind=k)
                                                               for k in args.kinds.split(",")},
               "smallest_error_called_rough": min(rough, default=None), "seconds": time.perf_counter() - t0}
    print(f"largest error of a count given without a caution: {summary['largest_error_said_without_caution']} "
          f"(by score: {summary['largest_error_said_without_caution_by_score']}; by noise kind: "
          f"{summary['largest_error_said_without_caution_by_kind']}); smallest error of a count called rough: "
          f"{summary['smallest_error_called_rough']}")
    return saved(args, {"epochs": args.epochs, "ends": ends, "scores": scores, "rows": rows, **summary,
                        "mean_rough_error": float(np.mean(rough)) if rough else None})


if __name__ == "__main__":
    run_script(main)
