"""Recording checkpoints while training: a plain loop, Lightning, the Hugging Face Trainer.
Each writes checkpoints that `gradscore run` accepts; tiny models, no downloads."""
from __future__ import annotations

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


def test_lightning_callback(tmp_path):
    L = pytest.importorskip("lightning")
    from gradscore.integrations.lightning import GradscoreCheckpoint
    x, y, data = _data(tmp_path)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(**KW)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

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


def test_hf_trainer_callback(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from gradscore.integrations.hf import from_config
    from gradscore.integrations.hf_trainer import GradscoreCallback
    cfg = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 31,
           "n_positions": 16, "bos_token_id": 0, "eos_token_id": 0}
    torch.manual_seed(0)
    model = from_config(cfg).train()
    ids = torch.randint(0, 31, (24, 12), generator=torch.Generator().manual_seed(0))
    train = [{"input_ids": r, "labels": r} for r in ids]
    cb = GradscoreCallback.for_model(str(tmp_path / "ck"), model, every_n_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=8,
                             learning_rate=0.05, lr_scheduler_type="linear", report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb]).train()
    store = gs.CheckpointStore(tmp_path / "ck")
    assert [i.step for i in store] == [0, 2, 4, 5]
    lrs = [i.lr for i in store]
    np.testing.assert_allclose(lrs[:3], [0.05, 0.05 * 3 / 5, 0.05 * 1 / 5])   # the linear schedule
    gs.save_dataset(tmp_path / "text.h5", {"input_ids": ids.numpy()}, None)
    assert main(["run", "--checkpoints", str(tmp_path / "ck"), "--data", str(tmp_path / "text.h5"),
                 "--out", str(tmp_path / "s.h5"), "--scores", "loss,grand", "--quiet"]) == 0
    assert gs.load_scores(tmp_path / "s.h5")["per_checkpoint"]["sq_grad_norm"].shape == (4, 24)
