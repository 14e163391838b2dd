"""Random option combinations of every command over real and wrong files: each must exit
0 or 2 (one line naming the problem), never raise, never change a file it was not told
to write, and never a dataset, checkpoint or mask even when told (--out with --overwrite).
Found: `import-checkpoints --model os:getcwd` raised a raw TypeError."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import shutil
import warnings

import numpy as np
import pytest
import torch

import gradscore as gs
from gradscore.cli import build_parser, main

from helpers import MLP_KWARGS, make_run

SKIP = {"demo", "experiment", "bench"}   # they train models: test_cli's
#: what `costate` and `run` write beside the checkpoints unless told otherwise (--overwrite recomputes)
DEFAULT_OUTPUTS = ("costate.h5", "target_gradient.h5")
NUMBERS = ["0", "1", "3", "-1", "0.5", "1e9", "nan", "abc", "100000"]
SCORES = ["el2n", "grand", "loss", "pds", "target_dot", "confidence", "forgetting", "aum", "mislabel",
          "inrun_value", "el2n,grand", "nope", ""]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A run's checkpoints and data, and an output of each kind made from them."""
    root = tmp_path_factory.mktemp("fuzz")
    ckpts, data = make_run(root, n=40, n_ckpts=2)
    g = torch.Generator().manual_seed(5)
    gs.save_dataset(root / "val.h5", torch.randn(6, MLP_KWARGS["d_in"], generator=g).numpy(),
                    torch.randint(0, MLP_KWARGS["n_classes"], (6,), generator=g).numpy())
    for argv in (["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(root / "scores.h5"),
                  "--scores", "el2n,grand,loss,confidence,variability,correctness,forgetting"],
                 ["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(root / "pds.h5"),
                  "--scores", "pds,target_dot", "--target", str(root / "val.h5")],
                 ["sketch", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(root / "sketch.h5"),
                  "--dim", "8"],
                 ["export", str(root / "scores.h5"), "--format", "td_metrics", "--out", str(root / "td.jsonl")]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(argv + (["--quiet"] if argv[0] != "export" else [])) == 0, argv
    _other_scores_files(root, ckpts, data)
    (root / "torch").mkdir()
    torch.save(gs.CheckpointStore(ckpts).build_model(0).state_dict(), root / "torch" / "step_1.pt")
    np.save(root / "mask.npy", np.arange(40) % 7 == 0)
    (root / "ids.txt").write_text("100\n101\n")
    (root / "text.txt").write_text("hello\n")
    (root / "empty.h5").write_bytes(b"")
    (root / "folder").mkdir()
    return root


def _other_scores_files(root, ckpts, data) -> None:
    """The scores files no `run` writes: imported dynamics (and its jsonl folder), in-run,
    and an aggregate of a window."""
    x, y, ids = (gs.load_dataset(data).read(0, 40) + (gs.load_dataset(data).ids(),))
    model = gs.CheckpointStore(ckpts).build_model(0)
    (root / "dyn").mkdir()
    for e in range(2):
        with torch.no_grad():
            logits = model(x).tolist()
        (root / "dyn" / f"dynamics_epoch_{e}.jsonl").write_text(
            "".join(json.dumps({"guid": int(i), "gold": int(t), f"logits_epoch_{e}": z}) + "\n"
                    for i, t, z in zip(ids, y, logits)))
    rec = gs.InRun(model, loss="cross_entropy", out=root / "inrun.h5", targets=(x[:4], y[:4]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        b = slice(step * 10, step * 10 + 10)
        with rec.step(torch.from_numpy(ids[b]), y[b], lr=0.1):
            torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
        opt.zero_grad()
    rec.close()
    for argv in (["import-dynamics", str(root / "dyn"), "--out", str(root / "imported.h5"), "--quiet"],
                 ["aggregate", str(root / "scores.h5"), "--steps", "0:1", "--out", str(root / "window.h5")]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(argv) == 0, argv


#: the scores files of every kind, for every command that reads one
SCORES_FILES = ("scores.h5", "pds.h5", "imported.h5", "inrun.h5", "window.h5")
READERS = {"info": [], "diagnose": ["--out", "{out}/d"], "select --by": ["--by", "el2n", "--out", "{out}/s.json"],
           "select --region": ["--region", "ambiguous", "--out", "{out}/s.json"],
           "select --jtt": ["--jtt", "--out", "{out}/s.json"], "flag": ["--out", "{out}/f.json"],
           "plot": ["--out", "{out}/p.png"], "plot --kind hist": ["--kind", "hist", "--out", "{out}/h.png"],
           "export": ["--format", "csv", "--out", "{out}/e.csv"],
           "aggregate": ["--steps", "0:1", "--out", "{out}/a.h5"]}


@pytest.mark.parametrize("kind", SCORES_FILES)
def test_every_command_that_reads_a_scores_file_takes_each_kind(files, tmp_path, capsys, kind):
    """Each reader on each kind of scores file: exit 0, or 2 with one line saying why
    (`info` on an imported file raised KeyError 'checkpoints'). `info` always describes it."""
    before = _digests(files)
    _each_reader(files / kind, tmp_path, capsys)
    assert _digests(files) == before
    for made in sorted(p for p in tmp_path.rglob("*") if p.is_file()):   # info on each output the readers wrote
        code = main(["info", str(made)])
        err = capsys.readouterr().err.strip().splitlines()
        # a JTT weights file was described as a dataset "missing field 'inputs'"
        assert code == 0 if made.suffix == ".h5" else (code == 2 and len(err) == 1 and ": is a gradscore " in err[0]
                                                        and "open this one as it is" in err[0]), (made, err)


def _each_reader(scores, tmp_path, capsys) -> None:
    """Every command of READERS on the scores file ``scores``: exit 0, or 2 with one line;
    ``info`` 0; numpy's and scipy's RuntimeWarnings (an undefined figure) are failures."""
    for i, (command, options) in enumerate(READERS.items()):   # each its own folder: no output exists
        argv = [command.split()[0], str(scores), *(o.format(out=tmp_path / str(i)) for o in options)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", RuntimeWarning)
            code = main(argv + (["--quiet"] if command == "export" else []))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 0 or (code == 2 and len(err) == 1 and "error: " in err[0]), (argv, code, err)
        assert command != "info" or code == 0, err


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("kind", ["run", "inrun"])
def test_every_reader_takes_a_scores_file_of_one_or_two_examples(tmp_path, capsys, n, kind):
    """A figure undefined over one or two examples (a rank correlation, a density) is NaN
    or absent, without numpy's or scipy's warning under the command's output."""
    ckpts, data = make_run(tmp_path, n=n, n_ckpts=2)
    if kind == "run":
        assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--target", str(data), "--quiet",
                     "--scores", "el2n,grand,loss,confidence,variability,correctness,forgetting,target_dot,pds",
                     "--out", str(tmp_path / "s.h5")]) == 0
    else:
        x, y = gs.load_dataset(data).read(0, n)
        model = gs.CheckpointStore(ckpts).build_model(0)
        rec = gs.InRun(model, loss="cross_entropy", out=tmp_path / "s.h5", targets=(x, y))
        for _ in range(3):
            with rec.step(range(n), y, lr=0.1):
                torch.nn.functional.cross_entropy(model(x), y).backward()
            model.zero_grad()
        rec.close()
    _each_reader(tmp_path / "s.h5", tmp_path / "out", capsys)


def _value(action, rng, paths, outs):
    """A value for an option: often a sensible one, else anything."""
    if action.choices:
        return rng.choice(list(action.choices))
    if action.type in (int, float):
        return rng.choice(NUMBERS)
    if action.dest == "out":
        return rng.choice(outs)
    if action.dest in ("scores", "by", "score"):
        return rng.choice(SCORES)
    if action.dest in ("steps", "range"):
        return rng.choice(["0:10", "1:", ":1", "5:5", "a:b"])
    if action.dest == "model":
        return rng.choice(["gradscore.demos.models:mlp", "os:getcwd", "nope:fn"])
    if action.dest == "model_kwargs":
        return rng.choice([json.dumps(MLP_KWARGS), "{}", "[1]", "notjson"])
    return rng.choice(paths)


def _argv(command, parser, rng, root, out):
    paths = [str(p) for p in sorted(root.rglob("*"))] + [str(root / "missing.h5")]
    outs = [str(out / n) for n in ("o.h5", "o.json", "o.png", "o.csv", "o.parquet", "o.jsonl", "d")] + \
        [str(root / "scores.h5"), str(root / "train.h5"), str(root / "ckpts" / "step_00000000.h5"),
         str(root / "mask.npy"), str(root / "folder"), "/proc/none/o.h5"]
    skip = set()
    for group in parser._mutually_exclusive_groups:
        keep = rng.choice(group._group_actions) if group.required or rng.random() < .5 else None
        skip |= {id(a) for a in group._group_actions if a is not keep}
    argv = [command]
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction) or id(a) in skip:
            continue
        if not a.option_strings:
            if a.nargs != "?" or rng.random() < .7:
                argv.append(rng.choice(paths))
            continue
        if not a.required and rng.random() > (.8 if a.dest in ("out", "checkpoints", "data", "sketch", "query",
                                                                "proxy", "target", "model") else .2):
            continue
        argv.append(a.option_strings[0])
        if a.nargs != 0:
            argv.append(_value(a, rng, paths, outs))
    return argv


def _an_input(path, root) -> bool:
    """A file no command may write, even named as --out with --overwrite: data, checkpoints,
    masks, id lists, text (only an output of the same kind is ever replaced)."""
    return (path.suffix in (".pt", ".npy", ".txt") or path.name in ("train.h5", "val.h5")
            or (path.parent == root / "ckpts" and path.name.startswith("step_")))


def _digests(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("seed", range(6))
def test_random_options_exit_0_or_2_and_change_no_input(files, tmp_path, seed):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    rng = random.Random(seed)
    for case in range(100):
        command = rng.choice(sorted(set(commands) - SKIP))
        root, out = tmp_path / f"c{case}", tmp_path / f"c{case}_out"
        shutil.copytree(files, root)
        out.mkdir()
        argv = _argv(command, commands[command], rng, root, out)
        before = _digests(root)
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = main(argv)
            except SystemExit as e:   # argparse's usage errors
                code = e.code
        said = err.getvalue()
        assert code in (0, 2) and "Traceback" not in said, (argv, code, said[-2000:])
        if code == 2:
            assert "error: " in said.strip().splitlines()[-1], (argv, said)
        told = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"}
        told |= {str(root / "ckpts" / name) for name in DEFAULT_OUTPUTS}
        after = _digests(root)
        changed = [str(p) for p, d in before.items() if (str(p) not in told or _an_input(p, root))
                   and after.get(p) != d]
        assert not changed, (argv, changed)
        shutil.rmtree(root)
        shutil.rmtree(out)
