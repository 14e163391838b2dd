"""Text: token sequences, causal-LM and sequence-classification losses, Hugging Face
models built from config (no download), tied embeddings. Ghost against the loop, float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gradscore as gs
from gradscore.losses import causal_lm

pytest.importorskip("transformers")  # in the test extra; absent only in a bare install
from gradscore.integrations.hf import from_config  # noqa: E402

GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 31,
        "n_positions": 16, "bos_token_id": 0, "eos_token_id": 0}
BERT = {"model_type": "bert", "vocab_size": 29, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 16,
        "num_labels": 3}


LLAMA = {"model_type": "llama", "vocab_size": 31, "hidden_size": 16, "intermediate_size": 24,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16}
QWEN2 = {**LLAMA, "model_type": "qwen2"}   # Qwen2RMSNorm: a copy of Llama's under another name
GEMMA = {**LLAMA, "model_type": "gemma", "head_dim": 8}   # (1 + w) · x̂


def _batch(vocab, B=5, T=9, seed=0):
    """Token ids with a repeated token, two padded examples, one ignored label."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    ids[:, 5] = ids[:, 2]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, 3] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def _check(model, loss, x, y, K):
    model = model.double().eval()
    ref = gs.Scorer(model, loss, engine="loop")
    V = torch.randn(K, ref.num_params, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2)) if K else None
    want = ref.score_batch(x, y, refs=V)
    scorer = gs.Scorer(model, loss, engine="ghost")
    got = scorer.score_batch(x, y, refs=V)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.sq_norm, want.sq_norm, rtol=1e-6, atol=1e-12)
    if K:
        torch.testing.assert_close(got.dots, want.dots, rtol=1e-6, atol=1e-9)
    return scorer


@pytest.mark.parametrize("K", [0, 2])
def test_gpt2_ghost_equals_loop_with_padding_ignored_labels_and_tied_embeddings(K):
    torch.manual_seed(0)
    model = from_config(GPT2)
    assert model.lm_head.weight is model.transformer.wte.weight
    x, y = _batch(31)
    scorer = _check(model, "causal_lm", x, y, K)
    why = scorer.explain()
    assert all(v.startswith("ghost") for v in why.values()), why   # SDPA needs no rule, nothing falls back
    assert "tied, exact cross term" in why["transformer.wte.weight"]
    assert why["transformer.h.0.attn.c_attn.weight"].startswith("ghost (hf_conv1d rule")
    assert gs.Scorer(model, "causal_lm").engine_name == "ghost"


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("config", [LLAMA, QWEN2, GEMMA], ids=["llama", "qwen2", "gemma"])
def test_hugging_face_rms_norms_take_their_checked_rule(config, K):
    """Their RMSNorm classes (w · x̂, and Gemma's (1 + w) · x̂) and Gemma's scaled embedding
    (tied to its head) take the structural rules, checked on the first batch, with the norm
    weights moved off their initial 1s and 0s; equal to the loop (which Llama's float32
    normalization holds to about 1e-7 in float64)."""
    torch.manual_seed(0)
    model = from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    x, y = _batch(31)
    why = _check(model, "causal_lm", x, y, K).explain()
    norms = [n for n in why if n.endswith("norm.weight")]
    assert len(norms) == 5 and all(why[n].startswith("ghost (hf_rms_norm rule on ") for n in norms), why
    assert all(v.startswith("ghost") for v in why.values()), why
    if config is GEMMA:
        assert why["model.embed_tokens.weight"].startswith("ghost (scaled_embedding rule on model.embed_tokens: ")
        assert "tied, exact cross term" in why["model.embed_tokens.weight"]


def test_gpt2_cross_term_matters():
    """Without the tied cross term GPT-2's norms are wrong: the check above can fail."""
    from gradscore.engines import ghost
    torch.manual_seed(0)
    model = from_config(GPT2).double()
    x, y = _batch(31)
    full = gs.Scorer(model, "causal_lm", engine="ghost").score_batch(x, y).sq_norm
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ghost._BatchSums, "add_cross_terms", lambda self: None)
        dropped = gs.Scorer(model, "causal_lm", engine="ghost").score_batch(x, y).sq_norm
    assert (full - dropped).abs().min() > 1e-6 * full.abs().max()


@pytest.mark.parametrize("K", [0, 2])
def test_bert_sequence_classifier_ghost_equals_loop(K):
    torch.manual_seed(0)
    model = from_config(BERT, task="sequence_classification")
    x, _ = _batch(29)
    y = torch.tensor([0, 2, 1, 1, 0])
    scorer = _check(model, "cross_entropy", x, y, K)
    assert all(v.startswith("ghost") for v in scorer.explain().values())


def test_mean_and_sum_reductions():
    torch.manual_seed(0)
    model = from_config(GPT2).double().eval()
    x, y = _batch(31)
    n_tok = (y[:, 1:] != -100).sum(1).double()
    mean = gs.Scorer(model, causal_lm("mean"), engine="ghost").score_batch(x, y)
    total = gs.Scorer(model, causal_lm("sum"), engine="ghost").score_batch(x, y)
    torch.testing.assert_close(total.loss, mean.loss * n_tok)
    torch.testing.assert_close(total.sq_norm, mean.sq_norm * n_tok ** 2)


@pytest.mark.parametrize("engine", ["ghost", "loop"])
def test_all_ignored_example_has_zero_loss_and_gradient(engine):
    torch.manual_seed(0)
    model = from_config(GPT2).double().eval()
    x, y = _batch(31)
    y[2] = -100
    out = gs.Scorer(model, "causal_lm", engine=engine).score_batch(x, y, refs=torch.ones(1, sum(
        p.numel() for p in model.parameters()), dtype=torch.float64))
    assert torch.isfinite(out.sq_norm).all() and torch.isfinite(out.dots).all()
    assert out.loss[2] == 0 and out.sq_norm[2] == 0 and out.dots[2, 0] == 0
    assert (out.sq_norm[[0, 1, 3, 4]] > 0).all()


def test_vmap_refusal_is_one_clear_error():
    """Data-dependent control flow (as in attention-mask code) cannot be vmapped."""
    from torch import nn

    class MaskCheck(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x) if bool((x > -10).all()) else self.lin(-x)

    with pytest.raises(gs.GradscoreError, match="vmap cannot trace this model.*engine='auto'"):
        gs.Scorer(MaskCheck().eval(), engine="vmap").score_batch(torch.randn(3, 4), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("use", ["mul", "matmul"])
def test_shared_row_used_otherwise_takes_the_free_rule_or_falls_back(use):
    """A batch-broadcast output that is not simply added to batch rows: multiplied with
    them, or a (1, T, 4) stack of matrices that matmul broadcasts over the batch (it went
    to vmap, with the layer's reason, before that use was taken), the free-parameter rule
    takes the embedding's weight (through its backward)."""
    from torch import nn

    class PosSelect(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 3)

        def forward(self, ids):
            p = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))   # (1, T, 4)
            h = self.tok(ids)
            return self.head(h * p if use == "mul" else (h @ p.transpose(1, 2)) @ p).mean(1)

    torch.manual_seed(0)
    model = PosSelect().double().eval()
    ids = torch.randint(0, 7, (4, 5))
    y = torch.tensor([0, 1, 2, 1])
    want = gs.Scorer(model, engine="loop").score_batch(ids, y)
    scorer = gs.Scorer(model, engine="ghost")
    got = scorer.score_batch(ids, y)
    torch.testing.assert_close(got.sq_norm, want.sq_norm, rtol=1e-6, atol=1e-12)
    why = scorer.explain()
    assert why["pos.weight"].startswith("ghost (free-parameter rule"), why
    assert why["tok.weight"].startswith("ghost")


def test_tied_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = from_config(GPT2)
    kwargs = {"config": GPT2, "task": "causal_lm"}
    with gs.CheckpointWriter(tmp_path, model_factory="gradscore.integrations.hf:from_config",
                             model_kwargs=kwargs, loss="causal_lm") as w:
        w.save(model, step=0, lr=0.1)
    import h5py
    with h5py.File(tmp_path / "step_00000000.h5") as f:
        assert "lm_head.weight" not in f["buffers"] and "transformer.wte.weight" in f["params"]
    back = gs.CheckpointStore(tmp_path).build_model(0)
    assert back.lm_head.weight is back.transformer.wte.weight
    torch.testing.assert_close(back.transformer.wte.weight, model.transformer.wte.weight)


def test_text_dataset_run_end_to_end(tmp_path):
    """`gradscore run` on an .h5 of input_ids/attention_mask with GPT-2 checkpoints:
    ghost equals the loop, LM labels default to the ids with padding ignored."""
    from gradscore.cli import main
    torch.manual_seed(0)
    model = from_config(GPT2)
    with gs.CheckpointWriter(tmp_path / "ck", model_factory="gradscore.integrations.hf:from_config",
                             model_kwargs={"config": GPT2}, loss="causal_lm") as w:
        w.save(model, step=0, lr=0.1)
        with torch.no_grad():
            model.transformer.wte.weight.mul_(1.1)
        w.save(model, step=1, lr=0.1)
    x, y = _batch(31, B=7)
    gs.save_dataset(tmp_path / "text.h5", {k: v.numpy() for k, v in x.items()}, None)
    from gradscore.reports.info import describe
    assert "7 examples (text)" in describe(tmp_path / "text.h5") and "token ids: 1..30" in describe(tmp_path / "text.h5")
    runs = {}
    for engine in ("ghost", "loop"):
        assert main(["run", "--checkpoints", str(tmp_path / "ck"), "--data", str(tmp_path / "text.h5"),
                     "--out", str(tmp_path / f"{engine}.h5"), "--scores", "loss,grand", "--engine", engine,
                     "--dtype", "float64", "--batch-size", "3", "--quiet"]) == 0
        runs[engine] = gs.load_scores(tmp_path / f"{engine}.h5")
    for k in ("loss", "grand"):
        np_close = torch.testing.assert_close
        np_close(torch.from_numpy(runs["ghost"]["scores"][k]), torch.from_numpy(runs["loop"]["scores"][k]),
                 rtol=1e-6, atol=1e-12)
    labels = y.clone()
    labels[0, 3] = x["input_ids"][0, 3]   # the file has no labels: only padding is ignored
    want = gs.Scorer(gs.CheckpointStore(tmp_path / "ck").build_model(0, dtype=torch.float64), "causal_lm",
                     engine="loop").score_batch(x, labels).loss
    torch.testing.assert_close(torch.from_numpy(runs["loop"]["per_checkpoint"]["loss"][0]), want)
    # --lm-reduction sum: long documents weigh more
    assert main(["run", "--checkpoints", str(tmp_path / "ck"), "--data", str(tmp_path / "text.h5"),
                 "--out", str(tmp_path / "sum.h5"), "--scores", "loss", "--lm-reduction", "sum",
                 "--dtype", "float64", "--quiet"]) == 0
    n_tok = (labels[:, 1:] != -100).sum(1).double()
    torch.testing.assert_close(torch.from_numpy(gs.load_scores(tmp_path / "sum.h5")["per_checkpoint"]["loss"][0]),
                               want * n_tok)
    # checkpoints written with the sum loss are scored by it; run's default took the mean
    with gs.CheckpointWriter(tmp_path / "cksum", model_factory="gradscore.integrations.hf:from_config",
                             model_kwargs={"config": GPT2}, loss="causal_lm_sum") as w:
        w.save(gs.CheckpointStore(tmp_path / "ck").build_model(0), step=0, lr=0.1)
    for extra, reduced in (([], want * n_tok), (["--lm-reduction", "mean"], want)):
        out = tmp_path / f"cksum{len(extra)}.h5"
        assert main(["run", "--checkpoints", str(tmp_path / "cksum"), "--data", str(tmp_path / "text.h5"),
                     "--out", str(out), "--scores", "loss", "--dtype", "float64", "--quiet", *extra]) == 0
        torch.testing.assert_close(torch.from_numpy(gs.load_scores(out)["per_checkpoint"]["loss"][0]), reduced)


def _masked(vocab, B=5, T=9):
    """_batch's tokens with a third of the positions masked (token 1 in the inputs): the
    labels are their tokens, −100 elsewhere (and at padding)."""
    x, labels = _batch(vocab, B, T)
    masked = ((torch.arange(T) + torch.arange(B)[:, None]) % 3 == 0) & (x["attention_mask"] == 1)
    return {**x, "input_ids": x["input_ids"].masked_fill(masked, 1)}, x["input_ids"].masked_fill(~masked, -100)


@pytest.mark.parametrize("K", [0, 2])
def test_a_masked_lm_is_scored_by_its_own_loss(K):
    """The task 'masked_lm' had no loss: causal_lm ran on it without a word, scoring each
    position's guess of the next position's label. masked_lm is the model's own loss on
    each example alone, and ghost equals the loop (the head's bias, which it holds for its
    decoder, by the decoder's rule)."""
    torch.manual_seed(0)
    model = from_config(BERT, task="masked_lm")
    x, y = _masked(29)
    scorer = _check(model, "masked_lm", x, y, K)
    assert all(v.startswith("ghost") for v in scorer.explain().values()), scorer.explain()
    got = scorer.score_batch(x, y)
    own = torch.stack([model(**{k: v[b:b + 1] for k, v in x.items()}, labels=y[b:b + 1]).loss for b in range(5)])
    torch.testing.assert_close(got.loss, own.detach(), rtol=1e-12, atol=0)
    n_masked = (y != -100).sum(1).double()
    total = gs.Scorer(model, gs.masked_lm("sum")).score_batch(x, y)
    torch.testing.assert_close(total.loss, got.loss * n_masked)
    torch.testing.assert_close(total.sq_norm, got.sq_norm * n_masked ** 2)
    assert gs.resolve_loss("masked_lm", "sum").name == "masked_lm_sum"


@pytest.mark.parametrize("head, loss, fix", [("masked_lm", "causal_lm", "masked_lm"),
                                             ("masked_lm", "causal_lm_sum", "masked_lm_sum"),
                                             ("causal_lm", "masked_lm", "causal_lm"),
                                             ("causal_lm", "cross_entropy", "causal_lm"),
                                             ("masked_lm", "nll", "masked_lm")])
def test_a_token_loss_that_does_not_score_what_the_head_predicts_is_refused(tmp_path, head, loss, fix):
    """Either runs: every number would be of a task the model was not trained for. The
    Scorer, the recorder, the Trainer callback and a CheckpointWriter's first save refuse
    it, naming the loss to use; the callback's default loss is the task's."""
    from gradscore.integrations.hf_trainer import GradscoreCallback
    model = from_config(BERT if head == "masked_lm" else GPT2, task=head)
    with pytest.raises(gs.ConfigError, match=f"use loss '{fix}'$"):
        with gs.CheckpointWriter(tmp_path / "w", model_factory="gradscore.integrations.hf:from_config",
                                 model_kwargs={"config": BERT if head == "masked_lm" else GPT2, "task": head},
                                 loss=loss) as w:
            w.save(model, step=0, lr=0.1)
    assert not list(tmp_path.glob("w/*.h5"))
    with pytest.raises(gs.ConfigError, match=f"'{loss}' does not score what .* predicts.*use loss '{fix}'$"):
        gs.Scorer(model, loss)
    with pytest.raises(gs.ConfigError, match=f"use loss '{fix}'$"):
        gs.InRun(model.train(), loss=loss, out=tmp_path / "r.h5")
    with pytest.raises(gs.ConfigError, match=f"use loss '{fix}'$"):
        GradscoreCallback.for_model(str(tmp_path / "ck"), model, task=head, loss=loss)
    assert not (tmp_path / "r.h5").exists() and not (tmp_path / "ck").exists()
    assert GradscoreCallback.for_model(str(tmp_path / "ck"), model, task=head).writer.loss == head


def test_an_encoder_decoder_given_its_labels_is_scored_by_masked_lm(tmp_path):
    """BART called as Hugging Face trains it, model(input_ids=…, labels=…): it shifts the
    labels right into its decoder's inputs, so its logits are aligned with them. causal_lm
    ran on it without a word, shifting them once more; masked_lm is its own loss on each
    example alone (ghost, equal to the loop), and causal_lm is refused, naming the fix."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM
    torch.manual_seed(0)
    config = AutoConfig.for_model("bart", vocab_size=31, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                                  decoder_ffn_dim=24, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0)
    model = AutoModelForSeq2SeqLM.from_config(config).double().eval()
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(3, 31, (5, 6), generator=g)
    labels[1, 4:] = -100
    x = {"input_ids": torch.randint(3, 31, (5, 8), generator=g), "labels": labels}
    own = torch.stack([model(**{k: v[b:b + 1] for k, v in x.items()}).loss for b in range(5)]).detach()
    scorer = gs.Scorer(model, "masked_lm")
    got = scorer.score_batch(x, labels)
    torch.testing.assert_close(got.loss, own, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.sq_norm, gs.Scorer(model, "masked_lm", engine="loop").score_batch(x, labels).sq_norm,
                               rtol=1e-9, atol=0)
    assert all(v.startswith("ghost") for v in scorer.explain().values())
    with pytest.raises(gs.ConfigError, match=r"'causal_lm' does not score what BartForConditionalGeneration .*labels "
                                             r"shifted right into its decoder's inputs.*use loss 'masked_lm'$"):
        gs.Scorer(model, "causal_lm")
    with pytest.raises(gs.ConfigError, match="use loss 'masked_lm'$"):
        gs.InRun(model.train(), loss="causal_lm", out=tmp_path / "r.h5")


def test_a_masked_lm_run_end_to_end(tmp_path, capsys):
    """`gradscore run` on a masked LM's checkpoints equals the loop; a text file without
    labels (which would score every visible token) is one line naming the field."""
    from gradscore.cli import main
    torch.manual_seed(0)
    with gs.CheckpointWriter(tmp_path / "ck", model_factory="gradscore.integrations.hf:from_config",
                             model_kwargs={"config": BERT, "task": "masked_lm"}, loss="masked_lm") as w:
        w.save(from_config(BERT, task="masked_lm"), step=0, lr=0.1)
    x, y = _masked(29, B=7)
    gs.save_dataset(tmp_path / "mlm.h5", {**{k: v.numpy() for k, v in x.items()}, "labels": y.numpy()}, None)
    gs.save_dataset(tmp_path / "ids.h5", {k: v.numpy() for k, v in x.items()}, None)
    assert main(["run", "--checkpoints", str(tmp_path / "ck"), "--data", str(tmp_path / "mlm.h5"), "--out",
                 str(tmp_path / "s.h5"), "--scores", "loss,grand", "--dtype", "float64", "--quiet"]) == 0
    want = gs.Scorer(gs.CheckpointStore(tmp_path / "ck").build_model(0, dtype=torch.float64), "masked_lm",
                     engine="loop").score_batch(x, y)
    got = gs.load_scores(tmp_path / "s.h5")["per_checkpoint"]
    torch.testing.assert_close(torch.from_numpy(got["loss"][0]), want.loss)
    torch.testing.assert_close(torch.from_numpy(got["sq_grad_norm"][0]), want.sq_norm, rtol=1e-9, atol=0)
    capsys.readouterr()
    assert main(["run", "--checkpoints", str(tmp_path / "ck"), "--data", str(tmp_path / "ids.h5"), "--out",
                 str(tmp_path / "t.h5"), "--scores", "loss", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no field 'labels'" in err and "masked LM" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "t.h5").exists()


def test_lm_reduction_of_checkpoints_without_a_token_loss_is_refused(tiny_run, tmp_path, capsys):
    """`--lm-reduction sum` on a classifier's checkpoints was dropped without a word."""
    from gradscore.cli import main
    ckpts, data = tiny_run
    for argv in (["run", "--data", str(data), "--scores", "loss"], ["costate", "--proxy", str(data), "--target",
                                                                      str(data)]):
        assert main([*argv, "--checkpoints", str(ckpts), "--lm-reduction", "sum", "--out", str(tmp_path / "x.h5"),
                     "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert "--lm-reduction applies to causal_lm and masked_lm checkpoints" in err and "cross_entropy" in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.h5").exists(), err


def test_class_scores_refused_for_lm_and_bad_token_ids(tmp_path, capsys):
    from gradscore.cli import main
    model = from_config(GPT2)
    with gs.CheckpointWriter(tmp_path / "ck", model_factory="gradscore.integrations.hf:from_config",
                             model_kwargs={"config": GPT2}, loss="causal_lm") as w:
        w.save(model, step=0, lr=0.1)
    x, y = _batch(31)
    gs.save_dataset(tmp_path / "text.h5", {k: v.numpy() for k, v in x.items()}, None)
    args = ["run", "--checkpoints", str(tmp_path / "ck"), "--data", str(tmp_path / "text.h5"), "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a.h5"), "--scores", "el2n,loss"]) == 2
    assert "el2n needs class probabilities" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "d.h5")]) == 0   # the default scores fit the loss
    assert sorted(gs.load_scores(tmp_path / "d.h5")["scores"]) == ["grand", "loss"]
    y[2, 4] = 40   # beyond the vocabulary of 31
    gs.save_dataset(tmp_path / "bad.h5", {k: v.numpy() for k, v in x.items()}, y.numpy())
    args[args.index(str(tmp_path / "text.h5"))] = str(tmp_path / "bad.h5")
    assert main(args + ["--out", str(tmp_path / "b.h5"), "--scores", "loss"]) == 2
    err = capsys.readouterr().err
    assert "bad.h5: field 'labels' has label 40 at index 2" in err and err.count("\n") == 1


@pytest.mark.slow   # a demo; test_text_dataset_run_end_to_end keeps the LM path in the default set
def test_lm_demo_fast_mode(tmp_path):
    from gradscore.demos.lm import run_lm_demo
    lines = []
    summary = run_lm_demo(tmp_path / "lm", n_docs=48, n_target=16, seq_len=24, warmup_epochs=1, steps=2,
                          progress=False, echo=lines.append)
    res = gs.load_scores(tmp_path / "lm" / "scores.h5")
    assert res["noisy"].sum() == summary["n_noisy"] == 10
    for k in ("loss", "grand", "target_dot", "target_cos", "pds"):
        assert res["scores"][k].shape == (48,) and np.isfinite(res["scores"][k]).all()
    assert set(summary["auroc"]) == {"all", "shuffled", "random"}
    assert any("norm inflation" in ln for ln in lines)
    assert (tmp_path / "lm" / "diagnosis" / "diagnosis.json").exists()


def test_demo_lm_without_transformers_is_one_line(monkeypatch, capsys, tmp_path):
    from gradscore.cli import main
    from gradscore.integrations import hf

    def missing():
        raise gs.CheckpointError("this model needs Hugging Face transformers: pip install 'gradscore[hf]'")
    monkeypatch.setattr(hf, "require_transformers", missing)
    assert main(["demo", "--lm", "--out", str(tmp_path / "d"), "--docs", "20", "--quiet"]) == 2
    assert "pip install 'gradscore[hf]'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()   # refused before anything was written
