"""Nothing lost: no command writes over one of its inputs or over a file that is not a
gradscore output of its kind, even with --overwrite; bad paths are one line and exit 2.

Driven through the CLI as a user would: the exit code, the one line on stderr, and the
files on disk afterwards (inputs unchanged bit for bit, nothing half-written).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from gradscore.cli import main


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def scored(tiny_run, tmp_path):
    ckpts, data = tiny_run
    out = tmp_path / "scores.h5"
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(out), "--quiet",
                 "--scores", "el2n,grand,loss,confidence,variability,correctness"]) == 0
    return ckpts, data, out


def _user_files(root: Path) -> dict[str, Path]:
    """Files a user keeps beside their runs, none of them gradscore's."""
    import h5py
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = {"h5": root / "mine.h5", "json": root / "mine.json", "png": root / "mine.png",
             "csv": root / "mine.csv", "npz": root / "mine_weights.npz",
             # a data set's table starts with an id column as an export does
             "csv_data": root / "train.csv", "csv_numbers": root / "features.csv"}
    with h5py.File(files["h5"], "w") as f:
        f["x"] = np.arange(3)
    files["json"].write_text(json.dumps({"notes": "mine"}))
    fig = plt.figure()
    fig.savefig(files["png"])
    plt.close(fig)
    files["csv"].write_text("name,value\na,1\n")
    files["csv_data"].write_text("id,text,label\n1,a good film,1\n2,a bad one,0\n")
    files["csv_numbers"].write_text("id,x,label\n1,0.5,2\n2,1.5,0\n")
    np.savez(files["npz"], a=np.arange(2))
    files["npz_weights"] = root / "theirs_weights.npz"   # another tool's sample weights, in JTT's two arrays
    np.savez(files["npz_weights"], ids=np.arange(3), weights=np.ones(3))
    return files


@pytest.mark.parametrize("target", ["data", "checkpoint"])
def test_run_never_writes_over_its_input_even_with_overwrite(tiny_run, capsys, target):
    ckpts, data = tiny_run
    victim = data if target == "data" else sorted(ckpts.glob("step_*.h5"))[0]
    before = {p: _digest(p) for p in [data, *ckpts.glob("*.h5")]}
    code, err = _run(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(victim),
                      "--overwrite", "--quiet"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert ("is the --data file" if target == "data" else "is a checkpoint") in err
    assert {p: _digest(p) for p in before} == before
    assert not victim.with_name(victim.name + ".partial").exists()


def _argv(command, ckpts, data, scores, sketch=None):
    """A command's arguments but ``--out`` on the tiny run (``scored``)."""
    return {"run": ["run", "--checkpoints", str(ckpts), "--data", str(data), "--quiet"],
            "sketch": ["sketch", "--checkpoints", str(ckpts), "--data", str(data), "--dim", "8", "--quiet"],
            "costate": ["costate", "--checkpoints", str(ckpts), "--proxy", str(data), "--target", str(data),
                        "--quiet"],
            "aggregate": ["aggregate", str(scores)],
            "select": ["select", str(scores), "--by", "el2n"],
            "flag": ["flag", str(scores), "--score", "el2n"],
            "export": ["export", str(scores), "--format", "csv"],
            "attribute": ["attribute", "--sketch", str(sketch), "--query", str(data), "--quiet"]}[command]


@pytest.mark.parametrize("command", ["run", "sketch", "costate", "select", "export", "inrun"])
def test_no_output_joins_a_folder_of_checkpoints_under_a_checkpoints_name(scored, tmp_path, capsys, command):
    # a scores file written as ckpts/step_00000009.h5 was read as a checkpoint by every later
    # command on that folder, which then refused it ("missing attribute(s) format_version, ...")
    ckpts, data, scores = scored
    before = {p.name: _digest(p) for p in ckpts.iterdir()}
    out = ckpts / "step_00000009.h5"
    if command == "inrun":
        import gradscore as gs
        from gradscore.demos.models import mlp
        from helpers import MLP_KWARGS
        with pytest.raises(gs.OutputError, match="read as a checkpoint"):
            gs.InRun(mlp(**MLP_KWARGS), out=out)
    else:
        code, err = _run(_argv(command, ckpts, data, scores) + ["--out", str(out), "--overwrite"], capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "read as a checkpoint" in err and "step_00000009.h5" in err, err
    assert {p.name: _digest(p) for p in ckpts.iterdir()} == before
    assert main(["info", str(ckpts)]) == 0
    elsewhere = ckpts / "scores.h5"   # another name in the same folder is the user's choice
    if command == "run":
        assert main(_argv("run", ckpts, data, scores) + ["--out", str(elsewhere)]) == 0
        assert main(["info", str(ckpts)]) == 0


@pytest.mark.parametrize("command", ["run", "sketch", "costate", "aggregate", "select", "export", "inrun"])
def test_an_output_path_ending_in_a_slash_is_refused_not_written_as_a_file(scored, tmp_path, capsys, command):
    # `--out results/` (a folder that does not exist yet) was written as a file named `results`;
    # refused, it leaves no folder behind either (run and sketch took their lock, which makes it, first)
    ckpts, data, scores = scored
    out = str(tmp_path / "new" / "results") + os.sep
    if command == "inrun":
        import gradscore as gs
        from gradscore.demos.models import mlp
        from helpers import MLP_KWARGS
        with pytest.raises(gs.OutputError, match="ends in"):
            gs.InRun(mlp(**MLP_KWARGS), out=out)
    else:
        code, err = _run(_argv(command, ckpts, data, scores) + ["--out", out], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "ends in" in err, err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command,name,says", [
    ("run", "scores.json", "JSON"), ("sketch", "s.csv", "CSV"), ("costate", "c.npz", "NumPy"),
    ("aggregate", "a.parquet", "Parquet"), ("select", "keep.csv", "CSV"), ("flag", "flagged.h5", "HDF5"),
    ("attribute", "a.png", "PNG"), ("inrun", "inrun.json", "JSON")])
def test_an_output_named_as_another_format_is_refused(scored, tmp_path, capsys, command, name, says):
    """`select --out keep.csv` wrote JSON into keep.csv, and `run --out scores.json` HDF5:
    a file whose name says another format than the one it holds, which the next tool that
    opens it by its name misreads. Refused in one line that names the format written, as
    `plot` and `export` already did; a name without a format's suffix stays the user's."""
    ckpts, data, scores = scored
    out = tmp_path / name
    writes = {"run": "HDF5", "sketch": "HDF5", "costate": "HDF5", "aggregate": "HDF5", "select": "JSON",
              "flag": "JSON", "attribute": "HDF5", "inrun": "HDF5"}[command]
    if command == "inrun":
        import gradscore as gs
        from gradscore.demos.models import mlp
        from helpers import MLP_KWARGS
        with pytest.raises(gs.OutputError, match=f"its name says {says}, but it would hold {writes}"):
            gs.InRun(mlp(**MLP_KWARGS), out=out)
    else:
        sketch = tmp_path / "k.h5"
        if command == "attribute":
            assert main(["sketch", "--checkpoints", str(ckpts), "--data", str(data), "--dim", "8", "--quiet",
                         "--out", str(sketch)]) == 0
        code, err = _run(_argv(command, ckpts, data, scores, sketch) + ["--out", str(out)], capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"{out}: its name says {says}, but it would hold {writes}" in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "sketch", "costate"])
def test_a_command_refused_after_taking_its_lock_leaves_no_folder_behind(tiny_run, tmp_path, capsys, command):
    # the lock makes the output's folder; a bad --data file refused after it left that folder empty
    ckpts, data = tiny_run
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"junk")
    out = str(tmp_path / "new" / "deeper" / "out.h5")
    argv = {"run": ["run", "--checkpoints", str(ckpts), "--data", str(bad)],
            "sketch": ["sketch", "--checkpoints", str(ckpts), "--data", str(bad), "--dim", "8"],
            "costate": ["costate", "--checkpoints", str(ckpts), "--proxy", str(bad), "--target", str(bad)]}[command]
    code, err = _run(argv + ["--out", out, "--quiet"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "bad.h5" in err, err
    assert not (tmp_path / "new").exists()


def test_the_lock_removes_only_the_empty_folders_it_made(tmp_path):
    from gradscore.io.outputs import lock
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError):
        with lock(tmp_path / "mine" / "a" / "b" / "out.h5"):
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine"]   # the user's folder stays
    with pytest.raises(RuntimeError):
        with lock(tmp_path / "mine" / "a" / "b" / "out.h5"):
            (tmp_path / "mine" / "a" / "keep.txt").write_text("x")   # written meanwhile: kept
            raise RuntimeError
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["mine", "mine/a",
                                                                                        "mine/a/keep.txt"]
    with lock(tmp_path / "new" / "out.h5"):
        pass
    assert (tmp_path / "new").is_dir()   # a finished command's folder stays, empty or not


# A write that fails midway (a full disk; here a file-size limit, which fails it the same
# way with EFBIG): HDF5 then crashed the process (SIGSEGV, h5py#914) or raised a raw traceback.
_LIMITED = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""
_WRITERS = {
    "run": "from gradscore.cli import main\n"
           "print('exit', main(['run', '--checkpoints', {ckpts!r}, '--data', {data!r}, '--out', {out!r}, '--quiet']))",
    "costate": "from gradscore.cli import main\n"
               "print('exit', main(['costate', '--checkpoints', {ckpts!r}, '--proxy', {data!r}, '--target', {data!r},"
               " '--out', {out!r}, '--quiet']))",
    "checkpoint": "from gradscore.io.checkpoints import write_checkpoint\nfrom gradscore.demos.models import mlp\n"
                  "from helpers import MLP_KWARGS\n"
                  "try:\n    write_checkpoint({out!r}, mlp(**MLP_KWARGS), step=0, lr=0.1)\n"
                  "except OSError as e:\n    print('exit', 2, e.filename)",
    "dataset": "import gradscore as gs, numpy as np\n"
               "try:\n    gs.save_dataset({out!r}, np.zeros((600, 20), np.float32), np.zeros(600, np.int64))\n"
               "except OSError as e:\n    print('exit', 2, e.filename)",
}


def _write_under_limit(command: str, out: Path, ckpts: Path, data: Path, limit: int | None):
    from helpers import python_child
    code = _WRITERS[command].format(ckpts=str(ckpts), data=str(data), out=str(out))
    if limit is not None:
        code = _LIMITED.format(tests=str(Path(__file__).parent), limit=limit) + code
    return python_child(code)


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
@pytest.mark.parametrize("short", ["by half", pytest.param("by one byte", marks=pytest.mark.slow)])
@pytest.mark.parametrize("command", ["run", *(pytest.param(c, marks=pytest.mark.slow) for c in _WRITERS if c != "run")])
def test_a_write_that_fails_midway_is_one_line_and_leaves_nothing(tmp_path, command, short):
    from helpers import make_run
    ckpts, data = make_run(tmp_path, n=600)
    ref = tmp_path / "ref" / "out.h5"
    ref.parent.mkdir()
    done = _write_under_limit(command, ref, ckpts, data, None)
    assert done.returncode == 0 and ref.exists(), done.stderr
    size = ref.stat().st_size
    out = tmp_path / "out" / "out.h5"
    out.parent.mkdir()
    child = _write_under_limit(command, out, ckpts, data, size // 2 if short == "by half" else size - 1)
    assert child.returncode == 0, child.stderr[-3000:]   # not killed (SIGSEGV) nor a traceback
    assert child.stdout.split()[-3 if command in ("checkpoint", "dataset") else -2:][:2] == ["exit", "2"], child.stdout
    if command in ("run", "costate"):
        lines = child.stderr.strip().splitlines()
        assert len(lines) == 1 and str(out) in lines[0] and "too large" in lines[0] and "ulimit" in lines[0], lines
    else:
        assert child.stdout.split()[-1] == str(out)
    assert not out.exists() and not list(out.parent.glob(".*.tmp")), list(out.parent.iterdir())
    again = _write_under_limit(command, out, ckpts, data, None)   # the rerun (resuming run's journal)
    assert again.returncode == 0 and out.exists(), again.stderr
    if command == "run":
        import gradscore as gs
        a, b = gs.load_scores(out), gs.load_scores(ref)
        for k in a["scores"]:
            np.testing.assert_array_equal(a["scores"][k], b["scores"][k])


def _disk_full_after(budget: int, real=os.pwrite):
    """An os.pwrite that fails with ENOSPC once ``budget`` bytes have been written through it."""
    import errno
    written = [0]

    def pwrite(fd, data, offset):
        if written[0] + len(data) > budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(data)
        return real(fd, data, offset)
    return pwrite


@pytest.mark.parametrize("share", [0, 0.1, 0.5, 0.99])
def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_run, tmp_path, capsys, monkeypatch, share):
    # the disk fills up `share` of the way into the scores file; the journal is kept for the rerun
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(tmp_path / "ref.h5"),
                 "--quiet"]) == 0
    monkeypatch.setattr(os, "pwrite", _disk_full_after(int(share * (tmp_path / "ref.h5").stat().st_size)))
    code, err = _run(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(out), "--quiet"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{out}: No space left on device; free space on that disk" in err, err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp")) and out.with_name("s.h5.partial").is_dir()
    monkeypatch.undo()
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    import gradscore as gs
    a, b = gs.load_scores(out), gs.load_scores(tmp_path / "ref.h5")
    for k in b["scores"]:
        np.testing.assert_array_equal(a["scores"][k], b["scores"][k])


def test_a_lock_taken_on_a_full_disk_leaves_no_lock_file(tmp_path, monkeypatch):
    # writing the holder's pid into the lock file failed (ENOSPC) and left the lock file behind
    import errno
    from gradscore.io.outputs import lock
    real = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(RuntimeError):
        with lock(tmp_path / "out.h5"):
            monkeypatch.setattr(os, "write", real)
            assert (tmp_path / "out.h5.lock").exists()
            raise RuntimeError   # the command fails later, naming its own file
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call", [1, 40, 400])
def test_ctrl_c_inside_an_hdf5_write_is_raised_after_the_file_closes(tmp_path, call):
    # a KeyboardInterrupt raised inside HDF5's write callback crashed the process (SIGSEGV)
    from helpers import python_child
    out = tmp_path / "out.h5"
    child = python_child(f"""
import os, signal, numpy as np
from gradscore.io import atomic
real, n = atomic._HeldErrors.write, [0]
def write(self, data):
    n[0] += 1
    if n[0] == {call}:
        signal.raise_signal(signal.SIGINT)   # Ctrl-C, delivered inside the callback
    return real(self, data)
atomic._HeldErrors.write = write
try:
    with atomic.atomic_h5({str(out)!r}) as f:
        for j in range(4):
            d = f.create_dataset(f"x{{j}}", (200, 2000), dtype=np.float32, chunks=(1, 2000))
            for i in range(200):
                d[i] = np.full(2000, i, np.float32)
    print("finished", n[0])
except KeyboardInterrupt:
    print("interrupted", n[0])
print(sorted(os.listdir({str(tmp_path)!r})))
""")
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split()[0] == "interrupted" and int(child.stdout.split()[1]) > {1: 1, 40: 40, 400: 400}[call]
    assert child.stdout.splitlines()[-1] == "[]", child.stdout   # no output, no temp file


def test_the_file_that_holds_write_errors_reads_back_what_was_written(tmp_path, monkeypatch):
    """After its first failed write, _HeldErrors serves from memory: any sequence of writes,
    reads, seeks and truncations reads as the same sequence on a plain file."""
    from gradscore.io import atomic
    rng = np.random.default_rng(0)
    failed = 0
    for trial in range(40):
        path = tmp_path / f"f{trial}"
        path.write_bytes(b"")
        monkeypatch.setattr(os, "pwrite", _disk_full_after(int(rng.integers(0, 1_200_000))))
        with atomic._HeldErrors(path) as fh, open(tmp_path / f"ref{trial}", "w+b") as ref:
            fh.PAGE = int(rng.choice([16, 4096, 1 << 16]))
            for _ in range(60):
                pos = int(rng.integers(0, 200_000))
                op = rng.choice(["write", "read", "truncate"], p=[0.6, 0.3, 0.1])
                fh.seek(pos), ref.seek(pos)
                if op == "write":
                    data = rng.integers(0, 256, int(rng.integers(1, 30_000)), dtype=np.uint8).tobytes()
                    assert fh.write(data) == ref.write(data)
                elif op == "read":
                    n = int(rng.integers(0, 30_000))
                    assert fh.read(n) == ref.read(n)
                else:
                    fh.truncate(pos), ref.truncate(pos)
                assert fh.seek(0, 2) == ref.seek(0, 2)
            fh.seek(0), ref.seek(0)
            assert fh.read() == ref.read()
            failed += fh.error is not None
    assert 5 < failed < 35   # both kinds of trial ran: writes held in memory, and all on disk


def test_costate_never_writes_over_its_input(tiny_run, capsys):
    ckpts, data = tiny_run
    before = _digest(data)
    code, err = _run(["costate", "--checkpoints", str(ckpts), "--proxy", str(data), "--target", str(data),
                      "--out", str(data), "--overwrite", "--quiet"], capsys)
    assert code == 2 and "is the proxy set" in err and _digest(data) == before


def test_no_command_replaces_a_file_of_another_kind(scored, tmp_path, capsys):
    ckpts, data, scores = scored
    files = _user_files(tmp_path)
    before = {k: _digest(p) for k, p in files.items()}
    commands = [
        (["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(files["h5"]), "--quiet"], "h5"),
        (["select", str(scores), "--by", "el2n", "--out", str(files["json"])], "json"),
        (["select", str(scores), "--jtt", "--out", str(tmp_path / "mine.json")], "npz"),
        (["select", str(scores), "--jtt", "--out", str(tmp_path / "theirs.json")], "npz"),
        (["plot", str(scores), "--kind", "hist", "--out", str(files["png"])], "png"),
        (["export", str(scores), "--format", "csv", "--out", str(files["csv"])], "csv"),
        (["export", str(scores), "--format", "csv", "--out", str(files["csv_data"])], "csv"),
        (["export", str(scores), "--format", "csv", "--out", str(files["csv_numbers"])], "csv"),
        (["import-dynamics", str(tmp_path), "--out", str(files["h5"])], "h5"),
    ]
    for argv, kind in commands:
        for extra in ([], ["--overwrite"]):
            code, err = _run(argv + extra, capsys)
            assert code == 2 and len(err.splitlines()) == 1, (argv, err)
            if argv[0] != "import-dynamics":   # no dynamics files there: refused before the output
                assert "exists and is not a gradscore" in err or "exists; pass --overwrite" in err, err
    assert {k: _digest(p) for k, p in files.items()} == before
    (tmp_path / "diag").mkdir()
    (tmp_path / "diag" / "diagnosis.json").write_text("{}")
    code, err = _run(["diagnose", str(scores), "--score", "target_dot", "--out", str(tmp_path / "diag"),
                      "--overwrite"], capsys)
    assert code == 2 and "diagnosis.json: exists and is not a gradscore JSON report" in err
    assert (tmp_path / "diag" / "diagnosis.json").read_text() == "{}"


def test_own_outputs_are_replaced_only_with_overwrite(scored, tmp_path, capsys):
    ckpts, data, scores = scored
    for argv in (["select", str(scores), "--by", "el2n", "--out", str(tmp_path / "sel.json")],
                 ["select", str(scores), "--jtt", "--out", str(tmp_path / "jtt.json")],
                 ["plot", str(scores), "--kind", "hist", "--out", str(tmp_path / "h.png")],
                 ["plot", str(scores), "--kind", "datamap", "--out", str(tmp_path / "m.svg")],
                 ["export", str(scores), "--format", "csv", "--out", str(tmp_path / "s.csv")],
                 ["export", str(scores), "--format", "parquet", "--out", str(tmp_path / "s.parquet")]):
        assert _run(argv, capsys)[0] == 0
        out = Path(argv[argv.index("--out") + 1])
        before = _digest(out)
        code, err = _run(argv, capsys)
        assert code == 2 and "exists; pass --overwrite" in err and _digest(out) == before
        assert _run(argv + ["--overwrite"], capsys)[0] == 0
    # run: the same options find the finished file; other options need --overwrite
    assert _run(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(scores),
                 "--scores", "el2n,grand,loss,confidence,variability,correctness", "--quiet"], capsys)[0] == 0
    code, err = _run(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(scores),
                      "--scores", "loss", "--quiet"], capsys)
    assert code == 2 and "made with other settings (scores (" in err and "['loss'] now) differ" in err
    assert _run(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(scores),
                 "--scores", "loss", "--quiet", "--overwrite"], capsys)[0] == 0


@contextlib.contextmanager
def _held_for_writing(path: Path):
    """``path`` open for writing in another process (a notebook's ``h5py.File(path, "a")``):
    HDF5 locks the file until that process closes it."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], 'a'); "
                               "print('open', flush=True); sys.stdin.read()", str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        yield
    finally:
        holder.communicate("", timeout=60)


def test_a_file_another_process_holds_open_for_writing_is_named_busy_not_damaged(scored, tmp_path, capsys):
    """Every command said of a file open for writing elsewhere that it "is damaged" and to
    restore it or rerun what wrote it (of a data file: "cannot read"), and ``run`` would
    never replace it. The file is whole: the fix is to close it there."""
    ckpts, data, scores = scored
    first = sorted(ckpts.glob("step_*.h5"))[0]
    new = str(tmp_path / "new.h5")
    run = ["run", "--checkpoints", str(ckpts), "--data", str(data), "--quiet",
           "--scores", "el2n,grand,loss,confidence,variability,correctness"]
    cases = {scores: [["info", str(scores)], ["diagnose", str(scores), "--out", str(tmp_path / "d")],
                      ["plot", str(scores), "--kind", "hist", "--out", str(tmp_path / "h.png")],
                      ["select", str(scores), "--by", "el2n", "--out", str(tmp_path / "s.json")],
                      ["export", str(scores), "--format", "csv", "--out", str(tmp_path / "s.csv")],
                      ["flag", str(scores), "--out", str(tmp_path / "f.json")],
                      [*run, "--out", str(scores)], [*run, "--out", str(scores), "--overwrite"]],
             data: [["info", str(data)], [*run, "--out", new]],
             first: [["info", str(ckpts)], [*run, "--out", new]]}
    for path, commands in cases.items():
        before = _digest(path)
        with _held_for_writing(path):
            for argv in commands:
                code, err = _run(argv, capsys)
                assert code == 2 and len(err.splitlines()) == 1, (argv, err)
                assert f"{path.name}: another process holds it open" in err and "damaged" not in err, err
        assert _digest(path) == before and not Path(new).exists()


@pytest.mark.parametrize("command", ["info", "diagnose", "select", "run", "run --overwrite", "sketch"])
def test_a_file_system_without_hdf5s_locks_is_named_with_its_fix(scored, tmp_path, capsys, monkeypatch, command):
    """Some network file systems refuse the lock HDF5 takes on every open (errno ENOLCK or
    ENOSYS): each file was called damaged. The fix is HDF5_USE_FILE_LOCKING=FALSE."""
    import h5py
    ckpts, data, scores = scored

    class NoLocks(h5py.File):
        def __init__(self, *args, **kwargs):
            raise OSError(38, "Unable to synchronously open file (unable to lock file, errno = 38, "
                              "error message = 'Function not implemented')")
    monkeypatch.setattr(h5py, "File", NoLocks)
    name, *extra = command.split()
    argv = {"info": ["info", str(scores)], "diagnose": ["diagnose", str(scores), "--out", str(tmp_path / "d")],
            "select": ["select", str(scores), "--by", "el2n", "--out", str(tmp_path / "s.json")],
            "run": ["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(scores), "--quiet",
                    "--scores", "loss"],
            "sketch": ["sketch", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(tmp_path / "k.h5"),
                       "--quiet"]}[name]
    code, err = _run(argv + extra, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "does not support the file locks HDF5 takes" in err and "HDF5_USE_FILE_LOCKING=FALSE" in err, err
    assert "damaged" not in err


def test_an_unwritable_output_is_one_line(scored, tmp_path, capsys, monkeypatch):
    """A read-only folder (simulated: the tests run as root, which no chmod stops)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir", "?"))
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    ckpts, data, scores = scored
    for argv in (["select", str(scores), "--by", "el2n", "--out", str(tmp_path / "ro" / "sel.json")],
                 ["plot", str(scores), "--kind", "hist", "--out", str(tmp_path / "ro" / "h.png")],
                 ["export", str(scores), "--format", "csv", "--out", str(tmp_path / "ro" / "s.csv")]):
        code, err = _run(argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "Permission denied" in err, err


@pytest.mark.parametrize("command", ["diagnose", "flag", "attribute", "select", "plot", "export", "run", "sketch"])
def test_a_read_only_folder_stops_a_command_before_its_work(scored, tmp_path, capsys, command):
    """An output in a folder this process may not write (a real read-only file system):
    `diagnose` printed its whole diagnosis and then failed on its first file; `attribute`
    and `flag` did all their work first. Now each stops before it, in one line."""
    from helpers import read_only_folder
    ckpts, data, scores = scored
    sketch = tmp_path / "k.h5"
    if command == "attribute":
        assert main(["sketch", "--checkpoints", str(ckpts), "--data", str(data), "--dim", "8", "--out", str(sketch),
                     "--quiet"]) == 0
    with read_only_folder(tmp_path / "ro") as ro:
        argv = {"diagnose": ["diagnose", str(scores), "--out", str(ro / "dg")],
                "flag": ["flag", str(scores), "--score", "el2n", "--out", str(ro / "f.json")],
                "attribute": ["attribute", "--sketch", str(sketch), "--query", str(data), "--out", str(ro / "a.h5")],
                "select": ["select", str(scores), "--by", "el2n", "--out", str(ro / "s.json")],
                "plot": ["plot", str(scores), "--kind", "hist", "--out", str(ro / "h.png")],
                "export": ["export", str(scores), "--format", "csv", "--out", str(ro / "s.csv")],
                "run": ["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(ro / "s.h5")],
                "sketch": ["sketch", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(ro / "k.h5")],
                }[command]
        capsys.readouterr()
        assert main(argv + (["--quiet"] if command in ("attribute", "run", "sketch") else [])) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1, (out, err)
        # run's and sketch's lock, taken first, is refused as early
        where = f"{ro / argv[-1]}.lock" if command in ("run", "sketch") else f"{ro}"
        assert f"cannot write or read {where}: Read-only file system" in err, err


def test_a_finished_costate_file_in_a_real_read_only_folder_is_read(tiny_run, tmp_path, capsys):
    """As the test below, on a read-only file system: the folder check leaves a finished
    output that a run only reads alone, and a new one is refused with the co-state's fix."""
    import shutil
    from helpers import read_only_folder
    ckpts, data = tiny_run
    argv = ["run", "--checkpoints", str(tmp_path / "archived"), "--data", str(data), "--target", str(data),
            "--scores", "pds", "--quiet", "--out"]

    def archive(to: Path) -> None:   # the run's checkpoints, and its co-states beside them
        shutil.copytree(ckpts, to, dirs_exist_ok=True)
        assert _run(argv + [str(tmp_path / "before.h5")], capsys)[0] == 0 and (to / "costate.h5").exists()
    with read_only_folder(tmp_path / "archived", fill=archive):
        code, err = _run(argv + [str(tmp_path / "after.h5")], capsys)
        assert code == 0, err
        # other settings need a new file: the folder refuses it, and the error names the way out
        code, err = _run(argv + [str(tmp_path / "other.h5"), "--lr-scale-steps"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "Read-only file system" in err, err
        assert "where it goes by default; pass --costate FILE" in err, err
    import gradscore as gs
    before, after = gs.load_scores(tmp_path / "before.h5"), gs.load_scores(tmp_path / "after.h5")
    np.testing.assert_array_equal(before["scores"]["pds"], after["scores"]["pds"])


def _read_only(folder: Path, monkeypatch) -> None:
    """Nothing can be created in ``folder`` (simulated: the tests run as root, which no chmod
    stops): os.open with O_CREAT, a temp file, a new directory."""
    import tempfile
    inside = str(folder.resolve())

    def refused(path) -> bool:
        return os.path.realpath(os.fspath(path)).startswith(inside)
    real_open, real_mkstemp, real_mkdir = os.open, tempfile.mkstemp, os.mkdir

    def os_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and refused(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def mkstemp(*args, **kwargs):
        if refused(kwargs.get("dir") or "."):
            raise PermissionError(13, "Permission denied", os.fspath(kwargs.get("dir") or "."))
        return real_mkstemp(*args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if refused(path) and not os.path.isdir(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("scores", ["target_dot", "pds"])
def test_a_read_only_checkpoint_folder_asks_for_the_costate_file_elsewhere(tiny_run, tmp_path, capsys, monkeypatch,
                                                                          scores):
    """The target scores keep ∇J(θ_t) (and the co-states) in a file beside the checkpoints by
    default. Where that folder is read-only (an archive, a colleague's run), the error said
    "choose another output path" of an --out that was fine; the fix is --costate FILE."""
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    _read_only(ckpts, monkeypatch)
    argv = ["run", "--checkpoints", str(ckpts), "--data", str(data), "--target", str(data), "--scores", scores,
            "--out", str(out), "--quiet"]
    code, err = _run(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(ckpts) in err and "Permission denied" in err and "--costate FILE" in err, err
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    assert _run(argv + ["--costate", str(tmp_path / "costate.h5")], capsys)[0] == 0 and out.exists()
    code, err = _run(["costate", "--checkpoints", str(ckpts), "--proxy", str(data), "--target", str(data)], capsys)
    assert code == 2 and "--out FILE" in err and "Permission denied" in err, err


def test_a_finished_costate_file_in_a_read_only_folder_is_read_as_it_is(tiny_run, tmp_path, capsys, monkeypatch):
    """A co-state file made before, beside checkpoints that are read-only now (an archived
    run): a run only reads it, but took the file's write lock first, which the folder
    refused, and asked for the co-states to be computed again elsewhere."""
    import gradscore as gs
    ckpts, data = tiny_run
    argv = ["run", "--checkpoints", str(ckpts), "--data", str(data), "--target", str(data), "--scores", "pds",
            "--quiet", "--out"]
    assert _run(argv + [str(tmp_path / "before.h5")], capsys)[0] == 0 and (ckpts / "costate.h5").exists()
    _read_only(ckpts, monkeypatch)
    code, err = _run(argv + [str(tmp_path / "after.h5")], capsys)
    assert code == 0, err
    before, after = gs.load_scores(tmp_path / "before.h5"), gs.load_scores(tmp_path / "after.h5")
    np.testing.assert_array_equal(before["scores"]["pds"], after["scores"]["pds"])
    code, err = _run(["costate", "--checkpoints", str(ckpts), "--proxy", str(data), "--target", str(data),
                      "--quiet"], capsys)
    assert code == 0, err
    # other settings would need a new file: that is the folder's refusal, with the way out
    code, err = _run(argv + [str(tmp_path / "other.h5"), "--lr-scale-steps"], capsys)
    assert code == 2 and "--costate FILE" in err, err


def test_info_into_a_closed_pipe_prints_no_traceback(scored):
    """`gradscore info … | head`: the reader is gone before gradscore writes."""
    _, _, scores = scored
    proc = subprocess.Popen([sys.executable, "-m", "gradscore", "info", str(scores)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()          # long before the child has imported torch and written anything
    err = proc.stderr.read()
    proc.wait()
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_second_writer_is_refused_at_once_and_a_dead_ones_lock_taken_over(tiny_run, tmp_path, capsys):
    from gradscore.io.outputs import lock
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    argv = ["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(out), "--quiet"]
    with lock(out):   # another run holds it
        code, err = _run(argv, capsys)
    assert code == 2 and "another run (pid" in err and "is writing it" in err
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    Path(str(out) + ".lock").write_text("pid 999999 on gone")   # left by a killed run: no flock held
    assert _run(argv, capsys)[0] == 0 and out.exists() and not Path(str(out) + ".lock").exists()


def test_a_failure_before_any_work_leaves_no_journal_and_a_changed_setting_is_named(tiny_run, tmp_path, capsys):
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    bad = tmp_path / "bad.h5"
    import gradscore as gs
    gs.save_dataset(bad, np.zeros((5, 3), dtype=np.float32), np.zeros(5, dtype=np.int64))   # wrong width
    code, err = _run(["run", "--checkpoints", str(ckpts), "--data", str(bad), "--out", str(out), "--quiet"], capsys)
    assert code == 2 and not Path(str(out) + ".partial").exists(), err
    # the corrected rerun is not blocked
    assert _run(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(out), "--quiet"], capsys)[0] == 0


@pytest.fixture
def nan_data(tiny_run, tmp_path):
    """The tiny run's data with NaN inputs at positions 3 and 40: (its file, the ids)."""
    import h5py
    import gradscore as gs
    with h5py.File(tiny_run[1]) as f:
        x, y, ids = f["inputs"][()], f["targets"][()], f["ids"][()]
    x[[3, 40]] = np.nan
    return gs.save_dataset(tmp_path / "nan.h5", x, y, ids=ids), ids


def test_nonfinite_inputs_stop_with_their_ids_or_are_recorded(tiny_run, nan_data, tmp_path, capsys):
    import h5py
    ckpts, _ = tiny_run
    bad, ids = nan_data
    out = tmp_path / "s.h5"
    argv = ["run", "--checkpoints", str(ckpts), "--data", str(bad), "--out", str(out), "--quiet"]
    code, err = _run(argv, capsys)
    assert code == 2 and f"ids {ids[3]}, {ids[40]}" in err and "step_00000000.h5" in err, err
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    assert _run(argv + ["--allow-nonfinite", "--scores", "el2n,confidence,variability"], capsys)[0] == 0
    with h5py.File(out) as f:
        assert np.flatnonzero(f["nonfinite"][()]).tolist() == [3, 40]
    # select does not drop them silently: one line, or with --allow-nonfinite left out and listed
    sel = tmp_path / "sel.json"
    for how in (["--by", "el2n", "--keep", "1.0"], ["--region", "all"]):
        code, err = _run(["select", str(out), "--out", str(sel), *how], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and f"{ids[3]}, {ids[40]}" in err, err
        assert "--allow-nonfinite" in err and not sel.exists()
    assert _run(["select", str(out), "--out", str(sel), "--by", "el2n", "--keep", "1.0", "--allow-nonfinite"],
                capsys)[0] == 0
    res = json.loads(sel.read_text())
    assert res["n_selected"] == 88 and res["nonfinite_ids"] == [int(ids[3]), int(ids[40])]
    assert not {3, 40} & set(res["indices"])


@pytest.mark.parametrize("command", ["sketch", "attribute", "costate --proxy", "costate --target"])
def test_nonfinite_inputs_stop_sketch_attribute_and_costate_with_their_ids(tiny_run, nan_data, tmp_path, capsys,
                                                                          command):
    """NaN in two examples: the query's attribution was NaN scores ranked as proponents, and
    the co-states a 'diverged' warning blaming the learning rate, each with exit code 0."""
    import gradscore as gs
    ckpts, data = tiny_run
    bad, ids = nan_data
    out = tmp_path / "out.h5"
    if command == "sketch":
        argv = ["sketch", "--checkpoints", str(ckpts), "--data", str(bad), "--dim", "64"]
    elif command == "attribute":
        sketch = tmp_path / "sketch.h5"
        assert _run(["sketch", "--checkpoints", str(ckpts), "--data", str(data), "--dim", "64", "--out", str(sketch),
                     "--quiet"], capsys)[0] == 0
        argv = ["attribute", "--sketch", str(sketch), "--query", str(bad)]
    else:
        argv = ["costate", "--checkpoints", str(ckpts), "--proxy", str(data), "--target", str(data)]
        argv[argv.index(command.split()[1]) + 1] = str(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gs.GradscoreWarning)   # the checkpoints' momentum
        code, err = _run(argv + ["--out", str(out), "--quiet"], capsys)
    lines = [line for line in err.splitlines() if "warning:" not in line]
    assert code == 2 and len(lines) == 1 and str(bad) in lines[0] and f"{ids[3]}, {ids[40]}" in lines[0], err
    assert "non-finite" in lines[0] and "learning rate" not in err, err
    assert not out.exists() and not list(tmp_path.glob("out.h5.*")), list(tmp_path.iterdir())


def test_float_and_one_hot_targets_are_refused_in_one_line(tiny_run, tmp_path, capsys):
    import h5py
    import gradscore as gs
    ckpts, data = tiny_run
    with h5py.File(data) as f:
        x, y = f["inputs"][()], f["targets"][()]
    for name, targets, says in (("float", y.astype(np.float32), "class targets must be integers"),
                                ("onehot", np.eye(4, dtype=np.float32)[y], "one-hot or soft labels")):
        path = gs.save_dataset(tmp_path / f"{name}.h5", x, targets)
        code, err = _run(["run", "--checkpoints", str(ckpts), "--data", str(path), "--out",
                          str(tmp_path / f"{name}_s.h5"), "--quiet"], capsys)
        assert code == 2 and says in err and len(err.splitlines()) == 1, err


def test_a_folder_mixing_two_runs_is_refused_naming_the_file(tmp_path, capsys):
    from helpers import make_run
    ckpts, data = make_run(tmp_path / "a", n_ckpts=2)
    other, _ = make_run(tmp_path / "b", n_ckpts=3, kwargs={"d_in": 12, "hidden": 16, "n_classes": 4, "depth": 1})
    stray = sorted(other.glob("step_*.h5"))[-1]
    (ckpts / stray.name).write_bytes(stray.read_bytes())
    code, err = _run(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(tmp_path / "s.h5"),
                      "--quiet"], capsys)
    assert code == 2 and stray.name in err and "model_kwargs" in err and "one training run" in err, err


def test_experiment_claims_its_results_before_training(tmp_path, capsys):
    out = tmp_path / "exp"
    out.mkdir()
    mine = out / "jtt.md"
    mine.write_text("# my notes\n")
    code, err = _run(["experiment", "jtt", "--mode", "tiny", "--out", str(out), "--overwrite"], capsys)
    assert code == 2 and "jtt.md: exists and is not a gradscore" in err and len(err.splitlines()) == 1, err
    assert mine.read_text() == "# my notes\n" and not (out / "jtt.json").exists() and not (out / "work").exists()
    mine.unlink()
    assert _run(["experiment", "jtt", "--mode", "tiny", "--out", str(out)], capsys)[0] == 0
    assert json.loads((out / "jtt.json").read_text())["gradscore_version"]
    digests = {p.name: _digest(p) for p in out.glob("jtt.*")}
    code, err = _run(["experiment", "jtt", "--mode", "tiny", "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err, err
    assert {p.name: _digest(p) for p in out.glob("jtt.*")} == digests
    other = tmp_path / "exp2"
    (other / "work").mkdir(parents=True)
    (other / "work" / "keep.txt").write_text("mine")
    code, err = _run(["experiment", "jtt", "--mode", "tiny", "--out", str(other)], capsys)
    assert code == 2 and "work: exists and is not" in err and len(err.splitlines()) == 1, err
    assert (other / "work" / "keep.txt").read_text() == "mine"


def test_import_checkpoints_never_writes_into_its_source_or_over_another_run(tmp_path, capsys):
    import torch
    from gradscore.demos.models import mlp
    kw = {"d_in": 6, "hidden": 8, "n_classes": 3, "depth": 1}
    src = tmp_path / "src"
    src.mkdir()
    torch.save(mlp(**kw).state_dict(), src / "step_0.pt")
    args = ["import-checkpoints", str(src), "--model", "gradscore.demos.models:mlp", "--model-kwargs", json.dumps(kw),
            "--lr", "0.1", "--quiet", "--out"]
    code, err = _run(args + [str(src)], capsys)
    assert code == 2 and "is the source folder" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in src.iterdir()) == ["step_0.pt"]
    from helpers import make_run
    ckpts, _ = make_run(tmp_path / "other")          # another model's checkpoints
    before = {p.name: _digest(p) for p in ckpts.iterdir()}
    code, err = _run(args + [str(ckpts)], capsys)
    assert code == 2 and "holds the checkpoints of another model" in err and len(err.splitlines()) == 1, err
    assert {p.name: _digest(p) for p in ckpts.iterdir()} == before
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    code, err = _run(args + [str(notes)], capsys)
    assert code == 2 and "not a directory" in err, err
    assert _run(args + [str(tmp_path / "ck")], capsys)[0] == 0
    assert _run(args + [str(tmp_path / "ck")], capsys)[0] == 0     # the same import again: nothing to do


def test_a_damaged_output_is_named_damaged_and_kept(scored, tmp_path, capsys):
    # a scores file whose root header fails its checksum was "not a gradscore scores file":
    # kept (gradscore cannot tell its kind), but the line did not say why
    ckpts, data, out = scored
    raw = bytearray(out.read_bytes())
    raw[raw.find(b"OHDR") + 20] ^= 0x10
    out.write_bytes(bytes(raw))
    for extra in ([], ["--overwrite"]):
        code, err = _run(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(out), "--quiet",
                          *extra], capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"{out}: exists and is damaged (" in err and "cannot tell that it is a gradscore scores file" in err, err
        assert "move the file away" in err
    code, err = _run(["aggregate", str(out), "--epochs-upto", "0", "--out", str(tmp_path / "a.h5")], capsys)
    assert code == 2 and f"{out}: is damaged (" in err and "not a gradscore" not in err, err   # as an input
    assert out.read_bytes() == bytes(raw)


def test_a_written_file_is_on_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    # without fsync a power loss after the rename could find the new name with no bytes (the
    # old file gone): the file's bytes go to the disk first, then its folder's entry
    from gradscore.io.atomic import atomic_h5, atomic_path
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    for write in ("text", "hdf5"):
        events.clear()
        out = tmp_path / f"{write}.out"
        if write == "text":
            with atomic_path(out) as tmp:
                tmp.write_text("x")
        else:
            with atomic_h5(out) as f:
                f["x"] = np.arange(3)
        (_, tmp, target), = [e for e in events if e[0] == "replace"]
        assert events == [("fsync", tmp), ("replace", tmp, str(out)), ("fsync", str(tmp_path))], events


def test_bench_json_is_claimed_before_timing(tmp_path, capsys):
    res = tmp_path / "bench.json"
    res.write_text(json.dumps({"gradscore_version": "0", "rows": []}))
    argv = ["bench", "--models", "digits_cnn", "--batches", "4", "--repeats", "1", "--no-end-to-end",
            "--json", str(res)]
    code, err = _run(argv, capsys)
    assert code == 2 and "--overwrite" in err and len(err.splitlines()) == 1, err
    res.write_text("not json")
    code, err = _run(argv + ["--overwrite"], capsys)
    assert code == 2 and "is not a gradscore" in err, err
    assert res.read_text() == "not json"


@pytest.mark.parametrize("out", [None, 3], ids=["none", "int"])
def test_an_out_that_is_not_a_path_is_one_config_error(scored, tmp_path, out):
    """The Python API given out=None (a variable not set) or a number raised Python's
    "expected str, bytes or os.PathLike object" from inside: one ConfigError naming 'out'."""
    import torch
    import gradscore as gs
    ckpts, data, scores = scored
    calls = [lambda: gs.score(ckpts, data, out=out, progress=False),
             lambda: gs.sketch(ckpts, data, out=out, dim=8, progress=False),
             lambda: gs.InRun(torch.nn.Linear(3, 2), out=out),
             lambda: gs.reaggregate(scores, out, epochs_upto=1)]
    for call in calls:
        with pytest.raises(gs.ConfigError, match=rf"invalid value for 'out': {out!r}; give a path"):
            call()
