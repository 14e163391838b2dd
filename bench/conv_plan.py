"""Every form of the ghost conv rule timed on a set of conv layers, against the plan's pick:
the check (and the data for a refit) of the constants in
gradscore/engines/rules/conv_costs.py.

    python -m bench.conv_plan [--batch 64] [--refs 2] [--repeats 5] [--json FILE]

Each layer is scored in a model conv → ReLU → mean → linear head (the head's cost is the
same for every form). For each layer: the time of ``score_batch`` with each form forced,
the fastest, the form the plan takes, and how much slower than the fastest it is.
"""
from __future__ import annotations

import argparse
from unittest import mock

import torch
from torch import nn

import gradscore as gs
from bench.engines import best_time, device_name, parsed, run_script, write_results
from gradscore.engines.rules import conv

#: (name, C_in, C_out, kernel, stride, image side, groups)
LAYERS = [("first_8px", 1, 16, 3, 1, 8, 1), ("digits_2nd", 16, 32, 3, 1, 8, 1), ("first_32px", 3, 16, 3, 1, 32, 1),
          ("strided_32px", 16, 32, 3, 2, 32, 1), ("depthwise_16px", 32, 32, 3, 1, 16, 32),
          ("pointwise_16px", 32, 64, 1, 1, 16, 1), ("resnet_32px", 16, 16, 3, 1, 32, 1)]
FORMS = ("outer", "gram", "grouped", "pixel", "sparse")


def _model(c_in: int, c_out: int, k: int, stride: int, groups: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_out, 10))


def measure(batch: int, K: int, repeats: int) -> list[dict]:
    rows = []
    for name, c_in, c_out, k, stride, side, groups in LAYERS:
        torch.manual_seed(0)
        model = _model(c_in, c_out, k, stride, groups).eval()
        x, y = torch.randn(batch, c_in, side, side), torch.randint(0, 10, (batch,))
        scorer = gs.Scorer(model, engine="ghost")
        refs = torch.randn(K, scorer.num_params)
        picked = []
        real_plan = conv.plan

        def spy(*args, **kwargs):
            picked.append(real_plan(*args, **kwargs))
            return picked[-1]
        with mock.patch.object(conv, "plan", spy):
            scorer.score_batch(x, y, refs)
        times = {}
        for form in FORMS:
            with mock.patch.object(conv, "plan", lambda *a, form=form, **kw: form):
                scorer.score_batch(x, y, refs)   # warm-up (numba compiles once)
                times[form] = best_time(lambda: scorer.score_batch(x, y, refs), repeats)
        fastest = min(times, key=times.get)
        rows.append({"layer": name, "times_s": times, "fastest": fastest, "plan": picked[0],
                     "plan_over_fastest": times[picked[0]] / times[fastest]})
        print(f"{name:<16} " + "  ".join(f"{f} {t * 1e3:7.2f} ms" for f, t in times.items())
              + f"   plan {picked[0]:<8} {rows[-1]['plan_over_fastest']:.2f}x the fastest ({fastest})")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="examples per call")
    ap.add_argument("--refs", type=int, default=2, help="reference vectors K")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per form (best kept)")
    args = parsed(ap, argv)
    rows = measure(args.batch, args.refs, args.repeats)
    mean = sum(r["plan_over_fastest"] for r in rows) / len(rows)
    print(f"plan's pick: {mean:.2f}x the fastest form on average over {len(rows)} layers")
    if args.json:
        write_results(args.json, {"device": device_name(),
                                  "threads": torch.get_num_threads(), "batch": args.batch, "refs": args.refs,
                                  "rows": rows}, indent=2)


if __name__ == "__main__":
    run_script(main)
