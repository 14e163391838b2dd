"""Gradient sketches' cost, as ratios measured side by side in one run (CPU or CUDA).

    python -m bench.sketch [--dim 8192] [--repeats 3] [--json bench/results/sketch_cpu.json --overwrite]

- ``sketch``: one batch's sketches (``Scorer.sketch_batch``) against the same batch's
  plain forward + backward of Σ ℓ_b (MLP 784-1024-1024-10 at B = 256, the d = 128
  transformer at B = 64), and against ``vmap`` materializing the per-example gradients
  alone (B, P), before any projection: the first half of materialize-then-project, which
  TRAK's library does (its dense projection of P = 1.9M at k = 8192 would cost another
  2·B·P·k flops per batch);
- ``attribute``: the blocked scoring of 1,000 queries against N sketched rows
  (``attribute.block_scores`` and the top-k) as a fraction of one plain float32 GEMM of
  the same shape, timed in the same run.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

import gradscore as gs
from bench.engines import _inputs, model_cases
from gradscore._version import __version__
from gradscore.io.outputs import claim
from gradscore.sketches.attribute import TopK, block_scores

CASES = {"mlp_784_1024_1024": 256, "transformer_d128_T64": 64}


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def sketch_rows(dim: int, repeats: int, device: str) -> list[dict]:
    rows = []
    for name, B in CASES.items():
        case = model_cases(device)[name]
        torch.manual_seed(0)
        model = case.factory().to(device).eval()
        x, y, _ = _inputs(case, model, B, device)
        scorer = gs.Scorer(model, loss=case.loss)
        proj = gs.Projection.for_model(model, scorer.param_names, dim)
        params = dict(model.named_parameters())
        loss_fn = scorer.loss.fn

        def plain():
            torch.autograd.grad(loss_fn(model(x), y).sum(), list(params.values()))

        def one(p, xb, yb):
            return loss_fn(functional_call(model, p, (xb[None],)), yb[None]).sum()
        per_example = vmap(grad(one), in_dims=(None, 0, 0))
        detached = {n: p.detach() for n, p in params.items()}
        t_plain = _best(plain, repeats)
        t_sketch = _best(lambda: scorer.sketch_batch(x, y, proj), repeats)
        t_vmap = _best(lambda: per_example(detached, x, y), repeats)
        rows.append({"model": name, "batch": B, "dim": proj.dim, "plain_s": t_plain, "sketch_s": t_sketch,
                     "sketch_ratio": t_sketch / t_plain, "vmap_materialize_s": t_vmap,
                     "vmap_ratio": t_vmap / t_plain,
                     "kron_share": sum(b.k for b in proj.spec.blocks if b.kind == "kron") / proj.dim})
    return rows


def attribute_row(dim: int, n_train: int, n_query: int, block: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    S = torch.randn(n_train, dim, generator=g).to(torch.float16).numpy()
    W = torch.randn(dim, n_query, generator=g) / dim ** 0.5
    S32 = torch.from_numpy(S.astype(np.float32))

    def blocked():
        top = TopK(n_query, 20)
        for a in range(0, n_train, block):
            top.add(block_scores([S[a:a + block]], [W]), a)

    t_gemm = _best(lambda: S32 @ W, repeats)
    t_blocked = _best(blocked, repeats)
    return {"n_train": n_train, "n_query": n_query, "dim": dim, "block": block, "gemm_s": t_gemm,
            "attribute_s": t_blocked, "fraction_of_gemm": t_gemm / t_blocked,
            "gemm_gflops": 2 * n_train * n_query * dim / t_gemm / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sketch", description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=8192, help="sketch dimension k")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (best is kept)")
    p.add_argument("--n-train", type=int, default=20000, help="sketched rows in the attribution timing")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    args = p.parse_args(argv)
    if args.json:
        claim(args.json, "json", overwrite=args.overwrite)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = sketch_rows(args.dim, args.repeats, device)
    for r in rows:
        print(f"{r['model']:<22} B={r['batch']:<4} k={r['dim']}: sketch {r['sketch_ratio']:.2f}x plain fwd+bwd; "
              f"vmap materialization alone {r['vmap_ratio']:.2f}x")
    att = attribute_row(args.dim, args.n_train, 1000, 8192, args.repeats)
    print(f"attribute 1000 queries x {att['n_train']} rows, k={att['dim']}: {att['fraction_of_gemm']:.0%} of a plain "
          f"float32 GEMM ({att['gemm_gflops']:.0f} GFLOP/s)")
    result = {"device": device, "device_name": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "gradscore": __version__,
              "sketch": rows, "attribute": att}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
