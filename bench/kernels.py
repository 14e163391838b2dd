"""norm_dot kernels against the torch reference, side by side in one run.

For each (B, P, K, dtype): the fused kernel of the device (numba on CPU, Triton on
CUDA) and the torch reference (G.pow(2).sum(1), G @ V.T), their effective bandwidth
(bytes of G read / time) and the ratio; the read bandwidth of a plain G.sum() measured
in the same run; on CUDA also the fraction of the device's peak memory bandwidth.

    python -m bench.kernels [--device cpu|cuda] [--json bench/results/kernels_cpu.json]
    python -m bench.kernels --device cuda --sweep      # Triton block sizes, for launch_config
"""
from __future__ import annotations

import argparse

import torch

from bench.engines import best_time, device_name, parsed, run_script, saved


from gradscore.kernels import get_backend, norm_dot_reference

#: vendor peak memory bandwidth, GB/s, by device-name substring
PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0,
            "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


def _time(fn, device: str, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after a warm-up, in seconds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    return best_time(fn, repeats, sync)


def cases(device: str) -> list[tuple[int, int, int, torch.dtype]]:
    if device == "cuda":
        return [(256, 2**20, 2, torch.float32), (1024, 2**18, 2, torch.float32),
                (256, 2**20, 0, torch.float32), (256, 2**20, 16, torch.float32),
                (512, 2**20, 2, torch.bfloat16), (512, 2**20, 2, torch.float16),
                (64, 2**22, 2, torch.float32), (8, 2**24, 1, torch.float32)]
    return [(64, 1_000_000, 2, torch.float32), (64, 1_000_000, 0, torch.float32),
            (64, 1_000_000, 1, torch.float32), (64, 1_000_000, 16, torch.float32),
            (256, 100_000, 2, torch.float32), (16, 4_000_000, 2, torch.float32),
            (64, 1_000_000, 2, torch.bfloat16)]


def run(device: str, repeats: int) -> dict:
    fused = get_backend(device)
    peak = next((v for k, v in PEAK_GBS.items()
                 if device == "cuda" and k in torch.cuda.get_device_name()), None)
    rows = []
    for B, P, K, dtype in cases(device):
        G = torch.randn(B, P, device=device).to(dtype)
        V = torch.randn(K, P, device=device).to(dtype) if K else None
        gbytes = G.numel() * G.element_size()
        t_fused = _time(lambda: fused.norm_dot(G, V), device, repeats)
        t_ref = _time(lambda: norm_dot_reference(G, V), device, repeats)
        t_sum = _time(lambda: G.sum(), device, repeats)
        row = {"B": B, "P": P, "K": K, "dtype": str(dtype).replace("torch.", ""),
               "backend": fused.name, "fused_s": t_fused, "torch_s": t_ref, "sum_s": t_sum,
               "fused_GBs": gbytes / t_fused / 1e9, "torch_GBs": gbytes / t_ref / 1e9,
               "sum_GBs": gbytes / t_sum / 1e9, "speedup_vs_torch": t_ref / t_fused}
        if peak:
            row["fused_fraction_of_peak"] = row["fused_GBs"] / peak
        rows.append(row)
        print(f"B={B:<5} P={P:<9} K={K:<3} {row['dtype']:<9} {fused.name:<6} "
              f"{row['fused_GBs']:>8.1f} GB/s  torch {row['torch_GBs']:>8.1f} GB/s  "
              f"x{row['speedup_vs_torch']:>5.2f}  G.sum {row['sum_GBs']:>8.1f} GB/s"
              + (f"  {row['fused_fraction_of_peak']:.0%} of peak" if peak else ""))
    name = device_name(device)
    return {"device": name, "device_type": device, "threads": torch.get_num_threads(),
            "peak_GBs": peak, "torch": torch.__version__, "rows": rows}


def sweep(repeats: int) -> list[dict]:
    """Time Triton launch configurations for one large case (GPU only)."""
    from gradscore.kernels.norm_dot_triton import launch_config, norm_dot_triton
    B, P = 256, 2**20
    G, V = torch.randn(B, P, device="cuda"), torch.randn(2, P, device="cuda")
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    out = []
    for bb in (16, 32, 64):
        for bp in (128, 256, 512, 1024):
            for warps in (2, 4, 8):
                cfg = launch_config(B, P, n_sm, len(V))
                cfg.update(BLOCK_B=bb, BLOCK_P=bp, num_warps=warps)
                cfg["split_p"] = -(-cfg["split_p"] // bp) * bp
                cfg["n_split"] = -(-P // cfg["split_p"])
                try:
                    t = _time(lambda: norm_dot_triton(G, V, config=cfg), "cuda", repeats)
                except Exception as e:  # noqa: BLE001 - a config that does not compile
                    print(f"{cfg}: {type(e).__name__}")
                    continue
                out.append({**cfg, "GBs": G.numel() * 4 / t / 1e9})
                print(f"BLOCK_B={bb:<3} BLOCK_P={bp:<5} warps={warps}  {out[-1]['GBs']:.0f} GB/s")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", action="store_true")
    args = parsed(ap, argv)
    result = run(args.device, args.repeats)
    if args.sweep:
        result["sweep"] = sweep(args.repeats)
    saved(args, result)


if __name__ == "__main__":
    run_script(main)
