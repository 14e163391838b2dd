"""The benchmark's own measurements: the CPU memory count follows live tensors, as the
bench's child measures it, and the flop count counts a grouped conv's weight gradient
per group."""
from __future__ import annotations

import json
import os

import pytest
import torch

from bench.engines import counted_flops, measured_child

CHILD = """
import json, torch
from bench.engines import _Memory
def one_after_another():
    for _ in range(3):
        torch.ones(2**20).sum()          # 4 MiB, freed before the next
def three_at_once():
    return [torch.ones(2**20) for _ in range(3)]
memory, peaks = _Memory("cpu"), []
for fn in (one_after_another, three_at_once):
    fn()
    with memory.measure() as out:
        fn()
    peaks.append(out.get("peak_bytes"))
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_cpu_peak_counts_live_tensors_not_total_allocations():
    sequential, together = json.loads(measured_child(CHILD))
    assert 3.5 * 2**20 <= sequential < 6 * 2**20          # one 4 MiB tensor at a time
    assert 11.5 * 2**20 <= together < 14 * 2**20          # three alive together


@pytest.mark.parametrize("groups", [1, 4])
def test_grouped_conv_weight_gradient_counts_the_flops_of_its_groups(groups):
    """The weight gradient of b examples as one conv with b·groups groups costs what b
    one-example weight gradients cost (torch's own formula counts it as dense)."""
    x, d = torch.randn(5, 8, 6, 6), torch.randn(5, 8, 4, 4)
    one = counted_flops(lambda: torch.nn.grad.conv2d_weight(x[:1], (8, 8 // groups, 3, 3), d[:1], groups=groups))
    grouped = counted_flops(lambda: torch.nn.grad.conv2d_weight(
        x.reshape(1, 40, 6, 6), (40, 8 // groups, 3, 3), d.reshape(1, 40, 4, 4), groups=5 * groups))
    assert one == 2 * 8 * 8 // groups * 9 * 16       # multiply-adds x 2 of one example's gradient
    assert grouped == 5 * one


def test_a_failing_memory_child_says_why():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        measured_child("1 / 0")
    with pytest.raises(RuntimeError, match="printed nothing"):
        measured_child("pass")


def test_sparse_conv_kernel_counts_a_multiply_add_per_non_zero_delta_tap_and_channel(monkeypatch):
    """torch's flop counter does not see the numba kernel; the bench adds its multiply-adds
    (one per non-zero δ, kernel tap and input channel; per δ for short rows, summed
    densely), and counts nothing twice."""
    from gradscore.engines.rules import conv
    monkeypatch.setattr(conv, "plan", lambda *args, **kwargs: "sparse")
    for c_in, dense in ((4, False), (1, True)):          # rows of 36 and 9 weights
        layer = torch.nn.Conv2d(c_in, 6, 3, padding=1)
        x, d = torch.randn(5, c_in, 7, 7), torch.randn(5, 6, 7, 7).relu()
        conv.conv(layer, [x], [d], {"weight": None}, 0)     # the first call probes the kernel backend
        flops = counted_flops(lambda: conv.conv(layer, [x], [d], {"weight": None}, 0))
        assert flops == 2 * (d.numel() if dense else int(d.count_nonzero())) * 9 * c_in > 0


def test_norm_rules_bench_times_the_forms_the_rules_use():
    """Smoke: each row pairs a rule's own form of x̂ (or of the per-example gradients) with
    the alternative, and both forms give the same numbers (else the bench would time a
    wrong candidate); the fused kernel's in float32."""
    from bench.norm_rules import CASES, run_bench
    for _, shape, dims, ours, other in CASES:
        x, d = torch.randn(*shape, dtype=torch.float64) * 3 + 1, torch.randn(*shape, dtype=torch.float64)
        if ours.__name__ == "_grads_fused":
            torch.testing.assert_close(ours(x.float(), d.float(), dims).double(), other(x, d, dims),
                                       rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(ours(x, d, dims), other(x, d, dims), rtol=1e-8, atol=1e-8)
    result = run_bench(pairs=4, echo=lambda _: None)
    assert [r["layer"] for r in result["rows"]] == [c[0] for c in CASES]
    assert all(r["ratio_rule_form_to_other"] > 0 for r in result["rows"])


def test_gram_bench_times_forms_that_agree(monkeypatch):
    """Smoke: on each shape the blocked Grams, the whole Grams and the outer form give the
    same norms (else the bench would time a wrong candidate); one row per shape."""
    import bench.gram as bench_gram
    from gradscore.kernels.ghost_linear import _gram_sq, ghost_linear
    for B, T, d_in, d_out in bench_gram.CASES:
        a, d = torch.randn(1, T, d_in, dtype=torch.float64), torch.randn(1, T, d_out, dtype=torch.float64)
        whole = _gram_sq(a, d, 2**30, [slice(0, T)])
        torch.testing.assert_close(_gram_sq(a, d, 2**30), whole, rtol=1e-10, atol=0)
        torch.testing.assert_close(ghost_linear(a, d, None, form="outer")[0], whole, rtol=1e-10, atol=0)
    monkeypatch.setattr(bench_gram, "CASES", [(3, 50, 8, 6), (2, 20, 5, 4)])
    rows = bench_gram.run_bench(pairs=2, echo=lambda _: None)["rows"]
    assert [(r["shape"], r["blocks"]) for r in rows] == [([3, 50, 8, 6], 2), ([2, 20, 5, 4], 1)]
    assert all(r["blocked_to_whole"] > 0 and r["outer_to_whole"] > 0 for r in rows)


def test_gram_rounding_bench_finds_the_constant_of_cancelled_share(monkeypatch):
    """Smoke: one row per (pairs, ε), the float32 rows measured as formed (not rerun in
    float64: else their error would be 0), and a constant k below the 16 that
    ``cancelled_share`` assumes."""
    import bench.gram as bench_gram
    monkeypatch.setattr(bench_gram, "ROUNDING_WIDTHS", [(32, 64)])
    result = bench_gram.run_rounding(echo=lambda _: None, B=16)
    assert [(r["pairs"], r["eps"]) for r in result["rows"]] == [(p, e) for p in (1, 4, 32) for e in (1e-1, 1e-2, 1e-3)]
    assert all(r["max_relative_error"] > 0 for r in result["rows"])
    assert 0 < result["largest_k"] < 16


SCRIPTS = ["conv_plan", "dynamics_scale", "engines", "families", "flag_counts", "gram", "inrun", "inrun_store",
           "kernels", "large_data", "norm_rules", "sketch", "whole_dataset"]


def test_whole_dataset_bench_measures_each_step(tmp_path):
    from bench import whole_dataset
    report = whole_dataset.main(["--examples", "3000", "--checkpoints", "4", "--json", str(tmp_path / "w.json")])
    assert [(r["examples"], r["checkpoints"], r["step"]) for r in report["rows"]] == [(3000, 4, "run"),
                                                                                      (3000, 4, "diagnose")]
    assert all(r["seconds"] > 0 and r["one_TxN_float64_bytes"] == 8 * 4 * 3000 for r in report["rows"])


def test_flag_counts_bench_gives_each_runs_count_against_the_truth(tmp_path):
    """With --inrun the same training is recorded (the checkpoints' rows do not change) and
    counted by the recording's AUM too."""
    from bench import flag_counts
    argv = ["--epochs", "2", "--ends", "1,5", "--scores", "aum,loss", "--rates", "0.2", "--seeds", "1",
            "--kinds", "symmetric"]
    plain = flag_counts.main([*argv, "--json", str(tmp_path / "p.json")])
    report = flag_counts.main([*argv, "--inrun", "--json", str(tmp_path / "f.json")])
    rows = report["rows"]
    assert [(r["end"], r["score"]) for r in rows] == [(1, "aum"), (1, "loss"), (1, "inrun_aum"),
                                                      (2, "aum"), (2, "loss"), (2, "inrun_aum")]
    assert [r for r in rows if r["score"] != "inrun_aum"] == plain["rows"]
    for row in rows:
        assert (row["kind"], row["rate"], row["true"]) == ("symmetric", 0.2, 251) and isinstance(row["rough"], bool)
        assert row["count"] is None or (0 <= row["fit_clean"] <= 1 and (row["score"] != "loss" or row["rough"]))
    assert report["runs"] == 1 and (tmp_path / "f.json").is_file()
    assert set(report["largest_error_said_without_caution_by_score"]) == {"aum", "loss", "inrun_aum"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_keeps_a_file_it_may_not_replace(script, tmp_path, monkeypatch, capsys):
    """Before timing anything: a JSON file that is not a results report is never replaced, an
    earlier report only with --overwrite; each refusal is one line and exit code 2."""
    import importlib

    from bench.engines import run_script
    main = importlib.import_module(f"bench.{script}").main
    notes, report = tmp_path / "notes.json", tmp_path / "report.json"
    notes.write_text('{"mine": 1}')
    report.write_text('{"gradscore_version": "0"}')
    for path, says in ((notes, "is not a gradscore JSON report"), (report, "pass --overwrite")):
        monkeypatch.setattr("sys.argv", [script, "--json", str(path)])
        with pytest.raises(SystemExit) as stop:
            run_script(main)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert notes.read_text() == '{"mine": 1}' and report.read_text() == '{"gradscore_version": "0"}'


def test_the_committed_results_are_reports_a_rerun_may_replace():
    """Results written before reports carried ``gradscore_version`` are still recognized, so
    ``--overwrite`` replaces them."""
    from pathlib import Path

    from gradscore.io.outputs import claim
    results = sorted((Path(__file__).parent.parent / "bench" / "results").glob("*.json"))
    assert results
    for path in results:
        claim(path, "json", overwrite=True)
