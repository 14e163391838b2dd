"""Hugging Face model families built from config (no download), against the per-example
loop in float64: causal LMs, sequence classifiers, masked LMs and image classifiers.

For each family, on a batch with padding, a repeated token and an ignored label (images:
random pixels): ``auto`` (the ghost engine) equals the loop (K = 0 and 2 references), and
on the model in float32 is as close to the float64 loop as the float32 loop is
(``helpers``). In training, the in-run recorder's records equal the loop at θ_t (those of
:data:`SAMPLED_IN_TRAINING` sum to the step's gradient); the families in
:data:`REFUSED_IN_RUN`, and only they, are refused with the error it names.
A family the installed transformers does not know is skipped with that reason. The fast
set is five families (Mistral, OPT, RoBERTa, ViT, ConvNeXt; RoBERTa as a classifier and as a masked LM); GPT-2,
BERT, Llama, Qwen2 and Gemma are ``test_text.py``'s; the rest are ``slow``.
"""
from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import torch

import gradscore as gs
from helpers import check_float32

tf = pytest.importorskip("transformers")   # in the test extra; absent only in a bare install
from gradscore.integrations.hf import from_config  # noqa: E402
from gradscore.losses import resolve_loss  # noqa: E402

VOCAB = 37
TEXT = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2}
#: dropout off (a step's records are for its own dropout mask, which a loop cannot redraw)
NO_DROPOUT = dict.fromkeys(["hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout",
                            "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                            "activation_dropout", "classifier_dropout", "classifier_dropout_prob", "seq_classif_dropout",
                            "resid_dropout", "embedding_dropout", "dropout_rate", "drop_path_rate"], 0.0)
GQA = {"num_key_value_heads": 1}
CAUSAL_LM = {
    "mistral": GQA, "phi": {}, "phi3": GQA, "gpt_neox": {}, "opt": {"ffn_dim": 24, "word_embed_proj_dim": 16},
    "bloom": {"n_layer": 2, "n_head": 2}, "falcon": {},
    "gptj": {"n_embd": 16, "n_layer": 2, "n_head": 2, "rotary_dim": 4, "n_positions": 32},
    "codegen": {"n_embd": 16, "n_layer": 2, "n_head": 2, "rotary_dim": 4, "n_positions": 32, "n_ctx": 32},
    "stablelm": GQA, "olmo": {}, "olmo2": {}, "gemma2": {**GQA, "head_dim": 8}, "qwen3": {**GQA, "head_dim": 8},
    "starcoder2": GQA, "gpt_bigcode": {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32},
    "gpt_neo": {"num_layers": 2, "attention_types": [[["global", "local"], 1]], "window_size": 4},
    "biogpt": {}, "cohere": GQA, "granite": GQA, "persimmon": {}, "mpt": {"d_model": 16, "n_heads": 2,
                                                                          "n_layers": 2, "max_seq_len": 32},
    "smollm3": GQA, "glm": {**GQA, "head_dim": 8}, "helium": {**GQA, "head_dim": 8},
    "gemma3_text": {**GQA, "head_dim": 8, "sliding_window": 4}, "nemotron": GQA,
    # mixtures of experts: the experts' float32-only grouped matmul swapped for their loop
    "mixtral": {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2, "experts_implementation": "eager"},
    "qwen2_moe": {**GQA, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                  "shared_expert_intermediate_size": 8, "experts_implementation": "eager"},
    # its router, a Linear subclass returning a tuple, takes the free-parameter rule
    "phimoe": {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2, "experts_implementation": "eager"},
    "gpt_oss": {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8, "sliding_window": 4,
                "layer_types": ["full_attention", "sliding_attention"], "experts_implementation": "eager"},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8, "n_group": 1,
                    "topk_group": 1, "first_k_dense_replace": 1, "kv_lora_rank": 8, "q_lora_rank": 8,
                    "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "n_shared_experts": 1,
                    "experts_implementation": "eager"},
    # state space and recurrent: Mamba's selective scan, RWKV with its cache off (in eval mode
    # it updates its state in place, which a backward refuses); hybrids of attention, Mamba and experts
    "mamba": {"state_size": 4, "expand": 2, "conv_kernel": 3},
    "mamba2": {"state_size": 4, "expand": 2, "conv_kernel": 3, "head_dim": 8, "n_groups": 1, "num_heads": 4,
               "chunk_size": 4},
    "jamba": {**GQA, "num_experts": 4, "num_experts_per_tok": 2, "mamba_d_state": 4, "mamba_dt_rank": 4,
              "expert_layer_period": 1, "expert_layer_offset": 0, "attn_layer_period": 2, "attn_layer_offset": 1,
              "use_mamba_kernels": False, "experts_implementation": "eager"},
    "qwen3_next": {**GQA, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                   "shared_expert_intermediate_size": 8, "head_dim": 8, "linear_num_value_heads": 2,
                   "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                   "linear_conv_kernel_dim": 3, "layer_types": ["linear_attention", "full_attention"],
                   "experts_implementation": "eager"},
    "granitemoehybrid": {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2, "mamba_d_state": 4,
                         "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_expand": 2, "mamba_chunk_size": 4,
                         "layer_types": ["mamba", "attention"], "mamba_n_groups": 1,
                         "experts_implementation": "eager"},
    "lfm2": {**GQA, "layer_types": ["conv", "full_attention"]},
    "nemotron_h": {**GQA, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                   "hybrid_override_pattern": "*E", "n_groups": 1, "moe_shared_expert_intermediate_size": 8,
                   "experts_implementation": "eager"},
    "rwkv": {"attention_hidden_size": 16, "context_length": 32, "use_cache": False},
}
SEQUENCE_CLASSIFICATION = {
    "roberta": {}, "distilbert": {"dim": 16, "hidden_dim": 24, "n_layers": 2, "n_heads": 2},
    "albert": {"embedding_size": 8}, "electra": {}, "xlm-roberta": {}, "camembert": {}, "megatron-bert": {},
    "ernie": {}, "nystromformer": {}, "roformer": {"embedding_size": 16}, "mpnet": {},
    "squeezebert": {"embedding_size": 16}, "convbert": {"embedding_size": 16},
    "mobilebert": {"embedding_size": 8, "intra_bottleneck_size": 16, "true_hidden_size": 16,
                   "num_feedforward_networks": 1},
    "deberta": {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 8},
    "deberta-v2": {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 8},
}
#: masked language models: the labels are the masked positions' tokens (the masked_lm loss)
MASKED_LM = {
    "bert": {}, "roberta": {}, "distilbert": SEQUENCE_CLASSIFICATION["distilbert"],
    "albert": SEQUENCE_CLASSIFICATION["albert"], "electra": {}, "mpnet": {},
    "modernbert": {"layer_types": ["full_attention", "sliding_attention"], "local_attention": 4,
                   "cls_token_id": 1, "sep_token_id": 2},
}
IMAGE = {"num_labels": 3, "image_size": 16, "num_channels": 3}
IMAGE_CLASSIFICATION = {
    "vit": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
            "patch_size": 4},
    "beit": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
             "patch_size": 4, "use_relative_position_bias": True},
    "dinov2": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 4},
    "convnext": {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2},
    "convnextv2": {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2},
    "resnet": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"},
    "regnet": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "groups_width": 4},
    "swin": {"embed_dim": 8, "depths": [1, 1], "num_heads": [2, 2], "window_size": 2, "patch_size": 2},
    "swinv2": {"embed_dim": 8, "depths": [1, 1], "num_heads": [2, 2], "window_size": 2, "patch_size": 2},
    "mobilenet_v2": {"depth_multiplier": 0.25},
    "mobilevit": {"hidden_sizes": [16, 16, 16], "neck_hidden_sizes": [8, 8, 16, 16, 16, 16, 32], "patch_size": 2},
    "poolformer": {"hidden_sizes": [8, 16, 16, 16], "depths": [1, 1, 1, 1]},
    "focalnet": {"embed_dim": 8, "depths": [1, 1], "hidden_sizes": [8, 16]},
    "bit": {"embedding_size": 8, "hidden_sizes": [8, 16, 16, 16], "depths": [1, 1, 1, 1],
            "layer_type": "bottleneck", "num_groups": 2},
}
#: families the in-run recorder refuses, and why (a part of the error): a parameter without
#: a rule (used by an op of its module's own forward, not by a layer), or train-mode BatchNorm
NO_RULE, BATCH_NORM = "needs a ghost rule for every trainable parameter", "is in training mode"
REFUSED_IN_RUN = {
    "squeezebert": NO_RULE,    # a LayerNorm over the channels of (B, C, T)
    "resnet": BATCH_NORM, "regnet": BATCH_NORM, "mobilenet_v2": BATCH_NORM, "mobilevit": BATCH_NORM,
}
#: the loss's rtol for families whose Mamba scan computes in float32 whatever the model's dtype: an
#: example's loss alone and in its batch differ by float32's rounding
SCAN_IN_FLOAT32 = dict.fromkeys(["mamba", "mamba2", "nemotron_h"], 1e-6)
#: families whose training forward draws each token's experts at random (PhiMoE's Gumbel sampling): a loop
#: cannot redraw a step's choices, so their records are checked to sum to the step's own gradient's dot
SAMPLED_IN_TRAINING = {"phimoe"}
FAST = {"mistral", "opt", "roberta", "vit", "convnext"}
TASKS = {"causal_lm": CAUSAL_LM, "sequence_classification": SEQUENCE_CLASSIFICATION, "masked_lm": MASKED_LM,
         "image_classification": IMAGE_CLASSIFICATION}
CASES = [pytest.param(task, name, id=f"{task}-{name}",
                      marks=() if name in FAST else pytest.mark.slow)
         for task, families in TASKS.items() for name in families]


def build(task: str, name: str, train: bool = False) -> torch.nn.Module:
    """The family's model from its config in float64, or a skip where the installed
    transformers does not know the family."""
    if name not in tf.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {tf.__version__} has no '{name}' model")
    torch.manual_seed(0)
    config = {"model_type": name, **(IMAGE if task == "image_classification" else {**TEXT, "num_labels": 3}),
              **NO_DROPOUT, **TASKS[task][name]}
    model = from_config(config, task=task).double()
    return model.train() if train else model


def batch(task: str, B: int = 5, T: int = 9) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs and targets: tokens with two padded examples, a repeated token and (LM) an
    ignored label; or images of the config's size."""
    g = torch.Generator().manual_seed(0)
    if task == "image_classification":
        x = {"pixel_values": torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64)}
        return x, torch.randint(0, 3, (B,), generator=g)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    ids[:, 5] = ids[:, 2]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    ids[mask == 0] = 0
    if task == "causal_lm":
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, 3] = -100
    elif task == "masked_lm":   # a third of the positions masked (token 3 in the inputs), the rest ignored
        masked = ((torch.arange(T) + torch.arange(B)[:, None]) % 3 == 0) & (mask == 1)
        labels = ids.masked_fill(~masked, -100)
        ids = ids.masked_fill(masked, 3)
    else:
        labels = torch.randint(0, 3, (B,), generator=g)
    return {"input_ids": ids, "attention_mask": mask}, labels


def loss_of(task: str) -> str:
    return task if task in ("causal_lm", "masked_lm") else "cross_entropy"


@pytest.mark.parametrize("task, name", CASES)
def test_a_family_is_scored_as_the_loop_scores_it(task, name):
    model = build(task, name).eval()
    x, y = batch(task)
    loop = gs.Scorer(model, loss_of(task), engine="loop")
    V = torch.randn(2, loop.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for K in (0, 2):
        want = loop.score_batch(x, y, refs=V[:K] if K else None)
        got = gs.Scorer(model, loss_of(task)).score_batch(x, y, refs=V[:K] if K else None)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=1e-12)
        # LlamaRMSNorm and its copies normalize in float32 whatever the model's dtype
        torch.testing.assert_close(got.sq_norm, want.sq_norm, rtol=1e-7, atol=0)
        if K:
            torch.testing.assert_close(got.dots, want.dots, rtol=1e-7, atol=1e-7 * float(want.dots.abs().max()))
    check_float32(model, x, y, None, V, want, f"{name} in float32", loss_of(task))


@pytest.mark.parametrize("task, name", CASES)
def test_a_family_in_training_is_recorded_as_the_loop_scores_it(tmp_path, task, name):
    """One training step through the model's own loss (Hugging Face's token mean for an
    LM, its mean cross-entropy for a classifier), with a target of two examples; or the
    refusal :data:`REFUSED_IN_RUN` names."""
    model = build(task, name, train=True)
    x, y = batch(task, B=6)
    first = {k: v[:4] for k, v in x.items()}
    target = ({k: v[4:] for k, v in x.items()}, y[4:])
    before = copy.deepcopy(model)
    try:
        rec = gs.InRun(model, loss=loss_of(task), out=tmp_path / "r.h5", targets=target)
        with rec.step(range(4), y[:4], lr=0.1):
            model(**first, labels=y[:4]).loss.backward()
        rec.close()
    except gs.GradscoreError as e:
        assert name in REFUSED_IN_RUN and REFUSED_IN_RUN[name] in str(e), f"{name} was recorded before: {e}"
        return
    assert name not in REFUSED_IN_RUN, f"{name} is recorded now: take it out of REFUSED_IN_RUN"
    with h5py.File(tmp_path / "r.h5") as f:
        rows = {k: f["inrun"][k][()] for k in f["inrun"]}
    per_example = resolve_loss(loss_of(task)).fn   # ℓ_b (B,): an LM's token mean, a classifier's cross-entropy

    def loss(m, inputs, labels):
        return per_example(m(**inputs).logits, labels)
    params = [p for p in before.parameters() if p.requires_grad]   # RoFormer's sinusoidal table is frozen
    gJ = torch.autograd.grad(loss(before.eval(), *target).mean(), params, allow_unused=True)
    if name in SAMPLED_IN_TRAINING:   # Σ_b ⟨∇L_b, ∇J⟩ = ⟨∇L, ∇J⟩, ∇L the step's .grad
        step = [p.grad for p in model.parameters() if p.requires_grad]
        dot = sum(float((gi * gj).sum()) for gi, gj in zip(step, gJ) if gi is not None and gj is not None)
        np.testing.assert_allclose(rows["dot"].sum(), dot, rtol=1e-6)
        assert np.all(rows["sq_norm"] > 0)
        return
    before.train()
    for b in range(4):
        lb = loss(before, {k: v[b:b + 1] for k, v in x.items()}, y[b:b + 1])[0]
        g = torch.autograd.grad(lb, params, allow_unused=True)
        sq = sum(float((gi ** 2).sum()) for gi in g if gi is not None)
        dot = sum(float((gi * gj).sum()) for gi, gj in zip(g, gJ) if gi is not None and gj is not None)
        np.testing.assert_allclose(rows["loss"][b], lb.item(), rtol=SCAN_IN_FLOAT32.get(name, 1e-10))
        # Hugging Face's loss runs in float32 (logits.float()): the share it gives each
        # example, read from its output gradient, is exact to float32's rounding
        np.testing.assert_allclose(rows["sq_norm"][b], sq, rtol=1e-5)
        np.testing.assert_allclose(rows["dot"][b] / rows["share"][b], dot, rtol=1e-5,
                                   atol=1e-5 * np.sqrt(sq) * rows["target_norm"][b])


#: DeBERTa-v3's configuration: its query and key projections also project the relative position
#: embeddings (normalized by the encoder's LayerNorm), bucketed
DEBERTA_V3 = {**SEQUENCE_CLASSIFICATION["deberta-v2"], "share_att_key": True, "norm_rel_ebd": "layer_norm",
              "position_buckets": 4}


def test_deberta_v3_is_ghost_throughout_and_scored_and_recorded_as_the_loop(monkeypatch, tmp_path):
    """DeBERTa-v2's disentangled attention repeats its position keys and queries, (heads, 2k,
    d) made of the relative position embeddings, over the batch (``.repeat(B, 1, 1)``) for a
    ``torch.bmm`` with each example's queries and keys. In DeBERTa-v3's configuration the
    attention's own query and key projections make them, so those weights, the embeddings
    and the LayerNorm (11 parameters of this 2-layer model) went to vmap on checkpoints and
    the recorder refused the model. Each takes the free-parameter rule now, and equals the
    loop on checkpoints and in training."""
    monkeypatch.setitem(SEQUENCE_CLASSIFICATION, "deberta-v2", DEBERTA_V3)
    model = build("sequence_classification", "deberta-v2")
    assert model.config.share_att_key
    scorer = gs.Scorer(model.eval(), engine="auto")
    scorer.score_batch(*batch("sequence_classification"))
    why = scorer.explain()
    assert all(v.startswith("ghost") for v in why.values()), {k: v for k, v in why.items() if not v.startswith("ghost")}
    assert why["deberta.encoder.layer.0.attention.self.key_proj.weight"].startswith("ghost (free-parameter rule"), why
    test_a_family_is_scored_as_the_loop_scores_it("sequence_classification", "deberta-v2")
    test_a_family_in_training_is_recorded_as_the_loop_scores_it(tmp_path, "sequence_classification", "deberta-v2")


def test_deberta_v3_trains_bit_identically_with_the_recorder(monkeypatch, tmp_path):
    """The recorder probes the repeated position keys and queries as they are and runs
    their backward per example within the step's: three Adam steps in float32 leave every
    parameter bit for bit what it is without it."""
    monkeypatch.setitem(SEQUENCE_CLASSIFICATION, "deberta-v2", DEBERTA_V3)
    x, y = batch("sequence_classification", B=10)

    def train(rec=None):
        model = build("sequence_classification", "deberta-v2", train=True).float()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for step in range(3):
            part = slice(2 * step, 2 * step + 4)
            inputs = {k: v[part] for k, v in x.items()}
            if rec is None:
                model(**inputs, labels=y[part]).loss.backward()
            else:
                with rec(model).step(range(part.start, part.stop), y[part], lr=0.01, step=step):
                    model(**inputs, labels=y[part]).loss.backward()
            opt.step()
            opt.zero_grad()
        return model
    recorders = []

    def recorder(model):
        if not recorders:
            recorders.append(gs.InRun(model, out=tmp_path / "r.h5", targets=({k: v[8:] for k, v in x.items()}, y[8:])))
        return recorders[0]
    plain, recorded = train(), train(recorder)
    recorders[0].close()
    for (n, a), (_, b) in zip(plain.state_dict().items(), recorded.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name, layer, rule", [("opt", "model.decoder.embed_positions", "own_embedding"),
                                              ("opt", "model.decoder.layers.0.fc1", "linear"),
                                              ("biogpt", "biogpt.embed_positions", "own_embedding")])
def test_hugging_face_text_layers_of_their_own_take_a_rule(name, layer, rule):
    """OPT's and BioGPT's learned position embeddings (an Embedding subclass that computes
    its positions itself) and OPT's MLP, which calls its Linears and LayerNorm on (B·T, d)
    rows, went to vmap, and in training the recorder refused both models. Each takes its
    rule now (the records: the test above)."""
    model = build("causal_lm", name)
    x, y = batch("causal_lm")
    scorer = gs.Scorer(model, "causal_lm", engine="auto")
    scorer.score_batch(x, y)
    why = scorer.explain()
    assert all(v.startswith("ghost") for v in why.values()), {k: v for k, v in why.items() if not v.startswith("ghost")}
    assert why[f"{layer}.weight"].startswith(f"ghost ({rule} rule"), why[f"{layer}.weight"]


@pytest.mark.parametrize("name, layer, rule", [
    ("convnext", "convnext.embeddings.layernorm", "norm_act"),
    ("convnextv2", "convnextv2.embeddings.layernorm", "norm_act"),
    ("bit", "bit.embedder.convolution", "std_conv"), ("bit", "bit.embedder.norm", "norm_act")])
def test_hugging_face_layers_of_their_own_take_a_rule(name, layer, rule):
    """Layers that compute what a rule assumes under names of their own went to vmap, and in
    training the recorder refused their models: ConvNeXt's LayerNorm with
    ``data_format="channels_first"`` (taken for one over the last dimension), BiT's
    ``WeightStandardizedConv2d`` and its GroupNorm with an ``activation``. Each takes its
    rule now, checked on the first batch (the records: the test above)."""
    model = build("image_classification", name)
    x, y = batch("image_classification")
    scorer = gs.Scorer(model, engine="auto")
    scorer.score_batch(x, y)
    why = scorer.explain()
    assert all(v.startswith("ghost") for v in why.values()), {k: v for k, v in why.items() if not v.startswith("ghost")}
    assert why[f"{layer}.weight"].startswith(f"ghost ({rule} rule"), why[f"{layer}.weight"]


SEQ2SEQ = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
           "decoder_attention_heads": 2, "encoder_ffn_dim": 24, "decoder_ffn_dim": 24, "max_position_embeddings": 32,
           "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2}


class Seq2Seq(torch.nn.Module):
    """An encoder-decoder LM on x = (source tokens | decoder input tokens): its logits."""

    def __init__(self, model: torch.nn.Module, source: int) -> None:
        super().__init__()
        self.model, self.source = model, source

    def forward(self, x):
        return self.model(input_ids=x[:, :self.source], decoder_input_ids=x[:, self.source:]).logits


T5 = {"d_model": 16, "d_kv": 8, "d_ff": 24, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
      "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16, "pad_token_id": 0,
      "eos_token_id": 2, "decoder_start_token_id": 0}
#: encoder-decoder families: their config and the rtol of ‖g‖² (T5's RMSNorm takes its mean square in float32)
ENCODER_DECODER = {"bart": (SEQ2SEQ, 1e-9), "mbart": (SEQ2SEQ, 1e-9), "marian": (SEQ2SEQ, 1e-9),
                   "pegasus": (SEQ2SEQ, 1e-9), "t5": (T5, 1e-7), "mt5": (T5, 1e-7), "umt5": (T5, 1e-7),
                   "longt5": (T5, 1e-7)}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in ("bart", "t5") else pytest.mark.slow)
                                  for n in ENCODER_DECODER])
def test_an_encoder_decoder_takes_ghost_rules_and_is_recorded_as_the_loop(tmp_path, name):
    """BART, mBART, Marian and Pegasus keep their vocabulary in a ``shared`` embedding that is
    never called (the encoder's and decoder's embeddings and the LM head hold its weight),
    and BART's and mBART's position embeddings compute their positions: both went to vmap,
    and the recorder refused these models. T5 and its copies add a relative attention bias:
    an Embedding of the (T, T) offsets, one for the batch, added to every example's scores
    (the free-parameter rule, through the embedding's backward). Every parameter takes a
    ghost rule now; one training step's records equal the loop at θ_t."""
    if name not in tf.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {tf.__version__} has no '{name}' model")
    torch.manual_seed(0)
    kwargs, rtol = ENCODER_DECODER[name]
    config = tf.AutoConfig.for_model(name, vocab_size=VOCAB, **kwargs, **NO_DROPOUT)
    model = Seq2Seq(tf.AutoModelForSeq2SeqLM.from_config(config), 7).double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, VOCAB, (6, 12), generator=g)
    y = x[:, 7:]
    loss = resolve_loss("causal_lm").fn
    scorer = gs.Scorer(model, "causal_lm")
    got = scorer.score_batch(x, y)
    torch.testing.assert_close(got.sq_norm, gs.Scorer(model, "causal_lm", engine="loop").score_batch(x, y).sq_norm,
                               rtol=rtol, atol=0)
    assert all(v.startswith("ghost") for v in scorer.explain().values()), scorer.explain()
    before = copy.deepcopy(model)
    rec = gs.InRun(model.train(), loss="causal_lm", out=tmp_path / "r.h5", targets=(x[4:], y[4:]))
    with rec.step(range(4), y[:4], lr=0.1):
        loss(model(x[:4]), y[:4]).mean().backward()
    rec.close()
    with h5py.File(tmp_path / "r.h5") as f:
        rows = {k: f["inrun"][k][()] for k in f["inrun"]}
    params = [p for p in before.parameters() if p.requires_grad]
    gJ = torch.autograd.grad(loss(before(x[4:]), y[4:]).mean(), params, allow_unused=True)
    for b in range(4):
        g_b = torch.autograd.grad(loss(before(x[b:b + 1]), y[b:b + 1])[0], params, allow_unused=True)
        np.testing.assert_allclose(rows["sq_norm"][b], sum(float((gi ** 2).sum()) for gi in g_b if gi is not None),
                                   rtol=rtol)
        np.testing.assert_allclose(rows["dot"][b] / rows["share"][b],
                                   sum(float((gi * gj).sum()) for gi, gj in zip(g_b, gJ)
                                       if gi is not None and gj is not None), rtol=1e-7, atol=1e-12)


class _Audio(torch.nn.Module):
    """An audio classifier called on raw waveforms (B, L): its logits."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_values=x).logits


def _layerdrop_model(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    """A float64 model of family ``name`` with LayerDrop 0.5 (each step skips each layer with
    probability 0.5), a batch x, y of 12 examples and its per-example loss's name."""
    drop = {"attention_dropout": 0.0, "activation_dropout": 0.0}
    if name == "wav2vec2":
        config = tf.AutoConfig.for_model(name, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                         intermediate_size=24, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                                         num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, num_labels=3,
                                         classifier_proj_size=8, layerdrop=0.5, hidden_dropout=0.0,
                                         feat_proj_dropout=0.0, final_dropout=0.0, mask_time_prob=0.0, **drop)
        model = _Audio(tf.AutoModelForAudioClassification.from_config(config))
        g = torch.Generator().manual_seed(0)
        return model.double(), torch.randn(12, 200, generator=g), torch.randint(0, 3, (12,), generator=g), \
            "cross_entropy"
    config = tf.AutoConfig.for_model(name, vocab_size=VOCAB, **{**SEQ2SEQ, "encoder_layers": 3, "decoder_layers": 3},
                                     encoder_layerdrop=0.5, decoder_layerdrop=0.5, dropout=0.0, **drop)
    model = Seq2Seq(tf.AutoModelForSeq2SeqLM.from_config(config), 7)
    x = torch.randint(3, VOCAB, (12, 12), generator=torch.Generator().manual_seed(0))
    return model.double(), x, x[:, 7:], "causal_lm"


@pytest.mark.parametrize("name", ["bart", pytest.param("m2m_100", marks=pytest.mark.slow),
                                  pytest.param("wav2vec2", marks=pytest.mark.slow)])
def test_layers_that_layerdrop_skips_are_recorded_as_the_loop_scores_them(tmp_path, name):
    """LayerDrop skips whole layers in a training step (M2M100's default 0.05, wav2vec2's
    0.1); the recorder refused such a step before ("was not called"). With 0.5, over three
    steps: some layers are skipped, none leaves its ghost rule, and every example's loss,
    ‖∇ℓ_b‖² and dot with the target equal the loop at θ_t, run from the step's random state
    (so each example skips what its step skipped)."""
    from gradscore.io.store import load_inrun_rows
    if name not in tf.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {tf.__version__} has no '{name}' model")
    torch.manual_seed(0)
    model, x, y, loss_name = _layerdrop_model(name)
    x = x.double() if x.is_floating_point() else x
    loss = resolve_loss(loss_name).fn
    layers = [m for n, m in model.named_modules() if n.split(".")[-2:-1] == ["layers"]]
    calls = [0]
    for m in layers:
        m.register_forward_pre_hook(lambda mod, _: calls.__setitem__(0, calls[0] + mod.training))   # the step's
    target = (x[8:], y[8:])
    rec = gs.InRun(model.train(), loss=loss_name, out=tmp_path / "r.h5", targets=target)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    for t in range(3):
        idx = torch.arange(4) + 4 * (t % 2)
        steps.append((copy.deepcopy(model), torch.get_rng_state(), idx))
        with rec.step(idx, y[idx], lr=0.1):
            loss(model(x[idx]), y[idx]).mean().backward()
        opt.step()
        opt.zero_grad()
    assert 0 < calls[0] < 3 * len(layers), (calls, len(layers))   # some skipped
    assert not rec.engine.fallback, rec.engine.fallback
    rows = load_inrun_rows(rec.close())
    for t, (before, state, idx) in enumerate(steps):
        at = rows["step"] == t
        params = [p for p in before.parameters() if p.requires_grad]
        gJ = torch.autograd.grad(loss(before.eval()(target[0]), target[1]).mean(), params, allow_unused=True)
        before.train()
        for b, i in enumerate(idx.tolist()):
            torch.set_rng_state(state)   # the step's draws: the same layers skipped
            lb = loss(before(x[i:i + 1]), y[i:i + 1])[0]
            g = torch.autograd.grad(lb, params, allow_unused=True)
            sq = sum(float((gi ** 2).sum()) for gi in g if gi is not None)
            dot = sum(float((gi * gj).sum()) for gi, gj in zip(g, gJ) if gi is not None and gj is not None)
            np.testing.assert_allclose(rows["loss"][at][b], lb.item(), rtol=1e-10)
            np.testing.assert_allclose(rows["sq_norm"][at][b], sq, rtol=1e-9)
            np.testing.assert_allclose(rows["dot"][at][b] / rows["share"][at][b], dot, rtol=1e-8, atol=1e-14)
