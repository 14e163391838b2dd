"""Per-example gradient engines, side by side in one run.

1. End to end: `gradscore run` (the Python `run`) on the demo setup (digits, digits_cnn,
   checkpoints of a short training run), engine vmap vs loop vs forward-only (el2n),
   in examples x checkpoints per second.
2. The hot path alone: Scorer.score_batch per engine vs one plain batched
   forward+backward of the summed loss (the cost floor), as a ratio.

    python bench/engines.py [--epochs 3] [--repeats 3] [--json bench/results/engines_cpu.json]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import best_time, save_json  # noqa: E402

import gradscore as gs
from gradscore.demo import make_digits, train
from gradscore.models import digits_cnn


def end_to_end(epochs: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_digits()
        path = gs.save_dataset(tmp / "train.h5", data["x_train"], data["y_train"], noisy=data["noisy"])
        train(data, tmp / "ckpts", epochs=epochs)
        work = len(data["y_train"]) * epochs
        res = {}
        for label, opts in [("vmap", {"engine": "vmap"}), ("loop", {"engine": "loop"}),
                            ("forward_only_el2n", {"scores": ("el2n", "loss")})]:
            sec = best_time(lambda: gs.score(tmp / "ckpts", path, out=tmp / f"{label}.h5",
                                         overwrite=True, progress=False, **opts),
                            repeats, warmup=False)
            res[label] = {"seconds": sec, "examples_per_second": work / sec}
        res["vmap_over_loop_speedup"] = res["vmap"]["examples_per_second"] / res["loop"]["examples_per_second"]
        res["examples_x_checkpoints"] = work
        return res


def hot_path(batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = digits_cnn().eval()
    x, y = torch.rand(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(2, P)

    def plain():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()

    base = best_time(plain, repeats)
    out = {"batch": batch, "params": P, "plain_fwd_bwd_seconds": base}
    for engine in ("vmap", "loop"):
        scorer = gs.Scorer(model, engine=engine)
        sec = best_time(lambda: scorer.score_batch(x, y, refs=V), repeats)
        out[engine] = {"seconds": sec, "ratio_to_plain_fwd_bwd": sec / base}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "end_to_end": end_to_end(args.epochs, args.repeats),
              "hot_path": hot_path(args.batch, args.repeats)}
    e2e, hp = result["end_to_end"], result["hot_path"]
    print(f"end to end (`run`, digits_cnn, {e2e['examples_x_checkpoints']} examples x checkpoints):")
    for k in ("vmap", "loop", "forward_only_el2n"):
        print(f"  {k:<18} {e2e[k]['examples_per_second']:>10.0f} ex/s  ({e2e[k]['seconds']:.2f}s)")
    print(f"  vmap / loop speed-up: {e2e['vmap_over_loop_speedup']:.1f}x")
    print(f"hot path (B={hp['batch']}, P={hp['params']}, K=2), time / plain batched fwd+bwd:")
    for k in ("vmap", "loop"):
        print(f"  {k:<18} {hp[k]['ratio_to_plain_fwd_bwd']:>8.1f}x")
    save_json(result, args.json)


if __name__ == "__main__":
    main()
