"""Gradient sketches' cost, as ratios measured side by side in one run (CPU or CUDA).

    python -m bench.sketch [--dim 8192] [--repeats 3] [--json bench/results/sketch_cpu.json --overwrite]

- ``sketch``: one batch's sketches (``Scorer.sketch_batch``) against the same batch's
  plain forward + backward of Σ ℓ_b (MLP 784-1024-1024-10 at B = 256, the d = 128
  transformer at B = 64), and against ``vmap`` materializing the per-example gradients
  alone (B, P), before any projection: the first half of materialize-then-project, which
  TRAK's library does (its dense projection of P = 1.9M at k = 8192 would cost another
  2·B·P·k flops per batch);
- ``memory``: peak memory of a sketch call against the plain forward+backward's, with
  float32 sketches and with the float16 ones ``gradscore sketch`` stores by default;
- ``storage`` (``--storage-n``): a generated sketch file written through the store's
  journal and read back in blocks: bytes per example, seconds, the process's peak RSS;
- ``attribute``: the blocked scoring of 1,000 queries against N sketched rows
  (``attribute.block_scores`` and the top-k) as a fraction of one plain float32 GEMM of
  the same shape, timed in the same run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

import gradscore as gs
from bench.engines import _inputs, device_name, measured_child, model_cases, parsed, run_script, write_results
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


def _case(name: str, B: int, dim: int, device: str):
    """(model, x, y, scorer, projection) of one bench case, seeded."""
    case = model_cases(device)[name]
    torch.manual_seed(0)
    model = case.factory().to(device).eval()
    x, y, _ = _inputs(case, model, B, device)
    scorer = gs.Scorer(model, loss=case.loss)
    return model, x, y, scorer, gs.Projection.for_model(model, scorer.param_names, dim)


def sketch_rows(dim: int, repeats: int, device: str, cases: dict[str, int] | None = None) -> list[dict]:
    """Sketch against plain forward+backward and vmap, per {model: batch} (default :data:`CASES`)."""
    rows = []
    for name, B in (cases or CASES).items():
        model, x, y, scorer, proj = _case(name, B, dim, device)
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


def peak_memory(name: str, B: int, dim: int, device: str) -> dict[str, int | None]:
    """{plain, sketch, sketch_float16: peak bytes of one call after a warm-up}
    (``bench.engines``' measure); float16: the buffer ``gradscore sketch`` uses by default."""
    from bench.engines import _Memory
    model, x, y, scorer, proj = _case(name, B, dim, device)
    params = list(model.parameters())
    calls = {"plain": lambda: torch.autograd.grad(scorer.loss.fn(model(x), y).sum(), params),
             "sketch": lambda: scorer.sketch_batch(x, y, proj),
             "sketch_float16": lambda: scorer.sketch_batch(x, y, proj, torch.float16)}
    memory, peaks = _Memory(device), {}
    for method, fn in calls.items():
        fn()
        with memory.measure() as mem:
            fn()
        peaks[method] = mem.get("peak_bytes")
    return peaks


def storage_row(n: int, dim: int, chunk: int, folder: Path) -> dict:
    """A sketch file of n generated examples (one checkpoint, float16) written through the
    store's journal and read back in blocks: its size, seconds, and the peak rise of the
    resident set over the whole (``bench.engines``' measure: VmHWM reset first)."""
    from bench.engines import _Memory
    with _Memory("cpu").measure() as mem:
        row = _storage(n, dim, chunk, folder)
    return {**row, "peak_rss_rise_bytes": mem.get("peak_bytes")}


def _storage(n: int, dim: int, chunk: int, folder: Path) -> dict:
    from gradscore.io.store import HDF5ScoresWriter
    from gradscore.sketches.store import SketchFile
    out = folder / "generated.sketch.h5"
    writer = HDF5ScoresWriter(out, {"generated": n}, n=n, T=1, chunk_size=chunk, overwrite=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for c in range(writer.n_chunks):
        a, b = writer.chunk_range(c)
        s = rng.standard_normal((b - a, dim), dtype=np.float32).astype(np.float16)
        writer.write_chunk(0, c, {"sketch": s, "loss": np.zeros(b - a), "p_gold": np.zeros(b - a),
                                  "sq_sketch": (s.astype(np.float64) ** 2).sum(1)})
    t_chunks = time.perf_counter() - t0
    spec = {"seed": 0, "dim": dim, "blocks": [{"name": "w", "kind": "dense", "shape": [dim], "offset": 0, "k": dim,
                                                "k_out": 0, "k_in": 0}]}
    t0 = time.perf_counter()
    writer.finalize(ids=np.arange(n), extras={"checkpoints": {"lr": np.ones(1)}},
                    aggregate=lambda m: {"self_influence": m["sq_sketch"].sum(0)},
                    attrs={"config": {"generated": n}, "sketch": spec})
    t_final = time.perf_counter() - t0
    sf = SketchFile.open(out)
    t0, read = time.perf_counter(), 0
    for a in range(0, n, 65536):
        read += sf.read(0, a, min(n, a + 65536)).nbytes
    t_read = time.perf_counter() - t0
    size = out.stat().st_size
    out.unlink()
    return {"n": n, "dim": dim, "store_dtype": "float16", "file_bytes": size, "bytes_per_example": size / n,
            "write_chunks_s": t_chunks, "assemble_s": t_final, "read_s": t_read,
            "read_gb_per_s": size / t_read / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sketch", description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=8192, help="sketch dimension k")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (best is kept)")
    p.add_argument("--n-train", type=int, default=20000, help="sketched rows in the attribution timing")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--storage-n", type=int, default=0, metavar="N",
                   help="also write and read back a generated sketch file of N examples (10^6: 4 GB at dim 2048)")
    p.add_argument("--storage-dim", type=int, default=2048, help="dim of the generated sketch file")
    p.add_argument("--storage-dir", default=".", metavar="DIR", help="where the generated file is written (then removed)")
    args = parsed(p, argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = sketch_rows(args.dim, args.repeats, device)
    for r in rows:
        print(f"{r['model']:<22} B={r['batch']:<4} k={r['dim']}: sketch {r['sketch_ratio']:.2f}x plain fwd+bwd; "
              f"vmap materialization alone {r['vmap_ratio']:.2f}x")
    for r in rows:
        code = ("import json; from bench.sketch import peak_memory; "
                f"print(json.dumps(peak_memory({r['model']!r}, {r['batch']}, {args.dim}, {device!r})))")
        peaks = peak_memory(r["model"], r["batch"], args.dim, device) if device == "cuda" else \
            json.loads(measured_child(code))
        r["memory_ratio"] = peaks["sketch"] / peaks["plain"] if peaks.get("plain") else None
        r["memory_ratio_float16"] = peaks["sketch_float16"] / peaks["plain"] if peaks.get("plain") else None
        print(f"{r['model']:<22} peak memory: sketch {r['memory_ratio']:.2f}x plain fwd+bwd "
              f"({r['memory_ratio_float16']:.2f}x into float16, as gradscore sketch stores)")
    att = attribute_row(args.dim, args.n_train, 1000, 8192, args.repeats)
    print(f"attribute 1000 queries x {att['n_train']} rows, k={att['dim']}: {att['fraction_of_gemm']:.0%} of a plain "
          f"float32 GEMM ({att['gemm_gflops']:.0f} GFLOP/s)")
    result = {"device": device, "device_name": device_name(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "sketch": rows, "attribute": att}
    if args.storage_n:
        code = ("import json; from pathlib import Path; from bench.sketch import storage_row; "
                f"print(json.dumps(storage_row({args.storage_n}, {args.storage_dim}, 4096, Path({args.storage_dir!r}))))")
        result["storage"] = st = json.loads(measured_child(code))
        print(f"sketch file, {st['n']} examples x {st['dim']} float16: {st['file_bytes'] / 1e9:.2f} GB, read at "
              f"{st['read_gb_per_s']:.2f} GB/s, peak memory rise {st['peak_rss_rise_bytes'] / 1e9:.2f} GB")
    if args.json:
        write_results(args.json, result)
    return 0


if __name__ == "__main__":
    run_script(main)
