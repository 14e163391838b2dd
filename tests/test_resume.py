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


def test_the_same_run_spelled_with_other_paths_is_the_same_run(tmp_path, monkeypatch, capsys):
    """A run (and its co-states and sketches) started as `--checkpoints /abs/ckpts` and rerun
    from its folder as `--checkpoints ./ckpts/` was "made with other settings (checkpoints
    ('/abs/ckpts' before, './ckpts/' now) differ)": a finished file was refused, an
    interrupted one could only be discarded. The paths are compared as absolute paths now:
    the finished file is kept as it is, the interrupted run resumes."""
    from gradscore.cli import main
    from gradscore.io.store import HDF5ScoresWriter
    ckpts, data = make_run(tmp_path, n=60, n_ckpts=3)
    target = tmp_path / "target.h5"
    import gradscore as gs
    with h5py.File(data) as f:
        gs.save_dataset(target, f["inputs"][:8], f["targets"][:8])
    runs = {"scores.h5": ["run", "--checkpoints", "{}ckpts", "--data", "{}train.h5", "--scores", "grand,pds",
                          "--target", "{}target.h5", "--chunk-size", "20", "--quiet"],
            "costate.h5": ["costate", "--checkpoints", "{}ckpts", "--proxy", "{}train.h5", "--target",
                           "{}target.h5", "--quiet"],
            "sketch.h5": ["sketch", "--checkpoints", "{}ckpts", "--data", "{}train.h5", "--dim", "8",
                          "--chunk-size", "20", "--quiet"]}
    monkeypatch.chdir(tmp_path)
    for out, argv in runs.items():
        absolute = [a.format(f"{tmp_path}/") for a in argv] + ["--out", str(tmp_path / out)]
        relative = [a.format("./") for a in argv] + ["--out", out]
        assert main(absolute) == 0, capsys.readouterr().err
        before = (tmp_path / out).read_bytes()
        assert main(relative) == 0, capsys.readouterr().err   # finished: kept as it is
        assert (tmp_path / out).read_bytes() == before, out
        if out == "costate.h5":
            continue
        (tmp_path / out).unlink()
        write, calls = HDF5ScoresWriter.write_chunk, []

        def stop_after_two(self, *a, **k):
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(1)
            return write(self, *a, **k)
        monkeypatch.setattr(HDF5ScoresWriter, "write_chunk", stop_after_two)
        assert main(absolute) == 130
        monkeypatch.setattr(HDF5ScoresWriter, "write_chunk", write)
        assert (tmp_path / f"{out}.partial").is_dir()
        assert main(relative) == 0, capsys.readouterr().err   # resumed, not refused
        assert (tmp_path / out).read_bytes() != b"" and not (tmp_path / f"{out}.partial").exists()
