"""How the normalization rules form x̂: the two-pass standardize they use for GroupNorm
and InstanceNorm against ``var_mean`` (what they used before), and for LayerNorm
against torch's fused ``layer_norm`` (what its rule keeps in float64 and off the CPU),
side by side in one run; and, for LayerNorm in float32 on CPU, the rule's fused numba
pass that forms γ's and β's per-example gradients against ``layer_norm`` followed by the
product and the sums over positions.

    python -m bench.norm_rules [--pairs 200] [--json bench/results/norm_rules_cpu.json --overwrite]

Each pair times the two forms back to back, in alternating order, after allocating and
freeing 8 MB of other tensors, as a rule runs between the backward's own ops (a tight
loop over one input alone keeps caches and the allocator warm and flatters composite
ops); a row is the median of the pairs' ratios with its quartiles.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch
from torch.nn import functional as F

from bench.engines import device_name, pair_ratios, parsed, run_script, write_results
from gradscore._version import __version__
from gradscore.engines.rules.norm import _standardize
from gradscore.kernels.norm_affine_numba import norm_affine_numba

EPS = 1e-5


def _var_mean(x: torch.Tensor, d: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + EPS)


def _two_pass(x: torch.Tensor, d: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return _standardize(x, dims, EPS)


def _layer_norm(x: torch.Tensor, d: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return F.layer_norm(x, x.shape[dims[0]:], eps=EPS)   # dims: the trailing ones, negative


def _grads_fused(x: torch.Tensor, d: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """γ's and β's per-example gradients (B, 2, D) of a LayerNorm over the last dim, x (B, T, D)."""
    return torch.stack(norm_affine_numba(x, d, EPS), 1)


def _grads_composite(x: torch.Tensor, d: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([(d * _layer_norm(x, d, dims)).sum(1), d.sum(1)], 1)


#: (layer, input shape, normalized dims, the rule's form, the other form); each form is
#: f(x, δ, dims): x̂, or the per-example gradients where the rule forms them at once
CASES: list[tuple[str, tuple[int, ...], tuple[int, ...], Callable, Callable]] = [
    ("GroupNorm 8 groups, 128 ch 8x8", (64, 8, 16 * 8 * 8), (2,), _two_pass, _var_mean),
    ("GroupNorm 32 groups, 64 ch 32x32", (32, 32, 2 * 32 * 32), (2,), _two_pass, _var_mean),
    ("InstanceNorm 16 ch 8x8", (64, 16, 8, 8), (2, 3), _two_pass, _var_mean),
    ("LayerNorm d=128, T=64", (64, 64, 128), (-1,), _layer_norm, _two_pass),
    ("LayerNorm d=64, T=128 (GPT-2)", (32, 128, 64), (-1,), _layer_norm, _two_pass),
    ("LayerNorm γ,β grads d=128, T=64", (64, 64, 128), (-1,), _grads_fused, _grads_composite),
    ("LayerNorm γ,β grads d=64, T=128", (32, 128, 64), (-1,), _grads_fused, _grads_composite),
]


def _other_work() -> None:
    """8 MB allocated, filled and freed, as a backward's own ops do between two rules."""
    junk = [torch.empty(256, 1024).normal_() for _ in range(8)]
    del junk


def run_bench(pairs: int = 200, echo=print) -> dict:
    """Rows: the rule's form / the other form, median [quartiles] over ``pairs``."""
    torch.manual_seed(0)
    rows = []
    for name, shape, dims, ours, other in CASES:
        x, d = torch.randn(*shape) * 3 + 1, torch.randn(*shape)
        ratios, _, _ = pair_ratios(lambda: ours(x, d, dims), lambda: other(x, d, dims), pairs,
                                   between=_other_work, alternate=True)
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        rows.append({"layer": name, "shape": list(shape), "ratio_rule_form_to_other": median,
                     "quartiles": [q1, q3]})
        echo(f"{name:<34} rule's form / other: {median:.2f} [{q1:.2f}-{q3:.2f}]")
    return {"device": "cpu", "device_name": device_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "gradscore": __version__,
            "pairs": pairs, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.norm_rules", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=200, help="timed pairs per layer; the median ratio is kept")
    args = parsed(p, argv)
    result = run_bench(args.pairs)
    if args.json:
        write_results(args.json, result)
    return 0


if __name__ == "__main__":
    run_script(main)
