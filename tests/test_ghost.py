"""Ghost engine against the per-example autograd loop (float64, K = 0, 1, 3): the model cases,
the chain per parameter and its fallbacks. Convolutions: test_ghost_conv.py; tied weights:
test_ghost_tied.py; every family's option grid: test_families.py."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune

import gradscore as gs
from helpers import GHOST_CASES, check_random_inrun, compare_with_loop, ghost_case


@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("name", GHOST_CASES)
def test_ghost_equals_loop(name, K):
    scorer = compare_with_loop(*ghost_case(name), K)
    assert scorer.engine_name == "ghost"
    assert all(v.startswith("ghost") for v in scorer.explain().values()), scorer.explain()


class _Slope(nn.Module):
    """A leaky slope of its own (F.prelu in its forward): a class no ghost rule knows."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((1,), 0.25))

    def forward(self, x):
        return F.prelu(x, self.weight)


class _BiasKV(nn.Module):
    """Self-attention by a MultiheadAttention with ``add_bias_kv`` (no rule takes it), a
    ``_Slope``, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True)
        self.slope, self.head = _Slope(), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.slope(self.mha(x, x, x, need_weights=False)[0]).flatten(1))


class _PooledTokens(nn.Module):
    """A bias-free linear map of each token, averaged over the tokens: a Gram-form layer."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 512, bias=False)

    def forward(self, x):
        return self.proj(x).mean(1)


@pytest.mark.parametrize("engine", ["ghost", "auto"])
def test_tokens_whose_gradients_cancel_score_as_the_float64_loop(engine):
    """Tokens v, −v, v, −v(1 + 10⁻⁵) of size 100: each example's float32 ‖g_b‖² within 10⁻⁴
    of the float64 loop's (the Gram form gave 0.0078 or −0.0039 for 4.6·10⁻⁶, the float32
    loop 3·10⁻⁴ off), so no GraNd is NaN or noise."""
    torch.manual_seed(0)
    model = _PooledTokens().eval()
    v = torch.randn(8, 1, 64) * 100
    x, y = torch.cat([v, -v, v, -v * (1 + 1e-5)], 1), torch.randint(0, 512, (8,))
    got = gs.Scorer(model, "cross_entropy", engine=engine).score_batch(x, y).sq_norm
    want = gs.Scorer(model.double(), "cross_entropy", engine="loop").score_batch(x.double(), y).sq_norm
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


def test_auto_is_the_chain_per_parameter():
    """auto: a ghost rule where one applies, the fallback for exactly the other parameters.
    ``engine="ghost"`` names the same engine (the other tests run ``auto`` alone)."""
    model, _ = ghost_case("transformer")
    assert gs.Scorer(model.eval()).engine_name == "ghost"
    assert type(gs.Scorer(model.eval(), engine="ghost").engine) is type(gs.Scorer(model.eval()).engine)
    torch.manual_seed(0)
    scorer = compare_with_loop(nn.Sequential(nn.Linear(3, 3), _Slope(), nn.Linear(3, 3)), torch.randn(5, 3), 2,
                      engine="auto")
    assert scorer.engine_name == "ghost"
    why = scorer.explain()
    assert why["0.weight"].startswith("ghost") and why["2.bias"].startswith("ghost")
    assert why["1.weight"] == "vmap (no ghost rule for _Slope)"


@pytest.mark.parametrize("K", [0, 3])
def test_unsupported_layers_fall_back_to_vmap_and_say_so(K):
    torch.manual_seed(0)
    scorer = compare_with_loop(_BiasKV(), torch.randn(6, 3, 4), K)
    why = scorer.explain()
    assert why["mha.bias_k"] == "vmap (MultiheadAttention with add_bias_kv)"
    assert why["slope.weight"] == "vmap (no ghost rule for _Slope)"
    assert why["head.weight"].startswith("ghost (linear rule on head: Linear)")


@pytest.mark.parametrize("K", [0, 2])
def test_torch_transformer_layer_is_ghost_throughout(K):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                       batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 5, 3))
    scorer = compare_with_loop(model, torch.randn(4, 5, 8), K)
    why = scorer.explain()
    assert why["0.self_attn.in_proj_weight"].startswith("ghost (attention rule on 0.self_attn")
    assert why["0.self_attn.out_proj.weight"].startswith("ghost (attention rule")  # used functionally by MHA
    assert why["0.linear1.weight"].startswith("ghost") and why["0.norm1.weight"].startswith("ghost")


class _QKVBias(nn.Module):
    """BEiT's and EVA's attention input: a Linear not called, whose weight its parent uses in
    ``F.linear(x, qkv.weight, cat(q_bias, zeros, v_bias))``; ``cat``: the bias made of two
    parameters, else ``qkv.bias`` itself."""

    def __init__(self, cat: bool, d: int = 4) -> None:
        super().__init__()
        self.cat = cat
        self.qkv, self.head = nn.Linear(d, 3 * d, bias=not cat), nn.Linear(3 * d, 3)
        if cat:
            self.q_bias, self.v_bias = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
            self.register_buffer("k_bias", torch.zeros(d), persistent=False)

    def forward(self, x):
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias)) if self.cat else self.qkv.bias
        return self.head(torch.tanh(nn.functional.linear(x, self.qkv.weight, bias)).mean(1))


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("T", [1, 3, 5])
@pytest.mark.parametrize("cat", [False, True])
def test_a_linear_its_parent_calls_functionally_takes_the_free_rule(cat, T, K):
    """A Linear whose weight its parent uses in F.linear, the layer itself never called,
    with its own bias or one concatenated from two parameters (vmap before): the
    free-parameter rule, equal to the loop, T == B too."""
    torch.manual_seed(0)
    why = compare_with_loop(_QKVBias(cat), torch.randn(5, T, 4), K).explain()
    assert all(v.startswith("ghost") for v in why.values()), why
    free = ["qkv.weight"] + (["q_bias", "v_bias"] if cat else ["qkv.bias"])
    assert all(why[n].startswith("ghost (free-parameter rule") for n in free), why


class _EinsumWeight(nn.Module):
    """A Linear not called, whose weight its parent uses in torch.einsum with the output's
    indices in another order than the rows' and then the weight's (not a product the rule takes)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.einsum("btd,od->bot", x, self.lin.weight).transpose(1, 2)
        return self.head(torch.tanh(h + self.lin.bias).mean(1))


@pytest.mark.parametrize("K", [0, 2])
def test_a_linear_its_parent_uses_otherwise_falls_back_with_why(K):
    torch.manual_seed(0)
    why = compare_with_loop(_EinsumWeight(), torch.randn(5, 3, 4), K).explain()
    assert why["lin.weight"].startswith("vmap (Linear 'lin' was not called; its parameters are used by another "
                                        "module; as a free parameter it is made by einsum into a tensor whose "
                                        "shape follows the batch's"), why
    assert why["lin.bias"].startswith("ghost (free-parameter rule") and why["head.weight"].startswith("ghost"), why


@pytest.mark.parametrize("K", [0, 2])
def test_a_weight_whose_one_op_is_a_product_is_scored_without_its_per_example_gradients(monkeypatch, K):
    """qkv.weight's one op is F.linear: its norms and dots take the Linear rule's forms on
    the rows and δ, never the (B, d_out · d_in) gradients (the concatenated bias's are formed)."""
    import gradscore.engines.free as free

    def boom(*a, **k):
        raise AssertionError("per-example gradient of a product's weight materialized")
    monkeypatch.setattr(free, "_weight_grads", boom)
    torch.manual_seed(0)
    compare_with_loop(_QKVBias(cat=True), torch.randn(5, 3, 4), K)


@pytest.mark.parametrize("cat", [False, True])
def test_a_linear_its_parent_calls_functionally_is_recorded_in_training_as_the_loop_scores_it(tmp_path, cat):
    """The same model in training, through the recorder (refused before): every record
    equals the loop at the step's θ_t."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 3, 4, dtype=torch.float64), torch.arange(12) % 3
    assert check_random_inrun(_QKVBias(cat).double(), x, y, 3, tmp_path / "r.h5")


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_a_compiled_or_data_parallel_model_is_scored_as_the_model_inside(wrap):
    """A model given through torch.compile's wrapper ran the engine's hooks under dynamo (31
    lines of graph-break warnings and seconds of compiling, for a 3-layer MLP) and named its
    parameters ``_orig_mod.*``; DataParallel's would split the batch over GPUs. The Scorer
    scores the module inside, under its own names, with the same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    scorer = gs.Scorer(wrapped, params="2.*")
    assert scorer.model is model and list(scorer.explain()) == ["2.weight", "2.bias"]
    want = gs.Scorer(model, engine="loop", params="2.*").score_batch(x, y, refs=[dict(model.named_parameters())])
    got = scorer.score_batch(x, y, refs=[dict(wrapped.named_parameters())])   # keyed by the wrapper's names
    torch.testing.assert_close(got.sq_norm, want.sq_norm, rtol=1e-10, atol=0)
    torch.testing.assert_close(got.dots, want.dots, rtol=1e-10, atol=0)
    prefix = "_orig_mod." if wrap == "compile" else "module."   # the wrapper's names pick them too
    assert gs.Scorer(wrapped, params=f"{prefix}2.*").param_names == ["2.weight", "2.bias"]
    assert gs.Projection.for_model(wrapped, scorer.param_names, 9).spec == gs.Projection.for_model(
        model, scorer.param_names, 9).spec


def test_frozen_layers_and_param_patterns():
    model, x = ghost_case("mlp_inplace_relu")
    model[0].weight.requires_grad_(False)
    scorer = compare_with_loop(model, x, 2)
    assert "0.weight" not in scorer.explain() and "0.bias" in scorer.explain()
    last = compare_with_loop(model, x, 2, params=["4.*"])
    assert list(last.explain()) == ["4.weight", "4.bias"]
    with pytest.raises(gs.EngineError, match="matches no parameter"):
        gs.Scorer(model, params=["head.*"])


def _reparametrized(layer: str, how: str) -> tuple[nn.Module, torch.Tensor]:
    """A small model whose first layer's weight is recomputed from parameters of other
    names: in a forward pre-hook by legacy ``weight_norm`` (weight_g, weight_v) or ``prune``
    (weight_orig and a mask), or by ``parametrizations.weight_norm`` (original0, original1,
    of a submodule)."""
    torch.manual_seed(0)
    first, rest, x = {
        "linear": (nn.Linear(4, 5), [nn.Tanh(), nn.Linear(5, 3)], torch.randn(6, 4)),
        "conv": (nn.Conv2d(2, 3, 3, padding=1), [nn.Flatten(), nn.Linear(3 * 4 * 4, 3)], torch.randn(6, 2, 4, 4)),
        "embedding": (nn.Embedding(10, 4), [nn.Flatten(), nn.Linear(4 * 5, 3)], torch.randint(0, 10, (6, 5))),
    }[layer]
    if how == "weight_norm":
        with warnings.catch_warnings():   # deprecated in favour of parametrizations, still in wide use
            warnings.simplefilter("ignore", FutureWarning)
            nn.utils.weight_norm(first)
    elif how == "parametrizations":
        nn.utils.parametrizations.weight_norm(first)
    else:
        prune.random_unstructured(first, "weight", amount=0.4)
    return nn.Sequential(first, *rest), x


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("how", ["weight_norm", "prune", "parametrizations"])
@pytest.mark.parametrize("layer", ["linear", "conv", "embedding"])
def test_a_weight_recomputed_from_other_parameters_takes_the_free_rule_where_it_follows_them(layer, how, K):
    """A rule knows the gradient of the parameters its layer defines (``weight``, ``bias``);
    weight_g, weight_v or weight_orig, from which a pre-hook makes ``weight``, take the
    free-parameter rule, which follows them into the layer's F.linear or F.conv2d (vmap
    before); into F.embedding, a lookup it does not take, they go to the fallback with both
    reasons. The scores equal the loop's."""
    model, x = _reparametrized(layer, how)
    why = compare_with_loop(model, x, K).explain()
    names = {"weight_norm": ["0.weight_g", "0.weight_v"], "prune": ["0.weight_orig"],
             "parametrizations": ["0.parametrizations.weight.original0", "0.parametrizations.weight.original1"]}[how]
    assert {n for n in why if n.startswith("0.")} == set(names + (["0.bias"] if layer != "embedding" else []))
    for n in names:
        if layer == "embedding":
            assert why[n].startswith("vmap (" if how == "parametrizations" else
                                     f"vmap ('{n[2:]}' is not a parameter of Embedding"), why[n]
            assert "; as a free parameter it is made by embedding" in why[n], why[n]
        else:
            assert why[n] == "ghost (free-parameter rule: per example in each use)", why[n]
    assert layer == "embedding" or why["0.bias"].startswith("ghost"), why["0.bias"]


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("layer, how", [("linear", "spectral_norm"), ("linear", "orthogonal"),
                                        ("linear", "weight_norm"), ("conv", "spectral_norm"), ("conv", "weight_norm")])
def test_a_weight_of_two_rows_made_of_parameters_alone_is_not_taken_for_the_batch(layer, how, K):
    """``parametrizations.spectral_norm`` makes W / σ(W): an op whose operands are all made of
    the layer's parameters, its result as many rows as W. For a layer of 2 outputs that is
    the layout's batch of 2 copies, and the op was taken for a use over the batch that W's
    own rows do not fit: the weight went to vmap (in training, refused). An op of the
    parameters alone makes a tensor, whatever its rows. The scores equal the loop's."""
    torch.manual_seed(0)
    P = nn.utils.parametrizations
    first, x = ((nn.Linear(4, 2), torch.randn(6, 4)) if layer == "linear" else
                (nn.Conv1d(3, 2, 3, padding=1), torch.randn(6, 3, 5)))
    getattr(P, how)(first)
    model = nn.Sequential(first, nn.Tanh(), nn.Flatten(), nn.Linear(2 if layer == "linear" else 10, 3))
    why = compare_with_loop(model, x, K).explain()
    assert all(v.startswith("ghost") for v in why.values()), why


class _BufferOfTheBatchsSize(nn.Module):
    """A parameter of the model's own added to a tensor that a buffer makes at the batch's
    size (``buf.new_zeros(B, d)``): a use over the batch, though every operand of the add
    comes from the model's own tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.shift = nn.Parameter(torch.linspace(-1, 1, 5))
        self.register_buffer("base", torch.ones(5))

    def forward(self, x):
        offset = self.shift + self.base.new_zeros(len(x), 5)
        return self.head(torch.tanh(self.lin(x) + offset))


@pytest.mark.parametrize("K", [0, 2])
def test_a_parameter_added_to_a_buffers_tensor_of_the_batchs_size_is_a_use(K):
    """Only a tensor no larger than the model's own tensors it is made of is taken to have
    no rows of the batch: the add is a use of the parameter, which the free-parameter rule
    takes, equal to the loop."""
    why = compare_with_loop(_BufferOfTheBatchsSize(), torch.randn(6, 4), K).explain()
    assert why["shift"] == "ghost (free-parameter rule: per example in each use)", why


@pytest.mark.parametrize("K", [0, 2])
def test_a_users_forward_hook_that_changes_a_layers_output(K):
    """A forward hook the user registered before scoring may return a new output (o·2,
    o + c): a rule's δ must be the gradient of the layer's own output, before that hook."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.Tanh(),
                          nn.Linear(5, 3))
    model[0].register_forward_hook(lambda mod, args, out: out * 2 + 1)
    model[2].register_forward_hook(lambda mod, args, out: torch.tanh(out))
    why = compare_with_loop(model, torch.randn(6, 2, 4, 4), K).explain()
    assert all(v.startswith("ghost") for v in why.values()), why


def test_a_forward_replaced_on_the_instance_falls_back():
    """``layer.forward = ...`` on one instance: its rule assumes the class's forward, so its
    parameters go to the fallback, named, and the scores equal the loop's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    first = model[0]
    first.forward = lambda x: nn.functional.linear(x, first.weight * 2, first.bias)
    why = compare_with_loop(model, torch.randn(6, 4), 2).explain()
    assert why["0.weight"] == "vmap (Linear has its forward replaced on the instance, which its rule cannot see)", why
    assert why["2.weight"].startswith("ghost")


def test_accelerates_device_hooks_keep_the_rules():
    """Accelerate's hooks (``device_map``, offloading) replace ``forward`` on the instance
    with a wrapper that moves tensors and calls the class's forward: the rules still apply."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    for m in (model[0], model[2]):
        add_hook_to_module(m, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    why = compare_with_loop(model, torch.randn(6, 4), 2).explain()
    assert all(v.startswith("ghost") for v in why.values()), why


class _FunctionalHead(nn.Module):
    """An embedding whose weight is also the output layer, used functionally (h @ Eᵀ), as
    many language models tie their head; and a Linear whose weight is used once more
    outside its own call."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, ids):
        h = torch.tanh(self.fc(self.emb(ids))).mean(1)
        return self.head(h) + h @ self.emb.weight.T[:, :3] + nn.functional.linear(h, self.fc.weight)[:, :3]


@pytest.mark.parametrize("K", [0, 2])
def test_a_weight_used_outside_its_layer_falls_back(K):
    """A rule sees its layer's own calls only: a weight also used outside them (a tied head
    written h @ E.T, F.linear(h, fc.weight)) goes to the fallback, named with the op, and the
    scores equal the loop's; the layers' other parameters keep their rules."""
    torch.manual_seed(0)
    why = compare_with_loop(_FunctionalHead(), torch.randint(0, 10, (6, 5)), K).explain()
    assert why["emb.weight"].startswith("vmap (used outside Embedding 'emb' (by .T)"), why["emb.weight"]
    assert why["fc.weight"].startswith("vmap (used outside Linear 'fc' (by linear)"), why["fc.weight"]
    assert why["fc.bias"].startswith("ghost") and why["head.weight"].startswith("ghost"), why


class _SkippedOnSomeBatches(nn.Module):
    """A block that a batch skips as a whole by what it holds (``skip``: ``"not"`` calls
    nothing, ``"linear"`` uses the block's weight in ``F.linear`` outside its call)."""

    def __init__(self, skip: str) -> None:
        super().__init__()
        self.skip, self.block, self.head = skip, nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            x = x + torch.tanh(self.block(x))
        elif self.skip == "linear":
            x = x + F.linear(x, self.block.weight)
        return self.head(x)


@pytest.mark.parametrize("skip", ["not", "linear"])
@pytest.mark.parametrize("first", ["calls", "skips"])
@pytest.mark.parametrize("K", [0, 2])
def test_a_layer_a_batch_does_not_call(skip, first, K):
    """A layer that some batches do not call. Laid out on the first batch and not called on a
    later one: where nothing reaches its parameters, its share of that batch is nothing and
    it keeps its rule for the batches after (it went to the fallback for good); where its
    weight is used otherwise on that batch, that weight goes to the fallback. Not called on
    the first batch, nor its weight used: laid out on the first batch that calls it (it went
    to the fallback); its weight used there, but not its bias: both go to the fallback on the
    batch that calls it. Every batch equals the loop."""
    torch.manual_seed(0)
    model = _SkippedOnSomeBatches(skip).double().eval()
    scorer, ref = gs.Scorer(model), gs.Scorer(model, engine="loop")
    x, y = torch.randn(6, 4, dtype=torch.float64).abs(), torch.randint(0, 3, (6,))
    V = torch.randn(K, ref.num_params, dtype=torch.float64) if K else None
    for batch in ((x, -x, x) if first == "calls" else (-x, x, -x, x)):
        got, want = scorer.score_batch(batch, y, refs=V), ref.score_batch(batch, y, refs=V)
        torch.testing.assert_close(got.sq_norm, want.sq_norm, rtol=1e-10, atol=0)
        if K:
            torch.testing.assert_close(got.dots, want.dots, rtol=1e-10, atol=1e-14)
    why = scorer.explain()
    if skip == "not":
        assert all(v.startswith("ghost") for v in why.values()), why
        assert why["block.weight"] == "ghost (linear rule on block: Linear)"
    elif first == "calls":
        assert "(Linear 'block' was not called; its parameters are used by another module" in why["block.weight"]
    else:
        assert "is used by linear on a later batch, not on the first" in why["block.bias"], why


@pytest.mark.parametrize("training", [False, True])
def test_instance_norm_with_running_stats_normalizes_as_its_mode_does(training):
    """InstanceNorm with ``track_running_stats`` normalizes by its running statistics in
    eval mode only, by each example's own in training mode: the rule follows the mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
                          nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double().train(training)
    model[1].running_mean.fill_(0.3)
    model[1].running_var.fill_(2.0)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y = torch.arange(5) % 3
    V = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    ref = gs.Scorer(model, engine="loop").score_batch(x, y, refs=V)
    got = gs.Scorer(model, engine="ghost").score_batch(x, y, refs=V)
    torch.testing.assert_close(got.sq_norm, ref.sq_norm, rtol=1e-9, atol=0)
    torch.testing.assert_close(got.dots, ref.dots, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["attention", "lstm"])
def test_dropout_inside_a_layer_is_refused_in_training_mode(kind):
    """Attention dropout and an LSTM's dropout between layers randomize examples in training
    mode, as Dropout modules do: scoring refuses them with the fix, model.eval()."""
    from gradscore.demos.models import recurrent_classifier
    torch.manual_seed(0)
    model = recurrent_classifier(kind="GRU", attention=True) if kind == "attention" else \
        recurrent_classifier(kind="LSTM", layers=2)
    (model.attn if kind == "attention" else model.rnn).dropout = 0.3
    ids, y = torch.randint(0, 1000, (4, 6)), torch.randint(0, 2, (4,))
    with pytest.raises(gs.EngineError, match="in training mode, which couples or randomizes examples; call "
                                             "model.eval"):
        gs.Scorer(model.train()).score_batch(ids, y)
    assert gs.Scorer(model.eval()).score_batch(ids, y).sq_norm.isfinite().all()


def test_a_positional_embedding_without_batch_dim_takes_the_free_rule():
    """An Embedding of arange(T): one output for the whole batch, added to each example's
    tokens. Its rule has no batch rows (it went to vmap); the free-parameter rule takes
    its weight through the embedding's backward."""
    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, 3)

        def forward(self, ids):
            return self.head((self.tok(ids) + self.pos(torch.arange(ids.shape[1]))).mean(1))

    torch.manual_seed(0)
    scorer = compare_with_loop(Pos(), torch.randint(0, 9, (5, 6)), 2)
    assert scorer.explain()["pos.weight"].startswith("ghost (free-parameter rule"), scorer.explain()


def test_mlp_norms_never_materialize_per_example_gradients(monkeypatch):
    import gradscore.kernels.ghost_linear as gl

    def boom(*a, **k):
        raise AssertionError("per-example gradient materialized")
    monkeypatch.setattr(gl, "_outer", boom)
    model, x = ghost_case("mlp_inplace_relu")
    compare_with_loop(model, x, 0)   # T = 1: the Gram form, ‖δ‖²‖a‖², never g_b
    compare_with_loop(model, x, 1)   # and dots by projecting a through V


def test_loss_must_be_per_example():
    model = nn.Linear(3, 2).eval()
    with pytest.raises(gs.EngineError, match=r"one loss per example, shape \(4,\): reduction='none'"):
        gs.Scorer(model, loss=lambda out, y: nn.functional.cross_entropy(out, y),
                  engine="ghost").score_batch(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))


class SquareThenBump(nn.Module):
    """y = lin(x); y·y saves y for its backward, then y is changed in place."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        sq = h * h
        h.add_(1.0)
        return self.head(sq + h)


def test_probe_hands_on_the_layers_output_without_a_copy():
    model = nn.Sequential(nn.Linear(4, 3), nn.Identity(), nn.Linear(3, 2)).eval()
    ptrs = []
    model[0].register_forward_hook(lambda m, i, out: ptrs.append(out.data_ptr()))   # before the engine's
    model[1].register_forward_hook(lambda m, i, out: ptrs.append(out.data_ptr()))   # what the network got
    scorer = gs.Scorer(model, engine="ghost")
    scorer.score_batch(torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1]))   # layout runs, the first-batch check
    before = len(ptrs)
    scorer.score_batch(torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1]))
    assert len(ptrs) == before + 2 and ptrs[-2] == ptrs[-1]


def test_an_in_place_change_of_a_saved_output_is_caught_as_without_the_engine():
    model = SquareThenBump().eval()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(gs.GradscoreError, match="modified by an inplace operation"):   # torch's error, one line
        gs.Scorer(model, engine="ghost").score_batch(x, y)


class QKV(nn.Module):
    """Three projections of one hidden state (a transformer's q, k, v), one of another."""

    def __init__(self, d=8):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 3)

    def forward(self, x):                        # x (B, T, 3)
        h = torch.tanh(self.inp(x))
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2), -1) @ self.v(h)
        return self.head(self.o(att).mean(1))


class QKVSeqFirst(QKV):
    """QKV run sequence-first: every layer's input is (T, B, ·), its batch in dimension 1."""

    def forward(self, x):                        # x (B, T, 3)
        h = torch.tanh(self.inp(x.transpose(0, 1)))
        q, k, v = (f(h).transpose(0, 1) for f in (self.q, self.k, self.v))
        att = (torch.softmax(q @ k.transpose(1, 2), -1) @ v).transpose(0, 1)
        return self.head(self.o(att).mean(0))


@pytest.fixture
def formed(monkeypatch) -> list:
    """The shapes (B, T, d) of the input Grams a batch forms (SharedGrams.gram's computations)."""
    from gradscore.kernels import ghost_linear as gl
    shapes: list = []
    plain = gl.SharedGrams.gram

    def counting(self, a, compute):
        return plain(self, a, lambda: shapes.append(tuple(a.shape)) or compute())
    monkeypatch.setattr(gl.SharedGrams, "gram", counting)
    return shapes


@pytest.mark.parametrize("T,d", [(4, 8), (64, 96)])
@pytest.mark.parametrize("layout", ["batch_first", "seq_first_T_eq_B"])
@pytest.mark.parametrize("K", [0, 2])
def test_layers_reading_one_input_form_its_gram_once(formed, K, layout, T, d):
    """q, k and v read one h: its Gram h hᵀ is formed once per batch and shared (at T = 4,
    d = 8 the Gram form wins only with it; at T = 64 it is formed in blocks), and every norm
    still equals the loop, also sequence-first with T == B (the batch moved to dimension 0
    of a view)."""
    torch.manual_seed(0)
    B = 5 if layout == "batch_first" else T                     # sequence-first: T == B
    model = (QKV if layout == "batch_first" else QKVSeqFirst)(d)
    x, shared = torch.randn(B, T, 3, dtype=torch.float64), (B, T, d)
    y = torch.arange(B) % 3
    scorer = gs.Scorer(model.double().eval(), engine="ghost")
    scorer.score_batch(x, y)     # the first batch lays out the layers
    formed.clear()
    compare_with_loop(model, x, K)
    from gradscore.kernels.ghost_linear import plan
    assert plan(T, d, d, 0) == "outer" and plan(T, d, d, 0, readers=3) == "gram"
    if K == 0:
        assert formed.count(shared) == 1, formed   # h hᵀ once for q, k and v


class SelfAttention(nn.Module):
    """nn.MultiheadAttention on one h for query, key and value (d = 8, 2 heads)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.inp, self.head = nn.Linear(3, 8), nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x):                        # x (B, T, 3)
        h = torch.tanh(self.inp(x if self.batch_first else x.transpose(0, 1)))
        out = self.attn(h, h, h, need_weights=False)[0]
        return self.head(out.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("K", [0, 2])
def test_multihead_attention_forms_its_inputs_gram_once_for_q_k_and_v(formed, K, batch_first):
    """The attention rule's q, k and v projections of one h share its Gram (at T = 4, d = 8
    the Gram form wins only with it), batch-first and sequence-first with T == B, and
    every norm and dot equals the loop."""
    torch.manual_seed(0)
    model, x = SelfAttention(batch_first), torch.randn(4, 4, 3, dtype=torch.float64)   # T == B
    gs.Scorer(model.double().eval(), engine="ghost").score_batch(x, torch.tensor([0, 1, 2, 0]))   # lays out
    formed.clear()
    compare_with_loop(model, x, K)
    if K == 0:
        assert formed == [(4, 4, 8)]   # h hᵀ once for q, k and v


def test_shared_grams_key_by_identity_and_go_after_the_last_reader():
    from gradscore.kernels.ghost_linear import SharedGrams
    shared, a = SharedGrams(), torch.randn(2, 3, 4)
    shared.note(a)
    shared.note(a.view(2, 3, 4))                 # another tensor object, the same data
    assert shared.readers(a) == 2 and shared.readers(a.clone()) == 1   # equal values are not the same input
    first = shared.gram(a, lambda: torch.bmm(a, a.transpose(1, 2)))
    assert shared.gram(a, lambda: pytest.fail("formed twice")) is first
    shared.used(a), shared.used(a)
    assert not shared._entries                  # the Gram and its input go with the last reader
    b = torch.randn(2, 3, 4)
    shared.note(b), shared.note(b)
    b.mul_(2)                                    # an in-place change: not the input the layers read
    assert shared.readers(b) == 1


class MyRMSNorm(nn.Module):
    """An RMSNorm of a user's own, named like Hugging Face's: ``kind`` "plain" computes
    w · x̂; "gated" multiplies by a gate of its input; "idle" holds a weight it never uses."""

    def __init__(self, d: int, kind: str):
        super().__init__()
        self.weight, self.variance_epsilon, self.kind = nn.Parameter(1 + 0.3 * torch.randn(d)), 1e-6, kind

    def forward(self, x):
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.kind == "idle":
            return x_hat
        return self.weight * x_hat * (torch.sigmoid(x.mean(-1, keepdim=True)) if self.kind == "gated" else 1)


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("kind", ["plain", "gated", "idle"])
def test_a_layer_named_like_an_rms_norm_takes_its_rule_only_if_it_computes_one(kind, K):
    """The structural rule is checked on the first batch with another weight: a gated or
    an idle layer of that name is a layer without a rule (the free-parameter rule follows
    its weight), and every engine equals the loop."""
    torch.manual_seed(0)
    model = _Pooled(nn.Sequential(nn.Linear(5, 6), MyRMSNorm(6, kind), nn.Tanh(), nn.Linear(6, 3)))
    why = compare_with_loop(model, torch.randn(7, 4, 5), K).explain()
    if kind == "plain":
        assert why["net.1.weight"] == "ghost (hf_rms_norm rule on net.1: MyRMSNorm)", why
    else:
        assert why["net.1.weight"] == "ghost (free-parameter rule: per example in each use)", why


class MyScaledWordEmbedding(nn.Embedding):
    """An Embedding subclass named like Gemma's: "plain" scales its rows by embed_scale;
    "squared" by its square, which the rule its name suggests does not assume."""

    def __init__(self, kind: str):
        super().__init__(9, 6, padding_idx=0)
        self.embed_scale, self.kind = torch.tensor(2.5), kind

    def forward(self, ids):
        return super().forward(ids) * (self.embed_scale if self.kind == "plain" else self.embed_scale ** 2)


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("kind", ["plain", "squared"])
def test_a_scaled_embedding_takes_its_rule_only_if_it_computes_one(kind, K):
    torch.manual_seed(0)
    model = _Pooled(nn.Sequential(MyScaledWordEmbedding(kind), nn.Tanh(), nn.Linear(6, 3)))
    ids = torch.randint(0, 9, (7, 5), generator=torch.Generator().manual_seed(0))
    why = compare_with_loop(model, ids, K).explain()
    if kind == "plain":
        assert why["net.0.weight"] == "ghost (scaled_embedding rule on net.0: MyScaledWordEmbedding)", why
    else:
        # nor does the free-parameter rule take a lookup (F.embedding) of the weight: both reasons
        assert why["net.0.weight"].startswith("vmap (MyScaledWordEmbedding 'net.0' does not compute embed_scale"), why
        assert "; as a free parameter it is made by embedding into a tensor" in why["net.0.weight"], why


class _Pooled(nn.Module):
    """A sequence model's output, averaged over the positions."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).mean(1)


class _PaddedEncoder(nn.Module):
    """torch's encoder with a padding mask and nested tensors: without gradients, in eval
    mode, it takes a fused path on nested tensors that never calls its Linear layers."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.emb, self.head = nn.Embedding(9, d), nn.Linear(d, 3)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)

    def forward(self, ids):
        pad = ids == 0
        return self.head(self.enc(self.emb(ids), src_key_padding_mask=pad).masked_fill(pad[..., None], 0).sum(1))


@pytest.mark.parametrize("K", [0, 2])
def test_an_encoder_with_nested_tensors_is_laid_out_on_the_scoring_path(K):
    """The layout's runs keep gradients on, as the scoring pass does: the row order check
    without them met nested tensors (torch's fused path) and raised."""
    ids = torch.randint(1, 9, (5, 7), generator=torch.Generator().manual_seed(0))
    ids[1, 4:] = 0
    ids[4, 2:] = 0
    why = compare_with_loop(_PaddedEncoder(), ids, K).explain()
    assert all(v.startswith("ghost") for v in why.values()), why


@pytest.mark.parametrize("B,T", [(0, 3), (3, 0), (1, 1), (4, 4), (5, 9)])
@pytest.mark.parametrize("form", ["by_rows", "by_pairs"])
def test_embedding_sq_norms_equal_each_examples_dense_gradient(B, T, form):
    """Both forms of an embedding's ‖g_b‖² (δ's summed by token id on CPU, pairs of equal ids
    elsewhere) against each example's dense gradient (vocabulary, dim) in float64: repeated
    ids, T == B, an empty batch or sequence, int32 ids."""
    from gradscore.engines.rules import embedding
    g = torch.Generator().manual_seed(10 * B + T)
    ids = torch.randint(0, 4, (B, T), generator=g, dtype=torch.int32)   # 4 ids: many repeats
    d = torch.randn(B, T, 3, generator=g, dtype=torch.float64)
    got = getattr(embedding, f"sq_norms_{form}")(ids, d)
    want = torch.stack([torch.zeros(4, 3, dtype=torch.float64).index_add_(0, ids[b].long(), d[b]).pow(2).sum()
                        for b in range(B)]) if B else torch.zeros(0, dtype=torch.float64)
    assert got.shape == (B,)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
