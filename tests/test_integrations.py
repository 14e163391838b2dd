"""Recording checkpoints while training: a plain loop, Lightning, the Hugging Face Trainer.
Each writes checkpoints that `gradscore run` accepts; tiny models, no downloads."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import gradscore as gs
from gradscore.cli import main
from gradscore.demos.models import mlp

KW = {"d_in": 6, "hidden": 8, "n_classes": 3, "depth": 1}


def _data(tmp_path, n=40):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return x, y, gs.save_dataset(tmp_path / "train.h5", x.numpy(), y.numpy())


def _run_ok(ckpts, data, tmp_path):
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--out",
                 str(tmp_path / "scores.h5"), "--scores", "grand,loss", "--quiet"]) == 0
    return gs.load_scores(tmp_path / "scores.h5")


#: a 1-layer GPT-2, built from its config (no download)
GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 31, "n_positions": 16,
        "bos_token_id": 0, "eos_token_id": 0}


def _inrun_gpt2(first_id: int = 0):
    """The in-run Trainer tests' model (GPT2 without dropout, eager attention, train mode),
    24 token rows (24, 12) and their training set with an ``ids`` column from ``first_id``."""
    from gradscore.integrations.hf import from_config
    torch.manual_seed(0)
    model = from_config({**GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
                        attn_implementation="eager").train()
    tokens = torch.randint(0, 31, (24, 12), generator=torch.Generator().manual_seed(0))
    return model, tokens, [{"input_ids": r, "labels": r, "ids": torch.tensor(first_id + i)}
                           for i, r in enumerate(tokens)]


def _Snapshots(snapshots: dict):
    """A Trainer callback keeping the model's state at the start of each step in ``snapshots``."""
    import copy

    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step] = copy.deepcopy(model.state_dict())
    return Snapshots()


def _inrun_module(L, optimizer=torch.optim.SGD, lr=0.1, snapshots=None):
    """A LightningModule over batches (ids, x, y) training a float64 MLP ``net`` with mean
    cross-entropy; ``snapshots`` (if given) gets the net's state at the start of each step."""
    import copy

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = mlp(**KW).double()     # float64: autocast leaves it as it is; a scaler still scales

        def training_step(self, batch, batch_idx):
            if snapshots is not None:
                snapshots.setdefault(self.global_step, copy.deepcopy(self.net.state_dict()))
            return torch.nn.functional.cross_entropy(self.net(batch[1]), batch[2])

        def configure_optimizers(self):
            return optimizer(self.parameters(), lr=lr)
    return Module()


def _fit(L, module, x, y, callbacks, epochs=1, **trainer_kwargs):
    """``module`` fit on the 40 examples (ids, x, y) in batches of 10; returns the trainer."""
    data = torch.utils.data.TensorDataset(torch.arange(40), x.double(), y)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=10))
    return trainer


def test_plain_loop_every_n_steps(tmp_path):
    x, y, data = _data(tmp_path)
    torch.manual_seed(0)
    model = mlp(**KW)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    rec = gs.CheckpointWriter(tmp_path / "ck", model_factory="gradscore.demos.models:mlp", model_kwargs=KW).every(3)
    for step in range(10):
        rec(model, step=step, lr=opt.param_groups[0]["lr"], epoch=step / 5)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    store = gs.CheckpointStore(tmp_path / "ck")
    assert [i.step for i in store] == [0, 3, 6, 9]
    assert [i.lr for i in store] == [0.2, 0.2, 0.1, 0.05]   # StepLR halves every 4 steps
    assert _run_ok(tmp_path / "ck", data, tmp_path)["per_checkpoint"]["loss"].shape == (4, 40)
    with pytest.raises(gs.CheckpointError, match="positive integer"):
        rec.writer.every(0)


def _mlp_module(L, optimizer=lambda net: torch.optim.SGD(net.parameters(), lr=0.1)):
    """A LightningModule class that trains an MLP (its ``net``) by cross-entropy with
    ``optimizer(net)``."""
    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(**KW)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return optimizer(self.net)

    return Module


def test_lightning_callback(tmp_path):
    L = pytest.importorskip("lightning")
    from gradscore.integrations.lightning import GradscoreCheckpoint
    x, y, data = _data(tmp_path)

    Module = _mlp_module(L)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    cb = GradscoreCheckpoint(str(tmp_path / "ck"), model_factory="gradscore.demos.models:mlp", model_kwargs=KW,
                             every_n_steps=3, attr="net")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(Module(), loader)
    store = gs.CheckpointStore(tmp_path / "ck")
    assert [i.step for i in store] == [0, 3, 6, 8]   # every 3 steps, and the end
    assert [i.epoch for i in store][:3] == [0.0, 0.75, 1.5] and all(i.lr == 0.1 for i in store)
    _run_ok(tmp_path / "ck", data, tmp_path)
    # a second, shorter fit into the folder: refused, else its steps 0-4 would sit beside the first's 6 and 8
    def fit(**kw):
        cb = GradscoreCheckpoint(str(tmp_path / "ck"), model_factory="gradscore.demos.models:mlp", model_kwargs=KW,
                                 every_n_steps=3, attr="net", **kw)
        L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[cb]).fit(Module(), loader)
    with pytest.raises(gs.CheckpointError, match="already holds the checkpoints of an earlier run at steps 0 to 8"):
        fit()
    fit(overwrite=True)
    assert [i.step for i in gs.CheckpointStore(tmp_path / "ck")] == [0, 3, 4]


def test_lightning_callback_records_the_optimizer_and_the_largest_rate(tmp_path):
    """The checkpoints recorded the optimizer as "lightning", which PDS and target_dot take for
    plain gradient steps: an Adam fit's co-states came without their warning. The learning
    rate was the first parameter group's: a first group frozen at lr 0 made every η_t 0."""
    L = pytest.importorskip("lightning")
    from gradscore.integrations.lightning import GradscoreCheckpoint
    x, y, data = _data(tmp_path)

    def fit(optimizer, folder, **trainer_kw):
        Module = _mlp_module(L, optimizer)
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
        cb = GradscoreCheckpoint(str(tmp_path / folder), model_factory="gradscore.demos.models:mlp", model_kwargs=KW,
                                 every_n_steps=2, attr="net")
        L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[cb], **trainer_kw).fit(Module(), loader)
        return list(gs.CheckpointStore(tmp_path / folder))

    def frozen_first(net):
        first, rest = list(net.parameters())[:2], list(net.parameters())[2:]
        return torch.optim.SGD([{"params": first, "lr": 0.0}, {"params": rest, "lr": 0.1}])

    infos = fit(frozen_first, "frozen")
    assert [i.lr for i in infos] == [0.1] * 3 and all(i.optimizer == "SGD(lr per group=0,0.1)" for i in infos)
    infos = fit(lambda net: torch.optim.SGD(net.parameters(), lr=0.1), "sgd")
    assert all(i.optimizer == "SGD" for i in infos)
    infos = fit(lambda net: torch.optim.SGD(net.parameters(), lr=0.1), "clipped", gradient_clip_val=1.0)
    assert all(i.optimizer == "SGD(clipped)" for i in infos)
    infos = fit(lambda net: torch.optim.Adam(net.parameters(), lr=0.01), "adam")
    assert all(i.optimizer == "Adam" for i in infos)
    assert main(["run", "--checkpoints", str(tmp_path / "adam"), "--data", str(data), "--target", str(data),
                 "--scores", "target_dot", "--out", str(tmp_path / "s.h5"), "--quiet"]) == 0
    assert any("written by Adam, not plain gradient steps" in w for w in gs.load_scores(tmp_path / "s.h5")["warnings"])


def test_hf_trainer_callback(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from gradscore.integrations.hf import from_config
    from gradscore.integrations.hf_trainer import GradscoreCallback
    torch.manual_seed(0)
    model = from_config(GPT2).train()
    ids = torch.randint(0, 31, (24, 12), generator=torch.Generator().manual_seed(0))
    train = [{"input_ids": r, "labels": r} for r in ids]
    cb = GradscoreCallback.for_model(str(tmp_path / "ck"), model, every_n_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=8,
                             learning_rate=0.05, lr_scheduler_type="linear", report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb]).train()
    store = gs.CheckpointStore(tmp_path / "ck")
    assert [i.step for i in store] == [0, 2, 4, 5]
    with pytest.raises(gs.CheckpointError, match="already holds the checkpoints of an earlier run at steps 0 to 5"):
        GradscoreCallback.for_model(str(tmp_path / "ck"), model, every_n_steps=2).writer.save(model, step=0, lr=0.1)
    assert [i.step for i in gs.CheckpointStore(tmp_path / "ck")] == [0, 2, 4, 5]
    lrs = [i.lr for i in store]
    np.testing.assert_allclose(lrs[:3], [0.05, 0.05 * 3 / 5, 0.05 * 1 / 5])   # the linear schedule
    gs.save_dataset(tmp_path / "text.h5", {"input_ids": ids.numpy()}, None)
    assert main(["run", "--checkpoints", str(tmp_path / "ck"), "--data", str(tmp_path / "text.h5"),
                 "--out", str(tmp_path / "s.h5"), "--scores", "loss,grand", "--quiet"]) == 0
    assert gs.load_scores(tmp_path / "s.h5")["per_checkpoint"]["sq_grad_norm"].shape == (4, 24)
    # an optimizer given with a first group frozen at lr 0: every η_t was that 0
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:1], "lr": 0.0}, {"params": params[1:], "lr": 0.05}])
    cb = GradscoreCallback.for_model(str(tmp_path / "groups"), model, every_n_steps=2)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb],
            optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))).train()
    assert [i.lr for i in gs.CheckpointStore(tmp_path / "groups")] == [0.05] * 4


@pytest.mark.parametrize("scale", [None, 256.0])
def test_hf_trainer_inrun_callback(tmp_path, scale):
    """The Trainer's own steps (gradient accumulation 2) recorded by gs.InRun; every
    recorded loss and ‖∇ℓ_b‖² equals the per-example loop at the step's parameters. With a
    loss scaler (what ``fp16=True`` gives on a GPU; set here by hand, as the CPU has none)
    the callback finds it on the Trainer's optimizer: the shares are of the unscaled loss, also
    when the scale doubles every step (the Trainer updates it before the step's record is made)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import copy

    import h5py
    from transformers import Trainer, TrainingArguments

    from gradscore.integrations.hf_trainer import GradscoreInRunCallback
    from gradscore.losses import causal_lm
    model, tokens, train = _inrun_gpt2(first_id=100)
    snapshots: dict = {}
    rec = gs.InRun(model, loss="causal_lm", out=tmp_path / "inrun.h5")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=0.05, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[_Snapshots(snapshots), GradscoreInRunCallback(rec)])
    if scale is not None:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1)
    trainer.train()
    with h5py.File(tmp_path / "inrun.h5") as f:
        rows = {k: f["inrun"][k][()] for k in f["inrun"]}
        ids = f["ids"][()]
    assert sorted(np.unique(rows["step"]).tolist()) == [0, 1, 2] and len(rows["step"]) == 3 * 2 * 4
    ref = copy.deepcopy(model).eval()
    for t in (0, 2):
        ref.load_state_dict(snapshots[t])
        at = np.flatnonzero(rows["step"] == t)
        # equal token counts: equal shares; they add up to 88/96, as this Trainer divides the 88 predicted
        # tokens' loss by num_items_in_batch = 96 labels (the share is read from the loss actually used)
        np.testing.assert_allclose(rows["share"][at], rows["share"][at][0], rtol=1e-6)
        assert 0.9 < rows["share"][at].sum() <= 1.0 + 1e-6
        for i in at:
            x = tokens[int(ids[rows["row"][i]]) - 100][None]
            loss = causal_lm("mean").fn(ref(input_ids=x).logits, x)[0]
            grads = torch.autograd.grad(loss, list(ref.parameters()))
            np.testing.assert_allclose(rows["loss"][i], float(loss), rtol=1e-5)
            np.testing.assert_allclose(rows["sq_norm"][i], float(sum((g ** 2).sum() for g in grads)), rtol=1e-4)
    assert main(["info", str(tmp_path / "inrun.h5")]) == 0


def test_hf_trainer_resumed_from_its_checkpoint_continues_the_recording(tmp_path):
    """A Trainer stops after step 4 (its recording closed), then resumes from its saved
    checkpoint-3 (``resume_from_checkpoint``) with ``gs.InRun(..., resume=True)``: the
    recording equals the one of an uninterrupted Trainer, step 3 recorded once."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import h5py
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradscore.exceptions import GradscoreWarning
    from gradscore.integrations.hf_trainer import GradscoreInRunCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 5

    def train(out, *, resume=False, stop=False, from_checkpoint=None):
        model, _, data = _inrun_gpt2()
        rec = gs.InRun(model, loss="causal_lm", out=tmp_path / out, resume=resume)
        args = TrainingArguments(output_dir=str(tmp_path / f"{out}.trainer"), max_steps=7,
                                 per_device_train_batch_size=4, learning_rate=0.05, report_to=[], use_cpu=True,
                                 save_strategy="steps", save_steps=3, logging_strategy="no", disable_tqdm=True,
                                 remove_unused_columns=False, seed=0)
        callbacks = [GradscoreInRunCallback(rec)] + ([StopAfter()] if stop else [])
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train(
            resume_from_checkpoint=from_checkpoint)

    train("whole.h5")
    train("r.h5", stop=True)
    with h5py.File(tmp_path / "r.h5") as f:
        assert sorted(set(f["inrun/step"][()])) == [0, 1, 2, 3, 4]
    with pytest.warns(GradscoreWarning, match="resumed at step 3: the records of steps 3 to 4"):
        train("r.h5", resume=True, from_checkpoint=str(tmp_path / "r.h5.trainer" / "checkpoint-3"))
    with h5py.File(tmp_path / "r.h5") as f, h5py.File(tmp_path / "whole.h5") as g:
        assert np.array_equal(f["ids"][()], g["ids"][()])
        for k in g["inrun"]:   # the same steps on the same batches from the same state
            np.testing.assert_allclose(f["inrun"][k][()], g["inrun"][k][()], rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_hf_trainer_inrun_callback_under_bf16_mixed_precision(tmp_path, family):
    """``TrainingArguments(bf16=True)``: Accelerate runs the forward under autocast and returns
    its outputs as float32 copies, made after the model computed its loss from the bf16
    logits, so no gradient reaches the returned logits. The recorder reads δ of the values
    the model computed; before, the step failed ("no backward reached the model"), and the
    Qwen3's RMSNorms were refused under autocast. Every record is within bf16's rounding
    of the float32 loop at the step's parameters."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import copy

    import h5py
    from transformers import Trainer, TrainingArguments

    from gradscore.integrations.hf import from_config
    from gradscore.integrations.hf_trainer import GradscoreInRunCallback
    from gradscore.losses import causal_lm
    model, tokens, train = _inrun_gpt2()
    if family == "qwen3":
        torch.manual_seed(0)
        model = from_config({"model_type": "qwen3", "vocab_size": 31, "hidden_size": 16, "intermediate_size": 24,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "head_dim": 8, "max_position_embeddings": 16}, attn_implementation="eager").train()
    snapshots: dict = {}
    rec = gs.InRun(model, loss="causal_lm", out=tmp_path / "inrun.h5")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=0.05, report_to=[], use_cpu=True, bf16=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[_Snapshots(snapshots), GradscoreInRunCallback(rec)]).train()
    with h5py.File(tmp_path / "inrun.h5") as f:
        rows = {k: f["inrun"][k][()] for k in f["inrun"]}
        ids = f["ids"][()]
    assert sorted(np.unique(rows["step"]).tolist()) == [0, 1] and len(rows["step"]) == 2 * 4
    ref = copy.deepcopy(model).float().eval()
    ref.load_state_dict(snapshots[1])
    at = np.flatnonzero(rows["step"] == 1)
    # equal token counts, equal shares; their sum is the loss's own normalization (num_items_in_batch)
    np.testing.assert_allclose(rows["share"][at], rows["share"][at][0], rtol=0.02)
    assert 0.9 < rows["share"][at].sum() <= 1.02
    for i in at:
        x = tokens[int(ids[rows["row"][i]])][None]
        loss = causal_lm("mean").fn(ref(input_ids=x).logits, x)[0]
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        np.testing.assert_allclose(rows["loss"][i], float(loss), rtol=0.02)       # bf16's 8 bits of mantissa
        np.testing.assert_allclose(rows["sq_norm"][i], float(sum((g ** 2).sum() for g in grads)), rtol=0.1)


def test_hf_trainer_with_label_smoothing_is_refused_with_the_reason(tmp_path):
    """The Trainer takes the labels out of the model's inputs to smooth the loss itself:
    the recorder has no targets, and says why in one line."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from gradscore.integrations.hf_trainer import GradscoreInRunCallback
    model, _, train = _inrun_gpt2()
    rec = gs.InRun(model, loss="causal_lm", out=tmp_path / "inrun.h5")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, label_smoothing_factor=0.1)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[GradscoreInRunCallback(rec)])
    with pytest.raises(gs.ConfigError, match="without 'labels'.*label_smoothing_factor > 0 .*set it to 0"):
        trainer.train()


def test_lightning_inrun_callback_is_bit_identical_and_exact(tmp_path):
    L = pytest.importorskip("lightning")
    import copy

    import h5py

    from gradscore.integrations.lightning import GradscoreInRun
    x, y, _ = _data(tmp_path)
    snapshots = {}

    def fit(callbacks):
        module = _inrun_module(L, snapshots=snapshots)
        _fit(L, module, x, y, callbacks(module), epochs=2)
        return module

    plain = fit(lambda m: [])
    recorded = fit(lambda m: [GradscoreInRun(gs.InRun(m.net, out=tmp_path / "inrun.h5"))])
    for a, b in zip(plain.state_dict().values(), recorded.state_dict().values()):
        assert torch.equal(a, b)
    with h5py.File(tmp_path / "inrun.h5") as f:
        rows = {k: f["inrun"][k][()] for k in f["inrun"]}
        ids = f["ids"][()]
    assert np.unique(rows["step"]).tolist() == list(range(8)) and ids.tolist() == list(range(40))
    net = copy.deepcopy(recorded.net)
    net.load_state_dict(snapshots[5])
    for i in np.flatnonzero(rows["step"] == 5):
        n = int(ids[rows["row"][i]])
        loss = torch.nn.functional.cross_entropy(net(x[n:n + 1].double()), y[n:n + 1])
        grads = torch.autograd.grad(loss, list(net.parameters()))
        np.testing.assert_allclose(rows["sq_norm"][i], float(sum((g ** 2).sum() for g in grads)), rtol=1e-10)


def test_lightning_resumed_from_its_checkpoint_continues_the_recording(tmp_path):
    """A Lightning fit stops after step 5; a second fit resumes from its checkpoint after
    step 4 (``ckpt_path``) with ``gs.InRun(..., resume=True)``: the recording equals an
    uninterrupted fit's, step 4 recorded once."""
    L = pytest.importorskip("lightning")
    import h5py

    from gradscore.exceptions import GradscoreWarning
    from gradscore.integrations.lightning import GradscoreInRun
    x, y, _ = _data(tmp_path)

    class StopAfter(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step == 6

    def fit(out, *, resume=False, stop=False, ckpt_path=None):
        module = _inrun_module(L)
        saves = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / f"{out}.ckpt", every_n_train_steps=4,
                                                    save_top_k=-1)
        callbacks = [GradscoreInRun(gs.InRun(module.net, out=tmp_path / out, resume=resume)), saves]
        data = torch.utils.data.TensorDataset(torch.arange(40), x.double(), y)
        L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=callbacks + ([StopAfter()] if stop else [])).fit(
            module, torch.utils.data.DataLoader(data, batch_size=10), ckpt_path=ckpt_path)

    fit("whole.h5")
    fit("r.h5", stop=True)
    with h5py.File(tmp_path / "r.h5") as f:
        assert sorted(set(f["inrun/step"][()])) == [0, 1, 2, 3, 4, 5]
    with pytest.warns(GradscoreWarning, match="resumed at step 4: the records of steps 4 to 5"):
        fit("r.h5", resume=True, ckpt_path=next((tmp_path / "r.h5.ckpt").glob("*step=4.ckpt")))
    with h5py.File(tmp_path / "r.h5") as f, h5py.File(tmp_path / "whole.h5") as g:
        assert np.array_equal(f["ids"][()], g["ids"][()]) and sorted(set(g["inrun/step"][()])) == list(range(12))
        for k in g["inrun"]:
            np.testing.assert_array_equal(f["inrun"][k][()], g["inrun"][k][()], err_msg=k)


def test_lightning_inrun_callback_reads_the_loss_scaler(tmp_path):
    """Lightning's "16-mixed" precision scales the loss by a GradScaler: the callback hands
    it to the recorder, whose shares are of the unscaled mean (1/B), as the plain run's."""
    L = pytest.importorskip("lightning")
    import h5py
    from lightning.pytorch.plugins.precision import MixedPrecision

    from gradscore.integrations.lightning import GradscoreInRun
    x, y, _ = _data(tmp_path)
    module = _inrun_module(L)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1))
    _fit(L, module, x, y, [GradscoreInRun(gs.InRun(module.net, out=tmp_path / "inrun.h5"))], plugins=[plugin])
    with h5py.File(tmp_path / "inrun.h5") as f:
        np.testing.assert_allclose(f["inrun/share"][()], 0.1, rtol=1e-12)


def test_inrun_callbacks_name_gradient_clipping(tmp_path, recwarn):
    """A trainer that clips the gradient makes a clipped step shorter than its learning rate
    says: with a target, both callbacks warn that inrun_value does not see it (one line
    naming the option); without clipping, or without a target, they do not."""
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from gradscore.exceptions import GradscoreWarning
    from gradscore.integrations.hf_trainer import GradscoreInRunCallback
    from gradscore.integrations.lightning import GradscoreInRun
    x, y, _ = _data(tmp_path)
    model = mlp(**KW)

    def args(clip):
        return TrainingArguments(output_dir=str(tmp_path / "o"), max_grad_norm=clip, report_to=[], use_cpu=True)

    def lightning_trainer(clip):
        return SimpleNamespace(precision_plugin=SimpleNamespace(), gradient_clip_val=clip, world_size=1, optimizers=[])

    for i, (targets, clip) in enumerate([((x[:4], y[:4]), 1.0), ((x[:4], y[:4]), 0.0), (None, 1.0)]):
        warns = targets is not None and clip > 0
        rec = gs.InRun(model, out=tmp_path / f"hf{i}.h5", targets=targets)
        with (pytest.warns(GradscoreWarning, match=r"^TrainingArguments\(max_grad_norm=1.0\): the trainer clips "
                                                   r"the gradient.*inrun_value") if warns else contextlib.nullcontext()):
            GradscoreInRunCallback(rec).on_train_begin(args(clip), None, None, optimizer=None)
        rec.detach()
        rec = gs.InRun(model, out=tmp_path / f"pl{i}.h5", targets=targets)
        with (pytest.warns(GradscoreWarning, match=r"^Trainer\(gradient_clip_val=1.0\): the trainer clips")
              if warns else contextlib.nullcontext()):
            GradscoreInRun(rec).on_train_start(lightning_trainer(clip), None)
        if not warns:
            assert not [w for w in recwarn if issubclass(w.category, GradscoreWarning)]


def test_hf_trainer_inrun_callback_preconditions_with_the_trainers_adam(tmp_path):
    """The Trainer makes its AdamW inside train(), after the recorder: with
    ``optimizer="adam"`` the callback hands it over, and each dot is the share times
    ⟨∇ℓ_b, Γ_t ∇J⟩, Γ_t from the Trainer's AdamW state before step t, as the loop gives."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import copy

    import h5py
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradscore.integrations.hf_trainer import GradscoreInRunCallback
    from gradscore.losses import causal_lm
    model, tokens, train = _inrun_gpt2()
    target = ({"input_ids": tokens[:3]}, tokens[:3])
    snapshots = {}

    class Snap(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            v = {n: (copy.deepcopy(optimizer.state[p]) if p in optimizer.state else None)
                 for n, p in model.named_parameters()}
            snapshots[state.global_step] = (copy.deepcopy(model.state_dict()), v)

    rec = gs.InRun(model, loss="causal_lm", out=tmp_path / "inrun.h5", targets=target, optimizer="adam")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=0.01, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                             max_grad_norm=0.0)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[Snap(), GradscoreInRunCallback(rec)]).train()
    assert isinstance(rec.optimizer, torch.optim.AdamW)
    with h5py.File(tmp_path / "inrun.h5") as f:
        rows = {k: f["inrun"][k][()] for k in f["inrun"]}
        ids = f["ids"][()]
        assert '"preconditioner": "adam"' in f.attrs["config"].decode()   # fixed-length UTF-8: h5py gives bytes
    ref = copy.deepcopy(model).eval()
    loss_fn = causal_lm("mean").fn
    params, v = dict(ref.named_parameters()), snapshots[2][1]
    ref.load_state_dict(snapshots[2][0])
    gJ = dict(zip(params, torch.autograd.grad(loss_fn(ref(**target[0]).logits, target[1]).mean(),
                                              list(params.values()))))
    pre = {n: gJ[n] / ((v[n]["exp_avg_sq"] / (1 - 0.999 ** float(v[n]["step"]))).sqrt() + 1e-8) for n in params}
    for i in np.flatnonzero(rows["step"] == 2):
        x = tokens[int(ids[rows["row"][i]])][None]
        grads = torch.autograd.grad(loss_fn(ref(input_ids=x).logits, x)[0], list(params.values()))
        want = float(sum((g * pre[n]).sum() for g, n in zip(grads, params)))
        np.testing.assert_allclose(rows["dot"][i], rows["share"][i] * want, rtol=1e-4)


def test_lightning_inrun_callback_hands_over_the_adam(tmp_path):
    """Lightning makes the optimizer in fit(), after the recorder: with optimizer="adam"
    the callback gives the recorder the trainer's Adam, whose state then preconditions
    every dot (the exact preconditioned dot is checked on the Hugging Face Trainer)."""
    L = pytest.importorskip("lightning")
    from gradscore.integrations.lightning import GradscoreInRun
    x, y, _ = _data(tmp_path)
    module = _inrun_module(L, optimizer=torch.optim.Adam, lr=0.01)
    rec = gs.InRun(module.net, out=tmp_path / "inrun.h5", targets=(x[:4].double(), y[:4]), optimizer="adam")
    trainer = _fit(L, module, x, y, [GradscoreInRun(rec)])
    assert rec.optimizer is trainer.optimizers[0]
    assert np.isfinite(gs.load_scores(tmp_path / "inrun.h5")["scores"]["inrun_value"]).all()
    with pytest.raises(gs.ConfigError, match="'adam' asks for the trainer's Adam, which no callback has given"):
        plain = gs.InRun(module.net, out=tmp_path / "plain.h5", targets=(x[:4].double(), y[:4]), optimizer="adam")
        with plain.step(range(10), y[:10], lr=0.01):
            torch.nn.functional.cross_entropy(module.net(x[:10].double()), y[:10]).backward()
    with pytest.raises(gs.ConfigError, match="'sgd'; give the torch optimizer that steps the model, 'adam'"):
        gs.InRun(module.net, out=tmp_path / "sgd.h5", optimizer="sgd")


@pytest.mark.parametrize("first", ["fast", "frozen"])
def test_lightning_inrun_callback_weighs_parameter_groups_by_their_learning_rates(tmp_path, first):
    """configure_optimizers with a slower first layer (lr/5), or with it frozen at lr 0 in
    the optimizer's first group: the callback hands the optimizer over, the step's η is the
    largest group lr, and each dot is the share times Σ_p (η_p/η)⟨∇_p ℓ_b, ∇_p J⟩ at θ_t, so
    that inrun_value is the first-order change of J the updates made."""
    L = pytest.importorskip("lightning")
    import copy

    import h5py

    from gradscore.integrations.lightning import GradscoreInRun
    slow = 0.0 if first == "frozen" else 0.2

    def two_groups(params, lr):
        params = list(params)
        groups = [{"params": params[2:]}, {"params": params[:2], "lr": lr * slow}]
        return torch.optim.SGD(groups[::-1] if first == "frozen" else groups, lr=lr)

    x, y, _ = _data(tmp_path)
    snapshots: dict = {}
    module = _inrun_module(L, optimizer=two_groups, lr=0.1, snapshots=snapshots)
    target = (x[:4].double(), y[:4])
    rec = gs.InRun(module.net, out=tmp_path / "inrun.h5", targets=target)
    _fit(L, module, x, y, [GradscoreInRun(rec)])
    with h5py.File(tmp_path / "inrun.h5") as f:
        rows = {k: f["inrun"][k][()] for k in f["inrun"]}
        ids = f["ids"][()]
    ref = copy.deepcopy(module.net).eval()
    params = dict(ref.named_parameters())
    weight = {n: slow if i < 2 else 1.0 for i, n in enumerate(params)}
    for t in (0, 3):
        ref.load_state_dict(snapshots[t])
        gJ = torch.autograd.grad(torch.nn.functional.cross_entropy(ref(target[0]), target[1]), list(params.values()))
        for i in np.flatnonzero(rows["step"] == t):
            b = int(ids[rows["row"][i]])
            gb = torch.autograd.grad(torch.nn.functional.cross_entropy(ref(x[b:b + 1].double()), y[b:b + 1]),
                                     list(params.values()))
            want = float(sum(weight[n] * (g * j).sum() for g, j, n in zip(gb, gJ, params)))
            np.testing.assert_allclose(rows["dot"][i], rows["share"][i] * want, rtol=1e-9)
    np.testing.assert_allclose(rows["lr"], 0.1)


def test_inrun_callbacks_give_the_recorder_the_ranks_ddp_averages(tmp_path):
    """Under DDP a trainer wraps the model the recorder is given, and averages the ranks'
    gradients: each callback gives the recorder the trainer's world size, by which it
    divides every share (two real gloo ranks: test_inrun's DDP test, "inner")."""
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    from types import SimpleNamespace

    from gradscore.integrations.hf_trainer import GradscoreInRunCallback
    from gradscore.integrations.lightning import GradscoreInRun
    model = mlp(**KW)
    rec = gs.InRun(model, out=tmp_path / "hf.h5")
    GradscoreInRunCallback(rec).on_train_begin(SimpleNamespace(world_size=4, max_grad_norm=0.0), None, None)
    rec.detach()
    rec2 = gs.InRun(model, out=tmp_path / "pl.h5")
    trainer = SimpleNamespace(precision_plugin=None, gradient_clip_val=None, world_size=2, optimizers=[])
    GradscoreInRun(rec2).on_train_start(trainer, None)
    assert (rec.data_parallel, rec2.data_parallel) == (4, 2)
    with pytest.raises(gs.ConfigError, match="'data_parallel': 0; give the number of processes"):
        gs.InRun(model, out=tmp_path / "bad.h5", data_parallel=0)
    assert not (tmp_path / "bad.h5").exists()


@pytest.mark.parametrize("given", ["inrun.h5", None], ids=["path", "none"])
@pytest.mark.parametrize("needs,module,name", [("lightning", "lightning", "GradscoreInRun"),
                                               ("transformers", "hf_trainer", "GradscoreInRunCallback")])
def test_a_callback_given_something_else_than_a_recorder_is_refused_when_made(given, needs, module, name):
    """The in-run callbacks given the file's path (or None) for the recorder took it, and the
    trainer then failed inside its own loop with an AttributeError: one ConfigError at once."""
    import importlib
    pytest.importorskip(needs)
    callback = getattr(importlib.import_module(f"gradscore.integrations.{module}"), name)
    with pytest.raises(gs.ConfigError, match=rf"invalid value for 'recorder': {given!r}; give the gs.InRun "
                                             rf"that records the training"):
        callback(given)


class _ByName(torch.nn.Module):
    """An MLP called with keywords, as a Trainer calls a model: model(x=..., labels=...)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(d_in=6, hidden=4, n_classes=3)

    def forward(self, x, labels=None):
        return self.net(x)


def test_the_attached_recorder_names_a_missing_ids_column_and_refuses_a_fractional_step(tmp_path):
    """A training set without an 'ids' column was told to keep a column it does not have
    (remove_unused_columns=False); set_step(1.5) was taken as step 1 (the next 1.75 would
    have shared its target gradient)."""
    model = _ByName()
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    rec.attach()
    x, y = torch.randn(4, 6), torch.arange(4) % 3
    with pytest.raises(gs.ConfigError, match=r"called without 'ids', the examples' ids the attached recorder reads: "
                                             r"give the training set an 'ids' column .*, and keep it"):
        model(x=x, labels=y)
    for step in (1.5, -1, "2"):
        with pytest.raises(gs.ConfigError, match="invalid value for 'step'"):
            rec.set_step(step, 0.1)
    rec.set_step(np.int64(0), 0.1)
    torch.nn.functional.cross_entropy(model(x=x, labels=y, ids=torch.arange(4)), y).backward()
    rec.detach()
    rec.close()
    assert gs.load_scores(tmp_path / "r.h5")["ids"].tolist() == [0, 1, 2, 3]


def test_lightning_ids_and_targets_that_do_not_give_a_pair_are_one_error(tmp_path):
    """`ids_and_targets` returning the whole (ids, x, y) batch was Python's 'too many values
    to unpack' from inside the trainer's loop, and a batch without positions (a dict) met
    the default's batch[0] as a KeyError; a value that cannot be called failed there too."""
    L = pytest.importorskip("lightning")
    from gradscore.integrations.lightning import GradscoreInRun
    x, y, _ = _data(tmp_path)
    with pytest.raises(gs.ConfigError, match=r"invalid value for 'ids_and_targets': 3; give a function"):
        GradscoreInRun(gs.InRun(mlp(**KW), out=tmp_path / "r.h5"), ids_and_targets=3)
    for pick, says in ((lambda b: b, r"returned a list of 3; it must return the pair \(ids, y\)"),
                       (lambda b: b["y"], r"failed on the batch \(a list of 3\): TypeError")):
        module = _inrun_module(L)
        with pytest.raises(gs.ConfigError, match=rf"invalid value for 'ids_and_targets': .*{says}"):
            _fit(L, module, x, y, [GradscoreInRun(gs.InRun(module.net, out=tmp_path / "r.h5", overwrite=True),
                                                  ids_and_targets=pick)])


def test_lightning_checkpoint_callback_names_an_attr_the_module_does_not_have(tmp_path):
    """`GradscoreCheckpoint(..., attr="model")` on a module whose network is `net` was
    Python's AttributeError from inside the trainer's first batch."""
    L = pytest.importorskip("lightning")
    from gradscore.integrations.lightning import GradscoreCheckpoint
    x, y, _ = _data(tmp_path)
    module = _inrun_module(L)
    cb = GradscoreCheckpoint(str(tmp_path / "ck"), model_factory="gradscore.demos.models:mlp", model_kwargs=KW,
                             attr="model")
    with pytest.raises(gs.ConfigError, match=r"invalid value for 'attr': the LightningModule has no 'model'; give "
                                             r"the attribute that holds the network \(its submodules: 'net'\)"):
        _fit(L, module, x, y, [cb])
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())
