"""Score store: journal semantics, fingerprints, atomic final file."""
from __future__ import annotations

import numpy as np
import pytest

import gradscore as gs
from gradscore.io.store import HDF5ScoresWriter, ScoresWriter


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


def test_store_implements_abc():
    assert issubclass(HDF5ScoresWriter, ScoresWriter) and not HDF5ScoresWriter.__abstractmethods__
