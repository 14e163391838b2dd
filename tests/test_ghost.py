"""Ghost engine against the per-example autograd loop, float64, every rule, K = 0, 1, 3."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import gradscore as gs
from gradscore.demos.models import digits_cnn, tiny_transformer


class NoGradPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x)
        return self.b(torch.tanh(h))


class SharedTwice(nn.Module):
    """One Linear applied twice (tied weights) plus a head."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class Seq1d(nn.Module):
    """Conv1d, GroupNorm, bias-free Linear on (B, T, d) sequences, LayerNorm on 2-D."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.gn = nn.GroupNorm(3, 6)
        self.lin = nn.Linear(6, 5, bias=False)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.gn(self.conv(x)).transpose(1, 2)     # (B, L, 6)
        return self.head(self.ln(self.lin(h).mean(1)))


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.lin = nn.Linear(4, 3)

    def forward(self, ids):
        return self.lin(self.emb(ids)).mean(1)


def _bn_eval():
    m = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.5, 2)
    m[1].weight.data.uniform_(0.5, 1.5)
    return m


def _cnn():
    m = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                      nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
                      nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    m[3].running_var.uniform_(0.5, 2)
    return m


def _case(name):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp_inplace_relu":
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8, bias=False),
                             nn.Tanh(), nn.Linear(8, 3)), torch.randn(7, 6, generator=g)
    if name == "bn_eval":
        return _bn_eval(), torch.randn(7, 6, generator=g)
    if name == "cnn":
        return _cnn(), torch.randn(7, 2, 8, 8, generator=g)
    if name == "digits_cnn":
        return digits_cnn(channels=4, batchnorm=True), torch.randn(7, 1, 8, 8, generator=g)
    if name == "conv1d_groupnorm_seq_linear":
        return Seq1d(), torch.randn(7, 4, 11, generator=g)
    if name == "embedding_repeated_tokens":
        ids = torch.randint(0, 7, (7, 9), generator=g)
        ids[:, 4] = ids[:, 2]
        ids[:, 5] = 0  # padding_idx: no gradient
        return TokenModel(), ids
    if name == "transformer":
        ids = torch.randint(0, 20, (5, 7), generator=g)
        ids[:, 3] = ids[:, 1]
        return tiny_transformer(vocab=20, d=16, heads=2, layers=2, n_classes=3), ids
    if name == "no_grad_region":
        return NoGradPart(), torch.randn(7, 6, generator=g)
    if name == "shared_twice":
        return SharedTwice(), torch.randn(7, 6, generator=g)
    raise KeyError(name)


CASES = ["mlp_inplace_relu", "bn_eval", "cnn", "digits_cnn", "conv1d_groupnorm_seq_linear",
         "embedding_repeated_tokens", "transformer", "no_grad_region", "shared_twice"]


def _compare(model, x, K, engine="ghost", **kw):
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    ref_scorer = gs.Scorer(model, engine="loop", **kw)
    V = torch.randn(K, ref_scorer.num_params, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2)) if K else None
    ref = ref_scorer.score_batch(x, y, refs=V)
    scorer = gs.Scorer(model, engine=engine, **kw)
    out = scorer.score_batch(x, y, refs=V)
    torch.testing.assert_close(out.sq_norm, ref.sq_norm, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
    if K:
        torch.testing.assert_close(out.dots, ref.dots, rtol=1e-6, atol=1e-9)
    else:
        assert out.dots is None
    assert float(ref.sq_norm.max()) > 0
    return scorer


@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("name", CASES)
def test_ghost_equals_loop(name, K):
    scorer = _compare(*_case(name), K)
    assert scorer.engine_name == "ghost"
    assert all(v.startswith("ghost") for v in scorer.explain().values()), scorer.explain()


def test_conv_in_slices_equals_one_piece(monkeypatch):
    from gradscore.engines.rules import conv
    model, x = _case("cnn")
    whole = _compare(model, x, 2).score_batch(x.double(), torch.zeros(7, dtype=torch.long))
    monkeypatch.setattr(conv, "workspace_bytes", lambda *captured: 1)   # one example per slice
    sliced = _compare(model, x, 2).score_batch(x.double(), torch.zeros(7, dtype=torch.long))
    torch.testing.assert_close(sliced.sq_norm, whole.sq_norm, rtol=1e-12, atol=0)


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("form", ["outer", "gram", "grouped"])
def test_conv_blocks_stay_within_the_layers_captured_bytes(monkeypatch, form, K):
    """With the 2 MiB floor off, every im2col slice and every per-example gradient or Gram
    block of a conv is no larger than the layer's input plus its output gradient, and
    the numbers still equal the loop's."""
    import gradscore.kernels.ghost_linear as gl
    from gradscore.engines.rules import conv
    monkeypatch.setattr(gl, "MIN_WORKSPACE_BYTES", 0)
    monkeypatch.setattr(conv, "plan", lambda *args, **kwargs: form)
    largest = [0]

    def record(fn):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            largest[0] = max(largest[0], out.numel() * out.element_size())
            return out
        return run
    monkeypatch.setattr(conv, "_patches", record(conv._patches))
    monkeypatch.setattr(torch, "bmm", record(torch.bmm))
    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", record(torch.nn.grad.conv2d_weight))
    torch.manual_seed(0)
    # wide and small: a per-example gradient (16·16·9) outweighs an example's input and δ
    model = nn.Sequential(nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 3)).double().eval()
    x = torch.randn(64, 16, 6, 6, dtype=torch.float64)
    model[2].requires_grad_(False)      # frozen head: every recorded block is the conv's
    captured = (x.numel() + 64 * 16 * 4 * 4) * 8        # the conv's input and δ, float64
    whole = 64 * 16 * 16 * 9 * 8                        # all 64 examples' patches, or gradients
    _compare(model, x, K)
    assert 0 < largest[0] <= captured < whole


CONV_PEAKS = """
import json, torch
from torch import nn
from bench.engines import _Memory
from gradscore.engines.rules import conv
torch.manual_seed(0)
layer = nn.Conv2d(16, 32, 3, padding=1)
x, d = torch.randn(512, 16, 8, 8), torch.randn(512, 32, 8, 8)
peaks = {}
for form in ("outer", "gram", "grouped", "pixel", "sparse"):
    conv.plan = lambda *args, form=form, **kwargs: form
    run = lambda: conv.conv(layer, [x], [d], {"weight": None}, 0)
    run()
    with _Memory("cpu").measure() as out:
        run()
    peaks[form] = out["peak_bytes"]
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_every_conv_forms_measured_peak_stays_near_the_layers_captured_bytes():
    """Measured, not counted: the resident-set peak of each conv form, with what torch
    and oneDNN allocate inside a call (the grouped form's im2col), stays near the layer's
    input plus δ; one batch's patches and per-example gradients would be 4x that."""
    from bench.engines import measured_child
    peaks = json.loads(measured_child(CONV_PEAKS))
    captured = 512 * (16 + 32) * 64 * 4                   # 6.3 MB
    whole = 512 * (16 * 9 * 64 + 32 * 16 * 9) * 4         # 28 MB
    assert whole > 4 * captured
    assert all(0 < peak < 1.5 * captured for peak in peaks.values()), peaks


class ConvTwice(nn.Module):
    """Non-square kernel, stride and dilation, 'valid' depthwise conv, one conv called
    twice, a 1x1 conv (whose patches are its input)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
        self.b = nn.Conv2d(4, 4, 2, padding="valid", groups=4)
        self.c = nn.Conv2d(4, 5, 1)
        self.head = nn.Linear(5 * 3 * 6, 3)

    def forward(self, x):
        return self.head(self.c(self.b(torch.tanh(self.b(torch.tanh(self.a(x)))))).flatten(1))


@pytest.mark.parametrize("K", [0, 3])
@pytest.mark.parametrize("form", ["outer", "gram", "pixel", "grouped", "sparse"])
@pytest.mark.parametrize("name", ["cnn", "conv1d_groupnorm_seq_linear", "conv_twice"])
def test_every_conv_form_equals_loop(monkeypatch, name, form, K):
    from gradscore.engines.rules import conv
    # the pixel and sparse forms take single calls only: a layer called twice keeps the outer form
    single = form in ("pixel", "sparse")
    monkeypatch.setattr(conv, "plan", lambda layer, geo, calls, K, cuda=False, density=None:
                        form if calls == 1 or not single else "outer")
    model, x = (ConvTwice(), torch.randn(5, 3, 9, 10)) if name == "conv_twice" else _case(name)
    _compare(model, x, K)


@pytest.mark.parametrize("kernels,expected", [(None, "sparse"), ("torch", "grouped")])
def test_sparse_conv_form_follows_the_density_of_delta(monkeypatch, kernels, expected):
    """The demo CNN's second conv sits behind ReLU + max-pool: about 1 in 6 of its δ is
    non-zero, and the plan takes the sparse kernel, unless the torch kernels are forced;
    the numbers equal the loop's either way."""
    from gradscore.engines.rules import conv
    if kernels:
        monkeypatch.setenv("GRADSCORE_KERNELS", kernels)
    chosen = []

    def plan(layer, *args, **kwargs):
        form = original(layer, *args, **kwargs)
        chosen.append((layer.in_channels, kwargs.get("density", args[4] if len(args) > 4 else None), form))
        return form
    original = conv.plan
    monkeypatch.setattr(conv, "plan", plan)
    torch.manual_seed(0)
    _compare(digits_cnn(channels=16), torch.rand(24, 1, 8, 8), 2)
    (density, form), = [(dens, form) for c_in, dens, form in chosen if c_in == 16]
    assert form == expected
    assert (density is None) == (kernels == "torch")
    if density is not None:
        assert 0.05 < density < 0.3


def test_conv_plan_follows_the_cost_of_each_form():
    """Wide channels on a small image: the pixel Gram for norms, the outer form once the
    references' convolutions cost more than a per-example gradient; narrow: the grouped
    form, which copies no patches, or on CUDA the outer form's Triton kernel; few input
    channels: the outer form."""
    from gradscore.engines.rules.conv import _geometry, plan
    x = torch.zeros(1, 128, 8, 8)
    wide, narrow = digits_cnn(channels=128)[2], digits_cnn(channels=16)[2]
    assert plan(wide, _geometry(wide, x.shape), 1, 0) == "pixel"
    assert plan(wide, _geometry(wide, x.shape), 1, 2) == "outer"
    assert plan(narrow, _geometry(narrow, x.shape), 1, 0) == "grouped"
    assert plan(narrow, _geometry(narrow, x.shape), 1, 0, cuda=True) == "outer"
    # depthwise: the grouped form has no loop over groups; 1x1: the patches are the input
    x = torch.zeros(1, 64, 16, 16)
    depthwise, pointwise = nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Conv2d(64, 64, 1)
    assert plan(depthwise, _geometry(depthwise, x.shape), 1, 0) == "grouped"
    assert plan(pointwise, _geometry(pointwise, x.shape), 1, 0) == "outer"
    # a first conv (1 or 3 input channels): oneDNN's grouped weight gradient is slow there
    first, rgb = digits_cnn()[0], nn.Conv2d(3, 32, 3, padding=1)
    assert plan(first, _geometry(first, (1, 1, 8, 8)), 1, 0) == "outer"
    assert plan(rgb, _geometry(rgb, (1, 3, 32, 32)), 1, 2) == "outer"
    # δ behind ReLU + max-pool (1 in 6 non-zero): the sparse kernel for the demo's second
    # conv, not once δ is dense, nor for the wide conv (its pixel Gram costs less), nor
    # for a layer called twice, nor on CUDA
    x = torch.zeros(1, 16, 8, 8)
    geo = _geometry(narrow, x.shape)
    assert plan(narrow, geo, 1, 0, density=0.17) == "sparse"
    assert plan(narrow, geo, 1, 2, density=0.17) == "sparse"
    assert plan(narrow, geo, 1, 0, density=1.0) == "grouped"
    # short rows (9 weights per output channel) are summed densely, whatever δ's density:
    # the kernel for the 1-channel first conv, not for the depthwise conv (grouped ties it)
    # nor the RGB conv (27 weights, a long row: sparse only where δ is sparser than 1/2)
    assert plan(first, _geometry(first, (1, 1, 8, 8)), 1, 0, density=1.0) == "sparse"
    assert plan(depthwise, _geometry(depthwise, (1, 64, 16, 16)), 1, 0, density=0.5) == "grouped"
    assert plan(rgb, _geometry(rgb, (1, 3, 32, 32)), 1, 2, density=0.5) == "outer"
    assert plan(narrow, geo, 2, 0, density=0.17) != "sparse"
    assert plan(narrow, geo, 1, 0, cuda=True, density=0.17) == "outer"
    assert plan(wide, _geometry(wide, (1, 128, 8, 8)), 1, 0, density=0.17) == "pixel"


def test_auto_is_the_chain_per_parameter():
    """auto: a ghost rule where one applies, the fallback for exactly the other parameters."""
    model, _ = _case("transformer")
    assert gs.Scorer(model.eval()).engine_name == "ghost"
    torch.manual_seed(0)
    scorer = _compare(nn.Sequential(nn.Linear(3, 3), nn.PReLU(), nn.Linear(3, 3)), torch.randn(5, 3), 2,
                      engine="auto")
    assert scorer.engine_name == "ghost"
    why = scorer.explain()
    assert why["0.weight"].startswith("ghost") and why["2.bias"].startswith("ghost")
    assert why["1.weight"] == "vmap (no ghost rule for PReLU)"


@pytest.mark.parametrize("K", [0, 3])
def test_unsupported_layers_fall_back_to_vmap_and_say_so(K):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.PReLU(),
                          nn.Flatten(), nn.Linear(3 * 5 * 5, 3))
    scorer = _compare(model, torch.randn(6, 2, 5, 5), K)
    why = scorer.explain()
    assert why["0.weight"] == "vmap (Conv2d with padding_mode='reflect')"
    assert why["1.weight"] == "vmap (no ghost rule for PReLU)"
    assert why["3.weight"].startswith("ghost (linear rule on 3: Linear)")


@pytest.mark.parametrize("K", [0, 2])
def test_torch_transformer_layer_is_ghost_throughout(K):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                       batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 5, 3))
    scorer = _compare(model, torch.randn(4, 5, 8), K)
    why = scorer.explain()
    assert why["0.self_attn.in_proj_weight"].startswith("ghost (attention rule on 0.self_attn")
    assert why["0.self_attn.out_proj.weight"].startswith("ghost (attention rule")  # used functionally by MHA
    assert why["0.linear1.weight"].startswith("ghost") and why["0.norm1.weight"].startswith("ghost")


def test_linear_used_without_its_forward_falls_back():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(nn.functional.linear(x, self.lin.weight, self.lin.bias)))

    torch.manual_seed(0)
    scorer = _compare(Functional(), torch.randn(5, 6), 2)
    assert "'lin' was not called" in scorer.explain()["lin.weight"]
    assert scorer.explain()["head.weight"].startswith("ghost")


class Tied(nn.Module):
    """Input embedding reused as the output layer (tied weights, as in GPT-2)."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(9, 4), nn.Linear(4, 4), nn.Linear(4, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids)))).mean(1)


@pytest.mark.parametrize("K", [0, 2])
def test_tied_weights_keep_the_cross_term(K):
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (5, 6))
    ids[:, 3] = ids[:, 0]
    scorer = _compare(Tied(), ids, K)   # fails if either use, or the cross term, is dropped
    why = scorer.explain()
    assert why["emb.weight"].startswith("ghost (embedding rule on emb") and "tied, exact cross term" in why["emb.weight"]
    assert gs.Scorer(Tied().eval()).engine_name == "ghost"   # auto: every parameter has a rule


def test_dropping_the_tied_cross_term_is_caught(monkeypatch):
    """The comparison above can fail: without the cross term the norms differ."""
    from gradscore.engines import ghost
    monkeypatch.setattr(ghost._Pass, "add_cross_terms", lambda self: None)
    with pytest.raises(AssertionError):
        _compare(Tied(), torch.randint(0, 9, (5, 6)), 0)


class PlainLinear(nn.Linear):
    """A Linear subclass whose forward is its own: the Linear rule does not apply to it."""

    def forward(self, x):
        return super().forward(x)


def test_tied_to_a_layer_without_rule_falls_back():
    model = Tied()
    model.head = PlainLinear(4, 9, bias=False)
    model.head.weight = model.emb.weight
    scorer = _compare(model, torch.randint(0, 9, (5, 6)), 2)
    why = scorer.explain()
    assert "shared by modules emb and head" in why["emb.weight"] and why["emb.weight"].startswith("vmap")
    assert why["mid.weight"].startswith("ghost")
    assert "PlainLinear overrides the forward of Linear" in why["emb.weight"], why["emb.weight"]


def test_frozen_layers_and_param_patterns():
    model, x = _case("mlp_inplace_relu")
    model[0].weight.requires_grad_(False)
    scorer = _compare(model, x, 2)
    assert "0.weight" not in scorer.explain() and "0.bias" in scorer.explain()
    last = _compare(model, x, 2, params=["4.*"])
    assert list(last.explain()) == ["4.weight", "4.bias"]
    with pytest.raises(gs.EngineError, match="matches no parameter"):
        gs.Scorer(model, params=["head.*"])


def test_positional_module_without_batch_dim_falls_back():
    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, 3)

        def forward(self, ids):
            return self.head((self.tok(ids) + self.pos(torch.arange(ids.shape[1]))).mean(1))

    torch.manual_seed(0)
    scorer = _compare(Pos(), torch.randint(0, 9, (5, 6)), 2)
    assert "has no batch dimension" in scorer.explain()["pos.weight"]


def test_mlp_norms_never_materialize_per_example_gradients(monkeypatch):
    import gradscore.kernels.ghost_linear as gl

    def boom(*a, **k):
        raise AssertionError("per-example gradient materialized")
    monkeypatch.setattr(gl, "_outer", boom)
    model, x = _case("mlp_inplace_relu")
    _compare(model, x, 0)   # T = 1: the Gram form, ‖δ‖²‖a‖², never g_b
    _compare(model, x, 1)   # and dots by projecting a through V


def test_loss_must_be_per_example():
    model = nn.Linear(3, 2).eval()
    with pytest.raises(gs.EngineError, match="one loss per example"):
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
    gs.Scorer(model, engine="ghost").score_batch(torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1]))
    assert len(ptrs) == 6 and ptrs[-2] == ptrs[-1]   # the first batch's two layout probes come first


def test_an_in_place_change_of_a_saved_output_is_caught_as_without_the_engine():
    model = SquareThenBump().eval()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(gs.GradscoreError, match="modified by an inplace operation"):   # torch's error, one line
        gs.Scorer(model, engine="ghost").score_batch(x, y)
