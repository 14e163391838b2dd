"""`flag`: the estimated number of mislabeled examples from a two-component mixture on a
score, the flagged ids, the rate per class, and precision/recall against a known mask."""
from __future__ import annotations

import json

import numpy as np
import pytest

import gradscore as gs
from gradscore.cli import main
from gradscore.io.store import HDF5ScoresWriter
from gradscore.demos.models import mlp
from gradscore.reports.flag import estimate


@pytest.mark.parametrize("n_noisy", [50, 100, 250])
def test_the_count_of_a_known_two_component_mixture_is_recovered(n_noisy):
    rng = np.random.default_rng(n_noisy)
    clean, noisy = rng.normal(-3.0, 1.0, 1000 - n_noisy), rng.normal(2.0, 1.2, n_noisy)
    est = estimate(np.concatenate([clean, noisy]))
    assert abs(est["count"] - n_noisy) <= 0.1 * n_noisy, est["count"]
    assert not est["rough"] and abs(est["count_three"] - est["count"]) <= 0.1 * est["count"]
    assert est["flagged"][1000 - n_noisy:].mean() > 0.95 and est["flagged"][:1000 - n_noisy].mean() < 0.02


def test_a_count_from_overlapping_populations_says_it_is_rough(tmp_path, capsys):
    """Two components that overlap (Ashman's D under 2) give a count that can be off by
    many (the README's quickstart: 218 to 566 for 283 flipped, by score and init): the
    report holds the separation, and the CLI line and diagnose say the count is rough.
    Well-separated components (the planted 13 below, D about 10) say nothing of the kind."""
    rng = np.random.default_rng(3)
    n, noisy = 1000, np.arange(1000) < 250
    scores = np.where(noisy, rng.normal(1.0, 0.6, n), rng.normal(0.0, 0.5, n))
    est = estimate(scores)
    assert est["finding"] == "two populations" and est["count"] is not None
    assert 1.0 < est["separation"] < 2.0 and est["rough"]
    path = _planted(tmp_path / "s.h5", np.arange(n), noisy, {"mislabel": scores})
    assert main(["flag", str(path), "--out", str(tmp_path / "f.json")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"mislabel: estimated {est['count']} mislabeled of 1000") and "a rough count" in line, line
    assert f"separation {est['separation']:.2f}" in line and "gradscore select" in line, line
    assert json.loads((tmp_path / "f.json").read_text())["separation"] == pytest.approx(est["separation"])
    lines: list = []
    gs.diagnose(path, echo=lines.append)
    assert any("a rough count" in x for x in lines), lines


@pytest.mark.parametrize("n_noisy", [0, 60])
def test_a_count_that_a_third_component_moves_says_it_is_rough(tmp_path, capsys, n_noisy):
    """A broad, flat clean population (the mislabel score under instance-dependent noise:
    gradscore experiment noise counted 541 for 63 flipped labels, with separation 2.1)
    is fitted by two Gaussians side by side, well apart (D about 3): a count of some 600
    with no caution, even with no noisy example at all. A three-component fit counts
    another number; where it moves the count by over a quarter, the count is rough."""
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.uniform(-11, -1, 1200), rng.normal(-0.5, 1.0, n_noisy)])
    est = estimate(scores)
    assert est["finding"] == "two populations" and est["separation"] > 2.5 and est["count"] > 500
    assert est["rough"] and abs(est["count_three"] - est["count"]) > 0.25 * est["count"]
    noisy = np.arange(len(scores)) >= 1200
    path = _planted(tmp_path / "s.h5", np.arange(len(scores)), noisy, {"mislabel": scores})
    assert main(["flag", str(path), "--out", str(tmp_path / "f.json")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert f"a rough count: a three-component mixture counts {est['count_three']}" in line, line
    rep = json.loads((tmp_path / "f.json").read_text())
    assert rep["rough"] and rep["count_three"] == est["count_three"]
    lines: list = []
    gs.diagnose(path, echo=lines.append)
    assert any("a three-component mixture counts" in x for x in lines), lines


def test_the_mixtures_are_fitted_on_a_sample_of_many_examples_and_every_example_is_assigned(monkeypatch):
    """At 10⁶ examples the three fits took 12 s, at 10⁷ minutes: they are fitted on a fixed
    random sample of ``FIT_SAMPLE`` values, and every example is then assigned by them."""
    from sklearn.mixture import GaussianMixture

    from gradscore.reports import flag as flag_module
    fitted = []
    real_fit = GaussianMixture.fit
    monkeypatch.setattr(GaussianMixture, "fit", lambda self, x, y=None: fitted.append(len(x)) or real_fit(self, x))
    monkeypatch.setattr(flag_module, "FIT_SAMPLE", 5000)
    rng = np.random.default_rng(0)
    n, n_noisy = 60_000, 6_000
    x = np.concatenate([rng.normal(-2.0, 1.0, n - n_noisy), rng.normal(3.0, 1.0, n_noisy)])
    est = estimate(x)
    assert fitted == [5000] * 3   # one, two and three components
    assert len(est["flagged"]) == n and abs(est["count"] - n_noisy) < 0.01 * n_noisy and not est["rough"]
    # Bayes' rates: 0.98 of the planted flagged, 0.002 of the others
    assert est["flagged"][n - n_noisy:].mean() > 0.97 and est["flagged"][:n - n_noisy].mean() < 0.01
    again = estimate(x)
    assert again["count"] == est["count"] and again["count_three"] == est["count_three"]   # the same sample


def test_one_population_flags_nothing_and_gives_no_count():
    est = estimate(np.random.default_rng(0).normal(size=2000))
    assert est["count"] is None and est["threshold"] is None and not est["flagged"].any()
    assert est["finding"] == "one population"


@pytest.mark.parametrize("unit", [1e-6, 1e-4, 1e-3, 1e3, 1e150])
def test_the_count_does_not_depend_on_the_scores_unit(unit):
    """A score of small spread (a GraNd or an in-run value late in training, a variability)
    was "one population" or a wrong count (15 of 100 at 1e-3): the mixtures' covariance floor
    (scikit-learn's reg_covar, 1e-6) outweighed the spread. A huge one overflowed (a raw
    traceback). The mixtures now fit the standardized values: the same count in any unit."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 900), rng.normal(4, 1, 100)])
    want, got = estimate(x), estimate(x * unit + 5 * unit)
    assert want["finding"] == "two populations" and abs(want["count"] - 100) <= 10
    assert np.array_equal(got["flagged"], want["flagged"]) and got["count"] == want["count"]
    assert got["count_three"] == want["count_three"] and got["rough"] == want["rough"]
    assert got["separation"] == pytest.approx(want["separation"], rel=1e-9)
    assert got["threshold"] == pytest.approx(want["threshold"] * unit + 5 * unit, rel=1e-12)
    # the BIC in the score's own unit: each shifts by 2 N log(unit), their difference not
    shift = 2 * len(x) * np.log(unit)
    assert got["bic_two"] - got["bic_one"] == pytest.approx(want["bic_two"] - want["bic_one"], rel=1e-6, abs=1e-6)
    assert got["bic_one"] == pytest.approx(want["bic_one"] + shift, rel=1e-9)


@pytest.mark.parametrize("values", [np.zeros(100), np.r_[np.zeros(90), np.ones(10)], np.r_[np.zeros(98), 1.0, 2.0]])
def test_a_constant_or_few_valued_score_is_estimated_without_scikit_learns_warnings(values):
    """A count of events (forgetting), a correctness of one checkpoint: scikit-learn's
    "Number of distinct clusters found smaller than n_clusters" was printed three times."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = estimate(values)
    if np.ptp(values) == 0:
        assert est["finding"] == "one population" and est["count"] is None and not est["flagged"].any()
    elif (values == 1).sum() == 10:
        assert est["count"] == 10 and est["flagged"][90:].all()


def test_a_suspicious_majority_flags_nothing_and_gives_no_count():
    """Two components, but the upper one holds most examples: no minority to call
    mislabeled, and no count (not 0, which would say the labels are clean)."""
    rng = np.random.default_rng(1)
    est = estimate(np.concatenate([rng.normal(-3.0, 1.0, 300), rng.normal(2.0, 1.0, 700)]))
    assert est["count"] is None and est["threshold"] is None and not est["flagged"].any()
    assert est["finding"] == "suspicious majority" and est["bic_two"] < est["bic_one"]


def test_flag_says_when_the_score_gives_no_count(tmp_path, capsys):
    """The README's quickstart case: scores whose clean and flipped populations overlap.
    The CLI line, the JSON and diagnose say that no count can be read, not "0 mislabeled"."""
    rng = np.random.default_rng(0)
    n, noisy = 1000, np.arange(1000) < 200
    scores = np.where(noisy, rng.normal(0.3, 0.2, n), rng.normal(0.0, 0.2, n))
    path = _planted(tmp_path / "s.h5", np.arange(n), noisy, {"mislabel": scores})
    data = gs.save_dataset(tmp_path / "d.h5", rng.normal(size=(n, 2)).astype(np.float32), np.arange(n) % 3)
    out = tmp_path / "f.json"
    assert main(["flag", str(path), "--data", str(data), "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "no count" in line and "estimated 0" not in line and "gradscore select" in line, line
    rep = json.loads(out.read_text())
    assert rep["estimated_count"] is None and rep["estimated_rate"] is None and rep["flagged"] == []
    assert rep["finding"] == "one population"
    assert rep["against_known_noisy"]["flagged"] == 0
    assert {c["estimated_rate"] for c in rep["per_class"].values()} == {None}   # no rate per class either
    lines = []
    assert gs.diagnose(path, echo=lines.append)["flag"]["estimated_count"] is None
    text = "\n".join(lines)
    assert "no count" in text and "0 of 1000" not in text, text


def _planted(path, ids, noisy, scores: dict[str, np.ndarray], correct: np.ndarray | None = None,
             config: dict | None = None):
    """A scores file holding ``scores`` (N,) for ``ids``, and the known-noisy mask; with
    ``correct`` (N,) bool, the model's predictions at its one checkpoint; ``config``: the
    run's (default: none)."""
    store = HDF5ScoresWriter(path, {"synthetic": 0}, n=len(ids), T=1, chunk_size=len(ids))
    rows = {k: v.astype(np.float64) for k, v in scores.items()}
    store.write_chunk(0, 0, rows if correct is None else {**rows, "correct": correct.astype(np.int8)})
    store.finalize(ids=np.asarray(ids), extras={"noisy": noisy}, attrs={"config": config or {}},
                   aggregate=lambda p: {k: v[0] for k, v in p.items() if k in scores})
    return path


@pytest.mark.parametrize("fit", [0.80, 0.93, 0.99])
def test_a_count_from_a_model_that_does_not_fit_what_it_calls_clean_is_rough(tmp_path, capsys, fit):
    """A model that has not fit its data (too few epochs: bench.flag_counts counted 486 for 251
    flipped after one epoch, with separation 4.4 and no caution) disagrees with clean examples
    it has not learned as with mislabeled ones: both land in the suspicious component. Where the
    last checkpoint predicts under FIT_CLEAN (95%) of the examples the count calls clean as
    labelled, the count is rough and says so; at 99% it is given plainly."""
    from gradscore.reports.flag import FIT_CLEAN
    rng = np.random.default_rng(5)
    n, noisy = 1000, np.arange(1000) < 250
    aum = np.where(noisy, rng.normal(-3.0, 0.5, n), rng.normal(2.0, 0.5, n))
    correct = ~noisy
    correct[rng.choice(np.flatnonzero(~noisy), round((1 - fit) * 750), replace=False)] = False
    clean_fit = correct[~noisy].mean()
    assert clean_fit == pytest.approx(fit, abs=1e-3)
    path = _planted(tmp_path / "s.h5", np.arange(n), noisy, {"aum": aum}, correct=correct)
    assert main(["flag", str(path), "--out", str(tmp_path / "f.json")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    rep = json.loads((tmp_path / "f.json").read_text())
    assert rep["estimated_count"] == 250 and rep["fit_clean"] == pytest.approx(clean_fit)
    assert rep["rough"] == (clean_fit < FIT_CLEAN)
    if clean_fit < FIT_CLEAN:
        assert f"the model predicts {clean_fit:.1%} of the examples it calls clean as labelled" in line, line
        assert "train longer" in line and "gradscore select" in line, line
    else:
        assert "rough" not in line, line
    lines: list = []
    assert gs.diagnose(path, echo=lines.append)["flag"]["fit_clean"] == pytest.approx(clean_fit)
    assert any(("as labelled" in x) == (clean_fit < FIT_CLEAN) for x in lines if "gradscore flag by" in x), lines


@pytest.mark.parametrize("score", ["el2n", "loss", "grand"])
def test_a_count_by_a_score_whose_counts_were_not_checked_is_rough(tmp_path, capsys, score):
    """bench.flag_counts checks the counts of mislabel and aum against the truth. el2n counted
    595 for 63 flipped after three epochs with every other check passing, loss 15-40% over on
    well-trained runs: a count by a score outside CALIBRATED is rough, and names the scores
    whose counts are checked."""
    rng = np.random.default_rng(6)
    n, noisy = 1000, np.arange(1000) < 250
    values = np.where(noisy, rng.normal(3.0, 0.5, n), rng.normal(-2.0, 0.5, n))
    path = _planted(tmp_path / "s.h5", np.arange(n), noisy, {score: values, "aum": -values})
    assert main(["flag", str(path), "--score", score, "--out", str(tmp_path / "f.json")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"{score}: estimated 250 mislabeled of 1000") and "a rough count" in line, line
    assert "flag by mislabel or aum (--score aum)" in line, line
    assert json.loads((tmp_path / "f.json").read_text())["rough"]
    assert main(["flag", str(path), "--score", "aum", "--out", str(tmp_path / "f.json"), "--overwrite"]) == 0
    assert "rough" not in capsys.readouterr().out.splitlines()[0]
    for loss, hint in (("cross_entropy", "flag by mislabel or aum (rerun `gradscore run --scores mislabel,aum`)"),
                       ("causal_lm", None), ("mse", None)):   # no classes: no margin to count by
        ckpts = tmp_path / loss
        with gs.CheckpointWriter(ckpts, model_factory="gradscore.demos.models:mlp", model_kwargs={"d_in": 2},
                                 loss=loss) as w:
            w.save(mlp(d_in=2), step=0, lr=0.1)
        alone = _planted(tmp_path / f"{loss}.h5", np.arange(n), noisy, {score: values},   # no calibrated score
                         config={"engine": "auto", "checkpoints": str(ckpts)})
        assert main(["flag", str(alone), "--score", score, "--out", str(tmp_path / "f.json"), "--overwrite"]) == 0
        line = capsys.readouterr().out.splitlines()[0]
        assert line.startswith(f"{score}: estimated 250") and "a rough count" in line, line
        assert (hint in line) if hint else ("flag by" not in line and f"rank by {score} instead" in line), line


def test_flag_through_the_cli_writes_ids_rates_and_precision(tiny_run, tmp_path, capsys):
    _, data = tiny_run   # 90 examples, ids 100..189, every 7th noisy
    n, rng = 90, np.random.default_rng(0)
    noisy = np.arange(n) % 7 == 0
    aum = np.where(noisy, rng.normal(-2.0, 0.3, n), rng.normal(1.0, 0.3, n))   # the noisy ones low
    scores = _planted(tmp_path / "s.h5", np.arange(100, 100 + n), noisy,
                      {"aum": aum, "el2n": rng.uniform(size=n), "variability": rng.uniform(size=n)})
    out = tmp_path / "flagged.json"
    assert main(["flag", str(scores), "--data", str(data), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["score"] == "aum" and rep["orientation"] == "lower = more suspicious"
    assert rep["finding"] == "two populations" and rep["estimated_count"] == 13 == len(rep["flagged"])
    assert sum(c["flagged"] for c in rep["per_class"].values()) == 13
    values = [f["score"] for f in rep["flagged"]]
    assert values == sorted(values)                           # most suspicious (lowest AUM) first
    assert sorted(f["id"] for f in rep["flagged"]) == list(100 + np.flatnonzero(noisy))
    assert rep["against_known_noisy"] == {"true_count": 13, "flagged": 13, "correct": 13, "precision": 1.0,
                                          "recall": 1.0}
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("aum: estimated 13 mislabeled of 90 (14.4%)") and "rough" not in line, line
    assert rep["separation"] > 2
    for argv, says in ((["--score", "pds"], "has no pds score"), (["--score", "variability"], "not a mislabel score"),
                       (["--data", str(tmp_path / "nope.h5")], "nope.h5")):
        assert main(["flag", str(scores), *argv, "--out", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert main(["flag", str(scores), "--out", str(out)]) == 2            # exists: --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert gs.flag(scores, score="el2n")["score"] == "el2n"
    assert gs.diagnose(scores, echo=lambda _: None)["flag"]["estimated_count"] == rep["estimated_count"]
