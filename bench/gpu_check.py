"""GPU validation kit: one prepared command that proves the CUDA paths and comes back with
every figure, inside a time budget.

    pip install --no-deps -e .                     # optional (offline: --no-build-isolation), over its own torch
    python -m bench.gpu_check [--budget-s 420]     # -> bench/results/gpu_<device>.{json,md}
    python -m bench.gpu_check --dry-run --out DIR  # CPU, tiny sizes, Triton's interpreter (CI)

Steps, each skipped with a line once the budget is spent (the results so far are
written after every step, so a kill leaves them too):

1. ``tests``: ``pytest -m cuda`` (tests/test_cuda.py and the other CUDA-marked tests):
   every Triton kernel against the torch reference, the engines against the loop on CUDA.
2. ``inrun_sketch``: ``bench.inrun`` (the in-run recorder against the same training
   steps, and the torch ops, kernel launches and device waits of one step) and
   ``bench.sketch`` (gradient sketches against a plain forward+backward) on the MLP,
   the transformer and GPT-2; the in-run recorder also on GPT-2 with a
   vocabulary of 32768, whose loss terms take the generic path on CUDA. It runs before
   the long steps, so the open issue's figures come back first.
3. ``gram``: ``bench.gram`` on CUDA: the Linear rules' Gram form with its Grams in blocks
   against whole Grams (what CUDA uses until this measures where blocks win) and the
   outer form, T = 32 to 1024.
4. ``bandwidth``: ``norm_dot``'s read bandwidth, Triton kernel and torch reference,
   against a device-to-device copy of the same bytes timed in the same run; then a sweep
   of ``launch_config``'s block sizes with the best configuration per shape.
5. ``engines``: ``bench.engines`` (plain forward+backward, ghost K = 0/2, vmap + fused,
   the loop, Opacus and BackPACK when installed) at batch 64, 256 and 1024, with
   ``torch.cuda.max_memory_allocated`` for memory.
6. ``torchrun``: a 2-process NCCL ``gradscore run`` against one process, bit for bit,
   where the machine has two GPUs or more.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # `python bench/gpu_check.py` as well as `python -m bench.gpu_check`
    sys.path.insert(0, str(ROOT))


class Budget:
    """Seconds left before ``limit_s`` from now; a step asks before it starts."""

    def __init__(self, limit_s: float) -> None:
        self.start, self.limit = time.monotonic(), limit_s

    @property
    def left(self) -> float:
        return self.limit - (time.monotonic() - self.start)


class Sizes:
    """What each step runs: the real sizes on a GPU, tiny ones for a dry run on CPU."""

    def __init__(self, dry_run: bool) -> None:
        self.device = "cpu" if dry_run else "cuda"
        # the dry run collects one file of CUDA tests (they skip): the whole suite's collection takes 10 s
        self.tests = "tests/test_cuda.py" if dry_run else "tests"
        # the first two: blocks of a small layer, where a call is its launch (CUDA_SMALL_BLOCK's rows);
        # the next two: 2 and 8 times CUDA_SMALL_BLOCK, where torch and the kernel may cross
        self.shapes = [(8, 1000)] if dry_run else [(256, 1024), (4096, 1024), (1024, 8192), (256, 1 << 17),
                                                   (64, 1 << 20), (256, 1 << 20), (1024, 1 << 18)]
        self.dtypes = ["float32"] if dry_run else ["float32", "bfloat16"]
        self.refs = [0, 2]
        self.repeats = 1 if dry_run else 20
        self.sweep = ({"BLOCK_B": [16], "BLOCK_P": [128, 256], "num_warps": [4], "split": [1.0]} if dry_run else
                      {"BLOCK_B": [16, 32, 64], "BLOCK_P": [128, 256, 512], "num_warps": [4, 8],
                       "split": [0.5, 1.0, 2.0]})
        self.models = ["digits_cnn"] if dry_run else ["mlp_784_1024_1024", "digits_cnn", "digits_cnn_c128",
                                                      "cifar_cnn_dw", "transformer_d128_T64", "resnet_bn_20k",
                                                      "lstm_d64_T32", "gpt2_d64_T128"]
        self.batches = [4] if dry_run else [64, 256, 1024]
        self.engine_repeats = 1 if dry_run else 3
        self.inrun_cases = ([("mlp_784_1024_1024", 8)] if dry_run else
                            [("mlp_784_1024_1024", 256), ("transformer_d128_T64", 64), ("transformer_d128_T64", 256),
                             ("gpt2_d64_T128", 32),
                             # a step whose GPU work outlasts its launches: the recorder's own GPU time shows
                             ("transformer_d128_T64", 2048)])
        # in-run only: a real vocabulary, whose loss terms take the generic path on CUDA
        self.inrun_vocab_cases = [] if dry_run else [("gpt2_d64_T128_V32768", 16)]
        self.sketch_dim = 256 if dry_run else 8192
        # bench.sketch's own cases (a classifier's: the GPT-2 above is a language model, which sketches refuse)
        self.sketch_cases = {"mlp_784_1024_1024": 8} if dry_run else None
        # bench.gram's shapes (None: its own) and pairs
        self.gram_cases = [(2, 50, 8, 6)] if dry_run else None
        self.gram_pairs = 2 if dry_run else 30


def step_tests(sizes: Sizes, budget: Budget) -> dict[str, Any]:
    """``pytest -m cuda``: its summary line and exit code (5: nothing collected)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", sizes.tests]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30.0, budget.left - 60))
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "command": " ".join(cmd[2:])}
    lines = done.stdout.strip().splitlines()
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)), "")
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"status": "ok" if done.returncode == 0 else f"exit code {done.returncode}", "summary": summary.strip("= "),
            "failed": failed[:30], "command": " ".join(cmd[2:])}


def _timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Best of ``repeats`` after one warm-up call (compiles the kernel for this shape)."""
    from bench.engines import best_time
    fn()
    sync()
    return best_time(fn, repeats, sync)


def _config(B: int, P: int, n_sm: int, K: int, block_b: int, block_p: int, warps: int, split: float
            ) -> dict[str, int]:
    """``launch_config``'s default with other block sizes, and ``split`` times its P splits."""
    import triton

    from gradscore.kernels.norm_dot_triton import launch_config
    base = launch_config(B, P, n_sm, K)
    n_split = max(1, int(round(base["n_split"] * split)))
    split_p = triton.cdiv(triton.cdiv(P, n_split), block_p) * block_p
    return {"BLOCK_B": block_b, "BLOCK_P": block_p, "num_warps": warps, "n_split": triton.cdiv(P, split_p),
            "split_p": split_p}


def step_bandwidth(sizes: Sizes, budget: Budget) -> dict[str, Any]:
    """Read bandwidth of norm_dot (Triton, torch reference) against a copy of G's bytes,
    then the best of the swept launch configurations per shape."""
    import torch

    from gradscore.kernels import norm_dot_reference
    from gradscore.kernels.norm_dot_triton import _sm_count, launch_config, norm_dot_triton
    sync = torch.cuda.synchronize if sizes.device == "cuda" else (lambda: None)
    rows, sweep = [], []
    for B, P in sizes.shapes:
        for dtype in sizes.dtypes:
            G = torch.randn(B, P, device=sizes.device).to(getattr(torch, dtype))
            copy = torch.empty_like(G)
            gbytes = G.numel() * G.element_size() / 1e9
            t_copy = _timed(lambda: copy.copy_(G), sizes.repeats, sync)
            for K in sizes.refs:
                if budget.left < 60:
                    return {"rows": rows, "sweep": sweep, "stopped": "out of time budget"}
                V = torch.randn(K, P, device=sizes.device).to(G.dtype) if K else None
                t_triton = _timed(lambda: norm_dot_triton(G, V), sizes.repeats, sync)
                t_torch = _timed(lambda: norm_dot_reference(G, V), sizes.repeats, sync)
                rows.append({"B": B, "P": P, "dtype": dtype, "K": K, "copy_GBps": 2 * gbytes / t_copy,
                             "triton_read_GBps": gbytes / t_triton, "torch_read_GBps": gbytes / t_torch,
                             "triton_over_copy": (gbytes / t_triton) / (2 * gbytes / t_copy),
                             "config": launch_config(B, P, _sm_count(G.device), K)})
            n_sm = _sm_count(G.device)
            V = torch.randn(2, P, device=sizes.device).to(G.dtype)
            want = norm_dot_reference(G, V)
            timed = []
            for bb in sizes.sweep["BLOCK_B"]:
                for bp in sizes.sweep["BLOCK_P"]:
                    for w in sizes.sweep["num_warps"]:
                        for split in sizes.sweep["split"]:
                            if budget.left < 60:
                                break
                            cfg = _config(B, P, n_sm, len(V), bb, bp, w, split)
                            try:
                                got = norm_dot_triton(G, V, config=cfg)
                            except Exception as e:  # noqa: BLE001 - a block too large for the chip's shared memory
                                timed.append({**cfg, "failed": f"{type(e).__name__}: {str(e)[:120]}"})
                                continue
                            tol = 1e-4 if G.dtype == torch.float32 else 2e-2
                            ok = bool(torch.allclose(got[0], want[0], rtol=tol, atol=tol))
                            t = _timed(lambda: norm_dot_triton(G, V, config=cfg), sizes.repeats, sync)
                            timed.append({**cfg, "seconds": t, "read_GBps": gbytes / t, "correct": ok})
            good = [c for c in timed if c.get("correct")]
            default = launch_config(B, P, n_sm, len(V))
            if good:
                best = min(good, key=lambda c: c["seconds"])
                failed = sum("failed" in c for c in timed)
                sweep.append({"B": B, "P": P, "dtype": dtype, "default": default, "best": best, "tried": len(timed),
                              "incorrect": len(timed) - len(good) - failed, "failed_to_launch": failed})
    return {"rows": rows, "sweep": sweep}


def step_engines(sizes: Sizes, budget: Budget) -> dict[str, Any]:
    """bench.engines on each model and batch, breadth first (every model at the smallest
    batch before the next batch), until the budget is spent."""
    from bench.engines import run_bench
    rows, skipped = [], []
    for B in sizes.batches:
        for name in sizes.models:
            if budget.left < 60:
                skipped.append(f"{name} batch {B}")
                continue
            try:
                res = run_bench((B,), sizes.engine_repeats, device=sizes.device, models=(name,), echo=lambda _: None)
            except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end of the kit
                rows.append({"model": name, "batch": B, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            rows += res["rows"]
    return {"rows": rows, "skipped_for_time": skipped}


def step_inrun_sketch(sizes: Sizes, budget: Budget) -> dict[str, Any]:
    """bench.inrun (the in-run recorder's overhead on training steps) and bench.sketch
    (sketching against a plain forward+backward) on the device."""
    from bench.inrun import op_counts
    from bench.inrun import run_bench as inrun_bench
    from bench.sketch import sketch_rows
    if budget.left < 90:
        return {"status": "skipped: out of time budget"}
    out: dict[str, Any] = {}
    try:
        out["ops"] = [{"model": name, "batch": B, **{f"{method}_{k}": v for method, counts in
                                                     op_counts(name, B, sizes.device).items()
                                                     for k, v in counts.items()}}
                      for name, B in sizes.inrun_cases[:2]]
        out["inrun"] = inrun_bench(sizes.engine_repeats, sizes.device, echo=lambda _: None,
                                   cases=sizes.inrun_cases + sizes.inrun_vocab_cases)["rows"]
        out["sketch"] = sketch_rows(sizes.sketch_dim, sizes.engine_repeats, sizes.device, cases=sizes.sketch_cases)
    except Exception as e:  # noqa: BLE001 - a failure is a result, not the end of the kit
        out["status"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    return out


def step_gram(sizes: Sizes, budget: Budget) -> dict[str, Any]:
    """bench.gram on the device: blocked Grams against whole ones and the outer form."""
    from bench.gram import run_bench
    if budget.left < 60:
        return {"status": "skipped: out of time budget"}
    try:
        return {"rows": run_bench(sizes.gram_pairs, echo=lambda _: None, device=sizes.device,
                                  cases=sizes.gram_cases)["rows"]}
    except Exception as e:  # noqa: BLE001 - a failure is a result, not the end of the kit
        return {"status": f"failed: {type(e).__name__}: {str(e)[:200]}"}


def step_torchrun(sizes: Sizes, budget: Budget) -> dict[str, Any]:
    """2 NCCL ranks against one process on the same generated run, compared bit for bit."""
    import numpy as np
    import torch

    import gradscore as gs
    from gradscore.demos.models import mlp
    if sizes.device != "cuda" or torch.cuda.device_count() < 2:
        return {"status": f"skipped: {torch.cuda.device_count()} GPU(s), the NCCL check needs 2"}
    if budget.left < 90:
        return {"status": "skipped: out of time budget"}
    work = Path(tempfile.mkdtemp(prefix="gradscore_gpu_check_"))
    try:
        kwargs = {"d_in": 32, "hidden": 64, "n_classes": 10, "depth": 2}
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(5000, 32, generator=g), torch.randint(0, 10, (5000,), generator=g)
        data = gs.save_dataset(work / "train.h5", x.numpy(), y.numpy())
        model = mlp(**kwargs)
        with gs.CheckpointWriter(work / "ckpts", model_factory="gradscore.demos.models:mlp", model_kwargs=kwargs) as w:
            for t in range(3):
                w.save(model, step=t, lr=0.1, epoch=t)
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.01)
        args = ["run", "--checkpoints", str(work / "ckpts"), "--data", str(data), "--chunk-size", "1000", "--quiet",
                "--device", "cuda"]
        one = subprocess.run([sys.executable, "-m", "gradscore", *args, "--out", str(work / "one.h5")],
                             capture_output=True, text=True, timeout=budget.left - 30)
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "gradscore",
                              *args, "--distributed", "--out", str(work / "two.h5")],
                             capture_output=True, text=True, timeout=budget.left - 10)
        if one.returncode or two.returncode:
            return {"status": "failed", "stderr": (one.stderr + two.stderr)[-2000:]}
        a, b = gs.load_scores(work / "one.h5"), gs.load_scores(work / "two.h5")
        same = all(np.array_equal(a["per_checkpoint"][k], b["per_checkpoint"][k]) for k in a["per_checkpoint"])
        return {"status": "ok" if same else "differs", "bit_identical": same}
    finally:
        shutil.rmtree(work, ignore_errors=True)


STEPS: dict[str, Callable[[Sizes, Budget], dict[str, Any]]] = {
    "tests": step_tests, "inrun_sketch": step_inrun_sketch, "gram": step_gram, "bandwidth": step_bandwidth,
    "engines": step_engines, "torchrun": step_torchrun}


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table, after an empty line: ``headers``, then one line per row of cells."""
    return ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables, for bench/README.md and the closing note."""
    env = result["environment"]
    out = [f"# GPU check: {result['device']}", "",
           "; ".join(f"{k} {v}" for k, v in env.items() if k != "kernels")
           + "; kernels " + ", ".join(f"{k}: {v}" for k, v in env["kernels"].items()), "",
           f"- tests: {result.get('tests', {}).get('summary') or result.get('tests', {}).get('status', 'not run')}"]
    for name in STEPS:
        if name in result and "status" in result[name] and name != "tests":
            out.append(f"- {name}: {result[name]['status']}")
    bw = result.get("bandwidth", {})
    if bw.get("rows"):
        out += _table(["B", "P", "dtype", "K", "copy GB/s", "Triton read GB/s", "torch read GB/s", "Triton / copy"],
                      [[r["B"], r["P"], r["dtype"], r["K"], f"{r['copy_GBps']:.0f}", f"{r['triton_read_GBps']:.0f}",
                        f"{r['torch_read_GBps']:.0f}", f"{r['triton_over_copy']:.2f}"] for r in bw["rows"]])
    if bw.get("sweep"):
        out += ["", "| B | P | dtype | default (B, P, warps, splits) | best | best read GB/s | incorrect configs |",
                "|---|---|---|---|---|---|---|"]
        for s in bw["sweep"]:
            d, b = s["default"], s["best"]
            out.append(f"| {s['B']} | {s['P']} | {s['dtype']} | {d['BLOCK_B']}, {d['BLOCK_P']}, {d['num_warps']}, "
                       f"{d['n_split']} | {b['BLOCK_B']}, {b['BLOCK_P']}, {b['num_warps']}, {b['n_split']} | "
                       f"{b['read_GBps']:.0f} | {s['incorrect']} |")
    gram = result.get("gram", {})
    if gram.get("rows"):
        out += _table(["Gram: (B, T, d_in, d_out)", "blocks (CPU rule)", "blocked / whole", "outer / whole", "plan"],
                      [[tuple(r["shape"]), r["blocks"], f"{r['blocked_to_whole']:.2f}", f"{r['outer_to_whole']:.2f}",
                        r["plan"]] for r in gram["rows"]])
    eng = result.get("engines", {})
    if eng.get("rows"):
        out += ["", "| model | batch | method | × plain | peak × plain |", "|---|---|---|---|---|"]
        for r in eng["rows"]:
            if "error" in r:
                out.append(f"| {r['model']} | {r['batch']} | {r.get('method', '')} | n/a ({r['error'][:60]}) | |")
            else:
                peak = r.get("peak_ratio_to_plain")
                out.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['ratio_to_plain']:.2f} | "
                           f"{'' if peak is None else f'{peak:.2f}'} |")
    extra = result.get("inrun_sketch", {})
    if extra.get("inrun"):
        out += ["", "in-run cells: time ratio to plain (floor) [counted flops ratio]", "",
                "| in-run: model | batch | norms | target every step | target every 10 |",
                "|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['batch']} | " + " | ".join(
                    "—" if m not in r else   # a vocabulary row: norms only
                    f"{r[m]['ratio']:.2f}" + (f" ({r[m]['floor']:.2f})" if r[m].get("floor") else "")
                    + (f" [{r[m]['flops_ratio']:.3f}]" if r[m].get("flops_ratio") else "")
                    for m in ("norms", "target_every1", "target_every10")) + " |"
                for r in extra["inrun"]]
    if extra.get("ops"):
        out += ["", "in-run fixed costs of one training step: torch ops dispatched (nested too), kernel launches, "
                "waits for the device", "", "| model | batch | method | torch ops | launches | waits |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['batch']} | {m} | {r[f'{m}_aten_ops']} | {r[f'{m}_launches']} | "
                f"{r[f'{m}_syncs']} |" for r in extra["ops"] for m in ("plain", "norms", "target_every1")
                if f"{m}_aten_ops" in r]
    if extra.get("sketch"):
        out += ["", "| sketch: model | batch | dim | × plain | vmap alone × plain |", "|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['batch']} | {r['dim']} | {r['sketch_ratio']:.2f} | {r['vmap_ratio']:.2f} |"
                for r in extra["sketch"]]
    return "\n".join(out) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="the same steps on CPU with tiny sizes, Triton under its interpreter (what CI runs)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting new work this many seconds after the start, and write what there is")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for gpu_<device>.json and .md")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is first imported
    import torch

    from gradscore.reports.info import environment
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; run with --dry-run to check the kit on CPU", file=sys.stderr)
        return 2
    budget, sizes = Budget(args.budget_s), Sizes(args.dry_run)
    device = "dry-run-cpu" if args.dry_run else torch.cuda.get_device_name(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_{_slug(device)}.json"
    from bench.engines import write_results
    result: dict[str, Any] = {"device": device, "dry_run": args.dry_run, "budget_s": args.budget_s,
                              "environment": environment(), "seconds": {}}
    for name in args.steps.split(","):
        if name not in STEPS:
            print(f"gpu_check: unknown step {name!r}; choose from {', '.join(STEPS)}", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        print(f"[{budget.limit - budget.left:5.0f} s] {name} …", flush=True)
        try:   # a step that breaks is recorded, and the others still run
            result[name] = STEPS[name](sizes, budget) if budget.left > 30 else {"status": "skipped: out of time budget"}
        except Exception as e:  # noqa: BLE001 - one figure lost, not the lease's others
            result[name] = {"status": f"error: {type(e).__name__}: {e}"}
            print(f"gpu_check: step {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        result["seconds"][name] = time.monotonic() - t0
        write_results(path, result, indent=2)   # after every step: a kill keeps what is done
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"-> {path}, {path.with_suffix('.md')}")
    tests = result.get("tests", {})
    return 0 if tests.get("status", "ok") == "ok" or "no tests ran" in tests.get("summary", "") else 1


if __name__ == "__main__":
    sys.exit(main())
