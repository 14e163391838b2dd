"""Import of recorded training dynamics (jsonl) and export of scores."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import gradscore as gs
from gradscore.cli import main
from gradscore.io.dynamics import export_scores, import_dynamics

LOGITS = {  # guid -> per-epoch logits (3 classes), gold
    "a": ([[3, 0, 0], [4, 0, 0], [5, 0, 0]], 0),          # always correct
    "b": ([[0, 2, 0], [0, 0, 2], [0, 3, 0]], 1),          # correct, forgotten, relearned
    "c": ([[0, 0, 1], [0, 0, 2], [0, 0, 3]], 0),          # never learned
}


def _write(root, key="logits_epoch_{e}", subdir="training_dynamics", order=None, table=LOGITS):
    d = root / subdir if subdir else root
    d.mkdir(parents=True, exist_ok=True)
    for e in range(3):
        with open(d / f"dynamics_epoch_{e}.jsonl", "w") as f:
            for guid in (order or list(table)):
                logits, gold = table[guid]
                f.write(json.dumps({"guid": guid, key.format(e=e): logits[e], "gold": gold}) + "\n")
    return root


def _softmax_gold(logits, gold):
    z = np.exp(np.asarray(logits, float) - np.max(logits))
    return z[gold] / z.sum()


@pytest.mark.parametrize("fmt,key,subdir", [("cartography", "logits_epoch_{e}", "training_dynamics"),
                                            ("trainingdynamics", "logits", None)])
def test_import_metrics_match_hand_computation(tmp_path, fmt, key, subdir):
    root = _write(tmp_path / "dyn", key=key, subdir=subdir)
    res = gs.load_scores(import_dynamics(root, tmp_path / "s.h5", fmt=fmt))
    assert res["ids"].tolist() == ["a", "b", "c"]
    p = np.array([[_softmax_gold(LOGITS[g][0][e], LOGITS[g][1]) for g in LOGITS] for e in range(3)])
    np.testing.assert_allclose(res["per_checkpoint"]["p_gold"], p, rtol=1e-6)
    np.testing.assert_allclose(res["scores"]["confidence"], p.mean(0), rtol=1e-6)
    np.testing.assert_allclose(res["scores"]["variability"], p.std(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(res["scores"]["correctness"], [1, 2 / 3, 0])
    np.testing.assert_array_equal(res["scores"]["forgetting"], [0, 1, 3])


def test_guid_order_may_differ_between_epochs(tmp_path):
    root = _write(tmp_path / "dyn")
    (root / "training_dynamics" / "dynamics_epoch_1.jsonl").unlink()
    d = root / "training_dynamics"
    with open(d / "dynamics_epoch_1.jsonl", "w") as f:
        for guid in ("c", "a", "b"):
            f.write(json.dumps({"guid": guid, "logits_epoch_1": LOGITS[guid][0][1], "gold": LOGITS[guid][1]}) + "\n")
    res = gs.load_scores(import_dynamics(root, tmp_path / "s.h5"))
    assert res["per_checkpoint"]["correct"][1].tolist() == [1, 0, 0]


@pytest.mark.parametrize("line,pattern", [
    ("{not json", r"dynamics_epoch_1\.jsonl:2: not valid JSON"),
    ('{"guid": "b", "logits_epoch_1": [0, 0, 2]}', r"dynamics_epoch_1\.jsonl:2: record has no 'gold'"),
    ('{"guid": "b", "logits_epoch_1": [0, 2], "gold": 1}', r"dynamics_epoch_1\.jsonl:2: 2 logits where earlier records have 3"),
    ('{"guid": "z", "logits_epoch_1": [0, 0, 2], "gold": 1}', r"dynamics_epoch_1\.jsonl:2: guid 'z' is not in"),
    # a diverged epoch's logits: imported, they were NaN scores, and "never learned" forgetting
    ('{"guid": "b", "logits_epoch_1": [NaN, 0, 2], "gold": 1}', r"dynamics_epoch_1\.jsonl: guid 'b' has logit nan, "
                                                                 r"not finite .* and 0 more"),
    ('{"guid": "b", "logits_epoch_1": [0, -Infinity, 2], "gold": 1}',
     r"dynamics_epoch_1\.jsonl: guid 'b' has logit -inf, not finite"),
    ('{"guid": "b", "logits_epoch_1": [0, "nan", 2], "gold": 1}', r"dynamics_epoch_1\.jsonl: guid 'b' has logit nan"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, pattern):
    root = _write(tmp_path / "dyn")
    path = root / "training_dynamics" / "dynamics_epoch_1.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(gs.DataError, match=pattern):
        import_dynamics(root, tmp_path / "s.h5")
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "s.h5.partial").exists()


def test_info_describes_an_imported_file(tmp_path, capsys):
    """`gradscore info` on an imported file ended in a KeyError traceback (no checkpoints)."""
    scores = import_dynamics(_write(tmp_path / "dyn"), tmp_path / "s.h5", progress=False)
    assert main(["info", str(scores)]) == 0
    out = capsys.readouterr().out
    assert f"(gradscore {gs.__version__}), imported from {tmp_path / 'dyn'} (cartography)" in out, out
    assert "3 examples, 3 epochs" in out, out
    assert "scores/forgetting: mean 1.333, min 0, max 3" in out, out


def test_missing_epoch_file(tmp_path, capsys):
    root = _write(tmp_path / "dyn")
    (root / "training_dynamics" / "dynamics_epoch_1.jsonl").unlink()
    assert main(["import-dynamics", str(root), "--out", str(tmp_path / "s.h5")]) == 2
    assert "epoch file(s) [1] missing" in capsys.readouterr().err


def test_a_file_given_for_the_folder_is_named_for_what_it_is(tmp_path, capsys):
    """An epoch file or an exported td_metrics.jsonl given for the folder: "dynamics
    directory does not exist", of a file that exists. Now what it is, and what to give."""
    root = _write(tmp_path / "dyn")
    epoch = root / "training_dynamics" / "dynamics_epoch_0.jsonl"
    (tmp_path / "td_metrics.jsonl").write_text('{"guid": "a", "confidence": 0.5}\n')
    cases = {epoch: f"{epoch}: is one epoch's file; give its folder, {epoch.parent}",
             tmp_path / "td_metrics.jsonl": "td_metrics.jsonl: is a file, not a folder of dynamics_epoch_<e>.jsonl files",
             tmp_path / "nope": "nope: dynamics directory does not exist"}
    for path, says in cases.items():
        assert main(["import-dynamics", str(path), "--out", str(tmp_path / "s.h5")]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
        assert not (tmp_path / "s.h5").exists()


def test_export_round_trip_preserves_values_and_ids(tmp_path):
    root = _write(tmp_path / "dyn")
    scores = import_dynamics(root, tmp_path / "s.h5")
    res = gs.load_scores(scores)
    assert main(["export", str(scores), "--format", "td_metrics", "--out", str(tmp_path / "td.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "td.jsonl").read_text().splitlines()]
    assert [r["guid"] for r in rows] == ["a", "b", "c"] and [r["index"] for r in rows] == [0, 1, 2]
    for key, name in (("confidence", "confidence"), ("variability", "variability"),
                      ("forgetfulness", "forgetting"), ("threshold_closeness", "threshold_closeness")):
        assert [r[key] for r in rows] == res["scores"][name].tolist()
    export_scores(scores, tmp_path / "s.csv", fmt="csv")
    with open(tmp_path / "s.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == ["a", "b", "c"]
    for name, values in res["scores"].items():
        assert [float(r[name]) for r in table] == values.tolist()
    import pyarrow.parquet as pq
    export_scores(scores, tmp_path / "s.parquet", fmt="parquet")
    t = pq.read_table(tmp_path / "s.parquet").to_pydict()
    assert t["id"] == ["a", "b", "c"]
    for name, values in res["scores"].items():
        assert t[name] == values.tolist()


@pytest.mark.parametrize("fmt,name", [("td_metrics", "x.parquet"), ("td_metrics", "x.csv"), ("csv", "x.parquet"),
                                      ("csv", "x.jsonl"), ("parquet", "x.csv"), ("parquet", "x.JSONL"),
                                      ("csv", "x.h5"), ("td_metrics", "x.npz"), ("parquet", "x.png")])
def test_export_refuses_a_file_name_of_another_format(tmp_path, capsys, fmt, name):
    """``--format td_metrics --out x.parquet`` wrote jsonl into a file named .parquet, which
    pandas and pyarrow then failed to read; ``--format csv --out x.h5`` wrote CSV as x.h5."""
    scores = import_dynamics(_write(tmp_path / "dyn"), tmp_path / "s.h5", progress=False)
    assert main(["export", str(scores), "--format", fmt, "--out", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert name in err and f"--format {fmt}" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / name).exists()
    assert main(["export", str(scores), "--format", fmt, "--out", str(tmp_path / "noext")]) == 0


@pytest.mark.parametrize("fmt", ["td_metrics", "csv"])
def test_export_shows_a_progress_bar_unless_quiet(tmp_path, monkeypatch, fmt):
    """10⁷ rows take a minute or more: a bar on the terminal (tqdm's own choice, after 5 s),
    over every row; --quiet turns it off."""
    from gradscore.io import dynamics
    from helpers import progress_bars
    scores = import_dynamics(_write(tmp_path / "dyn"), tmp_path / "s.h5", progress=False)
    bars = progress_bars(monkeypatch, dynamics)
    assert main(["export", str(scores), "--format", fmt, "--out", str(tmp_path / "a")]) == 0
    assert main(["export", str(scores), "--format", fmt, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert [(b.total, b.done, b.disable) for b in bars] == [(3, 3, None), (3, 3, True)]


@pytest.mark.parametrize("epoch", [0, 1])
def test_a_line_that_is_not_utf8_is_named_and_nothing_is_left(tmp_path, capsys, epoch):
    """A byte that is not UTF-8 (a file saved as Latin-1) was a UnicodeDecodeError traceback
    (exit 1); in a later epoch it also left the import's journal behind."""
    root = _write(tmp_path / "dyn")
    path = root / "training_dynamics" / f"dynamics_epoch_{epoch}.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"b"', b'"b\xe9"')
    path.write_bytes(b"".join(lines))
    assert main(["import-dynamics", str(root), "--out", str(tmp_path / "s.h5")]) == 2
    err = capsys.readouterr().err
    assert f"dynamics_epoch_{epoch}.jsonl:2: not UTF-8 text" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dyn"]


def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
    """Windows tools often start a UTF-8 file with a byte-order mark."""
    root = _write(tmp_path / "dyn")
    plain = gs.load_scores(import_dynamics(root, tmp_path / "a.h5"))
    for path in (root / "training_dynamics").iterdir():
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    marked = gs.load_scores(import_dynamics(root, tmp_path / "b.h5"))
    assert marked["ids"].tolist() == plain["ids"].tolist()
    for k, v in plain["scores"].items():
        np.testing.assert_array_equal(marked["scores"][k], v)


def test_import_shows_a_progress_bar_over_the_bytes_unless_quiet(tmp_path, monkeypatch):
    """10⁶ examples over 5 epochs take a minute: a bar over the files' bytes on a terminal."""
    from gradscore.io import dynamics
    from helpers import progress_bars
    bars = progress_bars(monkeypatch, dynamics)
    root = _write(tmp_path / "dyn")
    size = sum(p.stat().st_size for p in (root / "training_dynamics").iterdir())
    assert main(["import-dynamics", str(root), "--out", str(tmp_path / "a.h5")]) == 0
    assert main(["import-dynamics", str(root), "--out", str(tmp_path / "b.h5"), "--quiet"]) == 0
    assert [(b.total, b.done, b.disable) for b in bars] == [(size, size, None), (size, size, True)]


def test_a_score_imported_dynamics_cannot_give_names_the_checkpoints(tmp_path, capsys):
    """Imported logits give the dynamics scores; select was told to rerun `gradscore run`, as if
    the file were a run's, for a gradient score."""
    scores = import_dynamics(_write(tmp_path / "dyn"), tmp_path / "s.h5", progress=False)
    assert main(["select", str(scores), "--by", "grand", "--out", str(tmp_path / "k.json")]) == 2
    err = capsys.readouterr().err
    assert "grand comes from saved checkpoints: `gradscore run --scores grand`" in err and "rerun" not in err, err


@pytest.mark.parametrize("name, fmt", [("s.csv", "csv"), ("s.parquet", "parquet"), ("td.jsonl", "td_metrics"),
                                       ("td.JSON", "td_metrics")])
def test_export_takes_its_format_from_the_out_name(tmp_path, capsys, name, fmt):
    """``export s.h5 --out s.csv`` failed with argparse's "--format is required" although the
    name says csv: the suffix now names the format; a name that says none (``noext``,
    ``x.png``) is one line asking for --format, and writes nothing."""
    scores = import_dynamics(_write(tmp_path / "dyn"), tmp_path / "s.h5", progress=False)
    assert main(["export", str(scores), "--out", str(tmp_path / name), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"{fmt} -> ")
    export_scores(scores, tmp_path / f"api{Path(name).suffix}")
    assert (tmp_path / name).read_bytes() == (tmp_path / f"api{Path(name).suffix}").read_bytes()
    for other in ("noext", "x.png"):
        assert main(["export", str(scores), "--out", str(tmp_path / other)]) == 2
        err = capsys.readouterr().err
        assert other in err and "--format" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / other).exists()


def test_probabilities_recorded_for_logits_are_refused_or_read_as_such(tmp_path, capsys):
    """Files of softmax outputs (each row >= 0, summing to 1) read as logits gave the softmax
    of probabilities: every p_gold squeezed toward 1/C, every score wrong, silently."""
    def softmax(z):
        z = np.exp(np.asarray(z, float) - np.max(z))
        return (z / z.sum()).tolist()
    probs = {g: ([softmax(z) for z in zs], gold) for g, (zs, gold) in LOGITS.items()}
    root = _write(tmp_path / "p", table=probs)
    argv = ["import-dynamics", str(root), "--out", str(tmp_path / "s.h5"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "dynamics_epoch_0.jsonl: every example's logits are probabilities" in err and "--probabilities" in err
    assert err.count("\n") == 1 and not (tmp_path / "s.h5").exists()
    assert main(argv + ["--probabilities"]) == 0
    res = gs.load_scores(tmp_path / "s.h5")
    p = np.array([[_softmax_gold(LOGITS[g][0][e], LOGITS[g][1]) for g in LOGITS] for e in range(3)])
    np.testing.assert_allclose(res["per_checkpoint"]["p_gold"], p, rtol=1e-6)
    np.testing.assert_array_equal(res["scores"]["forgetting"], [0, 1, 3])
    one_hot = {g: ([[float(i == gold) for i in range(3)]] * 3, gold) for g, (_, gold) in LOGITS.items()}
    assert main(["import-dynamics", str(_write(tmp_path / "h", table=one_hot)), "--out", str(tmp_path / "h.h5"),
                 "--quiet"]) == 0   # one-hot rows are as likely logits: read as such
    assert main(["import-dynamics", str(_write(tmp_path / "z")), "--out", str(tmp_path / "t.h5"), "--quiet",
                 "--probabilities"]) == 2   # logits said to be probabilities
    err = capsys.readouterr().err
    assert "dynamics_epoch_0.jsonl: guid 'a' has [3.0, 0.0, 0.0], not probabilities" in err and err.count("\n") == 1
