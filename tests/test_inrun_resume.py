"""Resuming an in-run recording: a training restarted from a saved state continues its
file, and the file then equals one recording of the steps the training kept."""
from __future__ import annotations

import copy
import json
import warnings

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradscore as gs
from gradscore.exceptions import GradscoreWarning
from gradscore.demos.models import mlp
from gradscore.io.journal import Journal
from gradscore.io.store import load_inrun_rows

X = torch.randn(48, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randint(0, 4, (48,), generator=torch.Generator().manual_seed(1))
TARGETS = (X[:6], Y[:6])


def _batches(steps: range, seed: int) -> dict[int, torch.Tensor]:
    """{step: 8 example indices}: one order of the data."""
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randperm(48, generator=g)[:8] for t in steps}


class _Training:
    """A model, its optimizer and the three lines of a recorder; ``state`` and ``restored``
    are a training's saved state."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)

    def run(self, rec: gs.InRun, batches: dict[int, torch.Tensor], steps: range) -> None:
        for t in steps:
            idx = batches[t]
            with rec.step(idx, Y[idx], lr=0.1, step=t):
                F.cross_entropy(self.model(X[idx]), Y[idx]).backward()
            self.opt.step()
            self.opt.zero_grad()

    def state(self) -> tuple[dict, dict]:
        return copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.opt.state_dict())

    @classmethod
    def restored(cls, state: tuple[dict, dict]) -> "_Training":
        training = cls()
        training.model.load_state_dict(state[0])
        training.opt.load_state_dict(state[1])
        return training


def _recorder(training: _Training, out, **kwargs) -> gs.InRun:
    return gs.InRun(training.model, out=out, targets=TARGETS, flush_every=0, **kwargs)


def _assert_same_file(a, b) -> None:
    with h5py.File(a) as f, h5py.File(b) as g:
        assert np.array_equal(f["ids"][()], g["ids"][()])
        assert set(f["inrun"]) == set(g["inrun"]) and set(f["scores"]) == set(g["scores"])
        for k in f["inrun"]:
            np.testing.assert_array_equal(f["inrun"][k][()], g["inrun"][k][()], err_msg=k)
        for k in f["scores"]:
            np.testing.assert_array_equal(f["scores"][k][()], g["scores"][k][()], err_msg=k)
        assert f.attrs["inrun_complete"] and g.attrs["inrun_complete"]


def _reference(out, parts: list[tuple[dict, range]]) -> None:
    """One uninterrupted recording of the steps a resumed one kept: ``parts`` of (batches, steps)."""
    training = _Training()
    rec = _recorder(training, out)
    for batches, steps in parts:
        training.run(rec, batches, steps)
    rec.close()


def test_a_training_resumed_after_a_crash_continues_its_recording(tmp_path):
    """Steps 0–7 recorded, the training's state saved before step 5, then a crash; the
    training resumes from that state on another order of the data. The file equals one
    recording of steps 0–4 (first order) and 5–11 (second): the records of steps 5–7 made
    before the crash are replaced, not counted twice."""
    out, first, second = tmp_path / "r.h5", _batches(range(12), seed=1), _batches(range(12), seed=2)
    training = _Training()
    rec = _recorder(training, out)
    training.run(rec, first, range(5))
    saved = training.state()
    training.run(rec, first, range(5, 8))
    rec.flush()
    del rec                                             # the crash: never closed, every step flushed
    with h5py.File(out) as f:
        assert not f.attrs["inrun_complete"] and f["inrun/step"][()].max() == 7
    resumed = _Training.restored(saved)
    rec = _recorder(resumed, out, resume=True)
    with pytest.warns(GradscoreWarning, match="resumed at step 5: the records of steps 5 to 7 made before"):
        resumed.run(rec, second, range(5, 6))
    resumed.run(rec, second, range(6, 12))
    rec.close()
    _reference(tmp_path / "ref.h5", [(first, range(5)), (second, range(5, 12))])
    _assert_same_file(out, tmp_path / "ref.h5")
    assert not (tmp_path / "r.h5.partial").exists()


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_a_closed_recording_continues_and_a_second_crash_resumes_again(tmp_path, monkeypatch, chunk_rows):
    """A finished recording (its journal gone) continues with more training; that run
    crashes after step 6 and resumes from its state before step 5. The finished file's
    32 records go back into the journal in row files of ``chunk_rows`` (its default: one)."""
    out, a, b, c = tmp_path / "r.h5", _batches(range(10), 1), _batches(range(10), 2), _batches(range(10), 3)
    if chunk_rows:
        monkeypatch.setattr(gs.inrun.store, "CHUNK_ROWS", chunk_rows)
    training = _Training()
    rec = _recorder(training, out)
    training.run(rec, a, range(4))
    rec.close()
    rec = _recorder(training, out, resume=True)
    assert len(list((tmp_path / "r.h5.partial").glob("rank000_*.npz"))) == (7 if chunk_rows else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # step 4 follows step 3: nothing replaced, nothing missing
        training.run(rec, b, range(4, 5))
    saved = training.state()
    training.run(rec, b, range(5, 7))
    rec.flush()
    del rec
    resumed = _Training.restored(saved)
    rec = _recorder(resumed, out, resume=True)
    with pytest.warns(GradscoreWarning, match="steps 5 to 6"):
        resumed.run(rec, c, range(5, 9))
    rec.close()
    _reference(tmp_path / "ref.h5", [(a, range(4)), (b, range(4, 5)), (c, range(5, 9))])
    _assert_same_file(out, tmp_path / "ref.h5")


def _given(out) -> list[str]:
    """The warnings of the in-run file ``out`` about the optimizer (the recorder's own), read
    as they are stored (load_scores warns of an unfinished recording)."""
    with h5py.File(out) as f:
        return [w for w in json.loads(f.attrs["warnings"]) if "optimizer" in w]


def test_a_warning_given_before_a_crash_or_a_close_stays_in_the_resumed_file(tmp_path):
    """The recorder's optimizer holds none of the parameters (a warning), then the training
    crashes; the resumed training steps with its own optimizer (no warning). The records of
    the first steps were weighed without the optimizer's rates, so the resumed file keeps
    the warning: written during the training, at close, and after the closed recording is
    continued once more. Before, only the process that gave it wrote it: the resumed file
    had none. A damaged warnings file of the journal is one error naming it and the fix."""
    out, a = tmp_path / "r.h5", _batches(range(8), 1)
    training = _Training()
    rec = _recorder(training, out)
    rec.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)   # steps no parameter of the model
    with pytest.warns(GradscoreWarning, match="holds none of the model's parameters") as seen:
        training.run(rec, a, range(3))
    said = [str(w.message) for w in seen]
    rec.flush()
    del rec                                             # the crash
    for step in (3, 5):   # resumed after the crash, then after the close
        rec = _recorder(training, out, resume=True, optimizer=training.opt)
        with warnings.catch_warnings():
            warnings.simplefilter("error")              # this process gives no warning
            training.run(rec, a, range(step, step + 1))
            rec.flush()
            assert _given(out) == said
            training.run(rec, a, range(step + 1, step + 2))
            rec.close()
        assert _given(out) == said
    rec = _recorder(training, out, resume=True, optimizer=training.opt)
    training.run(rec, a, range(7, 8))
    rec.flush()
    kept = tmp_path / "r.h5.partial" / "rank000.warnings.json"
    kept.write_text('["the optimizer')
    with pytest.raises(gs.GradscoreError, match=f"{kept}: unreadable warnings of the recording .*delete it: the "
                                                f"recording keeps its records"):
        rec.close()
    kept.unlink()
    rec.close()
    assert _given(out) == [] and len(load_inrun_rows(out)["step"]) == 8 * 8


def test_a_journal_left_by_a_recorder_that_never_stepped_is_not_the_recordings(tmp_path):
    """A finished recording; then a recorder with other options (overwrite=True) is made
    and dropped before its first step. It leaves no journal; one with its settings and no
    records (a crash between the journal's fingerprint and its first rows) is not the
    recording's: a resume continues the finished recording, and so does a resume after
    that one's crash."""
    out, a = tmp_path / "r.h5", _batches(range(6), 1)
    training = _Training()
    rec = _recorder(training, out)
    training.run(rec, a, range(2))
    rec.close()
    dropped = _recorder(_Training(), out, overwrite=True, every=2)
    assert not (tmp_path / "r.h5.partial").exists()
    Journal.attach(out, dropped.fingerprint).open()
    del dropped
    rec = _recorder(training, out, resume=True)
    training.run(rec, a, range(2, 4))
    rec.flush()
    del rec
    rec = _recorder(training, out, resume=True)
    training.run(rec, a, range(4, 6))
    rec.close()
    _reference(tmp_path / "ref.h5", [(a, range(6))])
    _assert_same_file(out, tmp_path / "ref.h5")


def test_steps_lost_in_the_interruption_are_named(tmp_path):
    """Records flushed to step 3; the training resumes from its state after step 5 (steps
    4 and 5 ran but their records were never flushed): the file says so and keeps both runs."""
    out, a = tmp_path / "r.h5", _batches(range(9), 1)
    training = _Training()
    rec = _recorder(training, out)
    training.run(rec, a, range(4))
    rec.flush()
    rec = None
    training2 = _Training()
    rec = _recorder(training2, out, resume=True)
    with pytest.warns(GradscoreWarning, match=r"resumed at step 6, and the last recorded step is 3: steps 4 to 5 "
                                                 r"have no records"):
        training2.run(rec, a, range(6, 9))
    rec.close()
    with h5py.File(out) as f:
        assert sorted(set(f["inrun/step"][()])) == [0, 1, 2, 3, 6, 7, 8]


def test_resuming_what_cannot_be_continued_is_one_clear_error(tmp_path):
    out = tmp_path / "r.h5"
    training = _Training()
    rec = _recorder(training, out)
    training.run(rec, _batches(range(2), 1), range(2))
    rec.flush()
    del rec                                              # interrupted
    with pytest.raises(gs.OutputError, match="holds an interrupted in-run recording; pass resume=True to continue"):
        _recorder(training, out)
    with pytest.raises(gs.ConfigError, match="resume=True continues the recording in out and overwrite=True "
                                             "replaces it"):
        _recorder(training, out, resume=True, overwrite=True)
    with pytest.raises(gs.ConfigMismatchError, match=r"other settings \(every \(1 before, 2 now\) differs\)"):
        _recorder(training, out, resume=True, every=2)
    other = torch.nn.Sequential(torch.nn.Linear(10, 4)).double()
    wider = mlp(d_in=10, hidden=16, n_classes=4, depth=1).double()   # the same parameter names
    for model in (other, wider):
        with pytest.raises(gs.ConfigMismatchError, match=r"other settings \(parameters differ\)"):
            gs.InRun(model, out=out, targets=TARGETS, resume=True)
    # another target set of the same size (inrun_value would add up dots with two targets), or its
    # values in another dtype: the same count, other numbers
    for targets in [(X[6:12], Y[6:12]), (X[:6].float(), Y[:6]), (X[:6], (Y[:6] + 1) % 4)]:
        with pytest.raises(gs.ConfigMismatchError, match=r"other settings \(the target set differs\)"):
            gs.InRun(training.model, out=out, targets=targets, flush_every=0, resume=True)
    # the same examples from a shuffled loader: the same ∇J
    gs.InRun(training.model, out=out, targets=iter([(X[3:6], Y[3:6]), (X[[2, 0, 1]], Y[[2, 0, 1]])]),
             resume=True)
    rec = _recorder(training, out, resume=True)
    with pytest.raises(gs.ConfigError, match="invalid value for 'step': this recording continues an earlier one"):
        rec.step(range(8), Y[:8])
    with pytest.raises(gs.ConfigError, match="'ids': strings in step 2, integers before"):
        rec.step(list("abcdefgh"), Y[:8], lr=0.1, step=2)
    # a scores file of gradscore run is no recording to continue, nor replaced unasked
    with h5py.File(tmp_path / "run.h5", "w") as f:
        f.attrs.update({"fingerprint": '{"engine": "ghost"}', "config": "{}"})
        f.create_dataset("ids", data=np.arange(3))
        f.create_group("scores").create_dataset("grand", data=np.ones(3))
    with pytest.raises(gs.OutputError, match="not an in-run recording .*resume=True continues an in-run recording"):
        _recorder(training, tmp_path / "run.h5", resume=True)
    with pytest.raises(gs.OutputError, match="not an in-run recording .*pass overwrite=True to replace it"):
        _recorder(training, tmp_path / "run.h5")
    assert h5py.File(tmp_path / "run.h5")["scores/grand"].shape == (3,)


def test_resume_with_nothing_to_continue_starts_a_recording(tmp_path):
    training = _Training()
    rec = _recorder(training, tmp_path / "r.h5", resume=True)
    training.run(rec, _batches(range(3), 1), range(3))
    rec.close()
    _reference(tmp_path / "ref.h5", [(_batches(range(3), 1), range(3))])
    _assert_same_file(tmp_path / "r.h5", tmp_path / "ref.h5")


_DDP = """
import os, sys, torch, torch.nn.functional as F
import gradscore as gs
from gradscore.demos.models import mlp
from gradscore.io.store import load_inrun_rows
torch.distributed.init_process_group("gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
out, phase, state = sys.argv[1:4]
torch.manual_seed(0)
net = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double()
model = torch.nn.parallel.DistributedDataParallel(net)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(32, 10, generator=g, dtype=torch.float64), torch.randint(0, 4, (32,), generator=g)
batches = [torch.randperm(32, generator=g)[:8] for _ in range(8)]
opt = torch.optim.SGD(model.parameters(), lr=0.1)
steps = {"whole": range(8), "first": range(6), "resumed": range(3, 8)}[phase]
if phase == "resumed":
    saved = torch.load(state)
    net.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
rec = gs.InRun(model, out=out, targets=(x[:6], y[:6]), flush_every=0, resume=phase == "resumed")
for t in steps:
    if phase == "first" and t == 3 and rank == 0:
        torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, state)
    mine = batches[t].chunk(world)[rank]
    with rec.step(mine, y[mine], lr=0.1, step=t):
        F.cross_entropy(model(x[mine]), y[mine]).backward()
    opt.step()
    opt.zero_grad()
if phase == "first":
    rec.flush()       # then the crash: never closed
else:
    rec.close()
torch.distributed.destroy_process_group()
os._exit(0)           # DDP's teardown at exit aborts now and then on 2 cores (test_inrun's DDP test)
"""


def test_two_ddp_ranks_resume_their_recording(tmp_path):
    """Two gloo ranks record steps 0–5 and stop unclosed; restarted from their state before
    step 3, they continue the recording. It equals the two ranks' uninterrupted recording
    of steps 0–7: each rank writes the continued segment, none keeps a replaced record."""
    import subprocess
    import sys
    script = tmp_path / "ddp.py"
    script.write_text(_DDP)

    def torchrun(out: str, phase: str) -> None:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               str(script), str(tmp_path / out), phase, str(tmp_path / "state.pt")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun("whole.h5", "whole")
    torchrun("r.h5", "first")
    assert sorted({p.name[:7] for p in (tmp_path / "r.h5.partial").glob("rank*.npz")}) == ["rank000", "rank001"]
    torchrun("r.h5", "resumed")
    _assert_same_file(tmp_path / "r.h5", tmp_path / "whole.h5")
    assert not (tmp_path / "r.h5.partial").exists()


def test_a_damaged_row_file_of_the_journal_is_one_error_naming_it(tmp_path):
    """A row file of the journal damaged on disk: closing or resuming the recording names
    it (its records cannot be made again) instead of a zip traceback, and the scores file of
    the last flush is left as it was."""
    out, a = tmp_path / "r.h5", _batches(range(4), 1)
    training = _Training()
    rec = _recorder(training, out)
    training.run(rec, a, range(2))
    rec.flush()
    flushed = out.read_bytes()
    training.run(rec, a, range(2, 4))
    rec.flush()
    first = sorted((tmp_path / "r.h5.partial").glob("rank*.npz"))[0]
    with np.load(first) as z:
        lost = set(z["step"].tolist())
    raw = bytearray(first.read_bytes())
    raw[len(raw) // 3] ^= 0x04   # inside the stored arrays: zip's CRC-32 fails
    first.write_bytes(bytes(raw))
    out.write_bytes(flushed)
    for attempt in (rec.close, lambda: _recorder(_Training(), out, resume=True)):
        with pytest.raises(gs.GradscoreError, match=f"{first}: a row file of this in-run recording cannot be "
                                                    f"read \\(damaged: Bad CRC-32"):
            attempt()
        assert out.read_bytes() == flushed and first.exists()
    first.unlink()   # as the message says: the recording without those records
    rec.close()
    assert lost and set(load_inrun_rows(out)["step"].tolist()) == set(range(4)) - lost


def _recorded_ids(out) -> list:
    """The example id of each record of an in-run file, in step order."""
    return gs.load_scores(out, per_checkpoint=False)["ids"][load_inrun_rows(out, ["row"])["row"]].tolist()


def _step(rec: gs.InRun, model, ids, step: int) -> None:
    with rec.step(ids, Y[:8], step=step):
        F.cross_entropy(model(X[:8]), Y[:8]).backward()
    model.zero_grad()


def test_a_second_recorder_of_the_same_file_in_this_process_is_refused_or_replaces_it(tmp_path):
    """Two recorders of one `out` shared one journal: the first's file held the second's
    records (ids 100–107 for a recording of 0–7), silently. While one records, a second is
    refused (resume=True too: the first's last records are not in the journal yet); with
    overwrite=True it replaces the first, which then records and writes nothing (a cell of
    a notebook run again). Once a recorder has closed, or its with-block ended in an
    exception, a new one continues the file."""
    model = _Training().model
    out = tmp_path / "r.h5"
    first = gs.InRun(model, out=out, flush_every=0)
    _step(first, model, range(8), 0)
    for options in ({}, {"resume": True}):
        with pytest.raises(gs.OutputError, match=r"r\.h5: an earlier gs\.InRun of this process records it and is "
                                                 r"not closed; close\(\) it first, pass overwrite=True"):
            gs.InRun(model, out=out, **options)
    _step(first, model, range(8), 1)
    first.close()
    assert _recorded_ids(out) == list(range(8)) * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]   # no lock file left
    with pytest.raises(RuntimeError, match="the training broke"):
        with gs.InRun(model, out=out, resume=True, flush_every=0) as second:
            _step(second, model, range(100, 108), 2)
            raise RuntimeError("the training broke")
    third = gs.InRun(model, out=out, resume=True)
    _step(third, model, range(8), 3)
    replacing = gs.InRun(model, out=out, overwrite=True)
    for call in (lambda: _step(third, model, range(8), 4), third.close):
        with pytest.raises(gs.OutputError, match="a newer gs.InRun of the same out took over its file"):
            call()
    _step(replacing, model, range(200, 208), 0)
    replacing.close()
    assert _recorded_ids(out) == list(range(200, 208))


@pytest.mark.parametrize("then", ["same recorder", "new recorder", "new recorder after close"])
def test_a_recorder_refused_at_its_first_step_leaves_no_journal_and_gives_way(tmp_path, then):
    """A recorder refused at its first step (BatchNorm in training mode) left ``r.h5.partial``
    behind, and a new recorder of the same out made after the fix in the same process (a
    notebook cell run again) was refused as "not closed", even after close(). A recorder
    that has recorded nothing leaves no journal on disk and gives way to a new one; the
    refused recorder itself still records once the model is fixed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 4)).double()
    out = tmp_path / "r.h5"
    refused = gs.InRun(model, out=out, flush_every=0)
    assert not (tmp_path / "r.h5.partial").exists()
    with pytest.raises(gs.EngineError, match="is in training mode"):
        _step(refused, model, range(8), 0)
    assert not (tmp_path / "r.h5.partial").exists()
    model[1].eval()   # the fix: frozen statistics
    rec = refused
    if then != "same recorder":
        if then == "new recorder after close":
            with pytest.raises(gs.ConfigError, match="no step was recorded"):
                refused.close()
        rec = gs.InRun(model, out=out, flush_every=0)
    _step(rec, model, range(8), 0)
    rec.close()
    assert _recorded_ids(out) == list(range(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]
    if rec is not refused and then == "new recorder":
        with pytest.raises(gs.OutputError, match="a newer gs.InRun of the same out took over its file"):
            _step(refused, model, range(8), 1)


def test_a_recording_in_another_process_is_not_taken_over(tmp_path):
    """A live recorder in another process (its journal not yet flushed, or flushed): a new
    recorder with overwrite=True or resume=True replaced or continued its journal under it."""
    out = tmp_path / "r.h5"
    code = ("import sys, time, torch, gradscore as gs; from gradscore.demos.models import mlp; "
            f"rec = gs.InRun(mlp(d_in=10, hidden=8, n_classes=4, depth=1), out={str(out)!r}); "
            "print('ready', flush=True); sys.stdin.readline()")
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        model = _Training().model
        for options in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(gs.OutputError, match=r"r\.h5: another run \(pid \d+ on .*\) is writing it"):
                gs.InRun(model, out=out, **options)
    finally:
        child.communicate("\n", timeout=60)
    rec = gs.InRun(_Training().model, out=out, overwrite=True)   # the other process has ended: the file is free
    _step(rec, rec.network, range(8), 0)
    rec.close()


def test_a_recording_never_closed_is_written_when_the_script_ends(tmp_path):
    """A script that recorded its training and ended without rec.close() (forgotten, or an
    exception) left nothing: the records of a short training (under flush_every) were in
    memory alone, silently. At exit the recorder flushes them as an interrupted recording,
    and says so; resume=True and close() then finish it as one uninterrupted recording."""
    from helpers import python_child
    out = tmp_path / "r.h5"
    code = ("import torch, test_inrun_resume as T\n"
            "training = T._Training()\n"
            f"rec = T.gs.InRun(training.model, out={str(out)!r}, targets=T.TARGETS)\n"   # flush_every: 60 s
            "training.run(rec, T._batches(range(6), 0), range(6))\n"
            "print('trained', flush=True)\n")
    done = python_child(code, timeout=600)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr
    assert "r.h5: the recording was not closed (call rec.close() after the training)" in done.stderr, done.stderr
    with pytest.warns(GradscoreWarning, match="an unfinished in-run recording .*: its scores are of steps 0 to 5"):
        gs.load_scores(out)
    rec = _recorder(_Training(), out, resume=True)
    rec.close()
    _reference(tmp_path / "ref.h5", [(_batches(range(6), 0), range(6))])
    _assert_same_file(out, tmp_path / "ref.h5")
