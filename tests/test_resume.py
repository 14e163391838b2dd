"""A `gradscore run` killed with SIGKILL resumes and writes bit-identical scores."""
from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np

from helpers import make_run, sigkill_when


def _cmd(ckpts, data, out):
    return [sys.executable, "-m", "gradscore", "run", "--checkpoints", str(ckpts), "--data",
            str(data), "--out", str(out), "--engine", "loop", "--batch-size", "10",
            "--chunk-size", "20", "--quiet"]


def _read_all(path):
    with h5py.File(path) as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return out


def test_sigkill_then_rerun_is_bit_identical(tmp_path):
    ckpts, data = make_run(tmp_path, n=400, n_ckpts=4)
    killed = tmp_path / "killed.h5"
    partial = tmp_path / "killed.h5.partial"
    sigkill_when(_cmd(ckpts, data, killed),
                 lambda: partial.is_dir() and len(list(partial.glob("t*_c*.npz"))) >= 3)
    n_done = len(list(partial.glob("t*_c*.npz")))
    assert not killed.exists() and 3 <= n_done < 4 * 20, n_done

    subprocess.run(_cmd(ckpts, data, killed), check=True)
    assert killed.exists() and not partial.exists()
    clean = tmp_path / "clean.h5"
    subprocess.run(_cmd(ckpts, data, clean), check=True)

    a, b = _read_all(killed), _read_all(clean)
    assert set(a) == set(b) and "scores/grand" in a and "per_checkpoint/sq_grad_norm" in a
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
