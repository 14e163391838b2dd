"""`flag`: the estimated number of mislabeled examples from a two-component mixture on a
score, the flagged ids, the rate per class, and precision/recall against a known mask."""
from __future__ import annotations

import json

import numpy as np
import pytest

import gradscore as gs
from gradscore.cli import main
from gradscore.reports.flag import estimate


@pytest.mark.parametrize("n_noisy", [50, 100, 250])
def test_the_count_of_a_known_two_component_mixture_is_recovered(n_noisy):
    rng = np.random.default_rng(n_noisy)
    clean, noisy = rng.normal(-3.0, 1.0, 1000 - n_noisy), rng.normal(2.0, 1.2, n_noisy)
    est = estimate(np.concatenate([clean, noisy]))
    assert abs(est["count"] - n_noisy) <= 0.1 * n_noisy, est["count"]
    assert est["flagged"][1000 - n_noisy:].mean() > 0.95 and est["flagged"][:1000 - n_noisy].mean() < 0.02


def test_one_population_flags_nothing():
    est = estimate(np.random.default_rng(0).normal(size=2000))
    assert est["count"] == 0 and est["threshold"] is None


def test_flag_through_the_cli_writes_ids_rates_and_precision(tiny_run, tmp_path, capsys):
    ckpts, data = tiny_run
    scores = gs.score(ckpts, data, out=tmp_path / "s.h5", scores=["aum", "el2n", "variability"],
                      progress=False)
    out = tmp_path / "flagged.json"
    assert main(["flag", str(scores), "--data", str(data), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["score"] == "aum" and rep["orientation"] == "lower = more suspicious"
    assert rep["estimated_count"] == len(rep["flagged"]) and sum(c["flagged"] for c in rep["per_class"].values()) \
        == rep["estimated_count"]
    values = [f["score"] for f in rep["flagged"]]
    assert values == sorted(values)                           # most suspicious (lowest AUM) first
    assert rep["against_known_noisy"]["true_count"] == 13     # the tiny run's mask
    assert "estimated" in capsys.readouterr().out
    for argv, says in ((["--score", "pds"], "has no pds score"), (["--score", "variability"], "not a mislabel score"),
                       (["--data", str(tmp_path / "nope.h5")], "nope.h5")):
        assert main(["flag", str(scores), *argv, "--out", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert main(["flag", str(scores), "--out", str(out)]) == 2            # exists: --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert gs.flag(scores, score="el2n")["score"] == "el2n"
    assert gs.diagnose(scores, echo=lambda _: None)["flag"]["estimated_count"] == rep["estimated_count"]
