"""Sketch files and attribution: the stored sketches are the engine's; a stopped run
resumes bit-identically; TracIn and TRAK scores equal their formulas computed directly
from the sketches, whatever the block size; bad input is one line and exit code 2."""
from __future__ import annotations

import json
import h5py
import numpy as np
import pytest

import gradscore as gs
from gradscore.cli import main
from gradscore.io.checkpoints import CheckpointStore
from gradscore.io.store import HDF5ScoresWriter
from gradscore.sketches import Projection, SketchEngine
from gradscore.sketches.attribute import attribute
from gradscore.sketches.store import SketchFile, sketch
from gradscore.io.attrs import seal

from helpers import FORWARD_EDITS, USERHELP, USERNET, user_code_run


def _sketch(tiny_run, tmp_path, name="train.sketch.h5", **kw):
    ckpts, data = tiny_run
    kw = {"dim": 60, "chunk_size": 40, "store_dtype": "float32", "progress": False, **kw}
    return sketch(ckpts, data, out=tmp_path / name, **kw)


def _engine_sketches(ckpts, t, data, dim, seed):
    store = CheckpointStore(ckpts)
    model = store.build_model(t)
    names = [n for n, _ in model.named_parameters()]
    x, y = gs.load_dataset(data).read(0, len(gs.load_dataset(data)))
    proj = Projection.for_model(model, names, dim, seed)
    return SketchEngine(model, gs.resolve_loss(store.loss), names, proj).sketch_batch(x, y).dots.numpy()


def test_the_file_holds_the_engines_sketches(tiny_run, tmp_path):
    path = _sketch(tiny_run, tmp_path, seed=4)
    sf = SketchFile.open(path)
    T, N, dim = sf.shape
    assert (T, N) == (3, 90) and dim == sf.spec.dim
    for t in range(T):
        np.testing.assert_allclose(sf.read(t, 0, N), _engine_sketches(*tiny_run[:1], t, tiny_run[1], 60, 4),
                                   rtol=1e-5, atol=1e-7)
    with h5py.File(path) as f:
        sq = f["per_checkpoint/sq_sketch"][:]
        np.testing.assert_allclose(f["scores/self_influence"][:], (sf.lr[:, None] * sq).sum(0))
        np.testing.assert_allclose(sq[0], (f["sketch"][0].astype(np.float64) ** 2).sum(1), rtol=1e-6)


def test_a_stopped_run_resumes_to_the_same_file_bit_for_bit(tiny_run, tmp_path, monkeypatch):
    fresh = _sketch(tiny_run, tmp_path, name="fresh.h5")
    write, calls = HDF5ScoresWriter.write_chunk, [0]

    def stop_after_two(self, t, c, metrics):
        if calls[0] == 2:
            raise KeyboardInterrupt
        calls[0] += 1
        write(self, t, c, metrics)
    monkeypatch.setattr(HDF5ScoresWriter, "write_chunk", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        _sketch(tiny_run, tmp_path, name="stopped.h5")
    assert not (tmp_path / "stopped.h5").exists()
    assert len(list((tmp_path / "stopped.h5.partial").glob("t*.npz"))) == 2
    monkeypatch.setattr(HDF5ScoresWriter, "write_chunk", write)
    resumed = _sketch(tiny_run, tmp_path, name="stopped.h5")
    with h5py.File(fresh) as a, h5py.File(resumed) as b:
        assert np.array_equal(a["sketch"][:], b["sketch"][:])
        assert np.array_equal(a["scores/self_influence"][:], b["scores/self_influence"][:])


def test_ctrl_c_stops_attributing_at_the_next_block(tiny_run, tmp_path, monkeypatch):
    """Ctrl-C is held while the output is written (a KeyboardInterrupt inside HDF5's write
    callback crashes the process): attributing 10⁷ examples stops at its next block, not
    at its last, and leaves no file."""
    import signal
    from gradscore.sketches import attribute as module
    path = _sketch(tiny_run, tmp_path)
    blocks, plain = [], module.block_scores

    def scores(*args):
        blocks.append(1)
        if len(blocks) == 2:
            signal.raise_signal(signal.SIGINT)
        return plain(*args)
    monkeypatch.setattr(module, "block_scores", scores)
    with pytest.raises(KeyboardInterrupt):
        attribute(path, tiny_run[1], out=tmp_path / "a.h5", block_size=7, progress=False)
    assert len(blocks) == 2 and not [p for p in tmp_path.iterdir() if "a.h5" in p.name]   # nor its .a.h5.*.tmp


@pytest.mark.parametrize("method", ["tracin", "trak"])
def test_scores_equal_the_formula_whatever_the_block_size(tiny_run, tmp_path, method):
    ckpts, data = tiny_run
    path = _sketch(tiny_run, tmp_path)
    sf = SketchFile.open(path)
    outs = [attribute(path, data, out=tmp_path / f"a{b}.h5", method=method, top=5, full=True, block_size=b,
                      progress=False) for b in (7, 1000)]
    # the formula, from the stored training sketches and the queries sketched by the engine
    with h5py.File(path) as f:
        S, p = f["sketch"][:].astype(np.float64), f["per_checkpoint/p_gold"][:]
    Q = np.stack([_engine_sketches(ckpts, t, data, 60, 0) for t in range(3)]).astype(np.float64)
    if method == "tracin":
        want = sum(sf.lr[t] * S[t] @ Q[t].T for t in range(3))
    else:
        X = S[2] / (1 - p[2])[:, None]
        K = X.T @ X
        K += 1e-3 * np.trace(K) / len(K) * np.eye(len(K))
        want = S[2] @ np.linalg.solve(K, Q[2].T) / (1 - p[2])[None, :]   # queries are the training set
    tol = 1e-5 * np.abs(want).max()
    for out in outs:
        with h5py.File(out) as f:
            np.testing.assert_allclose(f["scores"][:], want, rtol=2e-4, atol=tol)
            np.testing.assert_allclose(f["target_dot"][:], want.mean(1), rtol=2e-4, atol=tol)
            ids = f["train_ids"][:]
            for side, order in (("proponents", -want), ("opponents", want)):   # the formula's top 5, up to ties
                rows = f[f"{side}/rows"][:]
                assert np.array_equal(f[f"{side}/ids"][:], ids[rows])
                np.testing.assert_allclose(np.take_along_axis(order.T, rows, 1), np.sort(order, axis=0)[:5].T,
                                           atol=tol)
                np.testing.assert_allclose(f[f"{side}/scores"][:], np.take_along_axis(want.T, rows, 1), atol=tol)

def test_bad_input_is_one_line_and_exit_code_2(tiny_run, tmp_path, capsys):
    ckpts, data = tiny_run
    path = _sketch(tiny_run, tmp_path)

    def fails(*argv, says):
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err

    fails("attribute", "--sketch", str(data), "--query", str(data), "--out", str(tmp_path / "x.h5"),
          says="is not a gradscore sketch file")
    fails("attribute", "--sketch", str(path), "--query", str(data), "--out", str(path),
          says="an input of this command")
    fails("sketch", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(path), "--dim", "80",
          says="dim (60 before, 80 now)")                          # another dim into the same file
    bad = tmp_path / "bad.h5"
    gs.save_dataset(bad, np.zeros((4, 3), np.float32), np.zeros(4, np.int64))
    fails("attribute", "--sketch", str(path), "--query", str(bad), "--out", str(tmp_path / "x.h5"),
          says="does not fit the model")
    first = sorted(ckpts.glob("step_*.h5"))[0]
    with h5py.File(first, "a") as f:                                 # a checkpoint changed since
        f.attrs["lr"] = 0.25
    fails("attribute", "--sketch", str(path), "--query", str(data), "--out", str(tmp_path / "x.h5"),
          says="differs from the checkpoint")
    first.unlink()
    fails("attribute", "--sketch", str(path), "--query", str(data), "--out", str(tmp_path / "x.h5"),
          says="has 2 checkpoints")
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("method", ["tracin", "trak"])
def test_a_damaged_sketch_file_is_named_not_the_output(tiny_run, tmp_path, capsys, method):
    # the sketches' checksum failing while the attribution file was being written was
    # "cannot write or read x.h5: ...": the output named, and a fix for another file
    import shutil
    from helpers import flip_a_byte_of
    _, data = tiny_run
    path = _sketch(tiny_run, tmp_path)
    bad = tmp_path / "bad.sketch.h5"
    shutil.copy(path, bad)
    with h5py.File(bad, "r") as f:
        chunks = f["sketch"].id.get_num_chunks()
    flip_a_byte_of(bad, "sketch")   # the first chunk: checkpoint 0's first rows
    assert chunks > 1
    every = ["--trak-checkpoints", "all"] if method == "trak" else []   # TRAK reads the last alone by default
    assert main(["attribute", "--sketch", str(bad), "--query", str(data), "--method", method, *every, "--out",
                 str(tmp_path / "x.h5"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"gradscore attribute: error: {bad}: is damaged (") and len(
        [line for line in err if "error" in line]) == 1, err
    assert "x.h5" not in err[-1] and not (tmp_path / "x.h5").exists()


@pytest.mark.slow   # spawns and kills the CLI; the interrupted-run test above stays in the default set
def test_a_killed_sketch_run_resumes_bit_identically(tiny_run, tmp_path):
    import subprocess
    import sys

    from helpers import sigkill_when
    ckpts, data = tiny_run
    cmd = [sys.executable, "-m", "gradscore", "sketch", "--checkpoints", str(ckpts), "--data", str(data),
           "--dim", "60", "--chunk-size", "1", "--batch-size", "1", "--quiet"]
    killed, partial = tmp_path / "killed.h5", tmp_path / "killed.h5.partial"
    sigkill_when(cmd + ["--out", str(killed)], lambda: partial.is_dir() and len(list(partial.glob("t*.npz"))) >= 5)
    assert not killed.exists() and 5 <= len(list(partial.glob("t*.npz"))) < 270
    subprocess.run(cmd + ["--out", str(killed)], check=True, capture_output=True)
    assert main(cmd[3:] + ["--out", str(tmp_path / "clean.h5")]) == 0
    with h5py.File(killed) as a, h5py.File(tmp_path / "clean.h5") as b:
        assert np.array_equal(a["sketch"][:], b["sketch"][:]) and np.array_equal(a["ids"][:], b["ids"][:])


def test_info_describes_sketch_and_attribution_files(tiny_run, tmp_path, capsys):
    ckpts, data = tiny_run
    path = _sketch(tiny_run, tmp_path, seed=2)
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "sketch file" in text and "3 checkpoints x 90 examples x" in text and "seed 2" in text
    assert "scores/self_influence" in text
    attr = attribute(path, data, out=tmp_path / "a.h5", top=3, progress=False)
    assert main(["info", str(attr)]) == 0
    text = capsys.readouterr().out
    assert "attribution file" in text and "tracin" in text and "90 queries" in text and "top 3" in text


def test_the_cli_says_how_many_it_kept_where_top_is_above_the_training_set(tiny_run, tmp_path, capsys):
    """`--top 100000` of 90 training examples kept 90 and said "top 100000"."""
    _, data = tiny_run
    path = _sketch(tiny_run, tmp_path)
    assert main(["attribute", "--sketch", str(path), "--query", str(data), "--top", "100000", "--out",
                 str(tmp_path / "a.h5"), "--quiet"]) == 0
    assert "(tracin, top 90 of 90) ->" in capsys.readouterr().out
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f["proponents/ids"].shape == (90, 90)


def test_a_sketch_files_self_influence_works_with_select_and_export(tiny_run, tmp_path, capsys):
    """docs/formats.md: a sketch file's /scores/self_influence works with select and export.
    Its csv export (columns id, self_influence) was not known for gradscore's own, so
    --overwrite refused to replace it ("exists and is not a gradscore export")."""
    path = _sketch(tiny_run, tmp_path, seed=2)
    s = gs.load_scores(path)["scores"]["self_influence"]
    assert main(["select", str(path), "--by", "self_influence", "--keep", "0.5", "--out",
                 str(tmp_path / "keep.json")]) == 0
    kept = json.loads((tmp_path / "keep.json").read_text())["indices"]
    assert sorted(kept) == sorted(np.argsort(s, kind="stable")[-45:].tolist())
    out = tmp_path / "si.csv"
    for _ in range(2):   # the second replaces the first
        assert main(["export", str(path), "--format", "csv", "--out", str(out), "--overwrite"]) == 0, \
            capsys.readouterr().err
    rows = out.read_text().splitlines()
    assert rows[0] == "id,self_influence" and [float(r.split(",")[1]) for r in rows[1:]] == s.tolist()


def test_run_takes_its_target_from_a_sketch_file(tiny_run, tmp_path):
    """`run --target T.sketch.h5`: ∇J(θ_t) is Φᵀ m_t, m_t the mean of the target's
    sketches, so each example's dot_target is its own sketch's dot with m_t."""
    ckpts, data = tiny_run
    train = _sketch(tiny_run, tmp_path, name="train.sketch.h5", dim=60, seed=3)
    target = sketch(ckpts, data, out=tmp_path / "target.sketch.h5", dim=60, seed=3, store_dtype="float32",
                    progress=False)
    out = gs.score(ckpts, data, out=tmp_path / "s.h5", scores=["target_dot"], target=str(target),
                   costate=str(tmp_path / "c.h5"), progress=False)
    with h5py.File(out) as f, h5py.File(train) as a, h5py.File(target) as b:
        got = f["per_checkpoint/dot_target"][:]
        for t in range(3):
            m = b["sketch"][t].astype(np.float64).mean(0)
            np.testing.assert_allclose(got[t], a["sketch"][t].astype(np.float64) @ m, rtol=1e-4,
                                       atol=1e-6 * np.abs(got[t]).max())


def test_a_target_sketch_of_other_checkpoints_is_refused(tiny_run, tmp_path, capsys):
    from helpers import make_run
    ckpts, data = tiny_run
    other_ckpts, _ = make_run(tmp_path / "other", seed=1)
    target = sketch(other_ckpts, data, out=tmp_path / "t.sketch.h5", dim=40, progress=False)
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--target", str(target),
                 "--scores", "target_dot", "--out", str(tmp_path / "s.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was sketched at other checkpoints" in err, err


def test_string_ids_go_through_sketch_and_attribution(tmp_path):
    """Imported data keeps string ids (guids): they come back in every output."""
    from helpers import make_run
    ckpts, data = make_run(tmp_path, n=30)
    x, y = gs.load_dataset(data).read(0, 30)
    ids = np.array([f"ex-{i:03d}" for i in range(30)], dtype=object)
    named = gs.save_dataset(tmp_path / "named.h5", x.numpy(), y.numpy(), ids=ids)
    path = sketch(ckpts, named, out=tmp_path / "s.h5", dim=30, progress=False)
    assert list(SketchFile.open(path).ids[:2]) == ["ex-000", "ex-001"]
    attr = attribute(path, named, out=tmp_path / "a.h5", top=2, progress=False)
    with h5py.File(attr) as f:
        assert f["query_ids"].asstr()[0] == "ex-000" and f["proponents/ids"].asstr()[0, 0].startswith("ex-")


def test_tracin_over_checkpoints_of_adam_warns_in_the_file_the_cli_and_info(tmp_path, capsys):
    """TracIn-CP weighs each checkpoint by its η_t as for plain gradient steps: over
    checkpoints of AdamW it says so (the API, the file, `info`, one CLI line), as does the
    sketch's self_influence (TracIn's, Σ_t η_t ‖Φ g_n‖²); TRAK, which uses no η, and TracIn
    over plain SGD checkpoints do not."""
    import subprocess
    import sys
    import warnings

    from helpers import make_run
    ckpts, data = make_run(tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error", gs.exceptions.GradscoreWarning)
        path = _sketch((ckpts, data), tmp_path / "plain")
        out = attribute(path, data, out=tmp_path / "plain.h5", progress=False)
    for f in (out, path):
        with h5py.File(f) as f:
            assert json.loads(f.attrs["warnings"]) == []
    ckpts, data = make_run(tmp_path / "adam")
    for p in ckpts.glob("step_*.h5"):
        with h5py.File(p, "a") as f:
            f.attrs["optimizer"] = "AdamW"
            seal(f)   # written so, not damaged
    with pytest.warns(gs.exceptions.GradscoreWarning, match="written by AdamW, not plain gradient steps; TracIn's "
                                                            "self-influence"):
        path = _sketch((ckpts, data), tmp_path / "adam")
    with h5py.File(path) as f:
        assert "self_influence" in json.loads(f.attrs["warnings"])[0]
    assert main(["info", str(path)]) == 0
    assert "  warning: the checkpoints were written by AdamW" in capsys.readouterr().out
    with pytest.warns(gs.exceptions.GradscoreWarning, match="written by AdamW, not plain gradient steps; TracIn-CP"):
        out = attribute(path, data, out=tmp_path / "tracin.h5", progress=False)
    with h5py.File(out) as f:
        assert "written by AdamW" in json.loads(f.attrs["warnings"])[0]
    assert main(["info", str(out)]) == 0
    assert "  warning: the checkpoints were written by AdamW" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error", gs.exceptions.GradscoreWarning)
        attribute(path, data, out=tmp_path / "trak.h5", method="trak", progress=False)
    err = subprocess.run([sys.executable, "-m", "gradscore", "attribute", "--sketch", str(path), "--query", str(data),
                          "--out", str(tmp_path / "cli.h5"), "--quiet"], capture_output=True, text=True,
                         check=True).stderr
    assert err.count("written by AdamW") == 1 and err.startswith("gradscore attribute: warning: "), err


def test_sketch_says_how_the_mean_loss_went_and_when_it_rose(tiny_run, tmp_path, capsys):
    """`sketch` reads the examples as `run` does, and is as wrong on ones saved otherwise
    than the model was trained on them (here: labels shifted): it says so as `run` does."""
    ckpts, data = tiny_run
    with h5py.File(data) as f:
        shifted = gs.save_dataset(tmp_path / "shifted.h5", f["inputs"][()], (f["targets"][()] + 1) % 4)
    for name, d in (("s.h5", data), ("t.h5", shifted)):
        assert main(["sketch", "--checkpoints", str(ckpts), "--data", str(d), "--dim", "16", "--out",
                     str(tmp_path / name), "--quiet"]) == 0
        out = capsys.readouterr()
        with h5py.File(tmp_path / name) as f:
            loss, step = f["per_checkpoint/loss"][()].mean(1), f["checkpoints/step"][()]
        assert f"mean loss {loss[0]:.3g} at step {step[0]} -> {loss[-1]:.3g} at step {step[-1]}\n" in out.out
        assert ("the examples' mean loss rose" in out.err) == (loss[-1] > loss[0]) == (d == shifted)
        assert main(["info", str(tmp_path / name)]) == 0 and f"mean loss {loss[0]:.3g}" in capsys.readouterr().out


def test_attributing_with_other_model_code_than_the_sketch_was_made_with_is_refused(tmp_path, monkeypatch):
    """The queries are sketched by the checkpoints' model as its code is now: after the user
    edited a helper the forward calls, between `sketch` and `attribute`, queries and training
    examples were sketched by two different models, and every score mixed them, silently."""
    import sys
    files = {"usernet.py": USERNET, "userhelp.py": USERHELP}
    ckpts, data = user_code_run(tmp_path, monkeypatch, files)
    path = sketch(ckpts, data, out=tmp_path / "s.sketch.h5", dim=16, progress=False)
    name, old, new, named = FORWARD_EDITS["a helper beside the model"]
    (tmp_path / name).write_text(files[name].replace(old, new))
    for module in ("usernet", "userhelp"):   # the user's next process
        monkeypatch.delitem(sys.modules, module)
    with pytest.raises(gs.CheckpointError, match=rf"s\.sketch\.h5: was sketched with other model code than now "
                                                 rf"\(code they call: {named}\); restore that code, or sketch again"):
        attribute(path, data, out=tmp_path / "a.h5", progress=False)
    assert not (tmp_path / "a.h5").exists()
