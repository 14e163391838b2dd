"""The Gram form of the Linear ghost norms (``kernels.ghost_linear``) with its Grams formed
as the upper triangle of blocks (what it does) against the whole Grams, and against the
outer form, side by side in one run, on transformer layer shapes from T = 32 to 1024.

    python -m bench.gram [--pairs 30] [--device cpu|cuda] [--json bench/results/gram_cpu.json --overwrite]
    python -m bench.gram --rounding [--json bench/results/gram_rounding_cpu.json --overwrite]

Both Grams a aᵀ and δ δᵀ are symmetric: k row blocks need k(k + 1)/2 of the k² block
products, (k + 1)/(2k) of the flops. A row gives k (``gram_blocks``'s CPU rule, timed on
either device), the median ratio of blocked to whole over the pairs with its quartiles,
the same for the outer form (on CUDA its Triton kernel), and the form ``plan`` picks on
the device: the data behind ``MIN_BLOCKED_T`` and ``BLOCK_ROWS``, and behind keeping
whole Grams on CUDA until measured (the GPU kit runs this).

``--rounding`` measures instead what the float32 Gram form keeps of a result whose terms
cancel: positions in pairs (a, δ), (a + ε n, −δ), so ‖g_b‖² is a small share of its terms
Σ_t ‖a_t‖²‖δ_t‖². A row gives the median share, the largest relative error of the float32
Grams (with the float64 rerun of ``cancellation_checked`` off) and k = error · share / u:
the constant of ``cancelled_share``.
"""
from __future__ import annotations

import argparse
import math
import statistics
from unittest import mock

import torch

from bench.engines import device_name, pair_ratios, parsed, run_script, write_results
from gradscore._version import __version__
from gradscore.kernels import ghost_linear as kernel
from gradscore.kernels.ghost_linear import _gram_sq, ghost_linear, gram_blocks, plan, workspace_bytes

#: (B, T, d_in, d_out): a d = 128 transformer's attention and MLP layers, GPT-2 small's at longer T
CASES = [(64, 32, 128, 128), (64, 64, 128, 128), (64, 64, 512, 128), (16, 128, 256, 256),
         (8, 256, 256, 768), (4, 512, 768, 768), (2, 1024, 768, 768), (2, 1024, 768, 3072)]


def run_bench(pairs: int = 30, echo=print, device: str = "cpu", cases: list | None = None) -> dict:
    """Rows: blocked / whole and outer / whole, median [quartiles] over ``pairs``."""
    torch.manual_seed(0)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for B, T, d_in, d_out in CASES if cases is None else cases:
        a, d = torch.randn(B, T, d_in, device=device), torch.randn(B, T, d_out, device=device)
        budget = workspace_bytes(a, d)
        blocks, whole = gram_blocks(T), [slice(0, T)]
        row = {"shape": [B, T, d_in, d_out], "blocks": len(blocks), "plan": plan(T, d_in, d_out, 0, cuda=cuda)}
        for name, fn in (("blocked", lambda: _gram_sq(a, d, budget, blocks)),
                         ("outer", lambda: ghost_linear(a, d, None, form="outer"))):
            fn()   # warm-up: the Triton kernel's first call compiles it
            ratios, _, _ = pair_ratios(fn, lambda: _gram_sq(a, d, budget, whole), pairs, sync, alternate=True)
            q1, median, q3 = statistics.quantiles(ratios, n=4)
            row[f"{name}_to_whole"], row[f"{name}_quartiles"] = median, [q1, q3]
        rows.append(row)
        echo(f"(B, T, d_in, d_out) = {(B, T, d_in, d_out)!s:<22} k = {row['blocks']:<2} "
             f"blocked / whole {row['blocked_to_whole']:.2f} [{row['blocked_quartiles'][0]:.2f}-"
             f"{row['blocked_quartiles'][1]:.2f}]  outer / whole {row['outer_to_whole']:.2f}  plan: {row['plan']}")
    return {"device": device,
            "device_name": device_name("cuda" if cuda else "cpu"),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "gradscore": __version__,
            "pairs": pairs, "rows": rows}


#: (d_in, d_out) of the rounding rows, each at P = 1, 4, 32 pairs and ε = 10⁻¹, 10⁻², 10⁻³
ROUNDING_WIDTHS = [(64, 64), (128, 512), (768, 3072), (16, 2048)]


def run_rounding(echo=print, B: int = 64) -> dict:
    """Rows: the float32 Gram form's largest relative error at a share of its terms (module
    docstring), against the float64 Gram of the same float32 inputs."""
    torch.manual_seed(0)
    u = torch.finfo(torch.float32).eps / 2
    rows = []
    for d_in, d_out in ROUNDING_WIDTHS:
        for P in (1, 4, 32):
            for eps in (1e-1, 1e-2, 1e-3):
                a = torch.randn(B, P, d_in, dtype=torch.float64) * torch.rand(B, P, 1, dtype=torch.float64) * 10
                d = torch.randn(B, P, d_out, dtype=torch.float64)
                near = a + eps * torch.randn_like(a) * a.norm(dim=2, keepdim=True) / math.sqrt(d_in)
                a32, d32 = torch.cat([a, near], 1).float(), torch.cat([d, -d], 1).float()
                want = _gram_sq(a32.double(), d32.double(), 2**30)
                with mock.patch.object(kernel, "cancelled_share", lambda dtype: 0.0):   # the float32 rows as formed
                    got = _gram_sq(a32, d32, 2**30).double()
                share = want / (a32.double().pow(2).sum(2) * d32.double().pow(2).sum(2)).sum(1)
                error = (got - want).abs() / want
                row = {"d_in": d_in, "d_out": d_out, "pairs": P, "eps": eps, "share": float(share.median()),
                       "max_relative_error": float(error.max()), "k": float((error * share).max() / u)}
                rows.append(row)
                echo(f"(d_in, d_out) = {(d_in, d_out)!s:<12} pairs {P:<3} share {row['share']:.1e}  "
                     f"largest error {row['max_relative_error']:.1e}  k {row['k']:.1f}")
    k = max(r["k"] for r in rows)
    echo(f"largest k {k:.1f}: at cancelled_share (float32: {kernel.cancelled_share(torch.float32):.3f}) the "
         f"error is at most {k * u / kernel.cancelled_share(torch.float32):.1e} (GRAM_RTOL {kernel.GRAM_RTOL:.0e})")
    return {"device": "cpu", "device_name": device_name("cpu"), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "gradscore": __version__, "examples": B, "largest_k": k, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gram", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=30, help="timed pairs per shape; the median ratio is kept")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the Grams are formed")
    p.add_argument("--rounding", action="store_true",
                   help="measure the float32 Gram form's rounding where its terms cancel, not its time (CPU)")
    args = parsed(p, argv)
    result = run_rounding() if args.rounding else run_bench(args.pairs, device=args.device)
    if args.json:
        write_results(args.json, result)
    return 0


if __name__ == "__main__":
    run_script(main)
