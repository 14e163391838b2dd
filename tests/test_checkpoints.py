"""Checkpoint round trip and every validation error."""
from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import gradscore as gs
from gradscore.io.checkpoints import load_state_dict, write_checkpoint
from gradscore.demos.models import digits_cnn, mlp
from gradscore.io.attrs import seal

from helpers import MLP_KWARGS, global_heap


def test_round_trip_with_buffers_and_attrs(tmp_path):
    torch.manual_seed(0)
    model = digits_cnn(channels=4, batchnorm=True)
    model[1].running_mean.uniform_()
    with gs.CheckpointWriter(tmp_path, model_factory="gradscore.demos.models:digits_cnn",
                             model_kwargs={"channels": 4, "batchnorm": True}) as w:
        w.save(model, step=3, lr=0.2, epoch=1)
        w.save(model, step=20, lr=0.1, epoch=2)
    store = gs.CheckpointStore(tmp_path)
    assert [i.step for i in store] == [3, 20] and len(store) == 2
    assert store[1].lr == 0.1 and store[1].epoch == 2 and store.loss == "cross_entropy"
    rebuilt = store.build_model(1)
    assert not rebuilt.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    with h5py.File(store[0].path) as f:
        assert "1.running_mean" in f["buffers"] and "0.weight" in f["params"]
        assert f["params/0.weight"].fletcher32


def _saved(tmp_path, model=None, **kw):
    model = mlp(**MLP_KWARGS) if model is None else model
    with gs.CheckpointWriter(tmp_path, model_factory="gradscore.demos.models:mlp",
                             model_kwargs=kw.pop("model_kwargs", MLP_KWARGS)) as w:
        return w.save(model, step=0, lr=0.1)


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "both"])
def test_a_wrapped_model_is_saved_as_the_model_it_wraps(tmp_path, wrap):
    """torch.compile's and DataParallel's wrappers prefix their state_dict keys (``_orig_mod.``,
    ``module.``); the writer saves the wrapped model's own, which its factory rebuilds."""
    torch.manual_seed(0)
    model = mlp(**MLP_KWARGS)
    wrapped = {"compile": lambda m: torch.compile(m), "data_parallel": torch.nn.DataParallel,
               "both": lambda m: torch.compile(torch.nn.DataParallel(m))}[wrap](model)
    _saved(tmp_path, wrapped)
    rebuilt = gs.CheckpointStore(tmp_path).build_model(0).state_dict()
    want = model.state_dict()
    assert rebuilt.keys() == want.keys() and all(torch.equal(rebuilt[k], want[k]) for k in want)


def test_missing_tensor_names_file_and_tensor(tmp_path):
    path = _saved(tmp_path)
    with h5py.File(path, "a") as f:
        del f["params/1.bias"]
    with pytest.raises(gs.CheckpointError, match=r"step_00000000\.h5: tensor '1\.bias'.*missing"):
        gs.CheckpointStore(tmp_path).build_model(0)


def test_extra_tensor_is_refused(tmp_path):
    path = _saved(tmp_path)
    with h5py.File(path, "a") as f:
        f["params/9.weight"] = [1.0]
    with pytest.raises(gs.CheckpointError, match=r"9\.weight.*not in the model"):
        gs.CheckpointStore(tmp_path).build_model(0)


def test_mis_shaped_tensor_names_shapes(tmp_path):
    from gradscore.io.checkpoints import write_checkpoint   # below the writer, which refuses it
    write_checkpoint(tmp_path / "step_00000000.h5", mlp(**{**MLP_KWARGS, "hidden": 9}), step=0, lr=0.1,
                     model_factory="gradscore.demos.models:mlp", model_kwargs=MLP_KWARGS)
    with pytest.raises(gs.CheckpointError, match=r"tensor '1\.weight' has shape \(9, 12\).*\(8, 12\)"):
        gs.CheckpointStore(tmp_path).build_model(0)


def test_truncated_file(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(gs.CheckpointError, match=r"step_00000000\.h5.*truncated or corrupt"):
        gs.CheckpointStore(tmp_path)


@pytest.mark.parametrize("thing", ["folder", "broken link"])
def test_a_folder_or_broken_link_named_as_a_checkpoint_is_named_as_such(tmp_path, thing):
    # it was called "truncated or corrupt", with the advice to re-save the checkpoint
    _saved(tmp_path)
    odd = tmp_path / "step_00000009.h5"
    odd.mkdir() if thing == "folder" else odd.symlink_to(tmp_path / "gone.h5")
    match = "is a folder named as a checkpoint" if thing == "folder" else r"is a link to a missing file \(.*gone\.h5\)"
    with pytest.raises(gs.CheckpointError, match=r"step_00000009\.h5: " + match) as e:
        gs.CheckpointStore(tmp_path)
    assert "corrupt" not in str(e.value) and "re-save" not in str(e.value)


def test_corrupt_tensor_fails_its_checksum(tmp_path):
    model = mlp(d_in=64, hidden=64, n_classes=4, depth=1)
    path = _saved(tmp_path, model=model, model_kwargs={"d_in": 64, "hidden": 64, "n_classes": 4, "depth": 1})
    with h5py.File(path) as f:
        offset = f["params/1.weight"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(gs.CheckpointError, match=r"tensor '1\.weight' is corrupt"):
        gs.CheckpointStore(tmp_path).build_model(0)


def test_a_checkpoint_damaged_anywhere_is_refused_or_reads_the_same(tmp_path):
    # damaged metadata (now checksummed) raised h5py's KeyError/RuntimeError as a traceback;
    # in HDF5's 1.8 format a damaged chunk index (a v1 B-tree, no checksum) read a tensor
    # as zeros without a word: 63 of the ~13,600 bytes outside the global heap did so; and
    # the global heap's text had no checksum (a flipped length there made HDF5 loop forever)
    model = mlp(**MLP_KWARGS)
    path = _saved(tmp_path / "good", model=model)
    expected = gs.CheckpointStore(path.parent).build_model(0).state_dict()
    raw, refused = path.read_bytes(), 0
    folder = tmp_path / "bad"
    folder.mkdir()
    assert not global_heap(raw)
    for offset in range(len(raw)):   # every byte: the tensors are a few hundred of them
        damaged = bytearray(raw)
        damaged[offset] ^= 0x10
        (folder / path.name).write_bytes(bytes(damaged))
        try:
            got = gs.CheckpointStore(folder).build_model(0).state_dict()
        except gs.CheckpointError as e:
            assert path.name in str(e)
            refused += 1
            continue
        assert all(torch.equal(got[k], expected[k]) for k in expected), offset
    assert refused > 500   # (the rest of the bytes are padding, or the fill of unused space)


def test_a_damaged_scalar_parameter_is_refused(tmp_path):
    # a 0-d tensor (a learned temperature) cannot be chunked, so it had no fletcher32: a
    # flipped bit read as another value. Scalars are now stored compact, in the checksummed
    # object header
    from torch import nn

    class Tempered(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.temperature = nn.Linear(3, 2), nn.Parameter(torch.tensor(1.2345678))

        def forward(self, x):
            return self.linear(x) / self.temperature
    from gradscore.io.checkpoints import write_checkpoint   # a model of its own: below the writer's check
    (tmp_path / "good").mkdir()
    path = write_checkpoint(tmp_path / "good" / "step_00000000.h5", Tempered(), step=0, lr=0.1)
    raw = bytearray(path.read_bytes())
    at = raw.find(np.float32(1.2345678).tobytes())
    assert at >= 0
    raw[at + 2] ^= 0x10
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / path.name).write_bytes(bytes(raw))
    with pytest.raises(gs.CheckpointError, match=f"{folder / path.name}: "):
        gs.CheckpointStore(folder).load_into(Tempered(), 0)


def test_empty_and_missing_directory(tmp_path):
    with pytest.raises(gs.CheckpointError, match="no checkpoint files"):
        gs.CheckpointStore(tmp_path)
    with pytest.raises(gs.CheckpointError, match="does not exist"):
        gs.CheckpointStore(tmp_path / "nope")


def test_unknown_format_version(tmp_path):
    path = _saved(tmp_path)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(gs.CheckpointError, match="unknown format_version 99"):
        gs.CheckpointStore(tmp_path)


def test_bad_factory_is_named(tmp_path):
    _saved(tmp_path)
    path = next(tmp_path.glob("step_*.h5"))
    with h5py.File(path, "a") as f:
        f.attrs["model"] = "gradscore.demos.models:nope"
        seal(f)   # written so, not damaged
    with pytest.raises(gs.CheckpointError, match="has no attribute 'nope'"):
        gs.CheckpointStore(tmp_path).build_model(0)


def test_the_writer_refuses_now_what_scoring_would_refuse_after_training(tmp_path, monkeypatch):
    """A misspelled loss, a factory that cannot be imported (one in ``__main__``, a notebook's:
    an error about '__main__' after the training), model_kwargs JSON cannot hold,
    a model the factory does not rebuild, a learning rate that is not a finite η ≥ 0: each
    was written into every checkpoint of the training, and only `gradscore run`, after it,
    refused them (the loss, factory and kwargs are sealed in the files)."""
    factory = "gradscore.demos.models:mlp"
    with pytest.raises(gs.GradscoreError, match="unknown loss 'crossentropy'; use one of cross_entropy"):
        gs.CheckpointWriter(tmp_path / "a", model_factory=factory, model_kwargs=MLP_KWARGS, loss="crossentropy")
    with pytest.raises(gs.CheckpointError, match="model_factory 'nope.models:mlp': cannot import module 'nope"):
        gs.CheckpointWriter(tmp_path / "b", model_factory="nope.models:mlp", model_kwargs=MLP_KWARGS)
    # a notebook's or the running script's own function: `run` imports its own __main__, which has no 'mlp'
    monkeypatch.setattr(sys.modules["__main__"], "mlp", mlp, raising=False)
    with pytest.raises(gs.ConfigError, match=r"model_factory '__main__:mlp' is in __main__ \(a notebook or the "
                                             r"running script\), which scoring cannot import: move it into a module "
                                             r"of its own \(models\.py\) and give 'models:mlp'$"):
        gs.CheckpointWriter(tmp_path / "b", model_factory="__main__:mlp", model_kwargs=MLP_KWARGS)
    monkeypatch.setattr(sys.modules["__main__"], "my_loss", lambda out, y: torch.nn.functional.cross_entropy(
        out, y, reduction="none"), raising=False)
    with pytest.raises(gs.ConfigError, match=r"loss '__main__:my_loss' is in __main__ \(a notebook or the running "
                                             r"script\), which scoring cannot import: move it into a module of its "
                                             r"own \(losses\.py\) and give 'losses:my_loss'$"):
        gs.CheckpointWriter(tmp_path / "b", model_factory=factory, model_kwargs=MLP_KWARGS, loss="__main__:my_loss")
    with pytest.raises(gs.ConfigError, match=r"model_factory: give the reference 'gradscore\.demos\.models:mlp', "
                                             r"which the checkpoints store, not the function itself$"):
        gs.CheckpointWriter(tmp_path / "b", model_factory=mlp, model_kwargs=MLP_KWARGS)
    with pytest.raises(gs.ConfigError, match="model_kwargs.*JSON.*dtype"):
        gs.CheckpointWriter(tmp_path / "c", model_factory=factory, model_kwargs={**MLP_KWARGS, "dtype": torch.float64})
    with pytest.raises(gs.ConfigError, match="loss.*name"):
        gs.CheckpointWriter(tmp_path / "d", model_factory=factory, loss=torch.nn.functional.cross_entropy)
    w = gs.CheckpointWriter(tmp_path / "e", model_factory=factory, model_kwargs=MLP_KWARGS)
    with pytest.raises(gs.CheckpointError, match=r"tensor '1\.weight' has shape \(9, 12\), but in the model that "
                                                 r"model_factory 'gradscore\.demos\.models:mlp' builds from its "
                                                 r"model_kwargs \(8, 12\); check model_kwargs"):
        w.save(mlp(**{**MLP_KWARGS, "hidden": 9}), step=0, lr=0.1)
    with pytest.raises(gs.CheckpointError, match=r"tensor\(s\) weight, bias of the model saved are not in the model "
                                                 r"that model_factory .* builds"):
        w.save(torch.nn.Linear(12, 4), step=0, lr=0.1)
    for lr in (-0.1, float("nan"), float("inf"), None, "0.1"):
        with pytest.raises(gs.ConfigError, match="invalid value for 'lr'.*finite learning rate >= 0"):
            w.save(mlp(**MLP_KWARGS), step=0, lr=lr)
    # a step of 1.5 was saved as step_00000001.h5, and one of 1.75 then replaced it; -1 was step_-0000001.h5
    for step in (1.5, -1, "3", None, True):
        with pytest.raises(gs.ConfigError, match=r"invalid value for 'step': .*; give the optimizer step, a whole "
                                                 r"number >= 0$"):
            w.save(mlp(**MLP_KWARGS), step=step, lr=0.1)
    for epoch in (float("nan"), -1.0, "1", None):   # a NaN epoch fell out of every --epochs-upto window
        with pytest.raises(gs.ConfigError, match=r"invalid value for 'epoch': .*; give the epoch θ_t is at, a "
                                                 r"finite number >= 0"):
            w.save(mlp(**MLP_KWARGS), step=0, lr=0.1, epoch=epoch)
    assert not list((tmp_path / "e").glob("*.h5"))   # nothing was written
    assert w.save(mlp(**MLP_KWARGS), step=0, lr=0.0).exists()   # η = 0 (a frozen step) is a learning rate
    for step, lr in enumerate((np.float32(0.1), torch.tensor(0.1), np.float64(0.1)), start=1):   # as schedulers give it
        assert w.save(mlp(**MLP_KWARGS), step=step, lr=lr).exists()
    for step, epoch in ((np.int64(4), np.float32(0.5)), (torch.tensor(5), torch.tensor(1.5))):   # as trainers count
        assert w.save(mlp(**MLP_KWARGS), step=step, lr=0.1, epoch=epoch).name == f"step_{int(step):08d}.h5"
    with gs.CheckpointWriter(tmp_path / "f", model_factory="tests_factory:reads_a_value",
                             model_kwargs=MLP_KWARGS) as w:   # cannot be built on the meta device: not checked
        w.save(mlp(**MLP_KWARGS), step=0, lr=0.1)


def test_a_factory_with_lazy_layers_scores_as_its_eager_twin(tmp_path):
    """nn.LazyLinear's weight has no shape until a forward: loading a checkpoint into the
    factory's model failed as "not a readable HDF5 file (Can't access the shape of an
    uninitialized parameter ...)". It now takes the stored shape, and scores as the same
    weights in an eager model do."""
    from tests_factory import eager_net, lazy_net
    torch.manual_seed(0)
    model = eager_net()
    x, y = torch.randn(30, 12), torch.randint(0, 4, (30,))
    gs.save_dataset(tmp_path / "d.h5", x.numpy(), y.numpy())
    lazy = lazy_net()
    lazy(x[:2])   # materialized, as after the training's first step
    lazy.load_state_dict(model.state_dict())
    scores = {}
    for name, net in (("eager", model), ("lazy", lazy)):
        with gs.CheckpointWriter(tmp_path / name, model_factory=f"tests_factory:{name}_net") as w:
            for step in range(2):
                w.save(net, step=step, lr=0.1)
        scores[name] = gs.load_scores(gs.score(tmp_path / name, tmp_path / "d.h5", out=tmp_path / f"{name}.h5",
                                               scores=["el2n", "grand", "loss"], progress=False))["scores"]
    for k in scores["eager"]:
        np.testing.assert_array_equal(scores["lazy"][k], scores["eager"][k], err_msg=k)


def test_load_state_dict_keeps_dtype_of_model(tmp_path):
    path = _saved(tmp_path)
    sd = load_state_dict(path, mlp(**MLP_KWARGS).double())
    assert all(v.dtype == torch.float64 for v in sd.values())


def test_write_is_atomic_on_failure(tmp_path):
    class Boom(torch.nn.Module):
        def state_dict(self, *a, **k):
            raise RuntimeError("boom")
    from gradscore.io.checkpoints import write_checkpoint
    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path / "step_00000001.h5", Boom(), step=1, lr=0.1)
    assert list(tmp_path.iterdir()) == []


def test_float64_checkpoint_loads_without_rounding(tmp_path):
    model = mlp(**MLP_KWARGS).double()
    with torch.no_grad():
        model[1].weight[0, 0] = 1 + 2**-40  # not representable in float32
    _saved(tmp_path, model=model)
    rebuilt = gs.CheckpointStore(tmp_path).build_model(0, dtype=torch.float64)
    assert rebuilt[1].weight[0, 0].item() == 1 + 2**-40


def test_step_name_attribute_mismatch_and_decreasing_epochs(tmp_path):
    model = mlp(**MLP_KWARGS)
    with gs.CheckpointWriter(tmp_path, model_factory="gradscore.demos.models:mlp", model_kwargs=MLP_KWARGS) as w:
        w.save(model, step=1, lr=0.1, epoch=2)
        w.save(model, step=2, lr=0.1, epoch=1)
    with pytest.raises(gs.CheckpointError, match=r"step_00000002\.h5: epoch 1 is before epoch 2"):
        gs.CheckpointStore(tmp_path)
    with h5py.File(tmp_path / "step_00000002.h5", "a") as f:
        f.attrs["epoch"] = 3
        f.attrs["step"] = 7
    with pytest.raises(gs.CheckpointError, match="file name says step 2 but its 'step' attribute is 7"):
        gs.CheckpointStore(tmp_path)


def test_missing_lr_attribute(tmp_path):
    path = _saved(tmp_path)
    with h5py.File(path, "a") as f:
        del f.attrs["lr"]
    with pytest.raises(gs.CheckpointError, match=r"step_00000000\.h5: missing attribute\(s\) lr"):
        gs.CheckpointStore(tmp_path)


def test_the_writer_records_the_optimizer_kind(tmp_path):
    import torch
    model = mlp(**MLP_KWARGS)
    for opt, kind in ((torch.optim.SGD(model.parameters(), lr=0.1), "SGD"),
                      (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "SGD(momentum=0.9)"),
                      (torch.optim.Adam(model.parameters()), "Adam"), ("my note", "my note"),
                      (torch.optim.SGD([{"params": [model[1].weight]}, {"params": [model[1].bias], "lr": 0.01}], lr=0.1),
                       "SGD(lr per group=0.1,0.01)")):
        with gs.CheckpointWriter(tmp_path / kind, model_factory="gradscore.demos.models:mlp", model_kwargs=MLP_KWARGS,
                                 optimizer=opt) as w:
            w.save(model, step=0, lr=0.1)
        assert gs.CheckpointStore(tmp_path / kind)[0].optimizer == kind


def test_checkpoints_naming_a_moved_factory_still_build(tmp_path):
    """Files written before the reference models moved to gradscore.demos name them
    'gradscore.models:mlp'; they still load."""
    from gradscore.demos.models import mlp
    from gradscore.io.checkpoints import write_checkpoint
    kw = {"d_in": 4, "hidden": 3, "n_classes": 2, "depth": 1}
    model = mlp(**kw)
    write_checkpoint(tmp_path / "step_00000000.h5", model, step=0, lr=0.1, model_factory="gradscore.models:mlp",
                     model_kwargs=kw, loss="cross_entropy")
    built = gs.CheckpointStore(tmp_path).build_model(0)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values()))


def _run_into(folder, steps, seed, **kw):
    """A 'training run' of an MLP (weights from ``seed``) saving ``steps`` into ``folder``."""
    torch.manual_seed(seed)
    model = mlp(**MLP_KWARGS)
    with gs.CheckpointWriter(folder, model_factory="gradscore.demos.models:mlp", model_kwargs=MLP_KWARGS, **kw) as w:
        for s in steps:
            w.save(model, step=s, lr=0.1, epoch=s)
    return model


def test_a_second_run_into_a_folder_of_checkpoints_is_refused(tmp_path):
    """A rerun of a training script into the folder of an earlier, longer run left that run's
    later checkpoints beside the new ones, and `gradscore run` scored both as one trajectory."""
    _run_into(tmp_path, [0, 1, 2, 3], seed=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(gs.CheckpointError, match=r"already holds the checkpoints of an earlier run at steps 0 to 3"
                       r".*overwrite=True to remove them first$"):
        _run_into(tmp_path, [0, 1], seed=1)
    with pytest.raises(gs.CheckpointError, match=r"at steps 2 to 3.*the checkpoints before step 2 stay"):
        _run_into(tmp_path, [2], seed=1)
    w = gs.CheckpointWriter(tmp_path, model_factory="gradscore.demos.models:mlp", model_kwargs=MLP_KWARGS)
    for _ in range(2):   # a loop that catches the error and saves on is refused again
        with pytest.raises(gs.CheckpointError, match="already holds"):
            w.save(mlp(**MLP_KWARGS), step=1, lr=0.1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before   # nothing written, nothing removed


def test_overwrite_replaces_the_earlier_runs_checkpoints_from_the_first_step_on(tmp_path):
    _run_into(tmp_path, [0, 1, 2, 3], seed=0)
    model = _run_into(tmp_path, [0, 1], seed=1, overwrite=True)
    store = gs.CheckpointStore(tmp_path)
    assert [i.step for i in store] == [0, 1]
    assert all(torch.equal(a, b) for a, b in zip(store.build_model(1).state_dict().values(),
                                                 model.state_dict().values()))
    # a resumed run saves after the folder's last step: it continues the folder, no option needed
    _run_into(tmp_path, [2, 3], seed=1)
    assert [i.step for i in gs.CheckpointStore(tmp_path)] == [0, 1, 2, 3]
    # one resumed from an earlier step replaces what the stopped run saved after it, when asked
    _run_into(tmp_path, [2], seed=2, overwrite=True)
    assert [i.step for i in gs.CheckpointStore(tmp_path)] == [0, 1, 2]
    # a second run through the same writer (a callback reused by a second trainer.train()) starts over
    torch.manual_seed(3)
    model = mlp(**MLP_KWARGS)
    w = gs.CheckpointWriter(tmp_path, model_factory="gradscore.demos.models:mlp", model_kwargs=MLP_KWARGS)
    for s in (3, 4, 4):   # the same step twice: one run saving it again
        w.save(model, step=s, lr=0.1, epoch=s)
    with pytest.raises(gs.CheckpointError, match="at steps 0 to 4"):
        w.save(model, step=0, lr=0.1)


def test_overwrite_never_removes_a_file_that_is_not_a_checkpoint(tmp_path):
    _run_into(tmp_path, [0, 1], seed=0)
    (tmp_path / "step_00000005.h5").write_text("my notes")
    with pytest.raises(gs.CheckpointError, match=r"step_00000005\.h5: .*not a gradscore checkpoint"):
        _run_into(tmp_path, [0], seed=1, overwrite=True)
    assert (tmp_path / "step_00000005.h5").read_text() == "my notes"
    assert len(list(tmp_path.glob("step_*.h5"))) == 3


def test_a_folder_filled_by_two_runs_at_once_is_refused(tmp_path):
    """Two jobs of a sweep that started on the same empty folder each passed the writer's
    check, and their checkpoints interleaved: `run` scored them as one trajectory."""
    a, b = (gs.CheckpointWriter(tmp_path, model_factory="gradscore.demos.models:mlp", model_kwargs=MLP_KWARGS)
            for _ in range(2))
    for w in (a, b):
        w._start_run(0)   # both look before either writes
    torch.manual_seed(0)
    model = mlp(**MLP_KWARGS)
    for step, w in ((0, a), (1, b), (2, a), (3, b)):
        w.save(model, step=step, lr=0.1, epoch=step)
    with pytest.raises(gs.CheckpointError, match=r"step_00000001\.h5: is of another training run than "
                       r"step_00000000\.h5 \(steps 0, 2 of one, 1, 3 of the other\)"):
        gs.CheckpointStore(tmp_path)


def test_a_resumed_run_is_the_same_run(tmp_path):
    _run_into(tmp_path, [0, 1], seed=0)
    _run_into(tmp_path, [2, 3], seed=0)   # a new process, after a stop
    runs = {i.run for i in gs.CheckpointStore(tmp_path)}
    assert len(runs) == 1 and "" not in runs
    _run_into(tmp_path, [0, 1], seed=1, overwrite=True)   # a new run from the start
    assert {i.run for i in gs.CheckpointStore(tmp_path)}.isdisjoint(runs)


def test_under_ddp_only_rank_0_writes(tmp_path, monkeypatch):
    """Every rank of a DDP run holds the same θ and calls the writer (a Trainer callback
    runs on each): rank 1 found rank 0's first checkpoint and refused it as an earlier run's."""
    import gradscore.io.checkpoints as checkpoints
    torch.manual_seed(0)
    model = mlp(**MLP_KWARGS)
    monkeypatch.setattr(checkpoints, "current_ranks", lambda: (0, 2))
    _run_into(tmp_path, [0, 1], seed=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(checkpoints, "current_ranks", lambda: (1, 2))
    w = gs.CheckpointWriter(tmp_path, model_factory="gradscore.demos.models:mlp", model_kwargs=MLP_KWARGS)
    assert [w.save(model, step=s, lr=0.1) for s in (0, 1, 2)] == [tmp_path / f"step_0000000{s}.h5" for s in (0, 1, 2)]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("factory", ["gradscore.demos.models:mlp", "tests_factory:reads_a_value"])
def test_the_model_skeleton_comes_without_weights_or_from_an_ordinary_build(tmp_path, factory):
    with gs.CheckpointWriter(tmp_path, model_factory=factory, model_kwargs=MLP_KWARGS) as w:
        w.save(mlp(**MLP_KWARGS), step=0, lr=0.1)
    store = gs.CheckpointStore(tmp_path)
    skeleton = store.model_skeleton()
    assert [type(m) for m in skeleton.modules()] == [type(m) for m in store.new_model().modules()]
    assert next(skeleton.parameters()).is_meta == (factory.endswith("mlp"))


SCRIPT = """import torch, gradscore as gs
open("ran.txt", "a").write(__name__ + "\\n")


def net():
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


{guard}with gs.CheckpointWriter("ck", model_factory="train:net", loss="cross_entropy") as w:
{indent}    model = net()
{indent}    for step in range(2):
{indent}        w.save(model, step=step, lr=0.1)
{indent}        torch.nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.arange(4) % 3).backward()
"""


@pytest.mark.parametrize("guarded", [False, True])
def test_a_factory_in_the_training_script_itself_never_runs_the_training_again(tmp_path, guarded):
    """A training script naming a factory of its own ("train:net") had the writer import
    it: without an ``if __name__ == "__main__":`` guard that ran the whole training again,
    nested, which wrote the checkpoints the outer run then refused. Such a script is
    refused before it runs twice; a guarded one imports as any module."""
    guard, indent = ('if __name__ == "__main__":\n    ', "    ") if guarded else ("", "")
    (tmp_path / "train.py").write_text(SCRIPT.format(guard=guard, indent=indent))
    r = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True)
    ran = (tmp_path / "ran.txt").read_text().split()
    if guarded:
        assert r.returncode == 0 and ran == ["__main__", "train"], r.stderr
        assert len(gs.CheckpointStore(tmp_path / "ck")) == 2
    else:
        assert r.returncode == 1 and ran == ["__main__"], r.stderr
        assert "model_factory 'train:net': importing train.py would run the script again" in r.stderr
        assert not (tmp_path / "ck").exists()


def test_scoring_never_runs_a_training_script_named_as_the_factory(tmp_path):
    """Checkpoints (or `import-checkpoints --model`) naming a factory in a training script
    without a guard: `run` imported the script, which trained again, for as long as the
    training took. It is refused with the line that would train, the script not run."""
    (tmp_path / "train.py").write_text(SCRIPT.format(guard="", indent=""))
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    ckpts = tmp_path / "ck"
    ckpts.mkdir()
    write_checkpoint(ckpts / "step_00000000.h5", model, step=0, lr=0.1, model_factory="train:net",
                     loss="cross_entropy")
    data = gs.save_dataset(tmp_path / "d.h5", np.zeros((4, 6), np.float32), np.arange(4) % 3)
    r = subprocess.run([sys.executable, "-m", "gradscore", "run", "--checkpoints", "ck", "--data", str(data),
                        "--out", "s.h5", "--quiet"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and not (tmp_path / "ran.txt").exists(), r.stderr
    assert "importing train.py would run it: line 9 calls CheckpointWriter() outside any function" in r.stderr


def test_a_module_that_fits_a_preprocessor_at_import_is_not_taken_for_a_training_script(tmp_path, monkeypatch):
    """The check that keeps a training script from running again read any `.fit(` or
    `.train(` outside a function as a training: a factory's module that fits a scaler at
    import (scikit-learn) or puts a model in train mode was refused. A trainer's fit or
    train is a training; those are not."""
    (tmp_path / "gs_prep_models.py").write_text(
        "import numpy as np\nimport torch\nfrom sklearn.preprocessing import StandardScaler\n\n"
        "SCALER = StandardScaler().fit(np.arange(12.0).reshape(6, 2))\nNET = torch.nn.Linear(6, 3)\nNET.train()\n\n\n"
        "def net():\n    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))\n")
    (tmp_path / "gs_fit_script.py").write_text(
        "import lightning\n\n\ndef net():\n    return None\n\n\ntrainer = lightning.Trainer(max_epochs=1)\n"
        "trainer.fit(net())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with gs.CheckpointWriter(tmp_path / "ck", model_factory="gs_prep_models:net", loss="cross_entropy") as w:
        w.save(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), step=0, lr=0.1)
    with pytest.raises(gs.CheckpointError, match=r"importing gs_fit_script\.py would run it: line 9 calls fit\(\) "
                                                 r"outside any function"):
        gs.CheckpointWriter(tmp_path / "ck2", model_factory="gs_fit_script:net", loss="cross_entropy")
