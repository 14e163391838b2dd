"""Gradient sketches: the fast sketch of every example equals Φ·g of its materialized
gradient (per-example autograd loop) in float64, for every rule family and layout; the
sketch dot is an unbiased estimate of the exact dot, its error shrinking as 1/√k."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gradscore.demos.models import digits_cnn, mlp, recurrent_classifier, tiny_transformer
from gradscore.losses import resolve_loss
from gradscore.sketches import Projection, SketchEngine
from helpers import CellLoop, ExpertsNet, FreeNet, PositionsNet, Reversed, SharedBias, loop_grads

LOSS = resolve_loss("cross_entropy")


class _Scaled(nn.Module):
    """A parameter no rule knows (used functionally): the fallback's dense block."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.fc = nn.Linear(d, 3)

    def forward(self, x):
        return self.fc(torch.tanh(x * self.scale))


class _Tied(nn.Module):
    """An embedding reused as the output layer: one weight, two uses."""

    def __init__(self, vocab: int = 7, d: int = 5) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


class _TiedFunctional(nn.Module):
    """An embedding whose weight is the output layer too, used functionally (h @ Eᵀ), as
    many language models write their tied head."""

    def __init__(self, vocab: int = 7, d: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)

    def forward(self, ids):
        return torch.tanh(self.emb(ids)).mean(1) @ self.emb.weight.T


class _SeqFirst(nn.Module):
    """Sequence-first layers (T, B, d): Embedding, GRU, LayerNorm, a Linear on each step."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.gru = nn.Embedding(11, 6), nn.GRU(6, 5)
        self.norm, self.proj, self.head = nn.LayerNorm(5), nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, ids):
        h, _ = self.gru(self.emb(ids).transpose(0, 1))
        return self.head(self.proj(self.norm(h)).mean(0))


def _case(name: str, B: int = 6, T: int = 5):
    g = torch.Generator().manual_seed(0)
    tokens = lambda vocab: torch.randint(0, vocab, (B, T), generator=g)   # noqa: E731
    if name == "mlp":
        return mlp(d_in=9, hidden=7, n_classes=3, depth=2), torch.randn(B, 9, generator=g), 3
    if name == "cnn":
        return digits_cnn(n_classes=3, channels=2).eval(), torch.randn(B, 1, 8, 8, generator=g), 3
    if name == "transformer":   # Embedding, LayerNorm, Linear over sequences
        return tiny_transformer(vocab=13, d=8, heads=2, layers=1, n_classes=3), tokens(13), 3
    if name == "gru_attention":  # recurrent and MultiheadAttention rules
        return recurrent_classifier(kind="GRU", vocab=13, d=8, attention=True, n_classes=3), tokens(13), 3
    if name == "lstm":
        return recurrent_classifier(kind="LSTM", vocab=13, d=8, n_classes=3), tokens(13), 3
    if name == "lstm_cell":   # a cell in the model's loop: its calls are the steps
        return CellLoop("LSTM"), torch.randn(B, 10, generator=g), 3
    if name == "positions":   # an Embedding with a forward of its own: the ids it looks up (1, T)
        return PositionsNet("arange", 6, most=6), tokens(11), 3
    if name == "fallback":
        return _Scaled(4), torch.randn(B, 4, generator=g), 3
    if name == "tied":
        return _Tied(), tokens(7), 7
    if name == "tied_bias":   # two Linear layers' one bias: a dense block from both rules
        return SharedBias(), torch.randn(B, 4, generator=g), 3
    if name == "weight_norm":   # weight_g, weight_v: the fallback's, not the Linear rule's
        model = mlp(d_in=9, hidden=7, n_classes=3, depth=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            nn.utils.weight_norm(model[3])
        return model, torch.randn(B, 9, generator=g), 3
    if name == "tied_functional":   # the embedding's weight also used outside its layer: the fallback's
        return _TiedFunctional(), tokens(7), 7
    if name == "hooked":   # a user's forward hook returns a new output: the rule needs δ of the layer's own
        model = mlp(d_in=9, hidden=7, n_classes=3, depth=2)
        model[3].register_forward_hook(lambda mod, args, out: out * 2 + 1)
        return model, torch.randn(B, 9, generator=g), 3
    if name == "seq_first":
        return _SeqFirst(), tokens(11), 3
    if name == "reordered":   # a Linear sees the batch reversed: its rows are not the examples': the fallback's
        return Reversed(9, 7, 3), torch.randn(B, 9, generator=g), 3
    raise ValueError(name)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "gru_attention", "lstm", "lstm_cell", "positions",
                                  "fallback", "tied", "tied_bias", "seq_first", "weight_norm", "hooked", "tied_functional",
                                  "reordered"])
@pytest.mark.parametrize("dim", [50, 300])
def test_sketch_equals_projection_of_the_loop_gradient(name, dim):
    torch.manual_seed(0)
    model, x, C = _case(name)
    model = model.double().eval()
    if x.is_floating_point():
        x = x.double()
    y = torch.arange(len(x)) % C
    names = [n for n, _ in model.named_parameters()]
    proj = Projection.for_model(model, names, dim, seed=3)
    engine = SketchEngine(model, LOSS, names, proj)
    got = engine.sketch_batch(x, y).dots
    want = proj.apply(loop_grads(model, x, y, names))
    assert got.shape == (len(y), proj.dim) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    kinds = {b.kind for b in proj.spec.blocks}
    assert "kron" in kinds and ("dense" in kinds) == (name not in ("tied", "tied_functional"))   # one weight


class _Convs(nn.Module):
    """Conv1d ('same', dilated), a strided and a grouped Conv2d, a Conv2d called twice
    (its calls add up), a Conv3d and a strided, grouped ConvTranspose2d with output
    padding: P_in applied to the patches as a convolution (the adjoint one's for the last)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding="same", dilation=2)
        self.c2 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
        self.twice = nn.Conv2d(6, 6, 1)
        self.c3 = nn.Conv3d(1, 2, 2)
        self.up = nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.head = nn.Linear(4 + 6 + 2 + 4, 3)

    def forward(self, x):                   # x (B, 2, 6, 6)
        a = torch.tanh(self.c1(x.flatten(2))).mean(2)
        h = torch.tanh(self.grouped(torch.tanh(self.c2(x))))
        h = self.twice(torch.tanh(self.twice(h))).mean((2, 3))
        v = torch.tanh(self.c3(x[:, :1, None, :3, :3].expand(-1, 1, 3, 3, 3))).mean((2, 3, 4))
        u = torch.tanh(self.up(x)).mean((2, 3))
        return self.head(torch.cat([a, h, v, u], 1))


@pytest.mark.parametrize("dim", [40, 400])
def test_conv_sketches_equal_projection_of_the_loop_gradient(dim):
    torch.manual_seed(0)
    model = _Convs().double().eval()
    x = torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(5) % 3
    names = [n for n, _ in model.named_parameters()]
    proj = Projection.for_model(model, names, dim, seed=7)
    assert all(proj.by_name[f"{c}.weight"].kind == "kron" for c in ("c1", "c2", "grouped", "twice", "c3", "up"))
    got = SketchEngine(model, LOSS, names, proj).sketch_batch(x, y).dots
    torch.testing.assert_close(got, proj.apply(loop_grads(model, x, y, names)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [6, 1])
def test_sequence_first_with_T_equal_to_B_and_T_1(T):
    """Layouts come from evidence, not from sizes: T == B == 6 and T == 1."""
    model, x, C = _case("seq_first", B=6, T=T)
    model = model.double().eval()
    y = torch.arange(len(x)) % C
    names = [n for n, _ in model.named_parameters()]
    proj = Projection.for_model(model, names, 120, seed=1)
    got = SketchEngine(model, LOSS, names, proj).sketch_batch(x, y).dots
    torch.testing.assert_close(got, proj.apply(loop_grads(model, x, y, names)), rtol=1e-10, atol=1e-12)


def _sketched_as_the_loop(model: nn.Module) -> SketchEngine:
    """The sketch engine's sketches of 3 examples against the projection of the loop's
    per-example gradients (assert); the engine, for its paths."""
    x = torch.randn(3, *model.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(3) % 3
    names = [n for n, _ in model.named_parameters()]
    proj = Projection.for_model(model, names, 60, seed=5)
    engine = SketchEngine(model, LOSS, names, proj)
    got = engine.sketch_batch(x, y).dots
    torch.testing.assert_close(got, proj.apply(loop_grads(model, x, y, names)), rtol=1e-10, atol=1e-12)
    return engine


@pytest.mark.parametrize("kind", ["vit", "twice", "gamma", "reshaped", "table", "chain", "sum", "matmul", "cosine",
                                  "mm", "cat_params", "mlp", "einsum_w_first", "slice_zero", "stacked", "tiled_t",
                                  "tiled_add", "left", "conv1d", "conv_strided"])
@pytest.mark.parametrize("layout", ["batch", "TB", "seq_first"])
def test_parameters_the_forward_uses_directly_are_sketched_as_the_loop_gives(kind, layout):
    """A class token and position embedding (the free-parameter rule, through a table's
    rows, an elementwise function or a sum too, or the batch's rows times it;
    sequence-first: the fallback): their
    dense blocks against each example's gradient."""
    torch.manual_seed(0)
    engine = _sketched_as_the_loop(FreeNet(kind, layout).double().eval())
    taken = layout != "seq_first" or kind in FreeNet.BATCH_FIRST
    assert ("pos_embed" in engine.free) == taken and ("pos_embed" in engine.fallback) == (not taken)


@pytest.mark.parametrize("kind, layout", [("mixtral", "merged"), ("gpt_oss", "twice"), ("nemotron_h", "flat")])
def test_hugging_face_experts_are_sketched_as_the_loop_gives(kind, layout):
    """The experts' stacked weights (E, ·, ·) are dense blocks: the experts rule's dots with
    the block's rows, against each example's gradient."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    engine = _sketched_as_the_loop(ExpertsNet(kind, layout).double().eval())
    assert not engine.fallback and not engine.free


def test_an_empty_batch_gives_an_empty_sketch():
    model = mlp(d_in=9, hidden=7, n_classes=3, depth=1).double().eval()
    names = [n for n, _ in model.named_parameters()]
    proj = Projection.for_model(model, names, 40)
    out = SketchEngine(model, LOSS, names, proj).sketch_batch(torch.zeros(0, 9, dtype=torch.float64),
                                                            torch.zeros(0, dtype=torch.long))
    assert out.dots.shape == (0, proj.dim)


def test_the_split_is_proportional_and_fixed_by_the_seed():
    model = mlp(d_in=64, hidden=32, n_classes=10, depth=1)
    names = [n for n, _ in model.named_parameters()]
    a, b = (Projection.for_model(model, names, 1000, seed=5) for _ in range(2))
    assert a.spec == b.spec and abs(a.dim - 1000) <= 0.05 * 1000
    w = a.by_name["1.weight"]                     # (32, 64): k_out/k_in ≈ rows/cols
    assert w.kind == "kron" and w.k_out * w.k_in == w.k and 0.3 < w.k_out / w.k_in < 0.8
    big, small = a.by_name["1.weight"].k, a.by_name["3.weight"].k     # 2048 vs 320 values
    assert 4 < big / small < 9
    like = torch.zeros(1)
    assert torch.equal(a.factors("1.weight", like)[0], b.factors("1.weight", like)[0])
    other = Projection.for_model(model, names, 1000, seed=6)
    assert not torch.equal(a.factors("1.weight", like)[0], other.factors("1.weight", like)[0])


@pytest.mark.parametrize("factored, shrink", [(False, (2.8, 5.7)), (True, (1.4, 3.0))])
def test_sketch_dots_are_unbiased_and_their_error_shrinks_with_k(factored, shrink):
    """Over 60 seeds, the mean sketch dot ⟨Φg, Φh⟩ is within 3 standard errors of the exact
    dot. From k = 16 to 256 the RMS error of dense blocks shrinks as 1/√k (÷4); that of
    Kronecker blocks as √(1/k_out + 1/k_in + 1/k) (÷ about 2), each factor only √k rows."""
    torch.manual_seed(0)   # one weight (16, 32): no block is clipped at its size or at 1 row
    model = nn.Sequential(nn.Linear(32, 16, bias=False), nn.Tanh(), nn.Linear(16, 2, bias=False)).double().eval()
    model[2].weight.requires_grad_(False)
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 1])
    names = ["0.weight"]
    grads = loop_grads(model, x, y, names)
    flat = torch.cat([grads[n].reshape(2, -1) for n in names], 1)
    exact = (flat[0] @ flat[1]).item()
    rms = {}
    for k in (16, 256):
        est = []
        for seed in range(60):
            proj = Projection.for_model(model, names, k, seed=seed, factored=factored)
            s = SketchEngine(model, LOSS, names, proj).sketch_batch(x, y).dots
            est.append((s[0] @ s[1]).item())
        est = np.array(est)
        assert abs(est.mean() - exact) < 3 * est.std(ddof=1) / np.sqrt(len(est)), (k, est.mean(), exact)
        rms[k] = np.sqrt(np.mean((est - exact) ** 2))
    assert shrink[0] < rms[16] / rms[256] < shrink[1], rms


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_unapply_is_the_adjoint_of_the_projection(name):
    """⟨Φᵀ m, g⟩ = ⟨m, Φ g⟩ for every m and g: Φᵀ m is the parameter-space vector whose
    exact dot with a gradient is the sketch dot (unbiased for ⟨v, g⟩ when m = Φ v)."""
    model, _, _ = _case(name)
    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    proj = Projection.for_model(model, names, 97, seed=4)
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(3, *p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()}
    m = torch.randn(proj.dim, generator=g, dtype=torch.float64)
    back = proj.unapply(m)
    assert {n: tuple(v.shape) for n, v in back.items()} == {n: tuple(p.shape) for n, p in model.named_parameters()}
    lhs = sum((back[n] * grads[n]).flatten(1).sum(1) for n in names)
    torch.testing.assert_close(lhs, proj.apply(grads) @ m, rtol=1e-12, atol=1e-12)


class _Norms(nn.Module):
    """GroupNorm, eval-mode BatchNorm, InstanceNorm with affine, RMSNorm; a plain RNN on a
    second path (an RNN's input gradient into InstanceNorm trips a torch bug: helpers.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gn, self.bn = nn.GroupNorm(2, 4), nn.BatchNorm2d(4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.rms, self.rnn = nn.RMSNorm(4), nn.RNN(4, 3, batch_first=True)
        self.head = nn.Linear(7, 3)

    def forward(self, x):                                 # x (B, 1, 4, 4)
        h = self.inorm(self.bn(torch.tanh(self.gn(self.conv(x)))))
        out, _ = self.rnn(self.rms(x.reshape(-1, 4, 4)))  # rows of the image as a sequence
        return self.head(torch.cat([torch.tanh(h).mean((2, 3)), out.mean(1)], 1))


def test_norm_and_rnn_families():
    torch.manual_seed(0)
    model = _Norms().double().eval()
    with torch.no_grad():   # BatchNorm's running statistics away from the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.arange(5) % 3
    names = [n for n, _ in model.named_parameters()]
    proj = Projection.for_model(model, names, 90, seed=2)
    got = SketchEngine(model, LOSS, names, proj).sketch_batch(x, y).dots
    torch.testing.assert_close(got, proj.apply(loop_grads(model, x, y, names)), rtol=1e-10, atol=1e-12)


def test_gpt2_conv1d_tied_embeddings_and_padding():
    """Hugging Face's Conv1D (Kronecker from its factors), the embedding tied to the LM
    head, padded examples through the causal-LM loss."""
    pytest.importorskip("transformers")
    from helpers import tiny_gpt2
    torch.manual_seed(0)
    model = tiny_gpt2(n_layer=1, n_embd=8, vocab_size=17, n_positions=8).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 17, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    loss = resolve_loss("causal_lm")
    names = [n for n, _ in model.named_parameters()]
    proj = Projection.for_model(model, names, 200, seed=5)
    assert any(b.kind == "kron" and "c_attn" in b.name for b in proj.spec.blocks)
    x = {"input_ids": ids, "attention_mask": mask}
    got = SketchEngine(model, loss, names, proj).sketch_batch(x, labels).dots
    params = dict(model.named_parameters())
    per = [torch.autograd.grad(loss.fn(model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits,
                                       labels[b:b + 1]).sum(), [params[n] for n in names]) for b in range(4)]
    want = proj.apply({n: torch.stack([p[i] for p in per]) for i, n in enumerate(names)})
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
