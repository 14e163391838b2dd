"""The GPU validation kit cannot rot while no GPU is around: its dry run (CPU, tiny sizes,
Triton's interpreter) takes every step's code path and writes its results files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_takes_every_step_and_writes_its_results(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_dry-run-cpu.json").read_text())
    from gradscore.io.outputs import claim
    claim(tmp_path / "gpu_dry-run-cpu.json", "json", overwrite=True)   # a report: a rerun into results replaces it
    assert "skipped" in result["tests"]["summary"] and result["tests"]["status"] == "ok"   # no CUDA here
    assert {r["K"] for r in result["bandwidth"]["rows"]} == {0, 2}
    assert all(r["triton_read_GBps"] > 0 and r["copy_GBps"] > 0 for r in result["bandwidth"]["rows"])
    assert result["bandwidth"]["sweep"] and result["bandwidth"]["sweep"][0]["incorrect"] == 0
    methods = {r["method"] for r in result["engines"]["rows"] if "error" not in r}
    assert {"plain", "loop", "vmap_fused", "ghost_k0", "ghost_k2"} <= methods
    assert result["torchrun"]["status"].startswith("skipped")
    assert "status" not in result["inrun_sketch"], result["inrun_sketch"]
    ops = result["inrun_sketch"]["ops"][0]   # the recorder's ops on top of the step's own (no CUDA: no launches)
    assert ops["norms_aten_ops"] > ops["plain_aten_ops"] > 0 and ops["norms_launches"] == 0
    inrun = result["inrun_sketch"]["inrun"][0]
    assert inrun["norms"]["ratio"] > 0
    # counted flops: the MLP's ghost norms (T = 1) add no matmul; the record's loss terms add
    # none where one numba call takes them (CPU), else three row dots of the (B, C) output
    # (as bmm); a target every step adds its pass
    from gradscore.kernels.dispatch import numba_on_cpu
    if numba_on_cpu():
        assert inrun["norms"]["flops_ratio"] == 1.0
    else:
        assert 1.0 < inrun["norms"]["flops_ratio"] < 1.001
    assert inrun["target_every1"]["flops_ratio"] > inrun["target_every10"]["flops_ratio"] > 1.0
    assert result["inrun_sketch"]["sketch"][0]["sketch_ratio"] > 0
    assert [(r["shape"], r["blocks"]) for r in result["gram"]["rows"]] == [([2, 50, 8, 6], 2)]
    assert result["gram"]["rows"][0]["blocked_to_whole"] > 0
    md = (tmp_path / "gpu_dry-run-cpu.md").read_text()
    assert "| B | P | dtype |" in md and "| model | batch |" in md and "| in-run: model |" in md and "| sketch: model |" in md
    assert "| Gram: (B, T, d_in, d_out) |" in md


def test_gpu_check_stops_at_its_budget_with_what_it_has(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path),
                           "--budget-s", "1", "--steps", "bandwidth,engines"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_dry-run-cpu.json").read_text())
    assert result["bandwidth"]["status"].startswith("skipped") and result["engines"]["status"].startswith("skipped")


def test_gpu_check_markdown_shows_a_norms_only_vocabulary_row():
    """The vocabulary row of the in-run step has norms only: its other cells read '—'."""
    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import markdown
    cell = {"ratio": 1.5, "floor": None, "flops_ratio": 1.33}
    md = markdown({"device": "cpu", "environment": {"torch": "x", "kernels": {"cpu": "numba"}},
                   "inrun_sketch": {"inrun": [{"model": "gpt2_d64_T128_V32768", "batch": 16, "norms": cell},
                                              {"model": "mlp", "batch": 8, "norms": cell,
                                               "target_every1": {**cell, "floor": 1.3}, "target_every10": cell}]}})
    assert "| gpt2_d64_T128_V32768 | 16 | 1.50 [1.330] | — | — |" in md
    assert "| mlp | 8 | 1.50 [1.330] | 1.50 (1.30) [1.330] | 1.50 [1.330] |" in md
