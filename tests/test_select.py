"""Selection (by score, regions, JTT) and plots on a real scores file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gradscore as gs
from gradscore.cli import main
from gradscore.reports.select import by_score, jtt_weights, regions
from helpers import per_checkpoint_reads, per_checkpoint_rows_read


def test_by_score_exact_indices():
    v = np.array([5.0, 1.0, 4.0, 3.0, 2.0, 0.0, 6.0, 7.0, 8.0, 9.0])
    assert by_score(v, keep=0.3).tolist() == [9, 8, 7]
    assert by_score(v, keep=0.3, highest=False).tolist() == [5, 1, 4]
    assert by_score(v, keep=0.2, exclude_top=0.1).tolist() == [8, 7]
    with pytest.raises(gs.ConfigError, match="'keep'"):
        by_score(v, keep=1.5)
    for keep in ("0.5", None, True):   # a string compared with 0 was Python's TypeError
        with pytest.raises(gs.ConfigError, match=f"invalid value for 'keep': {keep!r} is not a fraction in"):
            by_score(v, keep=keep)
    assert by_score(v, keep=np.float32(0.3)).tolist() == [9, 8, 7]
    assert by_score(v, keep=0.9, exclude_top=0.1).tolist() == [8, 7, 6, 0, 2, 3, 4, 1, 5]   # all that is left
    # more than is left after the excluded top: a shorter selection than asked, without a word (0 at 1.0)
    for keep, exclude in ((0.5, 1.0), (0.7, 0.4), (0.2, 0.9)):
        with pytest.raises(gs.ConfigError, match=f"invalid value for 'keep': {keep} after exclude_top {exclude} asks "
                                                 f"for more examples than are left; keep at most {1 - exclude:g}"):
            by_score(v, keep=keep, exclude_top=exclude)


def test_the_kept_and_the_excluded_fractions_partition_the_ranking():
    """exclude_top and keep were each rounded to a count: keep 0.5 after exclude_top 0.5 of 5
    examples kept ranks 2-3 and silently dropped rank 4, though the two fractions cover the
    whole ranking. The kept slice now ends at round((exclude_top + keep)·n), so kept and
    excluded always partition the ranking, and keep + exclude_top = 1 keeps all the rest."""
    for n in range(1, 40):
        v = np.random.default_rng(n).standard_normal(n)
        for exclude in (0.0, 0.1, 0.25, 0.3, 0.5, 0.7):
            picked = by_score(v, keep=1 - exclude, exclude_top=exclude)
            dropped = np.argsort(-v, kind="stable")[:int(round(exclude * n))]
            assert sorted([*picked, *dropped]) == list(range(n)), (n, exclude)
            for keep in (0.1, 0.3, 1 - exclude):
                if keep + exclude <= 1:
                    assert len(by_score(v, keep=keep, exclude_top=exclude)) == int(round((exclude + keep) * n)) - \
                        int(round(exclude * n)), (n, exclude, keep)


def test_regions_and_jtt_weights():
    conf = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.6])
    var = np.array([0.01, 0.02, 0.3, 0.05, 0.25, 0.1])
    r = regions(conf, var, fraction=1 / 3)
    assert r["easy"].tolist() == [0, 3] and r["hard"].tolist() == [1, 4] and r["ambiguous"].tolist() == [2, 4]
    assert jtt_weights(np.array([1, 0, 1, 0]), 20).tolist() == [1.0, 20.0, 1.0, 20.0]


@pytest.fixture
def scores_file(tiny_run, tmp_path):
    ckpts, data = tiny_run
    return gs.score(ckpts, data, out=tmp_path / "s.h5", progress=False,
                    scores=["el2n", "confidence", "variability", "correctness", "forgetting"])


def test_select_files_and_cli(scores_file, tmp_path, capsys):
    res = gs.load_scores(scores_file)
    out = tmp_path / "sel.json"
    assert main(["select", str(scores_file), "--by", "el2n", "--keep", "0.1", "--out", str(out)]) == 0
    sel = json.loads(out.read_text())
    expected = np.argsort(-res["scores"]["el2n"], kind="stable")[:9]
    assert sel["indices"] == expected.tolist() and sel["ids"] == res["ids"][expected].tolist()
    capsys.readouterr()
    assert main(["select", str(scores_file), "--region", "all", "--out", str(out)]) == 2   # exists
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert json.loads(out.read_text())["indices"] == expected.tolist()                  # untouched
    assert main(["select", str(scores_file), "--region", "all", "--out", str(out), "--overwrite"]) == 0
    sel = json.loads(out.read_text())
    assert {"easy_region", "ambiguous_region", "hard_region"} <= set(sel) and len(sel["hard_region"]) == 30
    assert main(["select", str(scores_file), "--jtt", "--checkpoint", "0", "--upweight", "5", "--out", str(out),
                 "--overwrite"]) == 0
    sel = json.loads(out.read_text())
    errors = np.flatnonzero(res["per_checkpoint"]["correct"][0] == 0)
    assert sel["error_set"] == errors.tolist()
    w = np.load(tmp_path / "sel_weights.npz")
    assert w["weights"][errors].tolist() == [5.0] * len(errors) and w["weights"].sum() == 90 + 4 * len(errors)
    capsys.readouterr()
    assert main(["select", str(scores_file), "--by", "pds", "--out", str(out), "--overwrite"]) == 2
    assert "score 'pds' is not in the scores file" in capsys.readouterr().err
    assert main(["select", str(scores_file), "--out", str(out), "--overwrite"]) == 2
    assert "exactly one of" in capsys.readouterr().err


def test_an_option_of_another_way_of_selecting_is_refused(scores_file, tmp_path, capsys):
    """`select --jtt --keep 0.5` took the whole error set, `--by el2n --checkpoint 2` the last
    checkpoint's el2n, `--region hard --lowest` the same region: each option was dropped
    without a word. Now one line, exit 2, and no file."""
    out = str(tmp_path / "k.json")
    cases = {("--jtt", "--keep", "0.5"): "--keep applies to --by only",
             ("--region", "hard", "--lowest"): "--highest/--lowest applies to --by only",
             ("--by", "el2n", "--checkpoint", "2"): "--checkpoint applies to --jtt only",
             ("--by", "el2n", "--upweight", "5"): "--upweight applies to --jtt only",
             ("--by", "el2n", "--fraction", "0.5"): "--fraction applies to --region only",
             ("--by", "el2n", "--temperature", "0.5"): "--temperature applies to --sample only",
             ("--region", "all", "--per-class", "--data", "x.h5"): "--per-class applies to --by only",
             ("--by", "el2n", "--data", "x.h5"): "--data applies to --per-class only",
             ("--jtt", "--allow-nonfinite"): "--allow-nonfinite applies to --by or --region only"}
    for extra, says in cases.items():
        assert main(["select", str(scores_file), *extra, "--out", out]) == 2, extra
        assert says in capsys.readouterr().err, extra
    assert not (tmp_path / "k.json").exists()
    assert main(["select", str(scores_file), "--by", "el2n", "--keep", "0.5", "--lowest", "--sample", "gumbel",
                 "--temperature", "0.5", "--seed", "1", "--out", out]) == 0


def test_plots(scores_file, tmp_path, capsys):
    for kind, name in (("datamap", "map.png"), ("datamap", "map.svg"), ("hist", "h.png"), ("hist", "h.svg")):
        assert main(["plot", str(scores_file), "--kind", kind, "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / name).stat().st_size > 5000
        head = (tmp_path / name).read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if name.endswith(".png") else b"<svg" in head or b"<?xml" in head
    assert main(["plot", str(scores_file), "--out", str(tmp_path / "big.png"), "--max-points", "10"]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "map.png").size == (704, 572)
    assert main(["plot", str(scores_file), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must end in .png or .svg" in capsys.readouterr().err
    plain = gs.score(*_run_parts(scores_file), out=tmp_path / "p.h5", scores=["el2n"], progress=False)
    assert main(["plot", str(plain), "--out", str(tmp_path / "y.png")]) == 2


def test_histograms_count_the_checkpoints_without_reading_the_rows(scores_file, tmp_path, monkeypatch):
    """The title counts the window's checkpoints from /checkpoints, not from the (T, N) rows
    it no longer reads."""
    from gradscore.reports import plots
    titles = []
    monkeypatch.setattr(plots, "score_histograms", lambda *a, title, **kw: titles.append(title))
    window = gs.reaggregate(scores_file, tmp_path / "w.h5", epochs_upto=1)
    for path in (scores_file, window):
        assert main(["plot", str(path), "--kind", "hist", "--out", str(tmp_path / "h.png"), "--overwrite"]) == 0
    assert "90 examples over 3 checkpoints" in titles[0] and "90 examples over 2 checkpoints" in titles[1], titles


def _run_parts(scores_file):
    cfg = gs.load_scores(scores_file)["config"]
    return cfg["checkpoints"], cfg["data"]


def test_by_score_per_class_keeps_the_fraction_within_each_class():
    from gradscore.reports.select import by_score
    rng = np.random.default_rng(0)
    classes = np.repeat([0, 1, 2], [100, 50, 10])
    v = rng.normal(size=160) + 5 * (classes == 0)          # class 0 would take every top slot
    idx = by_score(v, keep=0.2, classes=classes)
    assert np.bincount(classes[idx]).tolist() == [20, 10, 2]
    for c in range(3):                                       # within a class: its highest
        members = np.flatnonzero(classes == c)
        want = members[np.argsort(-v[members], kind="stable")[:len(idx[classes[idx] == c])]]
        assert sorted(idx[classes[idx] == c]) == sorted(want)


def test_gumbel_sampling_draws_by_weight_without_replacement_and_is_seeded():
    from gradscore.reports.select import by_score
    v = np.linspace(0, 3, 300)
    a = by_score(v, keep=0.1, sample="gumbel", temperature=1.0, seed=1)
    assert len(a) == 30 and len(set(a.tolist())) == 30
    assert np.array_equal(a, by_score(v, keep=0.1, sample="gumbel", temperature=1.0, seed=1))
    assert not np.array_equal(a, by_score(v, keep=0.1, sample="gumbel", temperature=1.0, seed=2))
    cold = by_score(v, keep=0.1, sample="gumbel", temperature=1e-4, seed=1)
    assert sorted(cold.tolist()) == sorted(by_score(v, keep=0.1).tolist())   # T -> 0: the hard top-k
    hot = np.concatenate([by_score(v, keep=0.1, sample="gumbel", temperature=1.0, seed=s) for s in range(50)])
    assert v[hot].mean() > v.mean() + 0.5 and len(np.unique(hot)) > 100      # weighted, yet diverse
    with pytest.raises(gs.ConfigError, match="temperature"):
        by_score(v, keep=0.1, sample="gumbel", temperature=0)


def test_select_per_class_through_the_cli(scores_file, tmp_path, capsys):
    import json
    res = gs.load_scores(scores_file)
    n = len(res["ids"])
    data = tmp_path / "labels.h5"
    labels = np.arange(n) % 3
    gs.save_dataset(data, np.zeros((n, 1), np.float32), labels)
    out = tmp_path / "keep.json"
    assert main(["select", str(scores_file), "--by", "el2n", "--keep", "0.5", "--per-class", "--data", str(data),
                 "--out", str(out)]) == 0
    sel = json.loads(out.read_text())
    counts = np.bincount(labels[sel["indices"]], minlength=3)
    assert counts.tolist() == [round(0.5 * (labels == c).sum()) for c in range(3)]
    assert main(["select", str(scores_file), "--by", "el2n", "--per-class", "--out", str(tmp_path / "x.json")]) == 2
    assert "--per-class needs --data" in capsys.readouterr().err


@pytest.mark.parametrize("command,reads", [
    (["select", "{s}", "--by", "el2n", "--keep", "0.5"], set()),
    (["select", "{s}", "--region", "all"], set()),
    (["select", "{s}", "--jtt", "--checkpoint", "0"], {"correct"}),
    (["flag", "{s}"], {"correct"}),   # the count's fit: the last selected checkpoint's row
    (["export", "{s}", "--format", "csv"], set()),
    (["plot", "{s}", "--kind", "hist"], set()),
    (["plot", "{s}"], set()),
])
def test_reports_read_only_the_per_checkpoint_rows_they_use(scores_file, tmp_path, monkeypatch, capsys,
                                                            command, reads):
    """A report loaded every (T, N) per-checkpoint row of the scores file to use (N,) scores:
    at 10⁷ examples and 50 checkpoints, gigabytes per metric (measured: `select` on 10⁶ × 10
    rose 330 MB over import). Each now reads the rows it uses, and nothing else."""
    read = per_checkpoint_reads(monkeypatch)
    suffix = {"export": ".csv", "plot": ".png"}.get(command[0], ".json")
    argv = [a.format(s=scores_file) for a in command] + ["--out", str(tmp_path / f"out{suffix}")]
    assert main(argv) == 0, capsys.readouterr().err
    assert {name for name, _ in read} == reads
    assert all(len(shape) == 1 for _, shape in read), read   # a checkpoint's row (N,), not all T


def test_run_reads_back_no_per_checkpoint_row(tiny_run, tmp_path, monkeypatch, capsys):
    """`gradscore run` read the whole file it had written, to print its warnings."""
    read = per_checkpoint_rows_read(monkeypatch)
    ckpts, data = tiny_run
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(tmp_path / "s.h5"),
                 "--scores", "el2n,grand", "--quiet"]) == 0
    assert read == []


def test_jtt_on_a_file_without_checkpoints_says_so(tmp_path, capsys):
    """An in-run recording has records per training step, no per-checkpoint `correct`:
    `select --jtt` on it was a KeyError traceback (exit 1)."""
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.arange(16) % 3
    with gs.InRun(model, out=tmp_path / "r.h5") as rec:
        with rec.step(range(16), y):
            F.cross_entropy(model(x), y).backward()
    assert main(["select", str(tmp_path / "r.h5"), "--jtt", "--out", str(tmp_path / "j.json")]) == 2
    err = capsys.readouterr().err
    assert "r.h5: is an in-run recording (gs.InRun)" in err and "--by correctness" in err, err
    assert not (tmp_path / "j.json").exists()


def test_jtt_and_sampling_options_of_the_wrong_kind_are_refused(scores_file):
    """`upweight=nan` wrote a weights file of NaNs, and `upweight=1` reported an empty error
    set; a checkpoint of 1.5, "1" or None, a temperature of "2", and a seed of -1, 1.5 or "x"
    were Python's or numpy's TypeError. The error set is the examples the checkpoint gets
    wrong, whatever their weight."""
    res = gs.load_scores(scores_file)
    wrong = np.flatnonzero(res["per_checkpoint"]["correct"][-1] == 0)
    assert len(wrong) and gs.select(scores_file, jtt=True, upweight=1)["error_set"] == wrong.tolist()
    for upweight in (float("nan"), float("inf"), "2", 0, -1):
        with pytest.raises(gs.ConfigError, match=f"invalid value for 'upweight': {upweight!r}; give a finite "
                                                 f"number > 0"):
            gs.select(scores_file, jtt=True, upweight=upweight)
    for checkpoint in (1.5, "1", None):
        with pytest.raises(gs.ConfigError, match=f"invalid value for 'checkpoint': {checkpoint!r}; give a whole "
                                                 f"number"):
            gs.select(scores_file, jtt=True, checkpoint=checkpoint)
    with pytest.raises(gs.ConfigError, match="invalid value for 'temperature': '2'; give a finite number > 0"):
        gs.select(scores_file, by="el2n", sample="gumbel", temperature="2")
    for seed in (-1, 1.5, "x"):
        with pytest.raises(gs.ConfigError, match=f"invalid value for 'seed': {seed!r}; give a whole number >= 0"):
            gs.select(scores_file, by="el2n", sample="gumbel", seed=seed)


def test_numpy_numbers_as_options_write_the_same_selection(scores_file, tmp_path):
    """`select(keep=np.float32(0.5))`, a numpy seed, upweight or checkpoint (a value a user
    computed with numpy) chose the examples and then crashed writing the JSON (float32 /
    int64 is not JSON serializable). The file and the result are a plain-number call's (the
    values exact in float32)."""
    calls = {"by": dict(by="el2n", keep=0.5, exclude_top=0.25, sample="gumbel", temperature=2.0, seed=3),
             "jtt": dict(jtt=True, upweight=3.0, checkpoint=1)}
    for name, options in calls.items():
        plain = gs.select(scores_file, out=tmp_path / f"{name}.json", **options)
        given = {k: (np.float32(v) if isinstance(v, float) else np.int64(v) if type(v) is int else v)
                 for k, v in options.items()}
        numpy = gs.select(scores_file, out=tmp_path / f"{name}_np.json", **given)
        assert {k: v for k, v in numpy.items() if k != "weights_file"} == {
            k: v for k, v in plain.items() if k != "weights_file"}
        written = [json.loads((tmp_path / f"{name}{kind}.json").read_text()) for kind in ("_np", "")]
        assert written[0] == written[1]


def test_a_data_file_other_than_the_scored_one_is_said_to_be(tiny_run, scores_file, tmp_path, capsys):
    """select --per-class, flag --data and diagnose --data match the --data file's labels and
    noisy mask to the scored examples by id: another dataset holding the same ids (a
    validation file of the same length) gave every per-class figure of its labels, silently.
    They say so now; of the scored data itself, nothing."""
    import h5py
    ckpts, data = tiny_run
    with h5py.File(data) as f:
        other = gs.save_dataset(tmp_path / "val.h5", f["inputs"][()] + 1, f["targets"][()][::-1].copy(),
                                ids=f["ids"][()], noisy=f["noisy"][()])
    dots = gs.score(ckpts, data, target=data, scores=["target_dot"], out=tmp_path / "t.h5", progress=False)
    commands = (["select", str(scores_file), "--by", "el2n", "--per-class", "--out", str(tmp_path / "k.json"),
                 "--overwrite", "--data"],
                ["flag", str(scores_file), "--score", "el2n", "--out", str(tmp_path / "f.json"), "--overwrite",
                 "--data"],
                ["diagnose", str(dots), "--score", "target_dot", "--data"])
    for command in commands:
        assert main([*command, str(data)]) == 0
        assert "is not the data" not in capsys.readouterr().err
        assert main([*command, str(other)]) == 0
        err = capsys.readouterr().err
        scored = scores_file if command[0] != "diagnose" else dots
        assert f"{other}: is not the data {scored} was scored from ({Path(data).resolve()})" in err, err
