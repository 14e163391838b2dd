"""The command line: demo, run, info, and one clear line + exit 2 for bad input."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradscore as gs
from gradscore.cli import main
from gradscore.io.attrs import seal

from helpers import MLP_KWARGS, make_run


def _fails(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("gradscore ") and " error: " in err
    import re
    assert re.search(pattern, err), err
    return err


def test_run_and_info(tiny_run, tmp_path, capsys):
    ckpts, data = tiny_run
    out = tmp_path / "scores.h5"
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(out),
                 "--batch-size", "8", "--chunk-size", "32", "--quiet"]) == 0
    res = gs.load_scores(out)
    assert set(res["scores"]) == {"el2n", "grand", "loss"}
    assert not list(tmp_path.glob("*.partial"))
    capsys.readouterr()
    for path in (ckpts, data, out):
        assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "3 checkpoints" in text and "90 examples" in text and "scores/grand" in text
    assert main(["info", "--env"]) == 0
    env = capsys.readouterr().out
    assert all(f'"{k}"' in env for k in ("kernels", "cuda_device", "triton", "numba")), env


def test_an_option_of_another_kind_is_refused_not_dropped(tiny_run, tmp_path, capsys):
    """`demo --docs 100` ran the digits demo, `attribute --ridge` ran TracIn, `run
    --clip-quantile` without the clip variant changed nothing: each option was dropped
    without a word; so were `run --target`, `--costate` and `--lr-scale-steps` without a
    score that reads them. Now one line, exit 2, nothing written."""
    ckpts, data = tiny_run
    cases = {("demo", "--docs", "100"): "--docs applies to --lm only",
             ("demo", "--pds", "--epochs", "3"): "--epochs applies to the digits demo or --inrun only",
             ("demo", "--steps", "3"): "--steps applies to --pds or --lm only",
             ("attribute", "--sketch", "s.h5", "--query", str(data), "--ridge", "0.5"):
                 "--ridge applies to --method trak only",
             ("run", "--checkpoints", str(ckpts), "--data", str(data), "--clip-quantile", "0.5"):
                 "--clip-quantile applies to --variants clip only; leave it out, or use it with --variants clip",
             **{("run", "--checkpoints", str(ckpts), "--data", str(data), "--scores", "el2n,grand", *extra):
                f"{extra[0]} applies to --scores pds, target_dot or target_cos only"
                for extra in (("--target", str(data)), ("--costate", "c.h5"), ("--lr-scale-steps",))}}
    outs = tmp_path / "outs"
    outs.mkdir()
    for argv, says in cases.items():
        assert main([*argv, "--out", str(outs / "o")]) == 2, argv
        assert says in capsys.readouterr().err, argv
    assert list(outs.iterdir()) == []


def test_bad_inputs_exit_2_with_one_line(tiny_run, tmp_path, capsys):
    ckpts, data = tiny_run
    out = str(tmp_path / "s.h5")
    _fails(capsys, ["run", "--checkpoints", str(tmp_path / "nope"), "--data", str(data), "--out", out],
           r"nope: checkpoint directory does not exist")
    _fails(capsys, ["run", "--checkpoints", str(data), "--data", str(data), "--out", out],   # swapped by mistake
           r"train\.h5: is a file, not a checkpoint directory; give the folder of step_<n>\.h5 files")
    _fails(capsys, ["run", "--checkpoints", str(ckpts), "--data", str(ckpts), "--out", out],
           r"ckpts: is a directory, not a dataset file; give an \.h5 or \.npz file, or a 'module:fn' factory that "
           r"returns a torch Dataset \(an ImageFolder with its evaluation transform\)$")
    # a file gradscore wrote, given as the data (a scores file for the target, the sketch for the data)
    made = str(tmp_path / "made.h5")
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", made, "--scores", "el2n"]) == 0
    sketched = gs.sketch(ckpts, data, out=tmp_path / "s.sketch.h5", dim=20, progress=False)
    capsys.readouterr()
    _fails(capsys, ["run", "--checkpoints", str(ckpts), "--data", str(data), "--target", made, "--scores",
                    "target_dot", "--out", str(tmp_path / "t.h5")],
           r"made\.h5: is a gradscore scores file, not a dataset; give the examples' file \(\.h5 or \.npz with "
           r"'inputs' and 'targets', or 'input_ids'\)")
    _fails(capsys, ["run", "--checkpoints", str(ckpts), "--data", str(sketched), "--out", str(tmp_path / "t.h5")],
           r"s\.sketch\.h5: is a gradscore sketch file, not a dataset")
    _fails(capsys, ["run", "--checkpoints", str(ckpts), "--data", str(ckpts / "step_00000000.h5"),
                    "--out", str(tmp_path / "t.h5")],
           r"step_00000000\.h5: is a gradscore checkpoint, not a dataset")
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 12)), targets=np.zeros(3))
    _fails(capsys, ["run", "--checkpoints", str(ckpts), "--data", str(tmp_path / "bad.npz"), "--out", out],
           r"bad\.npz: missing field 'inputs'")
    other, _ = make_run(tmp_path / "other", kwargs={**MLP_KWARGS, "d_in": 5})
    _fails(capsys, ["run", "--checkpoints", str(other), "--data", str(data), "--out", out],
           r"train\.h5: field .inputs. \(per-example shape \(12,\).*does not fit the model of .*step_00000000\.h5")
    # images stored as uint8: read as integers, which a float model refuses with torch's dtype error alone
    np.savez(tmp_path / "u8.npz", inputs=np.zeros((3, 12), np.uint8), targets=np.zeros(3, np.int64))
    _fails(capsys, ["run", "--checkpoints", str(ckpts), "--data", str(tmp_path / "u8.npz"), "--out", out],
           r"u8\.npz: field .inputs. \(per-example shape \(12,\), uint8 in the file, read as torch\.int64\) does not "
           r"fit the model of .*: its inputs are integers, the model's parameters float32: store them as float32, "
           r"scaled as in training \(.*\)$")
    _fails(capsys, ["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", out,
                    "--scores", "el2n,magic"], r"invalid value for 'scores': unknown score 'magic'")
    _fails(capsys, ["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", out,
                    "--batch-size", "0"], r"'batch_size': 0; give a whole number >= 1")
    _fails(capsys, ["info", str(tmp_path / "missing.h5")], r"no such file")
    assert not (tmp_path / "s.h5").exists()


def test_a_model_random_in_eval_mode_stops_run_sketch_and_costate_in_one_line(tiny_run, tmp_path, capsys):
    """A model whose forward calls F.dropout(h, p) without training=self.training scored
    every example as a random draw (the same checkpoint twice gave other scores), exit 0;
    the auto engine put it to the per-example loop as one "whose output depends on the rest
    of its batch". `costate` made co-states of random draws of the losses. Now each stops
    in one line with the cause and the fix."""
    from tests_factory import drops_in_eval
    _, data = tiny_run
    with gs.CheckpointWriter(tmp_path / "random", model_factory="tests_factory:drops_in_eval") as w:
        for step in range(2):   # the co-states need two
            w.save(drops_in_eval(), step=step, lr=0.1, epoch=step)
    says = (r"the model's output differs between two forwards of the same examples in eval mode: its forward "
            r"draws random numbers \(F\.dropout\(x, p\) without training=self\.training.*which model\.eval\(\) "
            r"turns off$")
    for command in (["run", "--data", str(data)], ["sketch", "--dim", "8", "--data", str(data)],
                    ["costate", "--proxy", str(data), "--target", str(data)]):
        _fails(capsys, [*command, "--checkpoints", str(tmp_path / "random"), "--quiet",
                        "--out", str(tmp_path / "out.h5")], says)
    assert not (tmp_path / "out.h5").exists()


def test_params_named_after_a_tied_head_score_the_shared_weight_and_say_so(tmp_path, capsys):
    """``--params 'head.*'`` on a head tied to the embedding failed ("matches no parameter");
    it scores the shared tensor, says so in one line, and the scores file keeps the line."""
    from tests_factory import tied_head
    torch.manual_seed(0)
    ids, y = torch.randint(0, 9, (20, 5)), torch.randint(0, 9, (20,))
    data = gs.save_dataset(tmp_path / "tokens.h5", ids.numpy(), y.numpy())
    with gs.CheckpointWriter(tmp_path / "tied", model_factory="tests_factory:tied_head") as w:
        model = tied_head()
        w.save(model, step=0, lr=0.1, epoch=0)
    out = tmp_path / "s.h5"
    assert main(["run", "--checkpoints", str(tmp_path / "tied"), "--data", str(data), "--out", str(out), "--quiet",
                 "--scores", "grand", "--params", "head.*"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'head.weight' is the tensor 'emb.weight' (tied weights)" in err[0], err
    assert gs.load_scores(out)["warnings"] == [err[0].split("warning: ", 1)[1]]
    want = gs.Scorer(model.eval(), engine="loop", params="emb.weight").score_batch(ids, y).sq_norm
    np.testing.assert_allclose(gs.load_scores(out)["scores"]["grand"], want.sqrt().numpy(), rtol=1e-5)
    sketch = tmp_path / "k.h5"   # the sketches of the same tensor, the same line kept
    assert main(["sketch", "--checkpoints", str(tmp_path / "tied"), "--data", str(data), "--out", str(sketch),
                 "--quiet", "--dim", "8", "--params", "head.*"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [err[0].replace("gradscore run:", "gradscore sketch:")]
    assert main(["info", str(sketch)]) == 0 and err[0].split("warning: ", 1)[1] in capsys.readouterr().out


def test_a_first_batch_warning_is_kept_in_the_scores_file(tiny_run, tmp_path, capsys, monkeypatch):
    """A warning the scorer gives on a checkpoint's first batch (here: the outputs of a model
    ending in a softmax, read by cross_entropy as logits) was printed once and lost: the
    scores file did not hold it, so `info` and `diagnose` showed nothing, and neither did
    the file of a resumed run or of one that reused the rows. Now the file holds it."""
    from gradscore.io.store import HDF5ScoresWriter
    from tests_factory import ends_in_softmax
    _, data = tiny_run
    with gs.CheckpointWriter(tmp_path / "soft", model_factory="tests_factory:ends_in_softmax") as w:
        for step in range(2):
            w.save(ends_in_softmax(), step=step, lr=0.1, epoch=step)
    out = tmp_path / "s.h5"
    argv = ["run", "--checkpoints", str(tmp_path / "soft"), "--data", str(data), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outputs are probabilities" in err[0], err   # once: not again from the file
    stored = gs.load_scores(out)["warnings"]
    assert len(stored) == 1 and err[0].endswith(stored[0]), stored
    for command in (["info", str(out)], ["diagnose", str(out)]):
        assert main(command) == 0 and f"warning: {stored[0]}" in capsys.readouterr().out, command
    # the commands that act on the scores or pass them on say it too; a selection or a flag report keeps it
    for command in (["select", str(out), "--by", "el2n", "--out", str(tmp_path / "sel.json")],
                    ["flag", str(out), "--score", "el2n", "--out", str(tmp_path / "flag.json")],
                    ["plot", str(out), "--kind", "hist", "--out", str(tmp_path / "h.png")],
                    ["export", str(out), "--format", "csv", "--out", str(tmp_path / "s.csv")]):
        assert main(command) == 0, command
        assert f"gradscore {command[0]}: warning: {stored[0]}" in capsys.readouterr().err.splitlines(), command
    for report in ("sel.json", "flag.json"):
        assert json.loads((tmp_path / report).read_text())["warnings"] == stored
    # a run whose chunks were all scored before it stopped: the rerun scores nothing
    with monkeypatch.context() as m:
        m.setattr(HDF5ScoresWriter, "finalize", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main([*argv, "--overwrite"]) == 130
    capsys.readouterr()
    kept = Path(str(out) + ".partial") / "t00000_c0000000.warnings.json"
    assert json.loads(kept.read_text()) == stored
    kept.write_text('["cut short')   # damaged on disk: named, with the way to recompute it
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{kept}: unreadable warnings of a chunk" in err, err
    for path in kept.parent.glob("t00000_c0000000.*"):
        path.unlink()
    assert main(argv) == 0 and gs.load_scores(out)["warnings"] == stored
    # a narrower window, its checkpoint's rows taken from the file
    assert main([*argv, "--epochs-upto", "0", "--overwrite"]) == 0
    assert gs.load_scores(out)["warnings"] == stored and "probabilities" in capsys.readouterr().err
    # the sketch file, and the attribution file (its queries' sketches)
    sketch, attribution = tmp_path / "k.h5", tmp_path / "a.h5"
    assert main(["sketch", "--checkpoints", str(tmp_path / "soft"), "--data", str(data), "--dim", "8",
                 "--out", str(sketch), "--quiet"]) == 0
    assert main(["attribute", "--sketch", str(sketch), "--query", str(data), "--out", str(attribution),
                 "--quiet"]) == 0
    capsys.readouterr()
    for path in (sketch, attribution):
        assert main(["info", str(path)]) == 0 and f"warning: {stored[0]}" in capsys.readouterr().out, path


def test_mismatched_model_in_checkpoint_is_named(tiny_run, tmp_path, capsys):
    import h5py
    ckpts, data = tiny_run
    path = sorted(ckpts.glob("step_*.h5"))[1]
    with h5py.File(path, "a") as f:
        f.attrs["model_kwargs"] = '{"d_in": 12, "hidden": 9, "n_classes": 4, "depth": 1}'
        seal(f)   # written so, not damaged
    _fails(capsys, ["run", "--checkpoints", str(ckpts), "--data", str(data), "--out",
                    str(tmp_path / "s.h5"), "--quiet"],
           r"step_00000001\.h5: its model_kwargs .*'hidden': 9.* differs from .*'hidden': 8.* of the first "
           r"checkpoint step_00000000\.h5")   # one folder, one training run: caught before any model is built
    assert not (tmp_path / "s.h5").exists()


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--data", "x"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv, says", [
    (["select", "s.h5", "--score", "grand", "--out", "x.json"], "unrecognized arguments: --score grand"),
    (["export", "s.h5", "--format", "csv", "--out", "x.csv", "--overwirte"],
     "unrecognized arguments: --overwirte (did you mean --overwrite?)"),
    (["run", "--checkpoints", "c", "--data", "d", "--out", "o.h5", "--batchsize=8"],
     "unrecognized arguments: --batchsize=8 (did you mean --batch-size?)"),
])
def test_an_unknown_option_is_named_with_its_commands_usage(capsys, argv, says):
    """An option the command does not have was refused with the top-level usage ("usage:
    gradscore [-h] [--version] COMMAND ...") and "gradscore: error:", which names neither
    the command nor its options; now the command's own usage and error line, with the
    nearest option where one is near."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: gradscore {argv[0]} ") and f"gradscore {argv[0]}: error: {says}\n" in err, err


@pytest.mark.parametrize("argv, near", [
    (["select", "{s}", "--by", "grnad", "--out", "{o}.json"], "grand"),
    (["flag", "{s}", "--score", "el2m", "--out", "{o}.json"], "el2n"),
    (["plot", "{s}", "--kind", "hist", "--scores", "los,grand", "--out", "{o}.png"], "loss"),
])
def test_a_misspelled_score_is_answered_with_the_nearest_the_file_has(tiny_run, tmp_path, capsys, argv, near):
    """A typo in a score's name was answered with "rerun `gradscore run --scores grnad`",
    which fails in turn (no such score); now with the nearest of the file's scores."""
    ckpts, data = tiny_run
    scores = tmp_path / "scores.h5"
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(scores), "--quiet"]) == 0
    capsys.readouterr()
    err = _fails(capsys, [a.format(s=scores, o=tmp_path / "out") for a in argv], f"; did you mean {near}\\?$")
    assert "rerun" not in err and "(it has: el2n, grand, loss)" in err, err


def test_demo_fast_mode(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "2", "--n-train", "240",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "AUROC" in text and "top-10 by el2n" in text and "data map regions" in text
    # the demo scores no dot product: its diagnosis points to the demo that does, not to a rerun of `run`
    assert "rerun `gradscore run" not in text and "`gradscore demo --pds` computes them" in text
    for p in ("data/train.h5", "scores.h5", "report.png", "datamap.png", "ckpts/step_00000008.h5"):
        assert (tmp_path / "demo" / p).exists(), p
    res = gs.load_scores(tmp_path / "demo" / "scores.h5")
    assert 0 < res["noisy"].sum() < 240
    assert res["per_checkpoint"]["loss"].shape == (2, 240)


def test_a_demo_rerun_with_fewer_epochs_scores_only_its_own_checkpoints(tmp_path, capsys):
    """The rerun left the first run's later checkpoints in DIR/ckpts and scored them too."""
    out = tmp_path / "demo"
    for epochs in ("3", "2"):
        assert main(["demo", "--out", str(out), "--epochs", epochs, "--n-train", "240", "--quiet"]) == 0
    assert gs.load_scores(out / "scores.h5")["per_checkpoint"]["loss"].shape == (2, 240)
    assert sorted(p.name for p in (out / "ckpts").iterdir()) == ["step_00000004.h5", "step_00000008.h5"]


@pytest.mark.parametrize("kind", [[], ["--pds"], ["--inrun"], ["--lm"]])
def test_a_demo_never_writes_into_a_folder_of_the_users(tmp_path, capsys, kind):
    """`gradscore demo --out .` replaced a project's data/train.h5, report.png and
    ckpts/step_<n>.h5 with the demo's."""
    mine = {"data/train.h5": "my data", "report.png": "my figure", "ckpts/step_00000023.h5": "my weights"}
    for name, text in mine.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    small = ["--epochs", "2", "--n-train", "240"] if kind in ([], ["--inrun"]) else []   # the options each takes
    assert main(["demo", *kind, "--out", str(tmp_path), *small, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("exists and is not a gradscore demo folder; gradscore never writes into it: choose another "
                        "path or move it away") and len(err.splitlines()) == 1
    assert {p.relative_to(tmp_path).as_posix(): p.read_text() for p in tmp_path.rglob("*") if p.is_file()} == mine


def test_console_script_help_and_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gradscore", "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--checkpoints" in r.stdout and "resumable" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gradscore", "info", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().endswith("no such file or directory")



def test_a_factory_in_a_file_of_the_working_folder_imports_under_the_console_script(tmp_path, monkeypatch):
    """`python -m gradscore` has the working folder on its import path, the `gradscore`
    console script had not: checkpoints of a model factory in the user's own file
    ("mymodels:net") failed to import in the very folder they were written from. From
    another folder the refusal names the one the factory was imported from."""
    script = Path(sys.executable).parent / "gradscore"
    assert script.exists(), "the install puts the console script beside python"
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "gs_user_models.py").write_text("from gradscore.demos.models import mlp\n\n\ndef net():\n"
                                            "    return mlp(d_in=6, hidden=5, n_classes=3, depth=1)\n")
    monkeypatch.syspath_prepend(str(proj))
    monkeypatch.delitem(sys.modules, "gs_user_models", raising=False)
    import gs_user_models
    with gs.CheckpointWriter(proj / "ck", model_factory="gs_user_models:net", loss="cross_entropy") as w:
        w.save(gs_user_models.net(), step=0, lr=0.1)
    gs.save_dataset(proj / "d.h5", np.random.default_rng(0).random((8, 6), dtype=np.float32), np.arange(8) % 3)
    argv = [str(script), "run", "--checkpoints", "ck", "--data", "d.h5", "--scores", "loss", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([*argv, "--out", "s.h5"], cwd=proj, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    argv = [a if a not in ("ck", "d.h5") else str(proj / a) for a in argv]
    r = subprocess.run([*argv, "--out", str(tmp_path / "s.h5")], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2 and f"PYTHONPATH={proj.resolve()} gradscore" in r.stderr, r.stderr

def test_run_and_a_recorder_import_no_compiler_they_do_not_use(tmp_path):
    """torch's compiler (dynamo) takes ~2 s to import, more than the rest of `gradscore run`
    on a small run: the ghost engine asks for it only inside a compiled forward. The child
    scores with `run` and records a step with gs.InRun; what torch itself imports counts."""
    from helpers import python_child
    ckpts, data = make_run(tmp_path)
    code = ("import sys, torch, torch.nn.functional as F\n"
            "before = 'torch._dynamo' in sys.modules\n"
            "import gradscore as gs\nfrom gradscore.cli import main\nfrom gradscore.demos.models import mlp\n"
            f"assert main(['run', '--checkpoints', {str(ckpts)!r}, '--data', {str(data)!r}, '--out', "
            f"{str(tmp_path / 's.h5')!r}, '--quiet']) == 0\n"
            "model = mlp(d_in=5, hidden=4, n_classes=3, depth=1)\n"
            f"rec = gs.InRun(model, out={str(tmp_path / 'r.h5')!r})\n"
            "x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])\n"
            "with rec.step(range(4), y):\n    F.cross_entropy(model(x), y).backward()\nrec.close()\n"
            "print(before, 'torch._dynamo' in sys.modules)")
    done = python_child(code)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = done.stdout.split()[-2:]
    assert after == before, "gradscore imported torch._dynamo"

@pytest.mark.parametrize("argv", [["flag", "{x}", "--out", "{o}.json"], ["select", "{x}", "--by", "el2n", "--out",
                                   "{o}.json"], ["export", "{x}", "--format", "csv", "--out", "{o}.csv"],
                                  ["diagnose", "{x}"], ["plot", "{x}", "--out", "{o}.png"]])
def test_a_missing_scores_file_is_named_in_one_line(tmp_path, capsys, argv):
    missing, folder, text = tmp_path / "nope.h5", tmp_path / "ckpts", tmp_path / "notes.h5"
    folder.mkdir()
    text.write_text("not HDF5")
    for given, says in ((missing, "no such file or directory"),   # h5py's open error was printed for these
                        (folder, "is a directory; give a scores file (written by gradscore run or gs.InRun)"),
                        (text, "is not a gradscore scores file (not an HDF5 file)"),
                        (make_run(tmp_path)[1], "is not a gradscore scores file (it has no /scores); give one "
                                                "written by gradscore run or gs.InRun")):
        assert main([a.format(x=given, o=tmp_path / "out") for a in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.endswith(f"{given}: {says}"), err


def test_bench_runs_small(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--models", "digits_cnn", "--batches", "4", "--repeats", "1",
                 "--no-end-to-end", "--json", str(out)]) == 0
    import json
    rows = json.loads(out.read_text())["rows"]
    methods = {r["method"] for r in rows if "error" not in r}
    assert {"plain", "loop", "vmap_fused", "ghost_k0", "ghost_k2"} <= methods
    assert all(r["ratio_to_plain"] > 0 for r in rows if "ratio_to_plain" in r)
    flops = {r["method"]: r["flops_ratio_to_plain"] for r in rows if r["method"].startswith("ghost")}
    assert 0 < flops["ghost_k0"] < flops["ghost_k2"]    # counted: the K = 2 dots add matmuls
    _fails(capsys, ["bench", "--models", "resnet"], r"--models: unknown resnet")


def test_every_option_of_every_command_has_help_and_no_literal_percent(capsys):
    from gradscore.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [(name, a.option_strings or a.dest) for name, p in sub.choices.items() for a in p._actions
               if a.help is None and a.dest != "help"]
    assert not missing, missing
    for name, p in sub.choices.items():
        assert "%%" not in p.format_help(), name


def test_an_empty_dataset_is_one_line_and_leaves_nothing(tiny_run, tmp_path, capsys):
    ckpts, _ = tiny_run
    empty = gs.save_dataset(tmp_path / "empty.h5", np.zeros((0, 12), dtype=np.float32), np.zeros(0, dtype=np.int64))
    out = tmp_path / "s.h5"
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(empty), "--out", str(out), "--quiet"]) == 2
    assert "has no examples" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "s.h5.partial").exists()


def test_info_folds_a_long_model_config(tmp_path, capsys):
    from helpers import MLP_KWARGS
    from gradscore.io.checkpoints import write_checkpoint
    from gradscore.demos.models import mlp
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    kwargs = {**MLP_KWARGS, **{f"option_{k}": "x" * 12 for k in range(40)}}   # a Hugging Face-sized config
    write_checkpoint(ckpts / "step_00000000.h5", mlp(**MLP_KWARGS), step=0, lr=0.1,
                     model_factory="gradscore.demos.models:mlp", model_kwargs=kwargs, loss="cross_entropy")
    capsys.readouterr()
    assert main(["info", str(ckpts)]) == 0
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()[1:]) <= 100, text   # the first names the folder
    assert "option_39" in text and "gradscore.demos.models:mlp" in text


def test_info_on_a_subset_and_window_run(tiny_run, tmp_path, capsys):
    ckpts, data = tiny_run
    out = tmp_path / "s.h5"
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out", str(out), "--quiet",
                 "--range", "10:30", "--epochs-upto", "1"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "20 examples (positions 10:30)" in text and "2 of 3 checkpoints (epochs <= 1)" in text, text
    assert max(len(line) for line in text.splitlines()[2:]) <= 100, text


def test_info_describes_a_costate_file(tiny_run, tmp_path, capsys):
    # a co-state file was taken for a scores file: "is damaged (... object 'ids' doesn't
    # exist); restore the file from a copy", of an intact file
    ckpts, data = tiny_run
    assert main(["costate", "--checkpoints", str(ckpts), "--proxy", str(data), "--target", str(data),
                 "--out", str(tmp_path / "c.h5"), "--quiet"]) == 0
    gs.compute_costate(gs.CostateConfig(checkpoints=str(ckpts), proxy=str(data), target=str(data), costates=False),
                       tmp_path / "t.h5", progress=False)   # what `run --scores target_dot` makes
    for name, costates in (("c.h5", True), ("t.h5", False)):
        out = tmp_path / name
        capsys.readouterr()
        assert main(["info", str(out)]) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"co-state file {out}") and f"checkpoints {ckpts}" in text, text
        assert "3 checkpoints (steps 0, 1, 2)" in text and f"target {data}" in text, text
        assert ("; co-states λ_t" in text) == costates != ("no co-states λ_t" in text) and "‖∇J(θ_t)‖" in text


def test_info_names_the_dtype_a_field_has_in_the_file(tmp_path, capsys):
    """`info` said torch.int64 for uint8 images and int32 labels: the type they are read as."""
    np.savez(tmp_path / "d.npz", inputs=np.zeros((3, 2, 2), np.uint8), targets=np.arange(3, dtype=np.int32),
             noisy=np.zeros(3, bool))
    assert main(["info", str(tmp_path / "d.npz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["  inputs: per-example shape (2, 2), uint8 in the file, read as torch.int64",
                          "  targets: per-example shape (), int32 in the file, read as torch.int64"], lines


def test_info_on_a_file_it_does_not_describe_says_what_it_describes(tmp_path, capsys):
    # `info sel.json` said "not a readable HDF5 file (... file signature not found)"
    report = tmp_path / "sel.json"
    report.write_text("{}")
    assert main(["info", str(report)]) == 2
    err = capsys.readouterr().err
    assert f"{report}: is not an HDF5 file; info describes a checkpoint folder, a dataset" in err, err


def test_run_has_an_option_for_every_runconfig_field_with_its_default():
    """`run`'s options are checked against RunConfig's fields, so the two cannot drift."""
    from dataclasses import MISSING, fields
    from gradscore.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {a.dest: a for a in sub.choices["run"]._actions}
    renamed = {"chunk_bytes": ("chunk_mb", lambda v: v // 2**20)}
    for f in fields(gs.RunConfig):
        dest, convert = renamed.get(f.name, (f.name, lambda v: v))
        assert dest in options, f"RunConfig.{f.name} has no `run` option"
        assert f.metadata.get("help"), f"RunConfig.{f.name} has no help"
        if f.default is not MISSING and not isinstance(f.default, tuple):
            assert options[dest].default == convert(f.default), f.name


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    """``import gradscore`` and the command line load no torch (the API loads its modules on
    first use), so a Ctrl-C while a command loads it is that command's one-line
    interruption, exit 130, not a traceback from inside torch's import."""
    import signal
    import time
    probe = ("import sys, gradscore, gradscore.cli; gradscore.cli.build_parser(); "
             "print('torch' in sys.modules, gradscore.InRun.__name__)")   # --help: every option, no torch
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "InRun"]
    proc = subprocess.Popen([sys.executable, "-m", "gradscore", "demo", "--out", str(tmp_path / "demo")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)   # the interpreter is up (0.1 s); loading torch takes seconds
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["gradscore demo: interrupted; rerun the same command to resume"]


def test_ctrl_c_says_resume_only_where_a_rerun_resumes(capsys):
    """`diagnose`, `export`, `flag` … save nothing as they go: "rerun the same command to
    resume" promised what their rerun does not do."""
    from gradscore.cli import interrupted
    for command, says in (("run", "rerun the same command to resume"), ("sketch", "rerun the same command to resume"),
                          ("diagnose", "rerun the same command"), ("export", "rerun the same command")):
        assert interrupted(command) == 130
        assert capsys.readouterr().err == f"gradscore {command}: interrupted; {says}\n"
