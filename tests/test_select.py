"""Selection (by score, regions, JTT) and plots on a real scores file."""
from __future__ import annotations

import json

import numpy as np
import pytest

import gradscore as gs
from gradscore.cli import main
from gradscore.reports.select import by_score, jtt_weights, regions


def test_by_score_exact_indices():
    v = np.array([5.0, 1.0, 4.0, 3.0, 2.0, 0.0, 6.0, 7.0, 8.0, 9.0])
    assert by_score(v, keep=0.3).tolist() == [9, 8, 7]
    assert by_score(v, keep=0.3, highest=False).tolist() == [5, 1, 4]
    assert by_score(v, keep=0.2, exclude_top=0.1).tolist() == [8, 7]
    with pytest.raises(gs.ConfigError, match="'keep'"):
        by_score(v, keep=1.5)


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


def _run_parts(scores_file):
    cfg = gs.load_scores(scores_file)["config"]
    return cfg["checkpoints"], cfg["data"]
