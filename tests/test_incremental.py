"""Incremental runs: a rerun with other scores or another checkpoint window reuses the
per-checkpoint rows of the existing scores file that still apply, computes only the rest,
and writes a file bit-identical to a fresh run; ``--ids``/``--range`` score a subset."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

import gradscore as gs
from gradscore.io.checkpoints import CheckpointStore
from gradscore.cli import main

from helpers import assert_same_scores_file


@pytest.fixture
def built(monkeypatch) -> list[int]:
    """The checkpoint indices whose model a run builds (= the checkpoints it scores)."""
    seen: list[int] = []
    original = CheckpointStore.build_model

    def build_model(self, t, *args, **kwargs):
        seen.append(t)
        return original(self, t, *args, **kwargs)
    monkeypatch.setattr(CheckpointStore, "build_model", build_model)
    return seen


OPTS = dict(chunk_size=40, batch_size=16, progress=False)


def test_epochs_upto_scores_only_the_checkpoints_it_uses(tiny_run, tmp_path, built):
    ckpts, data = tiny_run
    res = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "s.h5", epochs_upto=1, **OPTS))
    assert sorted(set(built)) == [0, 1]
    assert res["per_checkpoint"]["el2n"].shape == (2, 90)
    assert res["checkpoints"]["step"].tolist() == [0, 1]
    np.testing.assert_allclose(res["scores"]["el2n"], res["per_checkpoint"]["el2n"].astype(np.float64).mean(0),
                               rtol=1e-12)


def test_adding_a_score_of_the_same_pass_computes_nothing(tiny_run, tmp_path, built):
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    gs.score(ckpts, data, out=out, scores=["el2n", "grand"], **OPTS)
    built.clear()
    gs.score(ckpts, data, out=out, scores=["el2n", "grand", "loss", "forgetting", "confidence"], **OPTS)
    assert built == []    # every row came from the existing file; no --overwrite needed to add
    gs.score(ckpts, data, out=tmp_path / "fresh.h5", scores=["el2n", "grand", "loss", "forgetting", "confidence"],
             **OPTS)
    assert_same_scores_file(out, tmp_path / "fresh.h5")
    assert not (tmp_path / "s.h5.partial").exists()


def test_adding_a_gradient_score_reruns_the_gradient_pass_only(tiny_run, tmp_path, built):
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    gs.score(ckpts, data, out=out, scores=["el2n"], **OPTS)
    built.clear()
    gs.score(ckpts, data, out=out, scores=["el2n", "grand"], **OPTS)
    assert sorted(set(built)) == [0, 1, 2]
    gs.score(ckpts, data, out=tmp_path / "fresh.h5", scores=["el2n", "grand"], **OPTS)
    assert_same_scores_file(out, tmp_path / "fresh.h5")


def test_a_wider_window_computes_only_the_missing_checkpoints(tiny_run, tmp_path, built):
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    gs.score(ckpts, data, out=out, epochs_upto=1, **OPTS)
    built.clear()
    with pytest.raises(gs.ConfigMismatchError, match=r"epochs_upto \(1 before, None now\)"):
        gs.score(ckpts, data, out=out, **OPTS)   # changes the existing scores: needs --overwrite
    gs.score(ckpts, data, out=out, overwrite=True, **OPTS)
    assert sorted(set(built)) == [2]
    gs.score(ckpts, data, out=tmp_path / "fresh.h5", **OPTS)
    assert_same_scores_file(out, tmp_path / "fresh.h5")
    built.clear()
    gs.score(ckpts, data, out=out, epochs_upto=0, overwrite=True, **OPTS)   # narrower: all reused
    assert built == []
    gs.score(ckpts, data, out=tmp_path / "fresh0.h5", epochs_upto=0, **OPTS)
    assert_same_scores_file(out, tmp_path / "fresh0.h5")


def test_rows_made_with_other_numerics_are_not_reused(tiny_run, tmp_path, built):
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    gs.score(ckpts, data, out=out, **OPTS)
    built.clear()
    gs.score(ckpts, data, out=out, overwrite=True, **{**OPTS, "batch_size": 7})
    assert sorted(set(built)) == [0, 1, 2]
    built.clear()
    gs.score(ckpts, data, out=out, overwrite=True, dtype="float64", **{**OPTS, "batch_size": 7})
    assert sorted(set(built)) == [0, 1, 2]


def test_removing_a_score_needs_overwrite(tiny_run, tmp_path):
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    gs.score(ckpts, data, out=out, scores=["el2n", "loss"], **OPTS)
    with pytest.raises(gs.ConfigMismatchError, match="scores"):
        gs.score(ckpts, data, out=out, scores=["el2n"], **OPTS)
    assert set(gs.load_scores(out)["scores"]) == {"el2n", "loss"}


def test_range_and_ids_score_a_subset(tiny_run, tmp_path):
    ckpts, data = tiny_run
    full = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "full.h5", dtype="float64", **OPTS))
    part = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "r.h5", dtype="float64", index_range="10:30", **OPTS))
    assert part["ids"].tolist() == list(range(110, 130))
    np.testing.assert_array_equal(part["noisy"], full["noisy"][10:30])
    for k in full["per_checkpoint"]:
        np.testing.assert_allclose(part["per_checkpoint"][k], full["per_checkpoint"][k][:, 10:30], rtol=1e-10)
    ids = tmp_path / "ids.txt"
    ids.write_text("150\n101\n189\n150\n")
    part = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "i.h5", dtype="float64", ids=ids, **OPTS))
    assert part["ids"].tolist() == [101, 150, 189]     # in the dataset's order, each once
    for k in full["scores"]:
        np.testing.assert_allclose(part["scores"][k], full["scores"][k][[1, 50, 89]], rtol=1e-10)
    np.save(tmp_path / "ids.npy", np.array([120, 121]))
    part = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "n.h5", ids=tmp_path / "ids.npy", **OPTS))
    assert part["ids"].tolist() == [120, 121]


def test_subset_mistakes_get_one_line(tiny_run, tmp_path, capsys):
    ckpts, data = tiny_run
    base = ["run", "--checkpoints", str(ckpts), "--data", str(data), "--quiet"]
    ids = tmp_path / "ids.txt"
    ids.write_text("101\n7\n")
    cases = [
        (["--ids", str(ids)], "ids.txt: 1 id(s) are not in"),
        (["--ids", str(tmp_path / "missing.txt")], "missing.txt: does not exist"),
        (["--range", "80:200"], "range"),
        (["--range", "abc"], "range"),
        (["--range", "5:5"], "range"),
        (["--range", "0:5", "--ids", str(ids)], "not both"),
    ]
    for extra, msg in cases:
        out = tmp_path / "s.h5"
        assert main([*base, "--out", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (extra, err)
        assert not out.exists() and not (tmp_path / "s.h5.partial").exists()
    ids.write_text("101\n102\n")
    assert main([*base, "--out", str(tmp_path / "ok.h5"), "--ids", str(ids)]) == 0
    with h5py.File(tmp_path / "ok.h5") as f:
        assert f["ids"][()].tolist() == [101, 102]
    assert main([*base, "--out", str(tmp_path / "ok2.h5"), "--range", ":3"]) == 0
    assert gs.load_scores(tmp_path / "ok2.h5")["ids"].tolist() == [100, 101, 102]


def test_a_changed_ids_file_is_a_changed_run(tiny_run, tmp_path):
    ckpts, data = tiny_run
    ids = tmp_path / "ids.txt"
    ids.write_text("101\n102\n")
    out = tmp_path / "s.h5"
    gs.score(ckpts, data, out=out, ids=ids, **OPTS)
    ids.write_text("101\n103\n")
    with pytest.raises(gs.ConfigMismatchError, match="the data"):
        gs.score(ckpts, data, out=out, ids=ids, **OPTS)


def test_an_interrupted_incremental_run_resumes(tiny_run, tmp_path, monkeypatch):
    from gradscore.io.store import HDF5ScoresWriter
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    gs.score(ckpts, data, out=out, epochs_upto=0, scores=["el2n", "grand"], **OPTS)
    original, calls = HDF5ScoresWriter.write_chunk, []

    def write_chunk(self, t, c, metrics):
        calls.append((t, c))
        if len(calls) == 5:
            raise KeyboardInterrupt
        original(self, t, c, metrics)
    monkeypatch.setattr(HDF5ScoresWriter, "write_chunk", write_chunk)
    with pytest.raises(KeyboardInterrupt):
        gs.score(ckpts, data, out=out, scores=["el2n", "grand"], overwrite=True, **OPTS)
    assert gs.load_scores(out)["per_checkpoint"]["el2n"].shape == (1, 90)   # the old file is intact
    monkeypatch.setattr(HDF5ScoresWriter, "write_chunk", original)
    gs.score(ckpts, data, out=out, scores=["el2n", "grand"], overwrite=True, **OPTS)
    gs.score(ckpts, data, out=tmp_path / "fresh.h5", scores=["el2n", "grand"], **OPTS)
    assert_same_scores_file(out, tmp_path / "fresh.h5")


def test_rows_of_another_rows_version_are_not_reused(tiny_run, tmp_path, built, monkeypatch):
    """Rows written before a metric was added (margin, rows version 2) lack it: recomputed."""
    from gradscore import pipeline
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    current = pipeline.ROWS_VERSION
    monkeypatch.setattr(pipeline, "ROWS_VERSION", current - 1)
    gs.score(ckpts, data, out=out, **OPTS)
    monkeypatch.setattr(pipeline, "ROWS_VERSION", current)
    built.clear()
    gs.score(ckpts, data, out=out, overwrite=True, **OPTS)
    assert sorted(set(built)) == [0, 1, 2]


def test_aggregate_rewrites_the_window_bit_identical_to_a_fresh_run(tiny_run, tmp_path, built, capsys):
    import hashlib
    ckpts, data = tiny_run
    full = tmp_path / "full.h5"
    scores = ["el2n", "loss", "aum", "forgetting", "confidence"]
    gs.score(ckpts, data, out=full, scores=scores, **OPTS)
    digest = hashlib.sha256(full.read_bytes()).hexdigest()
    built.clear()
    assert main(["aggregate", str(full), "--epochs-upto", "1", "--out", str(tmp_path / "early.h5")]) == 0
    assert built == []                               # no model was built: rows only
    gs.score(ckpts, data, out=tmp_path / "fresh.h5", scores=scores, epochs_upto=1, **OPTS)
    assert_same_scores_file(tmp_path / "early.h5", tmp_path / "fresh.h5")
    assert hashlib.sha256(full.read_bytes()).hexdigest() == digest     # the input is never modified
    # a narrower window from a windowed file, and other scores of the same pass
    assert main(["aggregate", str(tmp_path / "early.h5"), "--epochs-upto", "0", "--scores", "aum,el2n",
                 "--out", str(tmp_path / "first.h5")]) == 0
    gs.score(ckpts, data, out=tmp_path / "fresh0.h5", scores=["aum", "el2n"], epochs_upto=0, **OPTS)
    assert_same_scores_file(tmp_path / "first.h5", tmp_path / "fresh0.h5")
    capsys.readouterr()
    for argv, says in (([str(tmp_path / "early.h5"), "--epochs-upto", "2"], "holds only the checkpoints with epoch <= 1"),
                       ([str(full), "--scores", "grand"], "need other per-checkpoint metrics"),
                       ([str(full), "--scores", "el2n,pds"], "pds need target dots, which a run with --target "
                        "computes: full.h5 was made without one; use `gradscore run --target FILE`"),
                       ([str(full), "--epochs-upto", "-1"], "epochs_upto"),
                       ([str(full)], "is the scores file, an input"),
                       ([str(tmp_path / "nope.h5")], "nope.h5: no such file"),
                       ([str(data)], "is not a gradscore scores file")):
        out = argv[0] if says.startswith("is the") else str(tmp_path / "x.h5")
        assert main(["aggregate", *argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.h5").exists()


def test_aggregate_keeps_every_checkpoint_for_pds_and_moves_the_window(tmp_path):
    from helpers import make_run
    ckpts, data = make_run(tmp_path)
    target = gs.save_dataset(tmp_path / "val.h5", np.random.default_rng(0).normal(size=(20, 12)).astype(np.float32),
                             np.arange(20) % 4)
    opts = dict(target=target, variants=("cos", "rank"), **OPTS)
    scores = ["pds", "target_dot", "grand", "el2n"]
    gs.score(ckpts, data, out=tmp_path / "full.h5", scores=scores, **opts)
    gs.reaggregate(tmp_path / "full.h5", tmp_path / "early.h5", epochs_upto=1)
    gs.score(ckpts, data, out=tmp_path / "fresh.h5", scores=scores, epochs_upto=1, **opts)
    assert_same_scores_file(tmp_path / "early.h5", tmp_path / "fresh.h5")
    assert gs.load_scores(tmp_path / "early.h5")["checkpoints"]["selected"].tolist() == [True, True, False]


def test_a_step_window_in_run_and_aggregate(tiny_run, tmp_path, built, capsys):
    ckpts, data = tiny_run
    full = tmp_path / "full.h5"
    gs.score(ckpts, data, out=full, scores=["el2n", "aum"], **OPTS)
    built.clear()
    fresh = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "fresh.h5", scores=["el2n", "aum"], steps="1:3",
                                    **OPTS))
    assert sorted(set(built)) == [1, 2] and fresh["checkpoints"]["step"].tolist() == [1, 2]   # only those scored
    assert main(["aggregate", str(full), "--steps", "1:3", "--out", str(tmp_path / "s.h5")]) == 0
    assert_same_scores_file(tmp_path / "s.h5", tmp_path / "fresh.h5")
    both = gs.score(ckpts, data, out=tmp_path / "both.h5", scores=["el2n", "aum"], steps="1:", epochs_upto=1, **OPTS)
    assert gs.load_scores(both)["checkpoints"]["step"].tolist() == [1]
    capsys.readouterr()
    assert main(["aggregate", str(tmp_path / "s.h5"), "--steps", "0:3", "--out", str(tmp_path / "x.h5")]) == 2
    assert "a wider window needs `gradscore run`" in capsys.readouterr().err
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(tmp_path / "y.h5"),
                 "--steps", "7:9", "--quiet"]) == 2
    assert "selects no checkpoint" in capsys.readouterr().err
