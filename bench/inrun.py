"""In-run scoring's overhead: training steps with ``gs.InRun`` against the same steps
without it, side by side in one run (CPU or CUDA).

    python -m bench.inrun [--repeats 15] [--json bench/results/inrun_cpu.json --overwrite]

For each model (the MLP 784-1024-1024-10 at batch 256, the d=128 transformer at T=64 (batch 64 and 256),
the demo's digits CNN, a d=128 ViT on 64 patches (its class token and position embedding
take the free-parameter rule) and, with ``transformers``, the LM demo's GPT-2 at T=128) one call
is 10 training steps (forward, mean loss, backward, SGD step), timed ``repeats`` times,
each call next to a call of the plain steps:

- ``norms``: the recorder with no target: loss, ‖∇ℓ_b‖², margins per example;
- ``target_every1`` / ``target_every10``: and the gradient of a target batch of 64
  examples (one extra forward+backward) at every step / every 10th step, with the dots.

The same GPT-2 with a vocabulary of 8192 and 32768 (batch 16) gets ``norms`` only, in
calls of 2 steps: there the (B, T, V) logits and their gradient are the step's largest
tensors, which is what its peak memory ratio shows.

A row's ``ratio`` is the median over the pairs of (recorder's call / plain call next to
it), with the quartiles beside it: the median of neighbours in time is what a noisy
machine moves least. ``floor`` is 1 + the target gradient's own time (the recorder's
target pass alone, in plain steps: the median of its pairs with plain calls) / ``every``:
what the issue's design, one extra forward+backward of the target batch, costs before
any recording. Peak memory of
one step is the rise of the resident set (CPU, measured in a child process as in
``bench.engines``) or ``torch.cuda.max_memory_allocated``, as a ratio to plain's.
``flops_ratio`` is the same call's counted matmul and convolution flops
(``bench.engines.counted_flops``) as a ratio to plain's: what a method costs before memory
traffic and per-op overhead, and without timing noise.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path
from typing import Callable

import torch

import gradscore as gs
from bench.engines import (_Memory, _inputs, counted_flops, device_name, measured_child, model_cases, pair_ratios,
                           parsed, run_script, write_results)
from gradscore._version import __version__
from gradscore.batch import call_model
from gradscore.losses import resolve_loss

#: (model, batch): the transformer at the MLP's batch too, where a target of 64 is a quarter of a step
CASES = [("mlp_784_1024_1024", 256), ("transformer_d128_T64", 64), ("transformer_d128_T64", 256),
         ("digits_cnn", 64), ("gpt2_d64_T128", 32), ("vit_d128_T64", 64)]
#: a language model with a real vocabulary (its logits are the step's largest tensors): norms only,
#: 2 steps per call (a target of 64 would time the target batch's own output layer)
VOCAB_CASES = [("gpt2_d64_T128_V8192", 16), ("gpt2_d64_T128_V32768", 16)]
STEPS = 10           # training steps per timed call
VOCAB_STEPS = 2      # ... of a VOCAB_CASES model
N_TARGET = 64
METHODS = {"plain": None, "norms": None, "target_every1": 1, "target_every10": 10}
NORMS_ONLY = {"plain": None, "norms": None}
VOCAB_MODELS = {name for name, _ in VOCAB_CASES}


def _steppers(name: str, B: int, device: str, work: Path, steps: int = STEPS,
              recorders: dict[str, gs.InRun] | None = None) -> dict[str, Callable[[], None]]:
    """{method: a call of ``steps`` training steps}, each on its own copy of the model
    (:data:`METHODS`, or :data:`NORMS_ONLY` for :data:`VOCAB_CASES`); ``recorders`` (if
    given) receives {method: its recorder}."""
    case = model_cases(device)[name]
    torch.manual_seed(0)
    base = case.factory().to(device).train()
    x, y, _ = _inputs(case, base, B, device)
    xt, yt, _ = _inputs(case, base, N_TARGET, device)
    loss_fn = resolve_loss(case.loss).fn
    ids = torch.arange(B)
    out: dict[str, Callable[[], None]] = {}
    for method, every in (NORMS_ONLY if name in VOCAB_MODELS else METHODS).items():
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        rec = None if method == "plain" else gs.InRun(
            model, loss=case.loss, out=work / f"{name}_{method}.h5", overwrite=True, flush_every=1e12,
            targets=None if every is None else (xt, yt), every=every or 1)
        if rec is not None and recorders is not None:
            recorders[method] = rec
        count = [0]

        def call(model=model, opt=opt, rec=rec):
            for _ in range(steps):
                if rec is None:
                    loss_fn(call_model(model, x), y).mean().backward()
                else:
                    with rec.step(ids, y, lr=1e-3, step=count[0]):
                        loss_fn(call_model(model, x), y).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                count[0] += 1
        out[method] = call
    return out


def peak_memory(name: str, B: int, device: str) -> dict[str, int | None]:
    """{method: peak bytes of one training step after a warm-up}."""
    memory, peaks = _Memory(device), {}
    with tempfile.TemporaryDirectory() as work:
        for method, fn in _steppers(name, B, device, Path(work), steps=1).items():
            fn()
            with memory.measure() as mem:
                fn()
            peaks[method] = mem.get("peak_bytes")
    return peaks


#: profiler events that launch a kernel, and that wait for the device
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaEventSynchronize")


def op_counts(name: str, B: int, device: str) -> dict[str, dict[str, int]]:
    """{method: {"aten_ops", "launches", "syncs"}} of one training step after a warm-up:
    the torch ops dispatched (nested ones too), and on CUDA the kernel launches and the
    waits for the device. Where a step is short, its fixed costs are these counts."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    with tempfile.TemporaryDirectory() as work:
        for method, fn in _steppers(name, B, device, Path(work), steps=1).items():
            fn()
            fn()
            sync()
            with profile(activities=activities) as prof:
                fn()
                sync()
            events = prof.key_averages()
            out[method] = {"aten_ops": sum(e.count for e in events if e.key.startswith("aten::")),
                           "launches": sum(e.count for e in events if e.key in LAUNCH_EVENTS),
                           "syncs": sum(e.count for e in events if e.key in SYNC_EVENTS)}
    return out


def target_pass_steps(rec: gs.InRun, plain: Callable[[], None], repeats: int, sync: Callable[[], None],
                      steps: int = STEPS, rows: int | None = None) -> float:
    """The recorder's target gradient alone (forward+backward of the target batch, ``rows``
    examples at a time as a training batch of ``rows`` has it, its factors and ‖∇J‖,
    recomputed at a step that has one) in plain training steps: the median over ``repeats``
    pairs of (target pass / a plain call of ``steps`` steps next to it), times ``steps``."""
    def once():
        rec.target_gradient.cached = None
        rec.target_gradient.refs(rec, 0, rows=rows)
    once()
    ratios, _, _ = pair_ratios(once, plain, repeats, sync)
    return steps * statistics.median(ratios)


def run_bench(repeats: int = 15, device: str | None = None, echo=print,
              cases: list[tuple[str, int]] | None = None) -> dict:
    """The table's rows: (model, batch) ``cases`` (default :data:`CASES` and
    :data:`VOCAB_CASES`) on ``device``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    available = model_cases(device)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, B in (cases or CASES + VOCAB_CASES):
            if name not in available:
                echo(f"{name}: skipped (needs transformers)")
                continue
            recorders: dict[str, gs.InRun] = {}
            steps = VOCAB_STEPS if name in VOCAB_MODELS else STEPS
            fns = _steppers(name, B, device, Path(work), steps=steps, recorders=recorders)
            for fn in fns.values():
                fn()   # warm-up: layouts, caches
            times = {method: pair_ratios(fns[method], fns["plain"], repeats, sync)
                     for method in fns if method != "plain"}
            flops = {method: counted_flops(fn) for method, fn in fns.items()}
            target = (target_pass_steps(recorders["target_every1"], fns["plain"], repeats, sync, steps, B)
                      if "target_every1" in recorders else None)
            if device == "cuda":
                peaks = peak_memory(name, B, device)
            else:
                code = ("import json; from bench.inrun import peak_memory; "
                        f"print(json.dumps(peak_memory({name!r}, {B}, {device!r})))")
                try:
                    peaks = json.loads(measured_child(code))
                except RuntimeError as e:
                    echo(f"  peak memory n/a: {e}")
                    peaks = {}
            row = {"model": name, "batch": B, "steps_per_call": steps, "pairs": repeats,
                   "n_target": None if target is None else N_TARGET,
                   "target_pass_ratio": target}
            for method, (ratios, t, t_plain) in times.items():
                q1, median, q3 = (statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1
                                  else ratios * 3)
                every = METHODS[method]
                row[method] = {"ratio": median, "quartiles": [q1, q3],
                               "floor": None if every is None else 1 + target / every,
                               "flops_ratio": flops[method] / flops["plain"] if flops["plain"] else None,
                               "seconds_per_step": t / steps, "plain_seconds_per_step": t_plain / steps,
                               "memory_ratio": (peaks[method] / peaks["plain"]
                                                if peaks.get(method) and peaks.get("plain") else None)}
            rows.append(row)
            echo(f"{name:<22} B={B:<4} " + "  ".join(
                f"{m} {row[m]['ratio']:.2f}x" + (f" [flops {row[m]['flops_ratio']:.3f}x]" if row[m]["flops_ratio"] else "")
                + (f" (floor {row[m]['floor']:.2f})" if row[m]["floor"] else "")
                + (f" ({row[m]['memory_ratio']:.2f}x mem)" if row[m]["memory_ratio"] else "") for m in times))
    return {"device": device, "device_name": device_name(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "gradscore": __version__, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inrun", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15,
                   help="timed pairs (recorder, plain) per method; the median ratio is kept")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    args = parsed(p, argv)
    result = run_bench(args.repeats, args.device)
    if args.json:
        write_results(args.json, result)
    return 0


if __name__ == "__main__":
    run_script(main)
