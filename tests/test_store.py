"""Score store: journal semantics, fingerprints, atomic final file."""
from __future__ import annotations

import numpy as np
import pytest

import gradscore as gs
from gradscore.io.store import HDF5ScoresWriter, ScoresWriter, load_inrun_rows

from helpers import flip_a_byte_of, numeric_datasets


def _store(tmp_path, fp, **kw):
    return HDF5ScoresWriter(tmp_path / "s.h5", fp, n=5, T=2, chunk_size=2, **kw)


def test_interrupted_run_with_other_config_is_refused(tmp_path):
    s = _store(tmp_path, {"a": 1})
    s.write_chunk(0, 0, {"loss": np.zeros(2, np.float32)})
    again = _store(tmp_path, {"a": 1})
    assert again.is_done(0, 0) and not again.is_done(0, 1) and not again.complete
    with pytest.raises(gs.ConfigMismatchError, match=r"s\.h5\.partial.*interrupted run.*--overwrite"):
        _store(tmp_path, {"a": 2})
    fresh = _store(tmp_path, {"a": 2}, overwrite=True)
    assert not fresh.is_done(0, 0)


def test_finalize_assembles_and_removes_journal(tmp_path):
    s = _store(tmp_path, {"a": 1})
    assert s.n_chunks == 3 and s.chunk_range(2) == (4, 5)
    for t in range(2):
        for c in range(3):
            a, b = s.chunk_range(c)
            s.write_chunk(t, c, {"loss": np.arange(a, b, dtype=np.float32) + 10 * t})
    s.finalize(ids=np.arange(5), extras={}, attrs={"config": {"x": 1}},
               aggregate=lambda pc: {"loss": pc["loss"].mean(0)})
    assert not s.partial.exists()
    res = gs.load_scores(tmp_path / "s.h5")
    np.testing.assert_array_equal(res["per_checkpoint"]["loss"], [np.arange(5), np.arange(5) + 10])
    np.testing.assert_array_equal(res["scores"]["loss"], np.arange(5) + 5.0)
    assert _store(tmp_path, {"a": 1}).complete
    # the (T, N) rows on request: none, those named (one name as a str too), or all
    assert gs.load_scores(tmp_path / "s.h5", per_checkpoint=False)["per_checkpoint"] == {}
    for keys in (["loss", "other"], "loss"):
        got = gs.load_scores(tmp_path / "s.h5", per_checkpoint=keys)["per_checkpoint"]
        assert list(got) == ["loss"] and np.array_equal(got["loss"], res["per_checkpoint"]["loss"])


def test_ctrl_c_stops_the_assembly_at_the_next_chunk_and_it_resumes(tmp_path, monkeypatch):
    """Ctrl-C is held while the scores file is written (a KeyboardInterrupt inside HDF5's
    write callback crashes the process); the assembly stops at its next chunk, not at its
    end, leaving no file and the journal, from which it finishes later."""
    import signal
    s = _store(tmp_path, {"a": 1})
    for t in range(2):
        for c in range(3):
            a, b = s.chunk_range(c)
            s.write_chunk(t, c, {"loss": np.arange(a, b, dtype=np.float32) + 10 * t})
    reads, plain = [], HDF5ScoresWriter._read_chunk

    def read(self, t, c):
        reads.append((t, c))
        if len(reads) == 2:   # the first is finalize's look at the rows' fields
            signal.raise_signal(signal.SIGINT)
        return plain(self, t, c)
    monkeypatch.setattr(HDF5ScoresWriter, "_read_chunk", read)
    finish = dict(ids=np.arange(5), extras={}, attrs={"config": {"x": 1}}, aggregate=lambda pc: {"loss": pc["loss"].mean(0)})
    with pytest.raises(KeyboardInterrupt):
        s.finalize(**finish)
    assert len(reads) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["s.h5.partial"]
    s.finalize(**finish)
    np.testing.assert_array_equal(gs.load_scores(tmp_path / "s.h5")["scores"]["loss"], np.arange(5) + 5.0)


def test_a_damaged_chunk_of_the_journal_is_named_with_its_fix(tmp_path):
    # a chunk file damaged on disk failed zip's CRC-32 check in a BadZipFile traceback
    s = _store(tmp_path, {"a": 1})
    for t in range(2):
        for c in range(3):
            a, b = s.chunk_range(c)
            s.write_chunk(t, c, {"loss": np.arange(a, b, dtype=np.float64) + 10 * t})
    chunk = sorted(s.partial.glob("*.npz"))[1]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 3] ^= 0x02
    chunk.write_bytes(bytes(raw))
    finish = dict(ids=np.arange(5), extras={}, attrs={"config": {"x": 1}}, aggregate=lambda pc: {"loss": pc["loss"].mean(0)})
    with pytest.raises(gs.GradscoreError, match=f"{chunk}: unreadable chunk file \\(damaged: .*\\); delete it"):
        s.finalize(**finish)
    assert not (tmp_path / "s.h5").exists()
    chunk.unlink()   # as the message says: the rerun computes it again
    again = _store(tmp_path, {"a": 1})
    t, c = (int(part[1:]) for part in chunk.stem.split("_"))
    assert not again.is_done(t, c)
    a, b = again.chunk_range(c)
    again.write_chunk(t, c, {"loss": np.arange(a, b, dtype=np.float64) + 10 * t})
    again.finalize(**finish)
    np.testing.assert_array_equal(gs.load_scores(tmp_path / "s.h5")["scores"]["loss"], np.arange(5) + 5.0)


def test_store_implements_abc():
    assert issubclass(HDF5ScoresWriter, ScoresWriter) and not HDF5ScoresWriter.__abstractmethods__


@pytest.mark.parametrize("writer", ["run", "inrun"])
def test_a_damaged_scores_file_fails_to_read_instead_of_giving_other_numbers(tiny_run, tmp_path, writer):
    # a flipped bit in a scores file changed the scores (and `select`'s picks) without a word
    import shutil
    import h5py
    from helpers import MLP_KWARGS
    from gradscore.demos.models import mlp
    ckpts, data = tiny_run
    good = tmp_path / "good.h5"
    if writer == "run":
        gs.score(checkpoints=ckpts, data=data, out=good, progress=False)
    else:
        import torch
        import torch.nn.functional as F
        ds = gs.load_dataset(data)
        x, y = ds.read(0, len(ds))
        torch.manual_seed(0)
        model = mlp(**MLP_KWARGS)
        with gs.InRun(model, out=good, targets=(x[:8], y[:8])) as rec:
            for t in range(4):
                with rec.step(ds.ids()[t * 16:(t + 1) * 16], y[t * 16:(t + 1) * 16], lr=0.1):
                    F.cross_entropy(model(x[t * 16:(t + 1) * 16]), y[t * 16:(t + 1) * 16]).backward()
    names = numeric_datasets(good)
    assert "scores/el2n" in names and "ids" in names
    for name in names:
        bad = tmp_path / f"bad_{name.replace('/', '_')}.h5"
        shutil.copy(good, bad)
        flip_a_byte_of(bad, name)
        with h5py.File(bad, "r") as f, pytest.raises(OSError, match="filter returned failure"):
            f[name][()]   # every dataset is checksummed
        if name == "done":   # the journal's bitmap: not part of the scores
            continue
        with pytest.raises(gs.GradscoreError, match=f"{bad.name}: /{name} is damaged"):
            gs.load_scores(bad)
            if writer == "inrun":
                load_inrun_rows(bad)


def test_a_damaged_dataset_file_fails_to_read_instead_of_giving_other_inputs(tiny_run, tmp_path):
    # a flipped bit in a data file saved by gs.save_dataset was read as other inputs
    import shutil
    _, data = tiny_run
    for name in ("inputs", "targets", "ids", "noisy"):
        bad = tmp_path / f"bad_{name}.h5"
        shutil.copy(data, bad)
        flip_a_byte_of(bad, name)
        with pytest.raises(gs.GradscoreError, match=f"{bad.name}: is damaged"):
            ds = gs.load_dataset(bad)
            ds.read(0, len(ds)), ds.ids(), ds.noisy()


@pytest.mark.parametrize("group", ["checkpoints", "scores", "per_checkpoint"])
def test_a_link_to_nothing_in_a_scores_file_is_damage_named_by_every_reader(tiny_run, tmp_path, group):
    # a damaged link reads as None through h5py's Group.items(): `aggregate` stopped in a
    # TypeError traceback (found by flipping bits of a scores file)
    import shutil
    import h5py
    from gradscore.cli import main
    from helpers import assert_same_scores_file
    ckpts, data = tiny_run
    good = tmp_path / "good.h5"
    gs.score(checkpoints=ckpts, data=data, out=good, progress=False)
    bad = tmp_path / "bad.h5"
    shutil.copy(good, bad)
    with h5py.File(bad, "r+") as f:
        f[f"{group}/lost"] = h5py.SoftLink("/nowhere")
    expected = f"{bad.name}: .*is damaged"
    with pytest.raises(gs.GradscoreError, match=expected):
        gs.load_scores(bad)
    assert main(["select", str(bad), "--by", "el2n", "--keep", "0.5", "--out", str(tmp_path / "keep.txt")]) == 2
    again = ["aggregate", str(bad), "--epochs-upto", "1", "--out", str(tmp_path / "again.h5")]
    if group == "scores":   # aggregate reads the rows and checkpoints alone: the same file as from the intact one
        assert main(again) == 0
        gs.reaggregate(good, tmp_path / "from_good.h5", epochs_upto=1)
        assert_same_scores_file(tmp_path / "again.h5", tmp_path / "from_good.h5")
    else:
        assert main(again) == 2 and not (tmp_path / "again.h5").exists()
    assert not (tmp_path / "keep.txt").exists()


def _alter_text_attribute(path, name):
    """Change one digit (else one letter) of the text attribute ``name`` of the HDF5 file
    ``path`` in its bytes, as a flipped bit would: its JSON still parses. Where another
    attribute holds the same text (a fingerprint holds the checkpoints' checksums), it too."""
    import h5py
    from gradscore.io.attrs import attributes
    with h5py.File(path, "r") as f:
        value = attributes(f)[name]
    raw = bytearray(path.read_bytes())
    i = next((i for i, ch in enumerate(value) if ch.isdigit()), None)
    i = next(i for i, ch in enumerate(value) if ch.isalpha()) if i is None else i
    at = raw.find(value.encode())
    assert at >= 0, name
    while at >= 0:
        raw[at + i] ^= 0x01 if value[i].isdigit() and value[i] not in "89" else 0x02
        at = raw.find(value.encode(), at + 1)
    path.write_bytes(bytes(raw))


#: text attributes first written after text became fixed-length: no earlier release's file holds them
WRITTEN_SINCE_FIXED_TEXT = frozenset({"model_code", "model_root"})


def _as_earlier_releases_wrote(path):
    """Rewrite the text attributes of ``path`` as h5py's own str (variable-length, in HDF5's
    global heap, which no checksum covers), as releases before fixed-length text did."""
    import h5py
    from gradscore.io.attrs import attributes
    with h5py.File(path, "a") as f:
        for k, v in attributes(f).items():
            if isinstance(v, str):
                f.attrs[k] = v
        if "format_version" in f.attrs:   # a checkpoint's
            f.attrs["format_version"] = 1


@pytest.mark.parametrize("layout", ["fixed", "variable"])
def test_a_text_attribute_changed_on_disk_is_damage_not_another_config(tiny_run, tmp_path, layout):
    # str attributes lived in HDF5's global heap, which no checksum covers: a flipped digit of
    # a sketch's seed gave attributions from another projection, without a word. Files are
    # now written with fixed-length text (in checksummed headers); the seal still covers the
    # variable-length text of files from earlier releases
    import shutil
    import h5py
    from gradscore.io.attrs import attributes
    from gradscore.io.checkpoints import CheckpointStore
    from gradscore.scores.costate import CostateConfig, CostateFile, compute_costate
    from gradscore.sketches.store import SketchFile
    ckpts, data = tiny_run
    files = {"scores": gs.score(checkpoints=ckpts, data=data, out=tmp_path / "s.h5", progress=False),
             "sketch": gs.sketch(ckpts, data, out=tmp_path / "t.sketch.h5", dim=64, seed=123, progress=False),
             "costate": compute_costate(CostateConfig(checkpoints=str(ckpts), proxy=str(data), target=str(data)),
                                        tmp_path / "c.h5", progress=False),
             "checkpoint": sorted(ckpts.glob("step_*.h5"))[0]}
    readers = {"scores": gs.load_scores, "sketch": SketchFile.open, "costate": CostateFile,
               "checkpoint": lambda p: CheckpointStore(p.parent)}
    for kind, good in files.items():
        if layout == "variable":
            _as_earlier_releases_wrote(good)
            readers[kind](good)   # an intact file of an earlier release reads
        with h5py.File(good, "r") as f:
            names = [k for k, v in attributes(f).items() if isinstance(v, str) and any(c.isalnum() for c in v)
                     and not (layout == "variable" and k in WRITTEN_SINCE_FIXED_TEXT)]
        assert names, kind
        for name in names:
            folder = tmp_path / f"{kind}_{name}"
            shutil.copytree(good.parent, folder, ignore=shutil.ignore_patterns("*.partial", "*.lock", "*_*_*"))
            bad = folder / good.name
            _alter_text_attribute(bad, name)
            with pytest.raises(gs.GradscoreError, match=(f"{bad}: attribute \\w+ is damaged" if layout == "variable"
                                                         else f"{bad}: .*(damaged|corrupt)")):
                readers[kind](bad)


@pytest.mark.parametrize("layout", ["fixed", "variable"])
def test_string_ids_changed_on_disk_are_damage_not_other_examples(tmp_path, layout):
    # string ids, like text attributes, lived where no HDF5 checksum reaches: one changed byte
    # named another example (and `select` would have listed it) without a word. They are now
    # fixed-length (checksummed chunks); their CRC-32 still covers the variable-length ids of
    # files from earlier releases
    import h5py
    from gradscore.demos.models import mlp
    from helpers import MLP_KWARGS
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 12, generator=g), torch.randint(0, 4, (12,), generator=g)
    ids = np.array([f"guid-{i:04d}" for i in range(12)])
    data = gs.save_dataset(tmp_path / "d.h5", x.numpy(), y.numpy(), ids=ids)
    model = mlp(**MLP_KWARGS)
    with gs.InRun(model, out=tmp_path / "r.h5") as rec:
        with rec.step(ids, y, lr=0.1):
            F.cross_entropy(model(x), y).backward()
    assert list(gs.load_dataset(data).ids()) == list(ids)
    assert list(gs.load_scores(tmp_path / "r.h5")["ids"]) == list(ids)
    for path, read in ((data, lambda p: gs.load_dataset(p).ids()), (tmp_path / "r.h5", gs.load_scores)):
        if layout == "variable":
            _ids_as_earlier_releases_wrote(path)
            np.testing.assert_array_equal(read(path) if path == data else read(path)["ids"], ids)
        raw = bytearray(path.read_bytes())
        if layout == "fixed":   # compressed: a byte in the middle of their chunk
            with h5py.File(path) as f:
                chunk = f["ids"].id.get_chunk_info(0)
            raw[chunk.byte_offset + chunk.size // 2] ^= 0x01
        at = raw.find(b"guid-0007")
        while at >= 0:   # (every copy: a rewritten file keeps the old one in unused space)
            raw[at + 7] ^= 0x01   # guid-0007 -> guid-0017: an id of no example
            at = raw.find(b"guid-0007", at + 1)
        bad = path.with_name("bad_" + path.name)
        bad.write_bytes(bytes(raw))
        with pytest.raises(gs.GradscoreError, match=f"{bad}: .*is damaged \\(" + (
                "/ids: its strings do not match" if layout == "variable" else "Can't synchronously read")):
            read(bad)


def _ids_as_earlier_releases_wrote(path):
    """Rewrite ``/ids`` of ``path`` as h5py's variable-length strings (in HDF5's global heap)
    with their CRC-32, as releases before fixed-length ids did."""
    import h5py
    from gradscore.io.attrs import VALUES_CRC
    with h5py.File(path, "a") as f:
        ids, crc = f["ids"].asstr()[()], f["ids"].attrs[VALUES_CRC]
        del f["ids"]
        f.create_dataset("ids", data=ids.astype(object), dtype=h5py.string_dtype()).attrs[VALUES_CRC] = crc


def test_a_long_text_attribute_outside_hdf5s_checksums_is_covered_by_the_seal(tmp_path):
    # with more than 8 attributes HDF5 keeps a text over about 4 KB (a fingerprint of many
    # checkpoints) in its dense storage's "huge objects", which no checksum covers
    import h5py
    from gradscore.io.atomic import atomic_h5
    import json
    from gradscore.io.attrs import attributes, verify, write_attrs
    long = {f"sha_{i}": f"{i:064x}" for i in range(100)}
    with atomic_h5(tmp_path / "f.h5") as f:
        write_attrs(f, {"fingerprint": long, **{f"n{i}": i for i in range(10)}})
    raw = bytearray((tmp_path / "f.h5").read_bytes())
    raw[raw.find(f"{77:064x}".encode()) + 63] ^= 0x01
    (tmp_path / "bad.h5").write_bytes(bytes(raw))
    with h5py.File(tmp_path / "bad.h5") as f:
        assert json.loads(attributes(f)["fingerprint"]) != long   # HDF5 reads it without a word
        with pytest.raises(gs.GradscoreError, match="bad.h5: attribute fingerprint is damaged"):
            verify(f, tmp_path / "bad.h5")


def test_string_ids_round_trip_with_any_text_and_one_ending_in_nul_is_refused(tmp_path):
    # h5py's variable-length strings refused an embedded NUL in a traceback, at the end of a run
    import h5py
    from gradscore.io.store import read_ids, write_ids
    ids = np.array(["a\0b", "é", "", "x" * 300, "\U0001f600"], dtype=object)
    with h5py.File(tmp_path / "i.h5", "w") as f:
        write_ids(f, "ids", ids)
        write_ids(f, "none", np.array([], dtype=object))
    with h5py.File(tmp_path / "i.h5") as f:
        assert list(read_ids(f["ids"])) == list(ids) and f["ids"].fletcher32
        assert read_ids(f["none"]).shape == (0,)
    with h5py.File(tmp_path / "j.h5", "w") as f, pytest.raises(ValueError, match=r"'ab\\x00' ends in NUL"):
        write_ids(f, "ids", np.array(["ab\0"], dtype=object))
    many = np.array([f"ex-{i}" for i in range(20_000)] + ["x" * 2000], dtype=object)
    with h5py.File(tmp_path / "k.h5", "w") as f:   # padded to 2000 bytes each: 40 MB uncompressed
        write_ids(f, "ids", many)
    assert (tmp_path / "k.h5").stat().st_size < 2**20
    with h5py.File(tmp_path / "k.h5") as f:
        assert list(read_ids(f["ids"])) == list(many)


def test_every_byte_of_text_and_numbers_in_every_file_gradscore_writes_is_checksummed(tmp_path):
    # the global heap has no checksum, and one flipped bit in a string's length there made
    # HDF5 itself loop forever (2 of the first 700 bytes of a checkpoint's heap, each read in
    # `gradscore run`): every file now keeps its text in checksummed headers and chunks. A
    # co-state file's η_t, steps and norms were written without fletcher32 (a flipped bit:
    # other PDS scores); and a scalar cannot be chunked, so is stored compact
    import torch
    import torch.nn.functional as F
    from gradscore.demos.models import mlp
    from helpers import MLP_KWARGS, global_heap, make_run, unchecked_datasets
    ckpts, data = make_run(tmp_path, n=30)
    x, y = gs.load_dataset(data).read(0, 30)
    ids = np.array([f"ex-{i:03d}" for i in range(30)])
    named = gs.save_dataset(tmp_path / "named.h5", x.numpy(), y.numpy(), ids=ids)
    scores = gs.score(checkpoints=ckpts, data=named, out=tmp_path / "s.h5", progress=False)
    sketch = gs.sketch(ckpts, named, out=tmp_path / "t.sketch.h5", dim=30, progress=False)
    model = mlp(**MLP_KWARGS)
    with gs.InRun(model, out=tmp_path / "r.h5") as rec:
        with rec.step(ids[:12], y[:12], lr=0.1):
            F.cross_entropy(model(torch.as_tensor(x[:12])), y[:12]).backward()
    files = {"data": named, "scores": scores, "sketch": sketch, "in-run": tmp_path / "r.h5",
             "checkpoint": sorted(ckpts.glob("step_*.h5"))[0],
             "aggregate": gs.reaggregate(scores, tmp_path / "a.h5", epochs_upto=0),
             "attribution": gs.attribute(sketch, named, out=tmp_path / "q.h5", top=2, progress=False),
             "costate": gs.compute_costate(gs.CostateConfig(checkpoints=str(ckpts), proxy=str(named),
                                                            target=str(named)), tmp_path / "c.h5", progress=False)}
    import json
    from gradscore.io.dynamics import import_dynamics
    (tmp_path / "dyn").mkdir()
    (tmp_path / "dyn" / "dynamics_epoch_0.jsonl").write_text("".join(
        json.dumps({"guid": f"g-{i}", "logits_epoch_0": [1.0, 0.0], "gold": i % 2}) + "\n" for i in range(4)))
    files["import-dynamics"] = import_dynamics(tmp_path / "dyn", tmp_path / "dyn.h5")
    for kind, path in files.items():
        assert not global_heap(path.read_bytes()), kind
        assert not unchecked_datasets(path), (kind, unchecked_datasets(path))   # η_t of a co-state file was


def test_a_scores_file_damaged_anywhere_is_refused_or_reads_the_same(tiny_run, tmp_path):
    # in HDF5's 1.8 format a chunk index is a v1 B-tree without a checksum: of the ~52,000
    # bytes of a small scores file outside the global heap, 312 flipped read as other
    # scores without a word (a chunk taken as unwritten reads as the fill value)
    from helpers import global_heap
    ckpts, data = tiny_run
    x, y = gs.load_dataset(data).read(0, len(gs.load_dataset(data)))
    data = gs.save_dataset(tmp_path / "named.h5", x.numpy(), y.numpy(),   # string ids, fixed-length
                           ids=np.array([f"ex-{i:04d}" for i in range(len(y))]))
    good = gs.score(checkpoints=ckpts, data=data, out=tmp_path / "good.h5", progress=False)
    want, raw = gs.load_scores(good), good.read_bytes()
    bad, refused = tmp_path / "bad.h5", 0
    assert not global_heap(raw)
    for offset in range(0, len(raw), 5):   # every fifth byte (the 1.8 format's misreads were runs of 8)
        damaged = bytearray(raw)
        damaged[offset] ^= 0x10
        bad.write_bytes(bytes(damaged))
        try:
            got = gs.load_scores(bad)
        except gs.GradscoreError as e:
            assert str(e).startswith(f"{bad}: "), e
            refused += 1
            continue
        for group in ("scores", "per_checkpoint", "checkpoints"):
            assert sorted(got[group]) == sorted(want[group]), offset
            for k in want[group]:
                np.testing.assert_array_equal(got[group][k], want[group][k], err_msg=f"{offset}: {group}/{k}")
        np.testing.assert_array_equal(got["ids"], want["ids"])
        np.testing.assert_array_equal(got["noisy"], want["noisy"])
        assert got["config"] == want["config"] and got["warnings"] == want["warnings"]
    assert refused > 500


def test_checkpoint_rows_read_the_rows_load_scores_reads_a_checkpoint_at_a_time(tiny_run, tmp_path):
    ckpts, data = tiny_run
    path = gs.score(checkpoints=ckpts, data=data, out=tmp_path / "s.h5", progress=False)
    whole = gs.load_scores(path)["per_checkpoint"]
    rows = gs.checkpoint_rows(path, ["loss", "correct", "not_a_metric"])
    assert sorted(rows) == ["correct", "loss"]
    for k, r in rows.items():
        assert r.shape == whole[k].shape and r.dtype == whole[k].dtype and len(r) == len(whole[k])
        for t in range(-len(r), len(r)):
            np.testing.assert_array_equal(r[t], whole[k][t])
        with pytest.raises(IndexError):
            r[len(r)]
    np.testing.assert_array_equal(np.stack(list(rows["loss"])), whole["loss"])
    bad = tmp_path / "bad.h5"
    bad.write_bytes(path.read_bytes())
    flip_a_byte_of(bad, "per_checkpoint/loss")   # checkpoint 0's row
    rows = gs.checkpoint_rows(bad, ["loss"])["loss"]
    with pytest.raises(gs.GradscoreError, match="bad.h5: /per_checkpoint/loss is damaged"):
        rows[0]
    with pytest.raises(gs.GradscoreError, match="not a gradscore scores file"):
        gs.checkpoint_rows(data, ["loss"])
