"""Per-example gradient engines vs one plain forward+backward (see gradscore/bench.py),
plus end-to-end `run` throughput on the demo setup, in one run.

    python bench/engines.py [--batches 64,256] [--json bench/results/engines_cpu.json]

Peers (optional): pip install -c <(pip freeze | grep '^torch==') opacus einops unfoldNd
and pip install --no-deps backpack-for-pytorch (pinning torch so pip never swaps it).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import gradscore as gs
from gradscore.bench import run_bench
from gradscore.demo import make_digits, train

sys.path.insert(0, str(Path(__file__).parent))
from common import best_time, save_json  # noqa: E402


def end_to_end(epochs: int, repeats: int) -> dict:
    """examples x checkpoints per second of `run` on the demo CNN, per engine."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_digits()
        path = gs.save_dataset(tmp / "train.h5", data["x_train"], data["y_train"], noisy=data["noisy"])
        train(data, tmp / "ckpts", epochs=epochs)
        work = len(data["y_train"]) * epochs
        res: dict = {"examples_x_checkpoints": work}
        for label, opts in [("ghost", {"engine": "ghost"}), ("vmap", {"engine": "vmap"}),
                            ("loop", {"engine": "loop"}), ("forward_only_el2n", {"scores": ("el2n", "loss")})]:
            sec = best_time(lambda: gs.score(tmp / "ckpts", path, out=tmp / f"{label}.h5", overwrite=True,
                                             progress=False, **opts), repeats, warmup=False)
            res[label] = {"seconds": sec, "examples_per_second": work / sec}
            print(f"  run --engine {label:<18} {work / sec:>9.0f} ex/s  ({sec:.2f}s)")
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="demo checkpoints for the end-to-end part")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = run_bench(tuple(int(b) for b in args.batches.split(",")), args.repeats)
    print("\nend to end (demo digits CNN):")
    result["end_to_end"] = end_to_end(args.epochs, args.repeats)
    save_json(result, args.json)


if __name__ == "__main__":
    main()
