"""Scale of import-dynamics + metrics + export: N examples x E epochs x C classes of
generated cartography jsonl; wall time and peak RSS of each step, in one run.

    python -m bench.dynamics_scale [--n 1000000] [--epochs 5] [--classes 10] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.engines import parsed, run_script, write_results
from gradscore.io.dynamics import export_scores, import_dynamics


def generate(root: Path, n: int, epochs: int, classes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, classes, n)
    d = root / "training_dynamics"
    d.mkdir(parents=True)
    for e in range(epochs):
        logits = rng.normal(size=(n, classes)).round(4)
        logits[np.arange(n), gold] += e * 0.5
        with open(d / f"dynamics_epoch_{e}.jsonl", "w") as f:
            for i in range(n):
                f.write('{"guid": %d, "logits_epoch_%d": [%s], "gold": %d}\n'
                        % (i, e, ", ".join(map(str, logits[i])), gold[i]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--classes", type=int, default=10)
    args = parsed(ap, argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        generate(root, args.n, args.epochs, args.classes)
        t_gen = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (root / "training_dynamics").iterdir())
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        import_dynamics(root, root / "scores.h5")
        t_imp = time.perf_counter() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        export_scores(root / "scores.h5", root / "td.jsonl", fmt="td_metrics")
        t_exp = time.perf_counter() - t0
        rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {"n": args.n, "epochs": args.epochs, "classes": args.classes, "jsonl_bytes": size,
           "generate_s": t_gen, "import_and_metrics_s": t_imp, "export_td_metrics_s": t_exp,
           "peak_rss_mb_before_import": rss0, "peak_rss_mb_after_import": rss1, "peak_rss_mb_after_export": rss2}
    print(json.dumps(res, indent=2))
    if args.json:
        write_results(args.json, res, indent=2)


if __name__ == "__main__":
    run_script(main)
