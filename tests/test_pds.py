"""PDS scores: exact against autograd through unrolled full-batch gradient descent."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch.func import functional_call

import gradscore as gs
from gradscore.scores.costate import CostateConfig, CostateFile, compute_costate, hvp
from gradscore.demos.models import mlp
from gradscore.io.attrs import seal

KW = {"d_in": 5, "hidden": 6, "n_classes": 3, "depth": 1}
LRS = [0.5, 0.4, 0.6, 0.3, 0.5, 0.45]  # η_t for the 6 steps


def _data(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _gd_run(tmp_path):
    """Full-batch GD with mean loss (γ_n = 1/N), a float64 checkpoint at every step."""
    xp, yp = _data(0, 14)
    xt, yt = _data(1, 9)
    proxy = gs.save_dataset(tmp_path / "proxy.h5", xp.numpy(), yp.numpy())
    target = gs.save_dataset(tmp_path / "target.h5", xt.numpy(), yt.numpy())
    torch.manual_seed(0)
    model = mlp(**KW).double()
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    with gs.CheckpointWriter(tmp_path / "ckpts", model_factory="gradscore.demos.models:mlp", model_kwargs=KW) as w:
        for t, lr in enumerate(LRS + [0.0]):
            w.save(model, step=t, lr=lr, epoch=t)
            if t == len(LRS):
                break
            loss = torch.nn.functional.cross_entropy(model(xp), yp)
            grads = torch.autograd.grad(loss, list(model.parameters()))
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p -= lr * g
    return tmp_path / "ckpts", proxy, target, theta0, (xp, yp, xt, yt)


def _autograd_pds(theta0, xp, yp, xt, yt):
    """−∂J_total/∂γ_n by autograd through the unrolled training, γ a leaf tensor."""
    model = mlp(**KW).double()
    gamma = torch.full((len(yp),), 1.0 / len(yp), dtype=torch.float64, requires_grad=True)
    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    J_total = 0.0
    for lr in LRS:
        losses = torch.nn.functional.cross_entropy(functional_call(model, theta, (xp,)), yp, reduction="none")
        grads = torch.autograd.grad((gamma * losses).sum(), list(theta.values()), create_graph=True)
        theta = {k: v - lr * g for (k, v), g in zip(theta.items(), grads)}
        J_total = J_total + torch.nn.functional.cross_entropy(functional_call(model, theta, (xt,)), yt)
    return -torch.autograd.grad(J_total, gamma)[0]


@pytest.mark.parametrize("engine", ["ghost", "vmap", "loop"])
def test_pds_equals_autograd_through_unrolled_training(tmp_path, engine):
    ckpts, proxy, target, theta0, (xp, yp, xt, yt) = _gd_run(tmp_path)
    expected = _autograd_pds(theta0, xp, yp, xt, yt)
    out = gs.score(ckpts, proxy, out=tmp_path / "s.h5", target=target, engine=engine, dtype="float64",
                   scores=["pds", "target_dot", "target_cos", "grand"], batch_size=5, progress=False)
    res = gs.load_scores(out)
    np.testing.assert_allclose(res["scores"]["pds"], expected.numpy(), rtol=1e-6, atol=1e-12)
    assert np.abs(expected.numpy()).max() > 1e-3
    # target_dot: the same sum with ∇J(θ_t) in place of λ_{t+1}
    cs = CostateFile(ckpts / "costate.h5")
    model = mlp(**KW).double()
    store = gs.CheckpointStore(ckpts)
    manual = np.zeros(len(yp))
    for t, lr in enumerate(LRS):
        store.load_into(model, t)
        gJ = cs.grad_target(t)
        for n in range(len(yp)):
            g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xp[n:n + 1]), yp[n:n + 1]),
                                    list(model.parameters()))
            manual[n] += lr * sum(float((gi * gJ[k]).sum()) for gi, k in zip(g, dict(model.named_parameters())))
    np.testing.assert_allclose(res["scores"]["target_dot"], manual, rtol=1e-8)
    assert np.all(np.abs(res["scores"]["target_cos"]) <= 1 + 1e-12)


def test_target_scores_without_pds_compute_no_costate(tmp_path, monkeypatch):
    """target_dot and target_cos need ∇J(θ_t) only: a run without pds makes no Hessian-vector
    product over the data and gives the scores of a run with pds; pds can be added later,
    but not re-aggregated from its rows, which hold no dots with co-states."""
    import shutil

    from gradscore.scores import costate

    ckpts, proxy, target, *_ = _gd_run(tmp_path)

    def no_hvp(*args, **kwargs):
        raise AssertionError("a Hessian-vector product was computed")
    with monkeypatch.context() as patch:
        patch.setattr(costate._Objective, "hvp", no_hvp)
        alone = tmp_path / "target_only.h5"
        gs.score(ckpts, proxy, out=alone, target=target, dtype="float64", scores=["target_dot", "target_cos"],
                 progress=False)
    with CostateFile(ckpts / "target_gradient.h5") as gradients:   # closed at the block's end
        assert not gradients.has_costates and gradients.costate(1) is None and gradients.warnings == []
    assert not gradients._f.id.valid
    full = gs.load_scores(gs.score(ckpts, proxy, out=tmp_path / "full.h5", target=target, dtype="float64",
                                   scores=["pds", "target_dot", "target_cos"], progress=False))
    res = gs.load_scores(alone)
    assert "pds" not in res["scores"]
    for name in ("target_dot", "target_cos"):
        np.testing.assert_allclose(res["scores"][name], full["scores"][name], rtol=1e-12, atol=1e-15)
    added = tmp_path / "added.h5"
    shutil.copy(alone, added)
    both = gs.load_scores(gs.score(ckpts, proxy, out=added, target=target, dtype="float64",
                                   scores=["target_dot", "target_cos", "pds"], progress=False))
    np.testing.assert_array_equal(both["scores"]["pds"], full["scores"]["pds"])
    with pytest.raises(gs.ConfigError, match="pds need other per-checkpoint metrics"):
        gs.reaggregate(alone, tmp_path / "again.h5", wanted=["pds"])
    kept = ckpts / "kept_gradient.h5"   # a ∇J-only file the user named, then named again for pds
    shutil.copy(ckpts / "target_gradient.h5", kept)
    with pytest.raises(gs.ConfigError, match="kept_gradient.h5: holds ∇J.* alone .*, or pass --overwrite to "
                                             "recompute it with the co-states"):
        gs.score(ckpts, proxy, out=tmp_path / "pds.h5", target=target, scores=["pds"], costate=kept, progress=False)
    # as its fix says: the file is made again, with the co-states (it was refused under --overwrite too)
    again = gs.load_scores(gs.score(ckpts, proxy, out=tmp_path / "pds.h5", target=target, dtype="float64",
                                    scores=["pds"], costate=kept, overwrite=True, progress=False))
    np.testing.assert_array_equal(again["scores"]["pds"], full["scores"]["pds"])
    assert CostateFile(kept).has_costates
    assert gs.load_scores(gs.reaggregate(tmp_path / "full.h5", tmp_path / "dots.h5",
                                         wanted=["target_dot"]))["scores"]["target_dot"].shape == (14,)


def test_hvp_equals_formed_hessian():
    torch.manual_seed(0)
    model = mlp(d_in=3, hidden=4, n_classes=2, depth=1).double().eval()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    ds = gs.load_dataset.__globals__["TorchDataset"](list(zip(x, y)))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def total(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        return torch.nn.functional.cross_entropy(functional_call(model, parts, (x,)), y, reduction="sum") * 0.1

    H = torch.autograd.functional.hessian(total, flat0)
    v = torch.randn(flat0.numel(), dtype=torch.float64)
    vd, i = {}, 0
    for n, s in zip(names, shapes):
        vd[n] = v[i:i + s.numel()].reshape(s)
        i += s.numel()
    hv = hvp(model, "cross_entropy", ds, vd, batch_size=3, weight=0.1)
    torch.testing.assert_close(torch.cat([hv[n].reshape(-1) for n in names]), H @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_size", [3, 10])
def test_the_costates_objective_takes_a_loss_that_reads_the_batch_per_example(batch_size):
    """A user's loss that reads the other rows of its batch (weighed by the batch's losses):
    the co-states' Σ_n ℓ_n and its Hessian-vector product were of the loss on each chunk of
    batch_size examples, so they changed with batch_size and were not the per-example
    losses the scores take. Now each example's loss alone, whatever the chunks."""
    from gradscore.scores.costate import _Objective
    from gradscore.losses import resolve_loss
    torch.manual_seed(0)
    model = mlp(d_in=3, hidden=4, n_classes=3, depth=1).double().eval()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 3, (10,))
    ds = gs.load_dataset.__globals__["TorchDataset"](list(zip(x, y)))

    def centred(z, t):
        ce = torch.nn.functional.cross_entropy(z, t, reduction="none")
        return ce + ce * ce / ce.sum()
    params = {n: p.detach() for n, p in model.named_parameters()}
    v = {n: torch.randn_like(p) for n, p in params.items()}
    total = lambda p: sum(centred(functional_call(model, p, (x[b:b + 1],)), y[b:b + 1])[0] for b in range(10))
    want_g = torch.func.grad(total)(params)
    want_hv = torch.func.jvp(torch.func.grad(total), (params,), (v,))[1]
    with pytest.warns(gs.GradscoreWarning, match="depends on the other examples of its batch"):
        objective = _Objective(model, resolve_loss(centred), ds, batch_size, 1.0)
        got_g = objective.gradient(params)
    got_hv = objective.hvp(params, v)
    for n in params:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_hv[n], want_hv[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_hvp_of_hugging_face_experts_on_their_fused_matmuls_is_the_eager_experts(impl):
    """Hugging Face's grouped matmul of a mixture's experts (Mixtral's default) has no
    forward-mode derivative, which the co-states' Hessian-vector products need: `run
    --scores pds` stopped on a Mixtral trained with it, with a fix (attn_implementation)
    the user had already applied. The experts now run their eager loop during the product
    (the same function: the product equals the eager model's), and the model's setting is
    given back after."""
    pytest.importorskip("transformers")
    from helpers import ExpertsNet
    torch.manual_seed(0)
    model = ExpertsNet("mixtral", impl=impl, D=8, I=8).eval()
    eager = copy.deepcopy(model)
    eager.experts.config._experts_implementation = "eager"
    x, y = torch.randn(6, 4, 8), torch.arange(6) % 3
    ds = gs.load_dataset.__globals__["TorchDataset"](list(zip(x, y)))
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    got, want = hvp(model, "cross_entropy", ds, v, batch_size=3), hvp(eager, "cross_entropy", ds, v, batch_size=3)
    for n in v:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
    assert model.experts.config._experts_implementation == impl


class _ExplicitWeightNorm(torch.nn.Module):
    """A Linear whose weight is g · v / ‖v‖ (per output row) written out: every op has a
    forward-mode derivative."""

    def __init__(self, layer: torch.nn.Module, names: tuple[str, str]):
        super().__init__()
        g, v = (dict(layer.named_parameters())[n] for n in names)
        self.weight_g, self.weight_v = (torch.nn.Parameter(t.detach().clone()) for t in (g, v))
        self.bias = torch.nn.Parameter(layer.bias.detach().clone())

    def forward(self, x):
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return torch.nn.functional.linear(x, w, self.bias)


@pytest.mark.parametrize("how", ["legacy", "parametrizations"])
def test_hvp_through_weight_norm_is_the_explicit_weight_norms(how):
    """torch's fused weight norm (``_weight_norm_interface``, legacy ``weight_norm`` and
    ``parametrizations.weight_norm`` on CPU) has no forward-mode derivative: `run --scores
    pds` stopped, and told the user to set a Hugging Face attention option. The product
    now runs weight norm's own composite form, v · (g / ‖v‖), the same function: it equals
    the product on the weight norm written out."""
    import warnings
    torch.manual_seed(0)
    model = mlp(d_in=6, hidden=5, n_classes=3, depth=1).double().eval()
    explicit = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if how == "legacy":
            torch.nn.utils.weight_norm(model[1])
        else:
            torch.nn.utils.parametrizations.weight_norm(model[1])
    names = ("weight_g", "weight_v") if how == "legacy" else ("parametrizations.weight.original0",
                                                               "parametrizations.weight.original1")
    explicit[1] = _ExplicitWeightNorm(model[1], names)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.arange(8) % 3
    ds = gs.load_dataset.__globals__["TorchDataset"](list(zip(x, y)))
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    rename = {f"1.{names[0]}": "1.weight_g", f"1.{names[1]}": "1.weight_v"}
    got = hvp(model, "cross_entropy", ds, v, batch_size=3)
    renamed = {rename.get(n, n): t for n, t in v.items()}
    want = hvp(explicit.eval(), "cross_entropy", ds, {n: renamed[n] for n, _ in explicit.named_parameters()},
               batch_size=3)
    for n in v:
        torch.testing.assert_close(got[n], want[rename.get(n, n)], rtol=1e-10, atol=1e-12)


class _Bags(torch.nn.Module):
    """Tokens (0 = padding where ``pad``) -> an EmbeddingBag, in the ``layout`` given ("rows":
    (B, L) ids; "offsets": the non-padding ids of every row, one bag each, an empty bag for
    an all-padding row; "last": the same with ``include_last_offset``), -> 3 classes. With
    ``explicit``, the same bags written out with nn.Embedding, one bag at a time."""

    def __init__(self, mode: str, layout: str, weighted: bool, pad: bool, explicit: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = torch.nn.EmbeddingBag(9, 4, mode=mode, padding_idx=0 if pad and layout == "rows" else None,
                                         include_last_offset=layout == "last")
        self.head = torch.nn.Linear(4, 3)
        self.layout, self.weighted, self.explicit = layout, weighted, explicit

    def forward(self, tokens):
        psw = (1 + tokens.double() / 3).to(self.bag.weight.dtype) if self.weighted else None
        if self.explicit:
            return self.head(torch.tanh(torch.stack([self._one(row, None if psw is None else psw[i])
                                                     for i, row in enumerate(tokens)])))
        if self.layout == "rows":
            return self.head(torch.tanh(self.bag(tokens, per_sample_weights=psw)))
        kept = tokens != 0
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), kept.sum(1).cumsum(0)])
        offsets = offsets if self.layout == "last" else offsets[:-1]
        return self.head(torch.tanh(self.bag(tokens[kept], offsets, per_sample_weights=None if psw is None
                                             else psw[kept])))

    def _one(self, row, psw):
        """The row's bag: its rows of the table (not padding, weighted), summed, averaged or
        maximized; 0 for none."""
        padded = self.layout != "rows" or self.bag.padding_idx is not None
        kept = row != 0 if padded else torch.ones_like(row, dtype=torch.bool)
        rows = torch.nn.functional.embedding(row[kept], self.bag.weight)
        if psw is not None:
            rows = rows * psw[kept].unsqueeze(1)
        if not len(rows):
            return self.bag.weight.new_zeros(4)
        return {"sum": rows.sum(0), "mean": rows.mean(0), "max": rows.amax(0)}[self.bag.mode]


@pytest.mark.parametrize("mode, layout, weighted, pad", [("sum", "rows", True, False), ("sum", "offsets", True, True),
                                                         ("mean", "rows", False, True), ("mean", "last", False, True),
                                                         ("max", "offsets", False, True), ("max", "rows", False, False),
                                                         ("max", "rows", False, True)])
def test_hvp_through_an_embedding_bag_is_its_bags_written_out(mode, layout, weighted, pad):
    """torch has no forward-mode derivative of embedding_bag, so `run --scores pds` refused a
    model with an nn.EmbeddingBag (PyTorch's text-classification tutorial). The product
    now runs the bags as index ops, the same function: it equals the product on the bags
    written out with nn.Embedding, one at a time, for sums (weighted), means and maxima,
    rows and offsets, padding, an empty bag and an id twice in a bag."""
    g = torch.Generator().manual_seed(1)
    tokens, y = torch.randint(1, 9, (7, 5), generator=g), torch.arange(7) % 3
    tokens[1, 2:], tokens[2, 1] = 0, tokens[2, 0]      # padding; an id twice in a bag
    tokens[4] = tokens[4] if layout == "rows" else 0   # an empty bag
    model, explicit = (_Bags(mode, layout, weighted, pad, e).double().eval() for e in (False, True))
    torch.testing.assert_close(model(tokens), explicit(tokens), rtol=1e-14, atol=0)
    ds = gs.load_dataset.__globals__["TorchDataset"](list(zip(tokens, y)))
    v = {n: torch.randn(p.shape, dtype=p.dtype, generator=g) for n, p in model.named_parameters()}
    got, want = hvp(model, "cross_entropy", ds, v, batch_size=3), hvp(explicit, "cross_entropy", ds, v, batch_size=3)
    for n in v:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)
        assert want[n].abs().max() > 0


def test_hvp_refuses_an_embedding_bag_whose_composite_is_another_function():
    """max_norm renormalizes the table in place and scale_grad_by_freq scales the gradient:
    the product keeps torch's op there, and its refusal says so."""
    for kwargs in ({"max_norm": 1.0}, {"scale_grad_by_freq": True}):
        model = torch.nn.Sequential(torch.nn.EmbeddingBag(9, 4, mode="sum", **kwargs), torch.nn.Linear(4, 3)).double()
        ds = gs.load_dataset.__globals__["TorchDataset"](list(zip(torch.randint(0, 9, (4, 3)), torch.arange(4) % 3)))
        v = {n: torch.ones_like(p) for n, p in model.named_parameters()}
        with pytest.raises(gs.EngineError, match="forward-mode derivatives .* torch lacks one here"):
            hvp(model, "cross_entropy", ds, v)


class _Attention(torch.nn.Module):
    """Tokens' features -> ``kind`` ("encoder": an nn.TransformerEncoderLayer, whose
    attention calls F.scaled_dot_product_attention; "causal": that function with
    is_causal; "masked": with a float mask) -> mean -> 3 classes."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.inp, self.head = kind, torch.nn.Linear(3, 8), torch.nn.Linear(8, 3)
        if kind == "encoder":
            self.layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x):
        h = self.inp(x)
        if self.kind == "encoder":
            return self.head(self.layer(h).mean(1))
        q = h.unflatten(-1, (2, 4)).transpose(1, 2)
        mask = None if self.kind == "causal" else torch.linspace(-1, 1, x.shape[1] ** 2).reshape(x.shape[1], -1)
        a = torch.nn.functional.scaled_dot_product_attention(q, q.flip(-1), q, attn_mask=mask,
                                                             is_causal=self.kind == "causal")
        return self.head(a.transpose(1, 2).flatten(2).mean(1))


def _assert_hvp_is_the_gradients_difference(model, x, y, g, loss_fn=None):
    """hvp of ``model`` (float64) on (x, y) equals the central difference of its gradient
    (functional_call, torch's own ops) along a random direction; ``loss_fn``: a per-example
    loss (out, y) -> (B,), default cross-entropy."""
    from torch.func import functional_call, grad
    loss_fn = loss_fn or (lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none"))
    params = {n: p.detach() for n, p in model.named_parameters()}
    v = {n: torch.randn(p.shape, dtype=p.dtype, generator=g) for n, p in params.items()}
    got = hvp(model, loss_fn, gs.load_dataset.__globals__["TorchDataset"](list(zip(x, y))), v, batch_size=4)
    loss = lambda p: loss_fn(functional_call(model, p, (x,)), y).sum()  # noqa: E731
    eps = 1e-5
    plus, minus = (grad(loss)({n: t + sign * eps * v[n] for n, t in params.items()}) for sign in (1, -1))
    largest = 0.0
    for n in params:
        want = (plus[n] - minus[n]) / (2 * eps)
        torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-7 * float(want.abs().max()) + 1e-12)
        largest = max(largest, float(want.abs().max()))
    assert largest > 1e-3


@pytest.mark.parametrize("kind", ["encoder", "causal", "masked"])
def test_hvp_through_scaled_dot_product_attention_is_the_gradients_difference(kind):
    """torch's CPU flash kernel of F.scaled_dot_product_attention has no forward-mode
    derivative, so `run --scores pds` refused every nn.TransformerEncoderLayer (and told
    the user to set a Hugging Face option). The product now runs that function on torch's
    math kernel, the same function: it equals the central difference of the gradient."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 5, 3, dtype=torch.float64, generator=g), torch.arange(6) % 3
    _assert_hvp_is_the_gradients_difference(_Attention(kind).double().eval(), x, y, g)


class _SqueezeExcite(torch.nn.Module):
    """A Linear, a squeeze-and-excitation gate through nn.Hardsigmoid (MobileNetV3's; in
    place where ``inplace``), and a prototype head: minus the distances (torch.cdist, p)
    to 3 learned prototypes, one of them an example's features exactly."""

    def __init__(self, p: float, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.gate = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4)
        self.act, self.p = torch.nn.Hardsigmoid(inplace=inplace), p
        self.prototypes = torch.nn.Parameter(torch.randn(3, 4))

    def features(self, x):
        h = torch.tanh(self.lin(x))
        return h * self.act(3 * self.gate(h))

    def forward(self, x):
        return -torch.cdist(self.features(x), self.prototypes, p=self.p)


@pytest.mark.parametrize("p, inplace", [(2.0, False), (1.0, True), (3.0, False), (float("inf"), False)])
def test_hvp_through_hardsigmoid_and_cdist_is_the_gradients_difference(p, inplace):
    """torch has no forward-mode derivative of hardsigmoid's backward (MobileNetV3's
    squeeze-and-excitation gate) or of cdist (prototype and cosine classifiers): `run
    --scores pds` refused them. The product now runs their composite forms, the same
    functions (a distance of 0 has the gradient 0, as torch's)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, dtype=torch.float64, generator=g), torch.arange(6) % 3
    model = _SqueezeExcite(p, inplace).double().eval()
    _assert_hvp_is_the_gradients_difference(model, x, y, g)
    with torch.no_grad():   # a distance of exactly 0: its gradient is 0 in both
        model.prototypes[0] = model.features(x[:1])[0]
        assert float(model(x[:1])[0, 0]) == 0
    v = {n: torch.ones_like(t) for n, t in model.named_parameters()}
    got = hvp(model, "cross_entropy", gs.load_dataset.__globals__["TorchDataset"](list(zip(x, y))), v)
    assert all(bool(torch.isfinite(t).all()) for t in got.values())


@pytest.mark.parametrize("name", ["huber", "huber_weighted", "soft_margin", "multi_margin", "multi_margin_p2"])
def test_hvp_through_a_loss_without_a_forward_mode_derivative_is_the_gradients_difference(name):
    """torch has no forward-mode derivative of huber_loss's backward, soft_margin_loss or
    multi_margin_loss: `pds` refused a user's per-example loss made of them (robust
    regression, margin classifiers), and named "the model". The product now runs their
    composite forms, the same functions."""
    F = torch.nn.functional
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    losses = {"huber": lambda o, t: F.huber_loss(o, t, reduction="none", delta=0.4).sum(1),
              "huber_weighted": lambda o, t: F.huber_loss(o, t, reduction="none", weight=1 + t.abs()).sum(1),
              "soft_margin": lambda o, t: F.soft_margin_loss(o, t.sign(), reduction="none").sum(1),
              "multi_margin": lambda o, t: F.multi_margin_loss(o, t.argmax(1), margin=0.7, weight=w,
                                                               reduction="none"),
              "multi_margin_p2": lambda o, t: F.multi_margin_loss(o, t.argmax(1), p=2, reduction="none")}
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, dtype=torch.float64, generator=g), torch.randn(6, 3, dtype=torch.float64, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    _assert_hvp_is_the_gradients_difference(model, x, y, g, losses[name])


def test_step_size_scaling_and_missing_target(tmp_path):
    ckpts, proxy, target, *_ = _gd_run(tmp_path)
    from gradscore.scores.costate import step_sizes
    assert step_sizes(gs.CheckpointStore(ckpts)).tolist() == LRS
    with pytest.raises(gs.ConfigError, match="'target'.*need a target set"):
        gs.score(ckpts, proxy, out=tmp_path / "s.h5", scores=["pds"], progress=False)


def test_target_with_other_classes_or_shape_is_refused(tmp_path):
    ckpts, proxy, target, *_ = _gd_run(tmp_path)
    bad = gs.save_dataset(tmp_path / "bad.h5", np.zeros((4, 5)), np.array([0, 1, 2, 7]))
    with pytest.raises(gs.DataError, match=r"bad\.h5: field 'targets' has label 7 at index 3"):
        compute_costate(CostateConfig(str(ckpts), str(proxy), str(bad)), progress=False)
    wide = gs.save_dataset(tmp_path / "wide.h5", np.zeros((4, 8)), np.array([0, 1, 2, 0]))
    with pytest.raises(gs.DataError, match=r"wide\.h5: target field 'inputs' \(per-example shape \(8,\), torch.float64\)"):
        compute_costate(CostateConfig(str(ckpts), str(proxy), str(wide)), progress=False)
    assert not (ckpts / "costate.h5").exists()


@pytest.mark.slow   # spawns and kills the CLI; test_resume.py keeps run's SIGKILL smoke test in the default set
def test_costate_cli_and_sigkill_resume_is_bit_identical(tmp_path):
    import subprocess
    import sys

    import h5py
    from helpers import sigkill_when
    from gradscore.cli import main

    ckpts, proxy, target, *_ = _gd_run(tmp_path)
    # more checkpoints so the run lasts long enough to be killed: repeat θ_6 with new steps
    for t in range(7, 40):
        with h5py.File(ckpts / "step_00000006.h5") as src, h5py.File(ckpts / f"step_{t:08d}.h5", "w") as dst:
            for k in src:
                src.copy(src[k], dst, name=k)
            dst.attrs.update(dict(src.attrs))
            dst.attrs.update({"step": t, "epoch": t, "lr": 0.1})
    cmd = [sys.executable, "-m", "gradscore", "costate", "--checkpoints", str(ckpts), "--proxy", str(proxy),
           "--target", str(target), "--dtype", "float64", "--hvp-batch", "1", "--quiet"]
    killed, partial = tmp_path / "killed.h5", tmp_path / "killed.h5.partial"
    sigkill_when(cmd + ["--out", str(killed)], lambda: partial.is_dir() and len(list(partial.glob("t*.h5"))) >= 2)
    assert not killed.exists() and 2 <= len(list(partial.glob("t*.h5"))) < 40
    subprocess.run(cmd + ["--out", str(killed)], check=True)
    assert main(["costate", "--checkpoints", str(ckpts), "--proxy", str(proxy), "--target", str(target),
                 "--dtype", "float64", "--hvp-batch", "1", "--quiet", "--out", str(tmp_path / "clean.h5")]) == 0
    a, b = CostateFile(killed), CostateFile(tmp_path / "clean.h5")
    for t in range(40):
        for get in (a.grad_target, a.costate):
            x, y = get(t), getattr(b, get.__name__)(t)
            assert (x is None) == (y is None) and (x is None or all(torch.equal(x[k], y[k]) for k in x)), t


def test_run_cli_pds_bad_target_exits_2(tmp_path, capsys):
    from gradscore.cli import main
    ckpts, proxy, target, *_ = _gd_run(tmp_path)
    bad = gs.save_dataset(tmp_path / "bad.h5", np.zeros((4, 5)), np.array([0, 1, 2, 5]))
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(proxy), "--target", str(bad),
                 "--scores", "pds", "--out", str(tmp_path / "s.h5"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.h5: field 'targets' has label 5 at index 3" in err and err.count("\n") == 1
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(proxy), "--scores", "pds",
                 "--out", str(tmp_path / "s.h5"), "--quiet"]) == 2
    assert "need a target set" in capsys.readouterr().err
    assert not (tmp_path / "s.h5").exists() and not (ckpts / "costate.h5.partial").exists()


def test_run_with_another_target_says_how_to_recompute_its_costates_and_does(tmp_path, capsys):
    """The default co-state file (CHECKPOINTS/costate.h5) of another target, or of checkpoints
    trained anew, stopped `run` with "pass --overwrite to replace it", which `run --overwrite`
    did not do: the user could not get past it without deleting the file."""
    from gradscore.cli import main
    ckpts, proxy, target, *_ = _gd_run(tmp_path)
    other = gs.save_dataset(tmp_path / "other.h5", *(a.numpy() for a in _data(2, 7)))

    def run(target, out, *extra):
        return main(["run", "--checkpoints", str(ckpts), "--data", str(proxy), "--target", str(target),
                     "--scores", "pds,grand", "--out", str(tmp_path / out), "--quiet", *extra])
    assert run(target, "a.h5") == 0
    before = (ckpts / "costate.h5").read_bytes()
    assert run(other, "b.h5") == 2
    err = capsys.readouterr().err
    assert "costate.h5: was computed with other settings (target" in err and err.count("\n") == 1
    assert "pass --overwrite to recompute it, or --costate FILE to keep it and write these to FILE" in err
    assert (ckpts / "costate.h5").read_bytes() == before and not (tmp_path / "b.h5").exists()
    assert run(other, "b.h5", "--costate", str(tmp_path / "other_costate.h5")) == 0
    assert run(other, "c.h5", "--overwrite") == 0
    want, got = gs.load_scores(tmp_path / "b.h5")["scores"], gs.load_scores(tmp_path / "c.h5")["scores"]
    assert np.array_equal(want["pds"], got["pds"]) and not np.array_equal(want["pds"], gs.load_scores(
        tmp_path / "a.h5")["scores"]["pds"])
    # co-states that match are reused under --overwrite, not recomputed
    mtime = (ckpts / "costate.h5").stat().st_mtime_ns
    assert run(other, "c.h5", "--overwrite") == 0 and (ckpts / "costate.h5").stat().st_mtime_ns == mtime


def test_pds_demo_small(tmp_path, capsys):
    from gradscore.demos.digits import run_pds_demo
    summary = run_pds_demo(tmp_path / "d", steps=2, progress=False)
    text = capsys.readouterr().out
    assert "10 most helpful by PDS" in text and "10 most harmful by PDS" in text and "the trap" in text
    assert (tmp_path / "d" / "ckpts" / "costate.h5").exists()
    assert len(list((tmp_path / "d" / "ckpts").glob("step_*.h5"))) == 3
    assert 0 <= summary["noisy_in_top50_abs_pds"] <= 50


def test_stability_warnings_name_momentum_and_divergence():
    from gradscore.scores.costate import GROWTH_BOUND, stability_warnings
    assert stability_warnings(["SGD", ""], [0.0, 1.0, 1.2, 1.1]) == []
    assert "SGD(momentum=0.9)" in stability_warnings(["SGD(momentum=0.9)"], [0.0, 1.0, 1.0])[0]
    assert "AdamW" in stability_warnings(["AdamW"], [0.0, 1.0, 1.0])[0]
    assert "SGD(lr per group=0.1,0.01)" in stability_warnings(["SGD(lr per group=0.1,0.01)"], [0.0, 1.0, 1.0])[0]
    grown = stability_warnings(["SGD"], [0.0, 4.8e29, 4.8e3, 4.8])   # ‖λ_1‖ … ‖λ_T‖, backwards growth
    assert len(grown) == 1 and "diverges" in grown[0] and f"{1e26:.3g}" in grown[0]
    assert stability_warnings(["SGD"], [0.0, GROWTH_BOUND * 0.99, 1.0]) == []
    assert "NaN/Inf" in stability_warnings(["SGD"], [0.0, float("nan"), 1.0])[0]


def test_a_warning_is_one_line_of_the_command_once(tmp_path):
    """The command line prints each warning once, as its own line: not again as a Python
    warning with a file name and a source line. Deprecations are shown as a newer torch
    shows them: torch 2.14 warns (FutureWarning) from its own jvp decompositions, which
    call torch.jit.script, and ``costate`` printed that to the user."""
    import subprocess
    import sys

    import h5py
    from helpers import make_run
    ckpts, data = make_run(tmp_path, n_ckpts=3)
    for p in ckpts.glob("step_*.h5"):
        with h5py.File(p, "a") as f:
            f.attrs["optimizer"] = "SGD(momentum=0.9)"
            seal(f)   # written so, not damaged
    err = subprocess.run([sys.executable, "-W", "default::DeprecationWarning", "-W", "default::FutureWarning",
                          "-m", "gradscore", "costate", "--checkpoints", str(ckpts), "--proxy",
                          str(data), "--target", str(data), "--quiet"], capture_output=True, text=True,
                         check=True).stderr
    assert err.count("written by SGD(momentum=0.9)") == 1 and "GradscoreWarning" not in err, err
    assert all(line.startswith("gradscore costate: warning: ") for line in err.strip().splitlines()), err


def test_a_diverging_costate_warns_in_the_file_the_cli_and_diagnose(tmp_path, capsys):
    """Checkpoints of SGD with momentum whose recorded η makes I − ηH expand: the co-state
    explodes backwards; costate, run and diagnose each say so, the files keep the warning."""
    import h5py
    from helpers import make_run
    from gradscore.cli import main
    ckpts, data = make_run(tmp_path, n_ckpts=4)
    for p in ckpts.glob("step_*.h5"):
        with h5py.File(p, "a") as f:
            f.attrs["lr"] = 400.0
            f.attrs["optimizer"] = "SGD(momentum=0.9)"
            seal(f)   # written so, not damaged
    assert main(["costate", "--checkpoints", str(ckpts), "--proxy", str(data), "--target", str(data),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "the checkpoints were written by SGD(momentum=0.9)" in err
    assert "the co-state diverges going backwards" in err, err
    out = tmp_path / "s.h5"
    assert main(["run", "--checkpoints", str(ckpts), "--data", str(data), "--target", str(data), "--out", str(out),
                 "--scores", "pds,grand", "--quiet"]) == 0
    assert "the co-state diverges" in capsys.readouterr().err
    assert any("diverges" in w for w in gs.load_scores(out)["warnings"])
    assert main(["diagnose", str(out), "--out", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    assert "warning: the co-state diverges" in text and "of the largest |⟨g, v⟩|" in text
    report = json.loads((tmp_path / "d" / "diagnosis.json").read_text())
    assert report["warnings"] and report["decomposition_max_rel_error"] < 1e-6


def test_a_costate_that_overflowed_stops_run_with_its_cause(tmp_path, capsys):
    """η so large that λ_t overflows to Inf/NaN going backwards: `costate` warns; `run`
    then stopped with every example's pds non-finite, blaming "NaN/Inf in their inputs, or
    a diverged checkpoint". It names the co-state file and the checkpoint instead, and
    --allow-nonfinite still records the NaN values."""
    import h5py
    from helpers import make_run
    from gradscore.cli import main
    ckpts, data = make_run(tmp_path, n_ckpts=4)
    for p in ckpts.glob("step_*.h5"):
        with h5py.File(p, "a") as f:
            f.attrs["lr"] = 1e30
            seal(f)   # written so, not damaged
    costate = tmp_path / "c.h5"
    assert main(["costate", "--checkpoints", str(ckpts), "--proxy", str(data), "--target", str(data),
                 "--out", str(costate), "--quiet"]) == 0
    assert "the co-state diverged to NaN/Inf going backwards" in capsys.readouterr().err
    out = tmp_path / "s.h5"
    argv = ["run", "--checkpoints", str(ckpts), "--data", str(data), "--target", str(data), "--costate", str(costate),
            "--out", str(out), "--scores", "pds,grand", "--quiet"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if ": warning: " not in line]
    assert len(err) == 1 and f"{costate}: λ_t+1 of checkpoint step_0000000" in err[0], err
    assert "is not finite" in err[0] and "their inputs" not in err[0] and "--allow-nonfinite" in err[0], err
    assert not out.exists()
    assert main(argv + ["--allow-nonfinite"]) == 0
    assert not np.isfinite(gs.load_scores(out)["scores"]["pds"]).all()


def test_target_dot_over_checkpoints_of_momentum_warns_without_pds(tmp_path):
    """target_dot weighs ⟨∇J(θ_t), g_n⟩ by η_t as for plain gradient steps, with or without
    the co-states: checkpoints of SGD with momentum say so in a target_dot-only run too."""
    import h5py
    from helpers import make_run
    ckpts, data = make_run(tmp_path, n_ckpts=3)
    plain = gs.load_scores(gs.score(ckpts, data, out=tmp_path / "plain.h5", target=data, scores=["target_dot"],
                                    progress=False))
    assert plain["warnings"] == []
    (ckpts / "target_gradient.h5").unlink()
    for p in ckpts.glob("step_*.h5"):
        with h5py.File(p, "a") as f:
            f.attrs["optimizer"] = "SGD(momentum=0.9)"
            seal(f)   # written so, not damaged
    with pytest.warns(gs.exceptions.GradscoreWarning, match=r"written by SGD\(momentum=0.9\).*target_dot"):
        out = gs.score(ckpts, data, out=tmp_path / "s.h5", target=data, scores=["target_dot"], progress=False)
    assert not CostateFile(ckpts / "target_gradient.h5").has_costates
    assert any("written by SGD(momentum=0.9)" in w for w in gs.load_scores(out)["warnings"])


def test_a_damaged_unit_of_an_interrupted_costate_run_is_named_with_its_fix(tmp_path, capsys, monkeypatch):
    """A co-state run resumes from its journal's units (λ_t per checkpoint). A damaged unit
    said "cannot write or read a file: ...; check the path and its permissions", naming
    neither the unit nor the fix. It names the unit; deleted, it is computed again."""
    from gradscore.cli import main
    from gradscore.scores import costate
    from helpers import flip_a_byte_of, numeric_datasets
    ckpts, proxy, target, *_ = _gd_run(tmp_path)
    config = CostateConfig(checkpoints=str(ckpts), proxy=str(proxy), target=str(target))
    want = compute_costate(config, tmp_path / "whole.h5", progress=False)
    saves, save = [], costate._save_unit

    def interrupted(*args):
        if len(saves) == 2:
            raise KeyboardInterrupt
        saves.append(args[0])
        save(*args)
    monkeypatch.setattr(costate, "_save_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compute_costate(config, tmp_path / "c.h5", progress=False)
    monkeypatch.setattr(costate, "_save_unit", save)
    unit = saves[1]   # λ_t of the second checkpoint from the end, read to go on
    flip_a_byte_of(unit, next(n for n in numeric_datasets(unit) if n.startswith("costate/")))
    argv = ["costate", "--checkpoints", str(ckpts), "--proxy", str(proxy), "--target", str(target),
            "--out", str(tmp_path / "c.h5"), "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gradscore costate: error: {unit}: is damaged (") and err.count("\n") == 1, err
    assert "delete it and rerun: it is computed again" in err, err
    unit.unlink()
    assert main(argv) == 0
    got, ref = CostateFile(tmp_path / "c.h5"), CostateFile(want)
    for t in range(1, len(got.steps)):
        for k, v in ref.costate(t).items():
            torch.testing.assert_close(got.costate(t)[k], v, rtol=1e-12, atol=0)
    got.close(), ref.close()


def test_a_damaged_costate_file_is_one_line_and_recomputed_once_deleted(tmp_path, capsys):
    """A co-state file damaged on disk (a dataset failing its checksum, a link to nothing):
    `run` reusing it said "cannot write or read a file ...; check the path and its
    permissions", naming neither the file nor the fix, or stopped in h5py's KeyError
    traceback. It names the file and says to delete it, after which the rerun computes it
    again and writes the scores of the intact file."""
    import shutil
    import h5py
    from gradscore.cli import main
    from helpers import flip_a_byte_of, numeric_datasets
    ckpts, proxy, target, *_ = _gd_run(tmp_path)

    def run(out):
        return main(["run", "--checkpoints", str(ckpts), "--data", str(proxy), "--target", str(target),
                     "--scores", "pds,grand", "--out", str(tmp_path / out), "--quiet"])
    assert run("good.h5") == 0
    good, path = (ckpts / "costate.h5").read_bytes(), ckpts / "costate.h5"
    names = [n for n in numeric_datasets(path) if "/" in n]   # ∇J(θ_t) and λ_t, read per checkpoint
    assert any("/costate/" in n for n in names) and any("/grad_target/" in n for n in names)
    header = [n for n in numeric_datasets(path) if "/" not in n]   # η_t, steps, norms: η_t was unchecksummed,
    assert {"eta", "step"} <= set(header)                           # and a flipped bit gave other PDS scores
    for i, name in enumerate(names[::3] + header + ["link"]):
        path.write_bytes(good)
        if name == "link":
            with h5py.File(path, "r+") as f:
                f["t_00001/costate/lost"] = h5py.SoftLink("/nowhere")
        else:
            flip_a_byte_of(path, name)
        capsys.readouterr()
        assert run(f"bad{i}.h5") == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"gradscore run: error: {path}: ") and err.count("\n") == 1, err
        assert "is damaged" in err and "delete it and rerun: it is computed again" in err, err
        shutil.rmtree(tmp_path / f"bad{i}.h5.partial", ignore_errors=True)
    path.unlink()
    assert run("again.h5") == 0
    assert np.array_equal(gs.load_scores(tmp_path / "again.h5")["scores"]["pds"],
                          gs.load_scores(tmp_path / "good.h5")["scores"]["pds"])
