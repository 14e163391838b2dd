"""`gradscore import-checkpoints` from torch.save and safetensors files."""
from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np
import pytest
import torch

import gradscore as gs
from gradscore.cli import main
from gradscore.demos.models import mlp
from tests_factory import tied_head

KW = {"d_in": 6, "hidden": 8, "n_classes": 3, "depth": 1}


def _states(n=3, make=lambda: mlp(**KW)):
    """``n`` state_dicts of ``make()``'s model, 0.1 apart in every parameter."""
    torch.manual_seed(0)
    model = make()
    out = []
    for _ in range(n):
        out.append({k: v.clone() for k, v in model.state_dict().items()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
    return out


def _args(src, out, *extra):
    return ["import-checkpoints", str(src), "--model", "gradscore.demos.models:mlp", "--model-kwargs",
            json.dumps(KW), "--out", str(out), "--quiet", *extra]


def test_torch_save_files_nested_and_ddp_prefixed(tmp_path):
    states = _states()
    src = tmp_path / "src"
    src.mkdir()
    torch.save(states[0], src / "step_0.pt")
    torch.save({"state_dict": states[1], "optimizer": {}}, src / "step_100.pth")
    torch.save({f"module.{k}": v for k, v in states[2].items()}, src / "epoch2_step_200.bin")
    (tmp_path / "lr.json").write_text(json.dumps({"0": 0.1, "100": 0.05, "200": 0.01}))
    assert main(_args(src, tmp_path / "ck", "--lr-schedule", str(tmp_path / "lr.json"),
                      "--steps-per-epoch", "100")) == 0
    store = gs.CheckpointStore(tmp_path / "ck")
    assert [(i.step, i.lr, i.epoch) for i in store] == [(0, 0.1, 0.0), (100, 0.05, 1.0), (200, 0.01, 2.0)]
    for i, want in enumerate(states):
        got = store.build_model(i).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    data = gs.save_dataset(tmp_path / "d.h5", x.numpy(), y.numpy())
    assert main(["run", "--checkpoints", str(tmp_path / "ck"), "--data", str(data), "--out",
                 str(tmp_path / "s.h5"), "--quiet"]) == 0
    # how the imported steps were taken is not known: target_dot says its plain-step reading may not hold
    assert main(["run", "--checkpoints", str(tmp_path / "ck"), "--data", str(data), "--target", str(data),
                 "--scores", "target_dot", "--out", str(tmp_path / "t.h5"), "--quiet"]) == 0
    assert any("the checkpoints were imported, so their optimizer is not recorded" in w
               for w in gs.load_scores(tmp_path / "t.h5")["warnings"])


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module.", "net._orig_mod.",
                                    "net.module._orig_mod."])
def test_compiled_and_ddp_wrapper_prefixes_are_stripped(tmp_path, prefix):
    """A torch.compile'd model saves its keys under ``_orig_mod.``; under DDP the two
    wrappers nest either way round; a LightningModule's compiled network (``self.net =
    torch.compile(net)``) saves them under its attribute (refused before: ``net.`` was
    found, the wrappers inside it were not stripped)."""
    state = _states(1)[0]
    src = tmp_path / "src"
    src.mkdir()
    torch.save({prefix + k: v for k, v in state.items()}, src / "step_5.pt")
    assert main(_args(src, tmp_path / "ck", "--lr", "0.1")) == 0
    got = gs.CheckpointStore(tmp_path / "ck").build_model(0).state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_safetensors_in_hf_style_directories(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    states = _states(2)
    for step, st in zip((500, 1000), states):
        (tmp_path / "src" / f"checkpoint-{step}").mkdir(parents=True)
        safetensors.save_file(st, str(tmp_path / "src" / f"checkpoint-{step}" / "model.safetensors"))
    assert main(_args(tmp_path / "src", tmp_path / "ck", "--lr", "0.3")) == 0
    store = gs.CheckpointStore(tmp_path / "ck")
    assert [(i.step, i.lr) for i in store] == [(500, 0.3), (1000, 0.3)]
    got = store.build_model(1).state_dict()
    assert all(torch.equal(got[k], v) for k, v in states[1].items())


def test_a_hugging_face_trainers_checkpoint_folders_as_they_are(tmp_path):
    """A Trainer's checkpoint-<step>/ holds, beside the model, its optimizer, scheduler,
    random states and its arguments (a pickled object torch.load(weights_only=True)
    refuses): those are not the model, and are left alone."""
    safetensors = pytest.importorskip("safetensors.torch")
    states = _states(2)
    model = mlp(**KW)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, st in zip((500, 1000), states):
        folder = tmp_path / "src" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        safetensors.save_file(st, str(folder / "model.safetensors"))
        torch.save(opt.state_dict(), folder / "optimizer.pt")
        torch.save({"last_epoch": step}, folder / "scheduler.pt")
        torch.save({"python": 1, "cpu": torch.get_rng_state()}, folder / "rng_state.pth")
        torch.save(argparse.Namespace(learning_rate=0.1), folder / "training_args.bin")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert main(_args(tmp_path / "src", tmp_path / "ck", "--lr", "0.1")) == 0
    store = gs.CheckpointStore(tmp_path / "ck")
    assert [i.step for i in store] == [500, 1000]
    assert all(torch.equal(store.build_model(1).state_dict()[k], v) for k, v in states[1].items())


def test_bad_sources_are_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"w": torch.zeros(2)}, src / "step_3.pt")
    assert main(_args(src, tmp_path / "ck", "--lr", "0.1")) == 2
    err = capsys.readouterr().err
    assert "step_3.pt: does not fit gradscore.demos.models:mlp" in err and err.count("\n") == 1
    assert not (tmp_path / "ck").exists()   # the folder it made for nothing is gone
    (src / "step_3.pt").unlink()
    torch.save(_states(1)[0], src / "final.pt")
    assert main(_args(src, tmp_path / "ck", "--lr", "0.1")) == 2
    assert "final.pt: no step number" in capsys.readouterr().err
    (src / "final.pt").write_bytes(b"garbage")
    (src / "final.pt").rename(src / "step_9.pt")
    assert main(_args(src, tmp_path / "ck", "--lr", "0.1")) == 2
    assert "step_9.pt: cannot read checkpoint" in capsys.readouterr().err


def test_what_scoring_would_refuse_is_refused_before_anything_is_written(tmp_path, capsys):
    """A misspelled loss, a learning rate below 0 or NaN (constant or in the schedule): each
    was written into every imported checkpoint, and scored as given (a loss only `gradscore
    run` refused, later). Now one line, exit 2, and no folder."""
    src = tmp_path / "src"
    src.mkdir()
    for step, state in zip((10, 20), _states(2)):
        torch.save(state, src / f"step_{step}.pt")
    (tmp_path / "nan.json").write_text('{"10": 0.1, "20": NaN}')
    (tmp_path / "neg.json").write_text('{"10": 0.1, "20": -0.5}')
    cases = {("--loss", "crossentropy", "--lr", "0.1"): "unknown loss 'crossentropy'; use one of cross_entropy",
             ("--lr", "-0.1"): "invalid value for 'lr': -0.1; give",
             ("--lr", "nan"): "invalid value for 'lr': nan; give",
             ("--lr-schedule", str(tmp_path / "nan.json")): "invalid value for 'lr' of step 20: nan; give",
             ("--lr-schedule", str(tmp_path / "neg.json")): "invalid value for 'lr' of step 20: -0.5; give"}
    for extra, says in cases.items():
        assert main(_args(src, tmp_path / "ck", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, (extra, err)
        assert not (tmp_path / "ck").exists(), extra


def test_a_factory_that_rejects_its_kwargs_or_builds_no_module_is_one_line(tmp_path, capsys):
    """`--model os:getcwd` (no keyword arguments; a string, not a model): a raw TypeError or
    AttributeError traceback. Now one line naming the factory, exit 2, and no folder."""
    src = tmp_path / "src"
    src.mkdir()
    torch.save(_states(1)[0], src / "step_1.pt")
    cases = {("--model", "os:getcwd"): "model factory 'os:getcwd' rejected model_kwargs",
             ("--model", "os:getcwd", "--model-kwargs", "{}"): "factory 'os:getcwd' did not return an nn.Module",
             ("--model-kwargs", '{"d_in": 6, "width": 3}'): "'gradscore.demos.models:mlp' rejected model_kwargs"}
    for extra, says in cases.items():
        args = _args(src, tmp_path / "ck", "--lr", "0.1")
        args += list(extra)   # the later --model / --model-kwargs wins
        assert main(args) == 2, extra
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "ck").exists(), extra


def test_a_factory_that_raises_its_own_error_is_one_line_naming_where(tmp_path, capsys):
    """A factory's own check of its keyword arguments (``raise ValueError("width must be
    even")``) was a raw traceback, exit 1. Now one line naming the factory, its error and
    the line of the factory's file that raised it, exit 2, and no folder."""
    import tests_factory
    src = tmp_path / "src"
    src.mkdir()
    torch.save(torch.nn.Linear(4, 3).state_dict(), src / "step_1.pt")
    args = ["import-checkpoints", str(src), "--model", "tests_factory:odd_width", "--model-kwargs", '{"width": 3}',
            "--out", str(tmp_path / "ck"), "--quiet", "--lr", "0.1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    line = tests_factory.odd_width.__code__.co_firstlineno + 3   # its `raise`
    assert re.fullmatch(r"gradscore import-checkpoints: error: model factory 'tests_factory:odd_width' failed on "
                        r"model_kwargs \{'width': 3\} \(ValueError: width must be even; raised at "
                        rf"\S*tests_factory.py:{line}\)\n", err), err
    assert not (tmp_path / "ck").exists()


def test_lightning_checkpoints_of_a_real_trainer(tmp_path):
    """A Lightning run's ModelCheckpoint folder as it is: ``epoch=0-step=2.ckpt`` files with
    the model under the LightningModule's attribute (``net.``) and a ``last.ckpt`` copy of
    the newest. Each step's weights are the trainer's."""
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(**KW)
            self.criterion = torch.nn.CrossEntropyLoss()

        def training_step(self, batch, i):
            return self.criterion(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "src", every_n_train_steps=2, save_top_k=-1,
                                                save_last=True)
    trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[saver])
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    assert (tmp_path / "src" / "last.ckpt").exists()
    assert main(_args(tmp_path / "src", tmp_path / "ck", "--lr", "0.1")) == 0
    store = gs.CheckpointStore(tmp_path / "ck")
    assert [i.step for i in store] == [2, 4]
    for i, step in enumerate((2, 4)):
        saved = torch.load(tmp_path / "src" / f"epoch=0-step={step}.ckpt", weights_only=True)["state_dict"]
        got = store.build_model(i).state_dict()
        assert all(torch.equal(got[k], saved["net." + k]) for k in got)


def test_lightning_prefix_only_where_one_attribute_holds_the_model(tmp_path, capsys):
    """The model's weights are taken from under the one attribute whose keys are the
    model's; a ``.ckpt`` takes its step from the file, whatever numbers its name ends in
    (a ``-v1`` of a second run, a metric); two attributes that both hold such a model (an
    EMA copy) are refused, naming both."""
    states = _states(2)
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"global_step": 7, "state_dict": {**{"net." + k: v for k, v in states[0].items()},
                                                  "teacher.0.weight": torch.zeros(5, 5)}}, src / "last.ckpt")
    assert main(_args(src, tmp_path / "ck", "--lr", "0.1")) == 0
    store = gs.CheckpointStore(tmp_path / "ck")
    assert [i.step for i in store] == [7]
    assert all(torch.equal(store.build_model(0).state_dict()[k], v) for k, v in states[0].items())
    (src / "last.ckpt").rename(src / "epoch=1-val_loss=0.25.ckpt")
    assert main(_args(src, tmp_path / "ck1", "--lr", "0.1")) == 0
    assert [i.step for i in gs.CheckpointStore(tmp_path / "ck1")] == [7]
    torch.save({"global_step": 7, "state_dict": {"net." + k: v for k, v in states[1].items()}},
               src / "epoch=1-step=7-v1.ckpt")
    assert main(_args(src, tmp_path / "ck3", "--lr", "0.1")) == 2
    assert "step 7 also names" in capsys.readouterr().err
    for p in src.iterdir():
        p.unlink()
    torch.save({"global_step": 9, "state_dict": {**{"net." + k: v for k, v in states[0].items()},
                                                  **{"ema." + k: v for k, v in states[1].items()}}},
               src / "epoch=1-step=9.ckpt")
    assert main(_args(src, tmp_path / "ck2", "--lr", "0.1")) == 2
    err = capsys.readouterr().err
    assert "epoch=1-step=9.ckpt" in err and "'net.'" in err and "'ema.'" in err and err.count("\n") == 1


def test_a_metric_in_the_name_is_not_taken_for_the_step(tmp_path, capsys):
    """Names that hold a metric (``val_loss=0.25``, ``acc_0.91``): the number after
    ``step`` (or ``iter``) is the step; a name with a decimal number and no such mark is
    refused, not read as step 25."""
    states = _states(2)
    src = tmp_path / "src"
    src.mkdir()
    torch.save(states[0], src / "epoch=1-step=40-val_loss=0.25.pt")
    torch.save(states[1], src / "model_epoch3_iter120_acc_0.91.pt")
    assert main(_args(src, tmp_path / "ck", "--lr", "0.1")) == 0
    assert [i.step for i in gs.CheckpointStore(tmp_path / "ck")] == [40, 120]
    torch.save(states[1], src / "epoch=2-val_loss=0.19.pt")
    assert main(_args(src, tmp_path / "ck2", "--lr", "0.1")) == 2
    err = capsys.readouterr().err
    assert "epoch=2-val_loss=0.19.pt: cannot tell the step" in err and err.count("\n") == 1


def test_the_step_a_file_records_wins_over_its_name(tmp_path, capsys):
    """A loop's ``torch.save({"model": ..., "step": 300, "epoch": 3}, "ckpt_epoch3.pt")``:
    the step is 300, not the 3 of the name; a name whose marked step disagrees with the
    file is refused."""
    states = _states(2)
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"model": states[0], "step": 300, "epoch": 3}, src / "ckpt_epoch3.pt")
    torch.save({"model": states[1], "global_step": 400, "epoch": 4}, src / "ckpt_epoch4.pt")
    assert main(_args(src, tmp_path / "ck", "--lr", "0.1")) == 0
    assert [i.step for i in gs.CheckpointStore(tmp_path / "ck")] == [300, 400]
    torch.save({"model": states[1], "step": 500}, src / "step_501.pt")
    assert main(_args(src, tmp_path / "ck2", "--lr", "0.1")) == 2
    assert "the name says step 501, the file records step 500" in capsys.readouterr().err


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_import_resumes_only_what_the_same_source_and_options_made(tmp_path, capsys):
    """An import into a folder that an import of another run filled kept that run's checkpoints
    at every step both runs had, silently: the folder then held two runs' weights."""
    first, second = _states(2), [{k: v + 1.0 for k, v in s.items()} for s in _states(2)]
    for name, states in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        for step, state in zip((0, 100), states):
            torch.save(state, tmp_path / name / f"step_{step}.pt")
    ck = tmp_path / "ck"
    assert main(_args(tmp_path / "a", ck, "--lr", "0.1")) == 0
    # interrupted: the missing step is imported, the other kept as it is
    kept = (ck / "step_00000000.h5").read_bytes()
    (ck / "step_00000100.h5").unlink()
    assert main(_args(tmp_path / "a", ck, "--lr", "0.1")) == 0
    assert (ck / "step_00000000.h5").read_bytes() == kept and len(gs.CheckpointStore(ck)) == 2
    before = _contents(ck)
    for src, lr, says in ((tmp_path / "b", "0.1", "was imported from .*a/step_0.pt, not .*b/step_0.pt"),
                          (tmp_path / "a", "0.2", "was imported with lr 0.1, not 0.2")):
        assert main(_args(src, ck, "--lr", lr)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "step_00000000.h5" in err, err
        assert __import__("re").search(says, err), err
        assert _contents(ck) == before
    torch.save(second[0], tmp_path / "a" / "step_0.pt")   # the source folder retrained since
    assert main(_args(tmp_path / "a", ck, "--lr", "0.1")) == 2
    assert "has changed since" in capsys.readouterr().err and _contents(ck) == before
    # steps the source does not have are another run's too
    (tmp_path / "c").mkdir()
    torch.save(first[0], tmp_path / "c" / "step_0.pt")
    assert main(_args(tmp_path / "c", tmp_path / "ck2", "--lr", "0.1")) == 0
    (tmp_path / "ck2" / "step_00000100.h5").write_bytes((ck / "step_00000100.h5").read_bytes())
    assert main(_args(tmp_path / "c", tmp_path / "ck2", "--lr", "0.1")) == 2
    assert "step 100, which" in capsys.readouterr().err


class _Opaque:
    """A Python object pickled into a checkpoint: weights_only=True does not load it."""


@pytest.mark.parametrize("content,detail", [(b"not a checkpoint", "Unsupported operand 110"),
                                            ("object", "Unsupported global: GLOBAL test_ckpt_import._Opaque")])
def test_a_file_torch_load_refuses_is_named_with_what_to_do(tmp_path, capsys, content, detail):
    """torch's message for a file weights_only=True refuses is a paragraph that advises
    weights_only=False ("arbitrary code execution"), which gradscore never does: the line
    now says why in torch's own words and what to do instead."""
    src = tmp_path / "src"
    src.mkdir()
    if content == "object":
        torch.save({"state_dict": _states(1)[0], "extra": _Opaque()}, src / "step_9.pt")
    else:
        (src / "step_9.pt").write_bytes(content)
    assert main(_args(src, tmp_path / "ck", "--lr", "0.1")) == 2
    err = capsys.readouterr().err
    assert f"step_9.pt: cannot read checkpoint: torch.load(weights_only=True) refuses it ({detail}" in err, err
    assert "weights_only` set to `False`" not in err and "Check the documentation" not in err, err
    assert err.count("\n") == 1 and "\x1b" not in err, err


def _tied_args(src, out, *extra):
    return ["import-checkpoints", str(src), "--model", "tests_factory:tied_head", "--out", str(out), "--quiet",
            "--lr", "0.1", *extra]


def test_a_tied_weight_stored_once_is_imported_under_both_names(tmp_path):
    """Hugging Face's save_pretrained and safetensors' save_model keep one name of a tied
    tensor (GPT-2 drops ``lm_head.weight``): every tied language model's Trainer checkpoint
    was refused as missing a key."""
    safetensors = pytest.importorskip("safetensors.torch")
    states = _states(3, tied_head)
    src = tmp_path / "src"
    (src / "checkpoint-10").mkdir(parents=True)
    model = tied_head()
    model.load_state_dict(states[0])
    safetensors.save_model(model, str(src / "checkpoint-10" / "model.safetensors"))   # one name kept
    torch.save({k: v for k, v in states[1].items() if k != "emb.weight"}, src / "step_20.pt")   # the other
    lightning = {"net." + k: v for k, v in states[2].items() if k != "head.weight"}   # under a LightningModule's net
    torch.save({"global_step": 30, "state_dict": {**lightning, "loss_fn.weight": torch.ones(9)}}, src / "last.ckpt")
    assert main(_tied_args(src, tmp_path / "ck")) == 0
    store = gs.CheckpointStore(tmp_path / "ck")
    for i, want in enumerate(states):
        got = store.build_model(i).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert got["head.weight"].data_ptr() == got["emb.weight"].data_ptr()


def test_two_different_tensors_for_one_tied_weight_are_refused(tmp_path, capsys):
    """A model trained untied, imported into a factory that ties: loading both names into the
    one tensor kept the last one silently."""
    state = _states(1, tied_head)[0]
    state["head.weight"] = state["head.weight"] + 1
    src = tmp_path / "src"
    src.mkdir()
    torch.save(state, src / "step_3.pt")
    assert main(_tied_args(src, tmp_path / "ck")) == 2
    err = capsys.readouterr().err
    assert "step_3.pt: 'emb.weight' and 'head.weight' are one tensor in tests_factory:tied_head" in err
    assert err.count("\n") == 1 and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_sharded_checkpoints_are_one_checkpoint(tmp_path, capsys, suffix):
    """A large model's save_pretrained writes model-00001-of-00003.safetensors and its
    siblings (pytorch_model-…bin before safetensors): each step was refused as two files."""
    safetensors = pytest.importorskip("safetensors.torch")
    states = _states(2)
    src = tmp_path / "src"
    stem = "model" if suffix == ".safetensors" else "pytorch_model"
    for step, state in zip((100, 200), states):
        folder = src / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        keys = sorted(state)
        for i, part in enumerate((keys[:1], keys[1:3], keys[3:]), start=1):
            shard = {k: state[k] for k in part}
            name = folder / f"{stem}-{i:05d}-of-00003{suffix}"
            safetensors.save_file(shard, str(name)) if suffix == ".safetensors" else torch.save(shard, name)
        (folder / f"{stem}{suffix}.index.json").write_text(json.dumps({"weight_map": {}}))
    assert main(_args(src, tmp_path / "ck", "--lr", "0.1")) == 0
    store = gs.CheckpointStore(tmp_path / "ck")
    assert [i.step for i in store] == [100, 200]
    for i, want in enumerate(states):
        got = store.build_model(i).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    # a rerun finds them imported; a shard changed since is named
    assert main(_args(src, tmp_path / "ck", "--lr", "0.1")) == 0
    shard = src / "checkpoint-200" / f"{stem}-00002-of-00003{suffix}"
    shard.write_bytes(shard.read_bytes())
    os.utime(shard, ns=(1, 1))
    assert main(_args(src, tmp_path / "ck", "--lr", "0.1")) == 2
    assert "has changed since" in capsys.readouterr().err
    # a missing shard, or one key in two shards: one line each, nothing written
    (src / "checkpoint-200" / f"{stem}-00003-of-00003{suffix}").unlink()
    assert main(_args(src, tmp_path / "ck2", "--lr", "0.1")) == 2
    err = capsys.readouterr().err
    assert f"checkpoint-200/{stem}-00003-of-00003{suffix} is missing" in err and err.count("\n") == 1
    assert not (tmp_path / "ck2").exists()
    one = {k: states[1][k] for k in sorted(states[1])[:2]}
    name = src / "checkpoint-200" / f"{stem}-00003-of-00003{suffix}"
    safetensors.save_file(one, str(name)) if suffix == ".safetensors" else torch.save(one, name)
    assert main(_args(src, tmp_path / "ck2", "--lr", "0.1")) == 2
    err = capsys.readouterr().err
    assert "is in two shards" in err and err.count("\n") == 1
    name.rename(src / "checkpoint-200" / f"{stem}-00004-of-00003{suffix}")
    assert main(_args(src, tmp_path / "ck2", "--lr", "0.1")) == 2
    assert f"{stem}-00004-of-00003{suffix}: shard 4 of 3?" in capsys.readouterr().err


def test_a_hugging_face_language_models_trainer_checkpoints(tmp_path):
    """GPT-2 saved by save_pretrained, whole and in shards: its tied head is stored once."""
    pytest.importorskip("transformers")
    from gradscore.integrations.hf import from_config
    config = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 16, "n_positions": 8,
              "bos_token_id": 0, "eos_token_id": 0}
    torch.manual_seed(0)
    model = from_config(config)
    states = []
    for step in (5, 10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        model.save_pretrained(tmp_path / "whole" / f"checkpoint-{step}")
        model.save_pretrained(tmp_path / "shards" / f"checkpoint-{step}", max_shard_size="2KB")
    assert len(list((tmp_path / "shards" / "checkpoint-5").glob("*-of-*.safetensors"))) > 1
    for kind in ("whole", "shards"):
        assert main(["import-checkpoints", str(tmp_path / kind), "--model", "gradscore.integrations.hf:from_config",
                     "--model-kwargs", json.dumps({"config": config}), "--loss", "causal_lm", "--lr", "0.1",
                     "--out", str(tmp_path / f"ck_{kind}"), "--quiet"]) == 0
        store = gs.CheckpointStore(tmp_path / f"ck_{kind}")
        for i, want in enumerate(states):
            got = store.build_model(i).state_dict()
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_scoring_a_folder_of_other_checkpoints_names_the_import(tmp_path, capsys):
    """`run` (or `info`) on a Trainer's output_dir said only that it held no step_<n>.h5."""
    safetensors = pytest.importorskip("safetensors.torch")
    (tmp_path / "out" / "checkpoint-500").mkdir(parents=True)
    safetensors.save_file(_states(1)[0], str(tmp_path / "out" / "checkpoint-500" / "model.safetensors"))
    for argv in (["info", str(tmp_path / "out")],
                 ["run", "--checkpoints", str(tmp_path / "out"), "--data", "x.h5", "--out", str(tmp_path / "s.h5")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "holds checkpoints of another format (checkpoint-500/model.safetensors)" in err
        assert "gradscore import-checkpoints" in err and err.count("\n") == 1


def test_a_checkpoint_finer_than_the_models_dtype_is_imported_unrounded(tmp_path):
    """float32 weights loaded into a model built in bfloat16 (a config saying "dtype":
    "bfloat16") were rounded: every score was of a model that never was. They are stored as
    they are (as CheckpointWriter stores a float32 model), and scored unrounded."""
    from gradscore.io.checkpoints import load_state_dict
    states = _states(2)
    src = tmp_path / "src"
    src.mkdir()
    torch.save(states[0], src / "step_3.pt")
    torch.save({k: v.to(torch.bfloat16) for k, v in states[1].items()}, src / "step_6.pt")   # bfloat16 in both
    assert main(["import-checkpoints", str(src), "--model", "tests_factory:in_dtype", "--model-kwargs",
                 json.dumps({**KW, "dtype": "bfloat16"}), "--out", str(tmp_path / "ck"), "--lr", "0.1",
                 "--quiet"]) == 0
    for step, want in zip((3, 6), (states[0], {k: v.to(torch.bfloat16).float() for k, v in states[1].items()})):
        got = load_state_dict(tmp_path / "ck" / f"step_{step:08d}.h5", mlp(**KW))
        assert all(torch.equal(got[k], want[k]) for k in want)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    data = gs.save_dataset(tmp_path / "d.h5", x.numpy(), y.numpy())
    gs.score(tmp_path / "ck", data, out=tmp_path / "s.h5", scores=["loss"], progress=False)
    model = mlp(**KW)
    model.load_state_dict(states[0])
    want = torch.nn.functional.cross_entropy(model(x), y, reduction="none").detach().numpy()
    np.testing.assert_allclose(gs.load_scores(tmp_path / "s.h5")["per_checkpoint"]["loss"][0], want, rtol=1e-6)

    store = gs.CheckpointStore(tmp_path / "ck")   # the public build: θ_t as stored, not rounded to the factory's
    built = store.build_model(0)
    assert all(torch.equal(p.detach(), states[0][k]) for k, p in built.named_parameters())
    assert next(store.build_model(0, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16   # asked for

def test_a_trainers_classifier_imports_by_its_saved_config_alone(tmp_path, capsys):
    """A sequence classifier's config.json names its class ("architectures"), but from_config
    built a causal LM unless given "task": the import failed, printing the whole config in
    its one line. The task is read from the class now, and the line is short."""
    pytest.importorskip("transformers")
    from gradscore.integrations.hf import from_config
    config = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 16, "n_positions": 8,
              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "num_labels": 3}
    torch.manual_seed(0)
    model = from_config(config, task="sequence_classification")
    model.save_pretrained(tmp_path / "out" / "checkpoint-5")
    saved = json.loads((tmp_path / "out" / "checkpoint-5" / "config.json").read_text())
    assert type(from_config(saved)).__name__ == "GPT2ForSequenceClassification"
    assert type(from_config({**saved, "architectures": ["GPT2LMHeadModel"]})).__name__ == "GPT2LMHeadModel"
    assert type(from_config(config)).__name__ == "GPT2LMHeadModel"   # no class named: a causal LM, as before
    def argv(src, kwargs, out, *extra):
        return ["import-checkpoints", str(tmp_path / src), "--model", "gradscore.integrations.hf:from_config",
                "--model-kwargs", json.dumps(kwargs), "--lr", "0.1", "--out", str(tmp_path / out), "--quiet", *extra]
    assert main(argv("out", {"config": saved}, "ck")) == 0
    got = gs.CheckpointStore(tmp_path / "ck").build_model(0).state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    told_otherwise = {"config": saved, "task": "causal_lm"}
    assert main(argv("out", told_otherwise, "ck2", "--loss", "causal_lm")) == 2
    err = capsys.readouterr().err
    assert "does not fit gradscore.integrations.hf:from_config({'config': {...}, 'task': 'causal_lm'})" in err
    assert len(err) < 600
    # a causal LM imported with the default loss, cross_entropy: `run` refused its data, naming another fix
    from_config(config).save_pretrained(tmp_path / "lm" / "checkpoint-5")
    assert main(argv("lm", {"config": config}, "ck3")) == 2
    err = capsys.readouterr().err
    assert "'cross_entropy' does not score what GPT2LMHeadModel predicts" in err and "use loss 'causal_lm'" in err
    assert not (tmp_path / "ck3").exists()
    assert main(argv("lm", {"config": config}, "ck3", "--loss", "causal_lm")) == 0


def test_an_accelerate_save_state_folder_as_it_is(tmp_path):
    """Accelerate's save_state writes, beside the model, optimizer.bin, scheduler.bin and
    sampler.bin: each was taken for a second checkpoint of the step, and the step refused."""
    accelerate = pytest.importorskip("accelerate")
    states = _states(2)
    model = mlp(**KW)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 6)), batch_size=4, shuffle=True)
    acc = accelerate.Accelerator(cpu=True)
    model, opt, sched, loader = acc.prepare(model, opt, sched, loader)
    for step, state in zip((100, 200), states):
        acc.unwrap_model(model).load_state_dict(state)
        acc.save_state(str(tmp_path / "src" / f"checkpoint_{step}"))
    names = {p.name for p in (tmp_path / "src" / "checkpoint_100").iterdir()}
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin"} <= names, names
    assert main(_args(tmp_path / "src", tmp_path / "ck", "--lr", "0.1")) == 0
    store = gs.CheckpointStore(tmp_path / "ck")
    assert [i.step for i in store] == [100, 200]
    assert all(torch.equal(store.build_model(1).state_dict()[k], v) for k, v in states[1].items())
