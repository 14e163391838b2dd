"""Dataset files: reading, chunking and the errors for bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gradscore as gs


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


def test_labels_out_of_range_name_index():
    ds = gs.load_dataset.__globals__["TorchDataset"]([(torch.zeros(2), 0)] * 3, source="f:g")
    with pytest.raises(gs.DataError, match=r"f:g: field 'targets' has label 7 at index 12"):
        ds.check_labels(10, torch.tensor([0, 1, 7]), 4)
    ds.check_labels(0, torch.tensor([0, 3]), 4)


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
