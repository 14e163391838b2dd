"""`gradscore experiment` in tiny mode: files written, subset sizes and data variants exact,
the same seed gives the same numbers."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy import ndimage

from gradscore.cli import main
from gradscore.demos.experiments import MODES, digits_setup
from gradscore.demos.experiments.common import digits_splits
from gradscore.demos.experiments.digits import shift, spurious
from gradscore.demos.experiments.jtt import spurious_setup
from gradscore.demos.experiments.prune import parse_method, subset

TINY = MODES["tiny"]
MLP = "gradscore.demos.models:mlp"


def test_splits_and_variants_are_exact():
    d = digits_splits()
    assert (len(d["y_train"]), len(d["y_val"]), len(d["y_test"])) == (1257, 180, 360)
    st = digits_setup(0.2)
    assert st.noisy.sum() == round(0.2 * 1257) and (st.y_train[st.noisy] != d["y_train"][st.noisy]).all()
    # shifted test split: rotation by 10°, Gaussian blur σ = 0.5, as documented
    x = d["x_test"][:5]
    want = np.clip(ndimage.gaussian_filter(ndimage.rotate(x[3, 0], 10.0, reshape=False, order=1), 0.5,
                                           mode="constant"), 0, 1)
    np.testing.assert_array_equal(shift(x)[3, 0], want)
    np.testing.assert_array_equal(shift(x), shift(x))
    # spurious patch: agrees with the label on exactly 95% of training and 50% of test images
    for agree, n in ((0.95, 1257), (0.5, 360)):
        xs, y, groups = spurious(d["x_train"][:n], d["y_train"][:n], agree, seed=0)
        patch = (xs[:, 0, :2, :2] == 1.0).all((1, 2))
        assert (patch == y.astype(bool)).sum() == round(agree * n)
        assert np.array_equal(groups, 2 * y + patch) and np.array_equal(y, d["y_train"][:n] >= 5)
    st = spurious_setup()
    assert st.model_kwargs == {"n_classes": 2} and len(np.unique(st.groups_test)) == 4


def test_prune_subsets():
    values = {"el2n": np.arange(10.0)}
    assert list(subset("el2n", values, 0.3, 10, 0)) == [7, 8, 9]
    assert list(subset("el2n", values, 0.3, 10, 0, highest=False)) == [0, 1, 2]
    assert list(subset("el2n", values, 0.3, 10, 0, exclude_top=0.2)) == [5, 6, 7]
    r = subset("random", values, 0.5, 10, 3)
    assert len(r) == 5 and np.array_equal(r, subset("random", values, 0.5, 10, 3))
    assert parse_method("el2n:lowest:exclude=0.1") == ("el2n", False, 0.1, False)
    assert parse_method("pds:per_class") == ("pds", True, 0.0, True)
    classes = np.array([0] * 8 + [1] * 2)                       # class 0 holds the 8 lowest values
    kept = subset("el2n", values, 0.5, 10, 0, highest=False, classes=classes)
    assert list(kept) == [0, 1, 2, 3, 8]                        # half of each class, not the 5 lowest


def test_prune_tiny(tmp_path):
    assert main(["experiment", "prune", "--mode", "tiny", "--out", str(tmp_path),
                 "--methods", "el2n,pds,hard,random", "--exclude-top", "0.1"]) == 0
    res = json.loads((tmp_path / "prune.json").read_text())
    assert {r["method"] for r in res["rows"]} == {"el2n:exclude=0.1", "pds:exclude=0.1", "hard:exclude=0.1", "random"}
    for r in res["rows"]:
        assert r["n_kept"] == round(r["fraction"] * 300) and len(r["accuracy"]) == 1
    noisy = [r for r in res["rows"] if r["condition"] == "20% flipped labels" and r["fraction"] < 1]
    assert all(0 <= r["flipped_share"] <= 1 for r in noisy)
    assert (tmp_path / "prune.png").stat().st_size > 0 and "| el2n:exclude=0.1 |" in (tmp_path / "prune.md").read_text()
    # what the scoring said of its PDS (momentum: an approximation) travels with the rows, not only to stderr
    assert any("SGD(momentum=0.9), not plain gradient steps" in w for w in res["warnings"])
    md = (tmp_path / "prune.md").read_text()
    assert "**What the scoring warned of in this run**" in md and "SGD(momentum=0.9), not plain gradient steps" in md


def test_regions_tiny(tmp_path):
    assert main(["experiment", "regions", "--mode", "tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "regions.json").read_text())
    assert {r["subset"]: r["n_train"] for r in res["rows"]} == {
        "ambiguous": 99, "easy": 99, "hard": 99, "random": 99, "all": 300}
    assert (tmp_path / "regions.png").exists() and (tmp_path / "regions.md").exists()


@pytest.mark.slow   # spawns two experiment runs; prune and regions keep a tiny run in the default set
def test_jtt_tiny_same_seed_same_numbers(tmp_path):
    for run in ("a", "b"):
        assert main(["experiment", "jtt", "--mode", "tiny", "--out", str(tmp_path / run)]) == 0
    a, b = (json.loads((tmp_path / r / "jtt.json").read_text()) for r in ("a", "b"))
    assert a["rows"] == b["rows"]
    assert [r["method"] for r in a["rows"]] == ["ERM", "JTT λ_up=5", "JTT λ_up=20", "JTT λ_up=50"]
    assert a["rows"][1]["error_set"] > 0 and (tmp_path / "a" / "jtt.png").exists()


def test_user_data_and_bad_options(tmp_path, capsys):
    import gradscore as gs
    rng = np.random.default_rng(0)
    for name, n in (("train", 120), ("test", 40)):
        gs.save_dataset(tmp_path / f"{name}.h5", rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, n))
    args = ["experiment", "prune", "--mode", "tiny", "--out", str(tmp_path / "o"), "--methods", "el2n,random",
            "--train", str(tmp_path / "train.h5"), "--test", str(tmp_path / "test.h5"),
            "--model", "gradscore.demos.models:mlp", "--model-kwargs", '{"d_in": 6, "hidden": 8, "n_classes": 3}']
    assert main(args) == 0
    rows = json.loads((tmp_path / "o" / "prune.json").read_text())["rows"]
    assert {r["condition"] for r in rows} == {"user data"} and rows[0]["n_kept"] == 54   # 90% of 120 train, half kept
    assert main(["experiment", "jtt", "--train", str(tmp_path / "train.h5")]) == 2
    assert "--train, --test and --model together" in capsys.readouterr().err
    assert main(["experiment", "prune", "--mode", "tiny", "--methods", "el3n", "--out", str(tmp_path / "x")]) == 2
    assert "unknown 'el3n'" in capsys.readouterr().err
    # keeping 90% after excluding the top 20% kept 80% under the 90% column, without a word
    assert main(["experiment", "prune", "--mode", "tiny", "--methods", "el2n:exclude=0.2", "--fractions", "0.5,0.9",
                 "--out", str(tmp_path / "x")]) == 2
    assert ("el2n:exclude=0.2 keeps 0.9 of the examples after excluding the top 0.2, more than are left; give "
            "fractions of at most 0.8") in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # an option of another experiment was dropped without a word
    assert main(["experiment", "jtt", "--mode", "tiny", "--fractions", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--fractions applies to prune only; leave it out, or use it with prune" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args,says", [
    (["prune", "--seeds", "0"], "'seeds': 0; give a whole number >= 1"),
    (["regions", "--seeds", "-1"], "'seeds': -1; give a whole number >= 1"),
    (["prune", "--fractions", "0.5,1.5"], "'fractions': 1.5 is not a fraction in \\(0, 1\\]"),
    (["prune", "--fractions", "0.5,nan"], "'fractions': nan is not a fraction in \\(0, 1\\]"),
    (["prune", "--exclude-top", "2"], "'exclude': 2.0 is not a fraction in \\[0, 1\\]"),
    (["prune", "--methods", "el2n:exclude=-0.1"], "'exclude': -0.1 is not a fraction in \\[0, 1\\]"),
    (["prune", "--methods", "el2n:exclude=x"], "'exclude': 'x' is not a fraction in \\[0, 1\\]")])
def test_seeds_fractions_and_exclusions_outside_their_range_are_refused_before_training(tmp_path, capsys, args,
                                                                                       says):
    """`--seeds 0` trained nothing and wrote a table of NaN with exit 0; `--seeds -1` was a
    raw IndexError; `--fractions 0.5,1.5` kept "150%" as all; `--exclude-top 2` said "give
    fractions of at most -1"; `exclude=x` was float()'s ValueError."""
    assert main(["experiment", *args[:1], "--mode", "tiny", *args[1:], "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"gradscore experiment: error: invalid value for {says}.*\n", err), err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("model,kwargs,says", [(MLP, *case) for case in [
    ('{"d_in": 5, "n_classes": 3}', r"train.h5: field 'inputs' \(per-example shape \(6,\), torch.float32\) does not "
                                    r"fit the model of --model gradscore.demos.models:mlp: mat1 and mat2 shapes"),
    ('{"d_in": 6, "n_classes": 2}', r"train.h5: field 'targets' has label 2 at index \d+, outside \[0, 2\) of the "
                                    r"model's 2 outputs"),
    ('{"d_in": 6, "classes": 3}', r"model factory 'gradscore.demos.models:mlp' rejected model_kwargs \{'d_in': 6, "
                                  r"'classes': 3\}: mlp\(\) got an unexpected keyword argument 'classes'")]] + [
    ("tests_factory:odd_width", '{"width": 3}', r"model factory 'tests_factory:odd_width' failed on model_kwargs "
                                                r"\{'width': 3\} \(ValueError: width must be even; raised at "
                                                r"\S*tests_factory.py:\d+\)")])
def test_user_data_that_does_not_fit_the_model_is_one_error_before_training(tmp_path, capsys, model, kwargs, says):
    """A --model that does not take the --train inputs, has fewer outputs than its labels,
    or refuses its --model-kwargs (a TypeError, or a check of the factory's own) was torch's
    or Python's raw traceback (exit 1) from inside the training."""
    import gradscore as gs
    rng = np.random.default_rng(0)
    for name, n in (("train", 60), ("test", 20)):
        gs.save_dataset(tmp_path / f"{name}.h5", rng.standard_normal((n, 6)).astype(np.float32), np.arange(n) % 3)
    assert main(["experiment", "regions", "--mode", "tiny", "--out", str(tmp_path / "o"),
                 "--train", str(tmp_path / "train.h5"), "--test", str(tmp_path / "test.h5"),
                 "--model", model, "--model-kwargs", kwargs]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"gradscore experiment: error: (.*/)?{says}.*\n", err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_fast_modes_run(tmp_path):
    for name in ("prune", "regions", "jtt"):
        assert main(["experiment", name, "--out", str(tmp_path)]) == 0


def test_lds_by_hand():
    from gradscore.demos.experiments.attribution import lds
    masks = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype=bool)
    scores = np.array([[1.0, -1.0], [2.0, 0.5], [0.0, 2.0]])
    predicted = masks @ scores                              # [[1, 1], [2, 2.5], [3, -0.5], [0, 2]]
    actual = np.stack([predicted[:, 0], -predicted[:, 1]], 1)
    assert lds(scores, masks, actual) == pytest.approx(0.0)  # +1 for query 0, -1 for query 1


def test_attribution_tiny(tmp_path):
    assert main(["experiment", "attribution", "--mode", "tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "attribution.json").read_text())
    assert {r["method"] for r in result["lds"]} >= {"gradscore tracin, k=256", "gradscore trak, k=256"}
    assert all(np.isfinite(r["lds"]) and r["seconds"] > 0 for r in result["lds"])
    assert (tmp_path / "attribution.png").stat().st_size > 0 and (tmp_path / "attribution.md").exists()


@pytest.mark.slow
def test_attribution_fast_beats_random_removal(tmp_path):
    """The issue's fast mode (20 subset models, k = 2048 and 8192, traker beside when
    installed): TracIn's LDS is positive and removing its top proponents flips more
    predictions than removing random examples."""
    assert main(["experiment", "attribution", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "attribution.json").read_text())
    lds = {r["method"]: r["lds"] for r in result["lds"]}
    assert lds["gradscore tracin, k=8192"] > 0.05
    rates = result["flips"]["rates"]
    assert rates["gradscore tracin, k=8192"] > rates["random examples"]


def test_a_rerun_with_fewer_epochs_trains_a_folder_of_its_own_checkpoints(tmp_path):
    """A rerun of an experiment into its OUT (another --mode) left the first run's later
    checkpoints in OUT/work: they were scored with the rerun's, or refused for their epochs."""
    import gradscore as gs
    from gradscore.demos.experiments.common import checkpointed_run
    st = digits_setup(0.2)
    for epochs in (3, 2):
        ckpts, _ = checkpointed_run(st, tmp_path, epochs=epochs)
    assert [i.epoch for i in gs.CheckpointStore(ckpts)] == [1, 2]
