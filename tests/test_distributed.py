"""`gradscore run` under torchrun: 2 gloo ranks on CPU write the same file, bit for bit,
as one process, and a killed rank resumes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from gradscore.cli import main
from helpers import make_run


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _assert_identical(a: Path, b: Path) -> None:
    da, db = _datasets(a), _datasets(b)
    assert da.keys() == db.keys()
    for k in da:
        assert np.array_equal(da[k], db[k]), k   # bit-identical, not close


def _torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "gradscore", *args]


def _workers(parent: int) -> list[int]:
    """PIDs of the processes whose parent is ``parent`` (torchrun's ranks)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    pids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def _one_process_and_two_ranks(tmp_path: Path, ckpts: Path, data: Path, scores: str
                               ) -> tuple[list[str], subprocess.CompletedProcess]:
    """``run --scores scores`` in one process (one.h5, co-state file c1.h5) and under torchrun
    with two ranks (two.h5, c2.h5); both outputs must be bit-identical. Returns the common
    arguments and torchrun's result."""
    common = ["run", "--checkpoints", str(ckpts), "--data", str(data), "--target", str(data),
              "--scores", scores, "--chunk-size", "16", "--batch-size", "8", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one.h5"), "--costate", str(tmp_path / "c1.h5")]) == 0
    two = common + ["--out", str(tmp_path / "two.h5"), "--costate", str(tmp_path / "c2.h5")]
    done = subprocess.run(_torchrun(two), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_identical(tmp_path / "one.h5", tmp_path / "two.h5")
    _assert_identical(tmp_path / "c1.h5", tmp_path / "c2.h5")
    return common, done


def test_two_ranks_score_target_alignment_without_costates_as_one_process(tmp_path):
    """target_dot and target_cos without pds: rank 0 computes ∇J(θ_t) alone, every rank reads
    it, and the file equals one process's bit for bit."""
    ckpts, data = make_run(tmp_path, n=64, n_ckpts=3)
    _one_process_and_two_ranks(tmp_path, ckpts, data, "target_dot,target_cos")
    with h5py.File(tmp_path / "two.h5") as f:
        assert "dot_target" in f["per_checkpoint"] and "dot_costate" not in f["per_checkpoint"]


def test_two_ranks_equal_one_process_and_a_killed_rank_resumes(tmp_path):
    ckpts, data = make_run(tmp_path, n=240, n_ckpts=3)
    common, done = _one_process_and_two_ranks(tmp_path, ckpts, data, "el2n,grand,loss,pds")
    assert done.stdout.count("scores ->") == 1          # printed by rank 0 only

    # kill one rank mid-run (loop engine: slow enough), then rerun the same command
    killed = common + ["--out", str(tmp_path / "killed.h5"), "--costate", str(tmp_path / "c2.h5"),
                       "--engine", "loop"]
    ref = common + ["--out", str(tmp_path / "one_loop.h5"), "--costate", str(tmp_path / "c1.h5"),
                    "--engine", "loop"]
    assert main(ref) == 0
    partial = tmp_path / "killed.h5.partial"
    proc = subprocess.Popen(_torchrun(killed), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(list(partial.glob("t*.npz"))) < 4:
        time.sleep(0.005)
    ranks = _workers(proc.pid)
    assert proc.poll() is None and len(ranks) == 2, "the run ended before a rank could be killed"
    os.kill(ranks[1], signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0 and not (tmp_path / "killed.h5").exists()
    n_done = len(list(partial.glob("t*.npz")))
    assert 4 <= n_done < 3 * 15
    again = subprocess.run(_torchrun(killed), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    _assert_identical(tmp_path / "one_loop.h5", tmp_path / "killed.h5")


@pytest.mark.parametrize("where", ["--data", *(pytest.param(w, marks=pytest.mark.slow) for w in ("--target", "--out"))])
def test_bad_input_on_one_rank_stops_every_rank_in_one_line(tmp_path, where):
    """A NaN example in rank 1's range of --data, or in --target (rank 0 computes the
    co-state file while the others wait), or an --out made with other options (rank 0 opens
    the journal first): the rank that found it said so in one line, and the other died in
    a barrier with a raw traceback of torch's connection error. Now each rank prints one
    line (the other's names the failed rank) and exits 2."""
    import gradscore as gs
    ckpts, data = make_run(tmp_path, n=90, n_ckpts=2)
    with h5py.File(data) as f:
        x, y, ids = f["inputs"][()], f["targets"][()], f["ids"][()]
    x[70] = np.nan   # chunk 4 of 6: rank 1's
    bad = gs.save_dataset(tmp_path / "nan.h5", x, y, ids=ids)
    args = ["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(tmp_path / "s.h5"),
            "--chunk-size", "16", "--quiet"]
    if where == "--data":
        args[args.index("--data") + 1] = str(bad)
    elif where == "--target":
        args += ["--target", str(bad), "--scores", "target_dot"]
    else:
        assert subprocess.run(_torchrun(args), capture_output=True, timeout=300).returncode == 0
        args += ["--batch-size", "7"]
    done = subprocess.run(_torchrun(args), capture_output=True, text=True, timeout=300)
    said = [line for line in done.stderr.splitlines() if line.startswith("gradscore run: error: ")]
    # torchrun ends the other rank once one exits, which may be before it prints its line
    assert done.returncode != 0 and 1 <= len(said) <= 2, done.stderr[-3000:]
    cause = "batch_size (256 before, 7 now)" if where == "--out" else f"ids {ids[70]})"
    assert all(cause in line for line in said), said
    assert "]: Traceback" not in done.stderr and "exitcode  : 2" in done.stderr, done.stderr[-3000:]


def test_distributed_flag_needs_torchrun(tiny_run, tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ckpts, data = tiny_run
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(tmp_path / "s.h5"),
                 "--distributed", "--quiet"]) == 2
    assert "torchrun --nproc-per-node N -m gradscore run" in capsys.readouterr().err


DDP_TRAINING = """
import sys, torch, torch.distributed as dist
import gradscore as gs
from gradscore.demos.models import mlp
dist.init_process_group("gloo")
kw = {"d_in": 12, "hidden": 8, "n_classes": 4, "depth": 1}
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(mlp(**kw))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(dist.get_rank())
with gs.CheckpointWriter(sys.argv[1], model_factory="gradscore.demos.models:mlp", model_kwargs=kw) as w:
    for step in range(4):
        w.save(model, step=step, lr=0.1, epoch=step)
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step(); opt.zero_grad()
dist.destroy_process_group()
import os
os._exit(0)   # DDP's teardown at interpreter exit aborts now and then on 2 cores (test_inrun's DDP test)
"""


def test_a_ddp_training_loop_writes_one_run_of_checkpoints(tmp_path):
    """Each rank calls the writer (as a Trainer's callback does on every rank); only rank 0
    writes, so the folder holds one run and no rank finds another's file for an earlier run's."""
    import gradscore as gs
    script = tmp_path / "train.py"
    script.write_text(DDP_TRAINING)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(tmp_path / "ckpts")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    store = gs.CheckpointStore(tmp_path / "ckpts")
    assert [i.step for i in store] == [0, 1, 2, 3] and len({i.run for i in store}) == 1
