"""Dataset files: reading, chunking and the errors for bad input."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import gradscore as gs
from gradscore.cli import main


def test_h5_and_npz_read_the_same(tmp_path):
    x, y = np.random.rand(10, 3).astype(np.float32), np.arange(10) % 3
    gs.save_dataset(tmp_path / "d.h5", x, y)
    np.savez(tmp_path / "d.npz", inputs=x, targets=y, ids=np.arange(10) * 2)
    a, b = gs.load_dataset(tmp_path / "d.h5"), gs.load_dataset(tmp_path / "d.npz")
    assert len(a) == len(b) == 10
    for (xa, ya), (xb, yb) in zip([a.read(2, 7)], [b.read(2, 7)]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ya.dtype == torch.int64
    assert a.ids().tolist() == list(range(10)) and b.ids().tolist() == list(range(0, 20, 2))
    assert a.noisy() is None


def test_missing_key_is_named(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.zeros((3, 2)), labels=np.zeros(3))
    with pytest.raises(gs.DataError, match=r"d\.npz: missing field 'targets' \(found: inputs, labels\)"):
        gs.load_dataset(tmp_path / "d.npz")


def test_length_mismatch_is_named(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.zeros((3, 2)), targets=np.zeros(3), noisy=np.zeros(4))
    with pytest.raises(gs.DataError, match="field 'noisy' has 4 rows but 'inputs' has 3"):
        gs.load_dataset(tmp_path / "d.npz")


def test_duplicate_ids_and_bad_extension_and_missing_file(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.zeros((3, 2)), targets=np.zeros(3), ids=[1, 1, 2])
    with pytest.raises(gs.DataError, match="duplicate"):
        gs.load_dataset(tmp_path / "d.npz")
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(gs.DataError, match="unknown dataset extension"):
        gs.load_dataset(tmp_path / "d.csv")
    with pytest.raises(gs.DataError, match="does not exist"):
        gs.load_dataset(tmp_path / "nope.h5")


def test_fields_of_text_are_named_with_the_fix(tmp_path, capsys):
    """String class names as targets (or inputs) gave a raw TypeError from torch in every
    command; a column of class indices, an error from inside the engine. Now one line
    naming the field and the fix, from the file as from the command line."""
    import h5py
    from gradscore.cli import main
    from helpers import make_run
    ckpts, _ = make_run(tmp_path / "run", n=10, n_ckpts=1)
    x = np.zeros((3, 12), np.float32)
    names = np.array(["cat", "dog", "cat"])
    np.savez(tmp_path / "t.npz", inputs=x, targets=names)
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["inputs"], f["targets"] = x, names.astype("S")
    np.savez(tmp_path / "i.npz", inputs=np.array([["a"] * 12] * 3), targets=np.arange(3))
    np.savez(tmp_path / "c.npz", inputs=x, targets=np.arange(3)[:, None])   # a column: "multi-target" from torch
    cases = {"c.npz": "field 'targets' has per-example shape (1,); the loss 'cross_entropy' takes one class index "
                      "per example: store them with shape (N,) (targets.reshape(-1) for a column)",
             "t.npz": "field 'targets' holds text (<U3), not numbers; store class indices "
                      "(np.unique(targets, return_inverse=True)[1])",
             "t.h5": "field 'targets' holds text (|S3), not numbers",
             "i.npz": "field 'inputs' holds text (<U1), not numbers"}
    for name, says in cases.items():
        if name != "c.npz":   # a column is a dataset; the loss refuses it
            with pytest.raises(gs.DataError, match=re.escape(f"{name}: {says}")):
                gs.load_dataset(tmp_path / name)
        assert main(["run", "--checkpoints", str(ckpts), "--data", str(tmp_path / name), "--out",
                     str(tmp_path / "s.h5"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err


def test_save_dataset_takes_torch_tensors_as_training_holds_them(tmp_path):
    """Tensors that require grad (features computed by a model) and bfloat16 tensors (a bf16
    model's embeddings) were numpy's RuntimeError and TypeError. They are saved as their
    values: bfloat16 as float32 (HDF5 has no bfloat16; every bfloat16 is a float32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g)
    features = (x * 2).requires_grad_()
    y = torch.arange(5, dtype=torch.int32)
    cases = {"grad": (features, features.detach()), "bf16": (x.bfloat16(), x.bfloat16().float()),
             "half": (x.half(), x.half())}
    for name, (given, want) in cases.items():
        ds = gs.load_dataset(gs.save_dataset(tmp_path / f"{name}.h5", given, y, noisy=torch.tensor([1, 0, 0, 1, 0])))
        got, labels = ds.read(0, 5)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        assert labels.tolist() == [0, 1, 2, 3, 4] and ds.noisy().tolist() == [True, False, False, True, False]


def test_save_dataset_replaces_only_a_dataset_it_wrote(tmp_path):
    """gs.save_dataset wrote over any file at its path: a scores file, a checkpoint, the
    user's own HDF5 data, a text file, all lost without a word. It now replaces only a
    dataset file it wrote (a script run again), and refuses any other file in one
    OutputError, leaving it as it was; a name it would write in another format than HDF5
    (``.npz``, which the readers then open with numpy) is refused too."""
    import h5py
    from helpers import make_run
    ckpts, data = make_run(tmp_path / "run", n=12, n_ckpts=1)
    scores = tmp_path / "s.h5"
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(scores), "--quiet"]) == 0
    own = tmp_path / "own.h5"
    with h5py.File(own, "w") as f:   # the user's data, written by h5py
        f["inputs"], f["targets"] = np.zeros((2, 3), np.float32), np.arange(2)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    x, y = np.ones((4, 3), np.float32), np.arange(4)
    for path, says in ((scores, "is not a gradscore dataset"), (ckpts / "step_00000000.h5", "read as a checkpoint"),
                       (own, "is not a gradscore dataset"), (notes, "is not a gradscore dataset"),
                       (tmp_path / "d.npz", "its name says NumPy, but it would hold HDF5")):
        before = path.read_bytes() if path.exists() else None
        with pytest.raises(gs.OutputError, match=re.escape(says)):
            gs.save_dataset(path, x, y)
        assert (path.read_bytes() if path.exists() else None) == before, path
    again = gs.save_dataset(data, x, y)   # its own file, saved again
    got, labels = gs.load_dataset(again).read(0, 4)
    assert torch.equal(got, torch.from_numpy(x)) and labels.tolist() == [0, 1, 2, 3]


def test_save_dataset_refuses_what_loading_refuses_and_writes_nothing(tmp_path):
    """save_dataset wrote files that load_dataset (and so every command) then refused:
    repeated ids, targets or a noisy mask of another length, no targets, a text mask of
    another shape."""
    x = np.zeros((5, 3), np.float32)
    cases = {"ids": (dict(ids=[1, 1, 2, 3, 4]), "field 'ids' has duplicate values"),
             "targets": (dict(targets=np.arange(4)), "field 'targets' has 4 rows but 'inputs' has 5"),
             "noisy": (dict(noisy=np.zeros(3, bool)), "field 'noisy' has 3 rows but 'inputs' has 5"),
             "none": (dict(targets=None), "missing field 'targets' \\(found: inputs\\); a dataset needs .*"),
             "mask": (dict(inputs={"input_ids": np.zeros((5, 4), int), "attention_mask": np.ones((5, 3), int)},
                           targets=None), "field 'attention_mask' has shape \\(5, 3\\) but 'input_ids' has \\(5, 4\\)")}
    for name, (kw, says) in cases.items():
        args = {"inputs": x, "targets": np.arange(5), **kw}
        with pytest.raises(gs.DataError, match=f"{name}\\.h5: {says}; nothing written"):
            gs.save_dataset(tmp_path / f"{name}.h5", args.pop("inputs"), args.pop("targets"), **args)
        assert not (tmp_path / f"{name}.h5").exists()
    assert list(tmp_path.iterdir()) == []


def test_labels_out_of_range_name_index():
    ds = gs.load_dataset.__globals__["TorchDataset"]([(torch.zeros(2), 0)] * 3, source="f:g")
    with pytest.raises(gs.DataError, match=r"f:g: field 'targets' has label 7 at index 12"):
        ds.check_labels(10, torch.tensor([0, 1, 7]), 4)
    ds.check_labels(0, torch.tensor([0, 3]), 4)


def test_labels_out_of_range_say_the_fix():
    """The error named the first bad label (a −100 "ignore" label of a classification set, a
    class the model has no output for) but no fix: it says what to do now."""
    ds = gs.load_dataset.__globals__["TorchDataset"]([(torch.zeros(2), 0)] * 3, source="f:g")
    with pytest.raises(gs.DataError, match=r"f:g: field 'targets' has label -100 at index 11, outside \[0, 4\) "
                                           r"of the model's 4 outputs; relabel or drop those examples \(run --ids scores the others\), or give a model "
                                           r"with an output per class"):
        ds.check_labels(10, torch.tensor([0, -100, 7]), 4)
    with pytest.raises(gs.DataError, match=r"at index 12, outside \[0, 4\) of the model's 4 outputs; relabel"):
        ds.check_labels(10, torch.tensor([0, 1, 7]), 4)


def test_factory_dataset():
    ds = gs.load_dataset("tests_factory:make")
    x, y = ds.read(1, 3)
    assert x.shape == (2, 4) and y.tolist() == [1, 2]


def test_a_factorys_fingerprint_follows_every_example():
    """Text inputs (dicts), bfloat16 and bool: a change of one value anywhere changes it."""
    TorchDataset = gs.load_dataset.__globals__["TorchDataset"]
    items = [({"input_ids": torch.arange(5) + i, "attention_mask": torch.ones(5, dtype=torch.long)}, i % 2)
             for i in range(7)]
    before = TorchDataset(items, source="f:g").fingerprint()
    assert TorchDataset(items, source="f:g").fingerprint() == before
    items[3][0]["attention_mask"][4] = 0
    assert TorchDataset(items, source="f:g").fingerprint()["sha256"] != before["sha256"]
    halves = [(torch.randn(3, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16), True) for i in range(4)]
    first = TorchDataset(halves, source="f:h").fingerprint()
    halves[2] = (halves[2][0], False)
    assert TorchDataset(halves, source="f:h").fingerprint()["sha256"] != first["sha256"]


def _flipped_reads(good, arrays, step, mask, refusal):
    """Flip ``mask`` in every ``step``-th byte of the data file ``good``: each copy is refused
    with ``refusal`` naming it, or reads ``arrays`` back. Returns how many were refused."""
    raw, refused = good.read_bytes(), 0
    for offset in range(0, len(raw), step):
        bad = good.with_name(f"bad{offset}{good.suffix}")
        damaged = bytearray(raw)
        damaged[offset] ^= mask
        bad.write_bytes(bytes(damaged))
        try:
            ds = gs.load_dataset(bad)
            x, y = ds.read(0, len(ds))
            got = ds.ids(), ds.noisy()
            ds.close()
        except refusal as e:
            assert str(e).startswith(f"{bad}: "), e
            refused += 1
            continue
        np.testing.assert_array_equal(x.numpy(), arrays["inputs"])
        np.testing.assert_array_equal(y.numpy(), arrays["targets"])
        np.testing.assert_array_equal(got[0], arrays["ids"])
        np.testing.assert_array_equal(got[1], arrays["noisy"])
    return refused


def _arrays(ids):
    rng = np.random.default_rng(0)
    return {"inputs": rng.normal(size=(40, 6)).astype(np.float32), "targets": rng.integers(0, 3, 40),
            "ids": ids, "noisy": rng.random(40) < 0.2}


@pytest.mark.parametrize("save", ["savez", "savez_compressed"])
def test_a_damaged_npz_is_refused_in_one_line_or_reads_the_same(tmp_path, save):
    # zip's CRC-32 check raised BadZipFile (and a cut deflate stream zlib.error), which no
    # reader caught: `gradscore run --data damaged.npz` ended in a traceback
    arrays = _arrays(np.arange(40) * 7)
    good = tmp_path / "good.npz"
    getattr(np, save)(good, **arrays)
    step = max(1, good.stat().st_size // 150)
    assert _flipped_reads(good, arrays, step, 0x08, gs.DataError) > 100   # nearly all data, names or checked headers


def test_a_damaged_h5_dataset_is_refused_in_one_line_or_reads_the_same(tmp_path):
    # a flipped bit in an object header of a save_dataset file raised h5py's KeyError
    # ("Unable to synchronously open object") from load_dataset: a traceback from `run`
    arrays = _arrays(np.array([f"ex-{i}" for i in range(40)], dtype=object))
    good = gs.save_dataset(tmp_path / "good.h5", arrays["inputs"], arrays["targets"], ids=arrays["ids"],
                           noisy=arrays["noisy"])
    assert _flipped_reads(good, arrays, 3, 0x10, gs.GradscoreError) > 400


def test_an_npz_whose_directory_lost_members_is_refused(tmp_path):
    # zip reads its directory by size: a damaged length there hides the members after it, and
    # the data read without its ids (positions in their place) and its noisy mask
    import struct
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    np.savez(good, inputs=rng.normal(size=(30, 4)), targets=rng.integers(0, 3, 30), ids=np.arange(30) + 100,
             noisy=np.zeros(30, bool))
    raw = bytearray(good.read_bytes())
    entry = raw.index(b"PK\x01\x02", raw.index(b"PK\x01\x02") + 1)   # the directory's entry of targets.npy
    assert raw[entry + 46:entry + 57] == b"targets.npy"
    end = raw.rindex(b"PK\x05\x06")
    name, extra = struct.unpack_from("<HH", raw, entry + 28)
    struct.pack_into("<H", raw, entry + 32, end - (entry + 46 + name + extra))   # a comment over ids and noisy
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    import zipfile
    assert sorted(zipfile.ZipFile(bad).namelist()) == ["inputs.npy", "targets.npy"]   # zip itself says nothing
    with pytest.raises(gs.DataError, match=f"{bad}: cannot read dataset file \\(damaged: its directory lists 2 "
                                           f"of the 4 members"):
        gs.load_dataset(bad)
    assert gs.load_dataset(good).ids()[0] == 100


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool])
def test_class_labels_of_any_integer_dtype_score_as_int64(tmp_path, dtype):
    """Labels held as int32 (or int16, bool) by a dataset factory or given to gs.Scorer: torch's
    cross-entropy refuses them ("expected target dtype to be Long or Byte, but got Int"), exit
    2, while the same labels in a file (read as int64) scored. They are class indices: each
    built-in loss that indexes classes now takes them as int64, with every engine."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double().eval()
    x = torch.randn(7, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 1]) if dtype == torch.bool else torch.arange(7) % 3
    log_probs = torch.nn.Sequential(model, torch.nn.LogSoftmax(-1))
    tokens = torch.randint(0, 3, (7, 4))
    lm = torch.nn.Sequential(torch.nn.Embedding(3, 5), torch.nn.Linear(5, 3)).double().eval()
    for net, inputs, labels, loss in ((model, x, y, "cross_entropy"), (log_probs, x, y, "nll"),
                                      (lm, tokens, tokens.masked_fill(torch.rand(7, 4) < 0.2, -100), "causal_lm")):
        if loss == "causal_lm" and dtype in (torch.uint8, torch.bool):
            continue   # −100 (an ignored token) does not fit these dtypes
        for engine in ("ghost", "vmap", "loop"):
            scorer = gs.Scorer(net, loss=loss, engine=engine)
            want = scorer.score_batch(inputs, labels)
            got = scorer.score_batch(inputs, labels.to(dtype))
            assert torch.equal(got.loss, want.loss) and torch.equal(got.sq_norm, want.sq_norm), (loss, engine)


def test_an_in_run_recording_takes_class_labels_of_any_integer_dtype(tmp_path):
    """gs.InRun's step and its target batch given int32 or int16 labels (the user's own loss
    takes y.long()): "the recorder's 'cross_entropy' loss failed … expected target dtype to
    be Long". The file is now the one int64 labels give."""
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    files = {}
    for dtype in (torch.int64, torch.int32, torch.int16):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = gs.InRun(model, out=tmp_path / f"{dtype}.h5", scores=("loss", "grand", "aum", "inrun_value"),
                       targets=(x[:4], y[:4].to(dtype)))
        for _ in range(2):
            with rec.step(torch.arange(16), y.to(dtype), lr=0.1):
                torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        files[dtype] = gs.load_scores(rec.close())["scores"]
    for dtype in (torch.int32, torch.int16):
        assert files[dtype].keys() == files[torch.int64].keys()
        for name, values in files[torch.int64].items():
            assert np.array_equal(files[dtype][name], values), (dtype, name)


def test_a_factorys_int32_labels_score_sketch_and_attribute_as_int64(tmp_path):
    """A dataset factory's int32 labels: `run` stopped ("expected target dtype to be Long"),
    the co-states of pds with a raw traceback (exit 1), `sketch` too. Each now writes what the
    same labels as int64 give."""
    from helpers import make_run
    ckpts, _ = make_run(tmp_path)
    files = {}
    for kind in ("relabeled", "relabeled_int32"):
        data = f"tests_factory:{kind}"
        out = tmp_path / kind
        for argv in (["run", "--checkpoints", str(ckpts), "--data", data, "--target", data, "--costate",
                      str(out) + ".costate.h5", "--scores", "el2n,grand,loss,pds,target_dot", "--out", f"{out}.h5"],
                     ["sketch", "--checkpoints", str(ckpts), "--data", data, "--dim", "16", "--out", f"{out}.sk.h5"],
                     ["attribute", "--sketch", f"{out}.sk.h5", "--query", data, "--top", "3", "--out", f"{out}.at.h5"]):
            assert main([*argv, "--quiet"]) == 0, argv
        files[kind] = (gs.load_scores(f"{out}.h5")["scores"], _numbers(f"{out}.sk.h5"), _numbers(f"{out}.at.h5"))
    for want, got in zip(files["relabeled"], files["relabeled_int32"]):
        assert want.keys() == got.keys() and want
        for name in want:
            assert np.array_equal(want[name], got[name]), name


def _numbers(path) -> dict:
    """Every non-empty numeric dataset of an HDF5 file, by its path in the file."""
    import h5py
    from helpers import numeric_datasets
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in numeric_datasets(path)}


def test_a_dataset_whose_items_are_random_draws_is_refused(tmp_path, capsys):
    """A map-style dataset built with its training transform (random crops, flips) gives
    another input each time an example is read: every score would be of a random draw, and
    the fingerprint pass differs from the scoring pass. Refused in one line; the global
    random states are as they were."""
    import random

    from gradscore.cli import main
    from gradscore.io.datasets import load_dataset
    torch.manual_seed(0)
    np.random.seed(0)   # the flips are drawn: 12 equal by chance is 2^-12, and not with these seeds
    model = torch.nn.Linear(6, 3)
    with gs.CheckpointWriter(tmp_path / "ck", model_factory="tests_factory:odd_width", model_kwargs={"width": 6}) as w:
        w.save(model, step=0, lr=0.1)
    for name in ("augmented", "augmented_numpy"):
        states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
        with pytest.raises(gs.DataError, match="random"):
            load_dataset(f"tests_factory:{name}")
        assert torch.equal(states[0], torch.get_rng_state()) and np.array_equal(states[1], np.random.get_state()[1])
        assert states[2] == random.getstate()
        assert main(["run", "--checkpoints", str(tmp_path / "ck"), "--data", f"tests_factory:{name}", "--out",
                     str(tmp_path / "s.h5"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert (re.search(f"tests_factory:{name}: example \\d+ differs between two reads", err)
                and "evaluation transform" in err
                and err.count("\n") == 1 and not (tmp_path / "s.h5").exists())
    assert main(["run", "--checkpoints", str(tmp_path / "ck"), "--data", "tests_factory:not_augmented", "--out",
                 str(tmp_path / "s.h5"), "--quiet"]) == 0


@pytest.mark.parametrize("factory, said", [("text_labels", "target of example 0 is a str ('cat')"),
                                           ("ragged", "inputs of examples 0 to 4 differ in shape: (6,), (7,)")])
def test_a_factory_dataset_whose_items_do_not_stack_is_one_line(tmp_path, capsys, factory, said):
    """A target that is a class name, or inputs of different shapes, raised torch's own
    error from inside the reader: a traceback."""
    with gs.CheckpointWriter(tmp_path / "ck", model_factory="tests_factory:odd_width", model_kwargs={"width": 6}) as w:
        w.save(torch.nn.Linear(6, 3), step=0, lr=0.1)
    assert main(["run", "--checkpoints", str(tmp_path / "ck"), "--data", f"tests_factory:{factory}", "--out",
                 str(tmp_path / "s.h5"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"tests_factory:{factory}: {said}" in err and err.count("\n") == 1
