"""Every fast engine against the per-example autograd loop, in float64."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscore as gs
from helpers import (BATCH_LOSSES, ChannelsLastNorm, EvalStateInPlace, PatchTokens, batch_forward_gradients,
                     channels_last_equals_contiguous, python_child)
from gradscore.engines import Engine, engine_class
from gradscore.engines.base import _ENGINES
from gradscore.demos.models import digits_cnn, mlp


def _models():
    torch.manual_seed(0)
    cnn = digits_cnn(channels=4, batchnorm=True)
    # give BatchNorm non-trivial running statistics so eval mode is really exercised
    cnn[1].running_mean.uniform_(-0.5, 0.5)
    cnn[1].running_var.uniform_(0.5, 2.0)
    return {
        "mlp": (mlp(d_in=12, hidden=8, n_classes=5, depth=2), torch.randn(9, 12)),
        "cnn": (cnn, torch.randn(9, 1, 8, 8)),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("chunk_elems", [1, 4, 10**9])
def test_vmap_matches_loop_float64(name, chunk_elems):
    model, x = _models()[name]
    model = model.double().eval()
    x = x.double()
    n_classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    y = torch.randint(0, n_classes, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(3, P, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = gs.Scorer(model, engine="loop").score_batch(x, y, refs=V)
    fast = gs.Scorer(model, engine="vmap", chunk_bytes=chunk_elems * P * 8).score_batch(x, y, refs=V)
    for field in ("loss", "sq_norm", "dots", "logits"):
        torch.testing.assert_close(getattr(fast, field), getattr(ref, field), rtol=1e-6, atol=0)
    assert ref.dots.shape == (9, 3) and ref.sq_norm.shape == (9,)
    assert float(ref.sq_norm.min()) > 0


def test_refs_as_dicts_equal_refs_as_tensor():
    model = mlp(d_in=6, hidden=5, n_classes=3, depth=1).double().eval()
    scorer = gs.Scorer(model, engine="vmap")
    V = torch.randn(2, scorer.num_params, dtype=torch.float64)
    dicts, offset = [{}, {}], 0
    for name, p in model.named_parameters():
        for k in range(2):
            dicts[k][name] = V[k, offset:offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    a = scorer.score_batch(x, y, refs=V)
    b = scorer.score_batch(x, y, refs=dicts)
    torch.testing.assert_close(a.dots, b.dots, rtol=1e-12, atol=0)
    # the dot with g itself: V = per-example gradient of example 0 gives dots[0] = sq_norm[0]
    named = dict(model.named_parameters())
    loss = torch.nn.functional.cross_entropy(model(x[:1]), y[:1])
    g0 = torch.autograd.grad(loss, list(named.values()))
    out = scorer.score_batch(x, y, refs=[dict(zip(named, g0))])
    torch.testing.assert_close(out.dots[0, 0], out.sq_norm[0], rtol=1e-12, atol=0)


def test_no_refs_gives_no_dots_and_forward_only_matches():
    model = mlp(d_in=6, hidden=5, n_classes=3, depth=1).double().eval()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    full = gs.Scorer(model).score_batch(x, y)
    fwd = gs.Scorer(model).score_batch(x, y, gradients=False)
    assert full.dots is None and fwd.sq_norm is None
    torch.testing.assert_close(full.loss, fwd.loss, rtol=1e-12, atol=0)


def test_frozen_parameters_are_not_scored():
    model = mlp(d_in=6, hidden=5, n_classes=3, depth=1).double().eval()
    model[1].weight.requires_grad_(False)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    vm = gs.Scorer(model, engine="vmap")
    assert "1.weight" not in vm.param_names
    torch.testing.assert_close(vm.score_batch(x, y).sq_norm,
                               gs.Scorer(model, engine="loop").score_batch(x, y).sq_norm,
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(5), nn.Dropout(0.5)])
def test_train_mode_coupling_layers_are_refused(layer):
    model = nn.Sequential(nn.Linear(4, 5), layer, nn.Linear(5, 3)).train()
    with pytest.raises(gs.EngineError, match="training mode.*model.eval"):
        gs.Scorer(model).score_batch(torch.randn(3, 4), torch.tensor([0, 1, 2]))


class _NoiseInEval(nn.Module):
    """Noise added to the hidden layer in eval mode too (a noise-injection regularizer
    without a ``self.training`` check)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h + 0.3 * torch.randn_like(h))


@pytest.mark.parametrize("engine", ["auto", "ghost", "vmap", "loop"])
@pytest.mark.parametrize("kind", ["F.dropout", "noise"])
def test_a_forward_random_in_eval_mode_is_refused_by_every_engine(engine, kind):
    """A forward that draws random numbers in eval mode gives every score as a random draw
    (the same example scored twice differs): every engine refuses it, before scoring, with
    the cause and the fix, and nothing is refused of a forward that is deterministic."""
    from tests_factory import drops_in_eval
    model = (drops_in_eval(d_in=6, hidden=8, n_classes=3) if kind == "F.dropout" else _NoiseInEval()).double().eval()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    scorer = gs.Scorer(model, engine=engine)
    for gradients in (True, False):
        with pytest.raises(gs.EngineError, match=r"differs between two forwards of the same examples in eval "
                                                 r"mode.*F\.dropout\(x, p, training=self\.training\)"):
            scorer.score_batch(x, y, gradients=gradients)
    fixed = mlp(d_in=6, hidden=8, n_classes=3, depth=1).double().eval()
    gs.Scorer(fixed, engine=engine).score_batch(x, y)


def test_bad_refs_are_refused():
    model = mlp(d_in=6, hidden=5, n_classes=3, depth=1).eval()
    scorer = gs.Scorer(model)
    x, y = torch.randn(2, 6), torch.tensor([0, 1])
    with pytest.raises(gs.EngineError, match=r"\(K, %d\)" % scorer.num_params):
        scorer.score_batch(x, y, refs=torch.randn(2, scorer.num_params + 1))
    with pytest.raises(gs.EngineError, match="no entry for parameter"):
        scorer.score_batch(x, y, refs=[{}])
    with pytest.raises(gs.EngineError, match="unknown engine"):
        gs.Scorer(model, engine="nope")
    with pytest.raises(gs.EngineError, match="unknown loss"):
        gs.Scorer(model, loss="hinge")
    for budget in ("x", float("nan"), 0, -5, 1.5):   # "x" and NaN were int()'s ValueError; 0 and -5 taken
        with pytest.raises(gs.ConfigError, match=f"invalid value for 'chunk_bytes': {budget!r}; give the memory "
                                                 f"budget of one block of per-example gradients in bytes"):
            gs.Scorer(model, chunk_bytes=budget)


@pytest.mark.parametrize("given", [lambda x: x, "model.pt", None], ids=["function", "path", "none"])
def test_what_is_not_a_module_is_refused_where_a_model_is_given(tmp_path, given):
    """A function, a checkpoint's path or None given as the model raised torch's or Python's
    AttributeError ('function' object has no attribute 'named_parameters') from inside
    gs.Scorer, gs.InRun and CheckpointWriter.save: one ConfigError naming the value and the fix."""
    writer = gs.CheckpointWriter(tmp_path / "ckpts", model_factory="gradscore.demos.models:mlp",
                                 model_kwargs={"d_in": 6, "hidden": 4, "n_classes": 3})
    for give in (gs.Scorer, lambda m: gs.InRun(m, out=tmp_path / "r.h5"), lambda m: writer.save(m, step=0, lr=0.1)):
        with pytest.raises(gs.ConfigError, match=rf"invalid value for 'model': a {type(given).__name__}; give the "
                                                 rf"torch.nn.Module"):
            give(given)
    assert not any(tmp_path.iterdir()) or [p.name for p in tmp_path.iterdir()] == ["ckpts"]


def test_a_lazy_layer_not_yet_run_or_a_meta_model_is_refused_where_a_model_is_given(tmp_path):
    """nn.LazyLinear has no shape until a forward: gs.Scorer, gs.InRun and
    CheckpointWriter.save raised torch's RuntimeError or ValueError from inside. One
    ConfigError naming the parameter and the fix; after one forward all three work."""
    from tests_factory import lazy_net
    writer = gs.CheckpointWriter(tmp_path / "ckpts", model_factory="tests_factory:lazy_net")
    model = lazy_net()
    gives = (gs.Scorer, lambda m: gs.InRun(m, out=tmp_path / "r.h5"), lambda m: writer.save(m, step=0, lr=0.1))
    for give in gives:
        with pytest.raises(gs.ConfigError, match=r"parameter '0.weight' of a lazy layer \(LazyLinear\) has no shape "
                                                 r"yet: run the model on one batch before"):
            give(model)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    model(torch.randn(2, 12))
    for give in gives:
        give(model)
    with pytest.raises(gs.ConfigError, match=r"parameter '0.weight' is on the meta device, a shape without values: "
                                             r"load the weights first"):
        gs.Scorer(model.to("meta"))   # was Tensor.item()'s RuntimeError at the first batch


def test_torchs_missing_batching_rule_notes_stay_inside_the_vmap_engine():
    """torch.func.vmap says 'There is a performance drop because we have not yet implemented
    the batching rule for aten::embedding_renorm_' (nn.Embedding(max_norm=...)) and for
    EmbeddingBag: a note to torch's developers, printed to a user of auto (which takes vmap
    there) at every batch. The scores are the loop's, with no warning (vmap itself cannot
    trace max_norm's in-place renorm: auto's fallback takes the loop)."""
    from tests_factory import embeddings
    model = embeddings().double()
    model.emb.max_norm = 0.5
    tokens, y = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(0)), torch.arange(6) % 3
    want = gs.Scorer(model, engine="loop").score_batch(tokens, y).sq_norm
    with warnings.catch_warnings(record=True) as given:   # recorded: an error would only change the path taken
        warnings.simplefilter("always")
        torch.testing.assert_close(gs.Scorer(model, engine="auto").score_batch(tokens, y).sq_norm, want)
        with pytest.raises(gs.EngineError, match="vmap cannot trace this model .*embedding_renorm_.*use engine='auto'"):
            gs.Scorer(model, engine="vmap").score_batch(tokens, y)
    assert [str(w.message) for w in given] == []


class _TwoInputs(nn.Module):
    """forward(image, meta): a model with two positional inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, image, meta):
        return self.a(image) + self.b(meta)


def test_inputs_given_as_a_tuple_name_the_forwards_arguments(tmp_path):
    """A tuple (image, meta) of inputs was torch's 'only one element tensors can be converted
    to Python scalars' from inside gs.Scorer and gs.InRun's targets, and the recorder's step
    refused model(image, meta) without the fix. One error naming the dict to give (a dict
    works: the model is called as model(**x)), and it scores as the loop."""
    model = _TwoInputs().double()
    g = torch.Generator().manual_seed(0)
    image = torch.randn(5, 3, generator=g, dtype=torch.float64)
    meta = torch.randn(5, 2, generator=g, dtype=torch.float64)
    y = torch.arange(5) % 4
    given = (r"a (tuple|list) of 2 tensors; give a model's several inputs as a dict by the names of its forward's "
             r"arguments, \{'image': \.\.\., 'meta': \.\.\.\} \(called as model\(\*\*x\)\)")
    for call in (lambda: gs.Scorer(model).score_batch((image, meta), y), lambda: gs.Scorer(model).output([image, meta]),
                 lambda: gs.InRun(model, out=tmp_path / "r.h5", targets=((image, meta), y))):
        with pytest.raises(gs.GradscoreError, match=given):
            call()
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with pytest.raises(gs.EngineError, match=r"called with 2 positional and 0 keyword arguments: pass them all by "
                                             r"name, model\(image=\.\.\., meta=\.\.\.\)"):
        with rec.step(torch.arange(5), y, lr=0.1):
            F.cross_entropy(model(image, meta), y).backward()
    as_dict = {"image": image, "meta": meta}
    torch.testing.assert_close(gs.Scorer(model).score_batch(as_dict, y).sq_norm,
                               gs.Scorer(model, engine="loop").score_batch(as_dict, y).sq_norm)


class _TwoOutputs(nn.Module):
    """forward returns (logits, features) or {"out": logits, "feat": features}."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.a, self.kind = nn.Linear(3, 4), kind

    def forward(self, x):
        h = self.a(x)
        return (h, torch.tanh(h)) if self.kind == "tuple" else {"out": h, "feat": torch.tanh(h)}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_an_output_gradscore_cannot_read_is_one_error_with_the_fix(tmp_path, kind):
    """A model returning (logits, features) was a TypeError that every engine wrapped as 'check
    that the inputs fit the model and loss', and that the recorder reported as 'Linear 'a'
    the model did not run on 1 and 2 copies': neither the cause nor the fix."""
    model = _TwoOutputs(kind)
    x, y = torch.randn(5, 3), torch.arange(5) % 4
    says = rf"the model returned a {kind} of 2; gradscore reads its output as one tensor of logits, or the 'logits' " \
           rf"of a Hugging Face output or dict: give gradscore a model whose forward returns the logits"
    for engine in ("auto", "ghost", "vmap", "loop"):
        with pytest.raises(gs.EngineError, match=says):
            gs.Scorer(model, engine=engine).score_batch(x, y)
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with pytest.raises(gs.EngineError, match=says):
        with rec.step(torch.arange(5), y, lr=0.1):
            out = model(x)
            F.cross_entropy(out[0] if kind == "tuple" else out["out"], y).backward()


def test_every_engine_implements_the_abc():
    assert {"vmap", "loop"} <= set(_ENGINES)
    for name, cls in _ENGINES.items():
        assert issubclass(cls, Engine) and engine_class(name) is cls and cls.name == name
        assert not getattr(cls, "__abstractmethods__", None)


def test_custom_and_mse_losses_match_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    for loss in ("mse", lambda out, t: (out - t).abs().sum(1)):
        a = gs.Scorer(model, loss=loss, engine="vmap").score_batch(x, y)
        b = gs.Scorer(model, loss=loss, engine="loop").score_batch(x, y)
        torch.testing.assert_close(a.sq_norm, b.sq_norm, rtol=1e-10, atol=0)


@pytest.mark.parametrize("engine", ["auto", "ghost", "vmap", "loop"])
@pytest.mark.parametrize("name", [*BATCH_LOSSES, "per example"])
def test_a_loss_that_reads_the_batch_is_taken_per_example_by_every_engine(engine, name):
    """A user's loss whose value for an example reads the other rows of its batch
    (log_softmax over dim 0 instead of the classes) was taken on the whole batch by ghost
    and by every forward-only score, and on each example alone by vmap and the loop: the
    engines gave other losses and norms (ghost's losses 3.26 against the loop's 1.45),
    silently. Every engine now takes each example's loss alone, as the loop does, and the
    engines that see the batch say so in a warning; a loss that is per example runs as
    before, without one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    fn = BATCH_LOSSES.get(name, lambda z, y: F.cross_entropy(z, y, reduction="none"))
    params = list(model.parameters())
    losses = [fn(model(x[b:b + 1]), y[b:b + 1])[0] for b in range(6)]
    want = torch.stack([sum((g ** 2).sum() for g in torch.autograd.grad(l, params, allow_unused=True)
                            if g is not None) for l in losses])
    scorer = gs.Scorer(model, loss=fn, engine=engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = scorer.score_batch(x, y)
        alone = scorer.score_batch(x, y, gradients=False)
    said = [str(w.message) for w in caught if issubclass(w.category, gs.GradscoreWarning)]
    torch.testing.assert_close(got.loss, torch.stack(losses).detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(alone.loss, torch.stack(losses).detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.sq_norm, want, rtol=1e-10, atol=1e-20)
    if name == "per example":
        assert not said, said
    else:
        assert len(said) <= 1 and all("depends on the other examples of its batch" in s for s in said), said
        assert said or engine in ("vmap", "loop"), said


def test_above_its_size_an_outputs_gradient_is_not_formed_to_check_the_loss(monkeypatch):
    """The check of a user's loss forms its output's gradient (B, ...) only up to a size (a
    language model's (B, T, V) logits: the values alone); the built-ins are not checked."""
    from gradscore import losses
    z, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    check = {n: losses.resolve_loss(fn) for n, fn in BATCH_LOSSES.items()}
    assert all(losses.reads_the_batch(loss, z, y) for loss in check.values())
    assert losses.reads_the_batch(losses.resolve_loss("cross_entropy"), z, y) is None
    monkeypatch.setattr(losses, "_ROWS_GRAD_ELEMENTS", z.numel() - 1)
    assert losses.reads_the_batch(check["gradient by the batch"], z, y) is None   # its values are cross_entropy's
    assert all(losses.reads_the_batch(loss, z, y) for n, loss in check.items() if n != "gradient by the batch")


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_mse_of_one_output_per_example_against_a_target_vector(engine):
    """A regressor's output (B, 1) against targets (B,), the usual layout of y: the loss of
    example b is (out_b − y_b)², not Σ_j (out_b − y_j)² over the batch, which broadcasting
    gave (a wrong loss and norm for every example). Targets whose layout is not the
    output's up to single dimensions are one EngineError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double().eval()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    got = gs.Scorer(model, loss="mse", engine=engine).score_batch(x, y)
    params = list(model.parameters())
    losses = [(model(x[b:b + 1])[0, 0] - y[b]) ** 2 for b in range(6)]
    want = torch.stack([sum((g ** 2).sum() for g in torch.autograd.grad(l, params)) for l in losses])
    torch.testing.assert_close(got.loss, torch.stack(losses).detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(got.sq_norm, want, rtol=1e-10, atol=0)
    wide = nn.Sequential(nn.Linear(5, 2)).double().eval()
    with pytest.raises(gs.EngineError, match=r"'mse' loss: targets of shape \((6|1),\) for outputs of shape \((6|1), 2\)"):
        gs.Scorer(wide, loss="mse", engine=engine).score_batch(x, y)


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_cross_entropy_of_one_logit_is_refused(engine, tmp_path):
    """A binary classifier with one logit (trained with BCE), scored by the default loss:
    a softmax over one class is 1, so every loss and gradient was 0, without a word (with
    labels of 0 only; a label 1 was refused as out of range). One EngineError names the
    fix; in training too."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
    with pytest.raises(gs.EngineError, match=r"one logit per example.*is 0 for every example.*binary"):
        gs.Scorer(model.eval(), engine=engine).score_batch(x, y)
    if engine == "auto":
        rec = gs.InRun(model.train(), out=tmp_path / "r.h5")
        with pytest.raises(gs.EngineError, match=r"one logit per example"):
            with rec.step(range(6), y, lr=0.1):
                nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y.double()).backward()


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(9, 4), nn.Linear(4, 3)

    def forward(self, input_ids, scale):
        return self.head(torch.tanh(self.emb(input_ids) * scale).mean(1))


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("scale", [torch.tensor(2.0), torch.tensor([2.0])], ids=["0-dim", "one row"])
def test_an_input_without_the_batch_is_one_data_error_naming_it(engine, scale):
    """Every engine slices inputs by example: a constant among them (a temperature) gave
    an IndexError or a shape error from deep inside, blamed on the model and loss."""
    ids, y = torch.randint(0, 9, (6, 4)), torch.randint(0, 3, (6,))
    scorer = gs.Scorer(_Scaled(), engine=engine)
    with pytest.raises(gs.DataError, match=r"invalid input 'scale': shape \(.*\) in a batch of 6 examples"):
        scorer.score_batch({"input_ids": ids, "scale": scale}, y)
    with pytest.raises(gs.DataError, match="invalid input 'input_ids': shape \\(5, 4\\) in a batch of 6"):
        scorer.score_batch({"input_ids": ids[:5], "scale": torch.full((5,), 2.0)}, y)
    with pytest.raises(gs.DataError, match="invalid targets: one number"):
        scorer.score_batch({"input_ids": ids, "scale": torch.full((6, 1, 1), 2.0)}, torch.tensor(1))
    out = scorer.score_batch({"input_ids": ids, "scale": torch.full((6, 1, 1), 2.0)}, y)
    assert out.sq_norm.shape == (6,)


@pytest.mark.parametrize("row", [0, 3, 7], ids=["first", "middle", "last"])
def test_a_nan_in_one_examples_input_is_that_examples_nan_as_in_the_loop(row):
    """The layout runs read the first and last examples alone: a NaN there made their
    comparison raise torch's 'atol must be greater than or equal to zero'."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 10, dtype=torch.float64), torch.randint(0, 4, (8,))
    x[row, 2] = float("nan")
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double().eval()
    V = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    ref = gs.Scorer(model, engine="loop").score_batch(x, y, refs=V)
    out = gs.Scorer(model).score_batch(x, y, refs=V)
    assert out.sq_norm.isnan().nonzero().flatten().tolist() == [row]
    torch.testing.assert_close(out.sq_norm, ref.sq_norm, rtol=1e-10, atol=0, equal_nan=True)
    torch.testing.assert_close(out.dots, ref.dots, rtol=1e-10, atol=1e-12, equal_nan=True)


class _ShapeSwitch(nn.Module):
    """A GRU (vmap cannot trace it: the fallback takes the loop) and one Linear registered
    under two names, called on (B, T, d) and on its (T, B, d) transpose: with T == B the
    layout cannot tell its calls apart, so the Linear goes to the fallback."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 3, batch_first=True)
        self.a = nn.Linear(3, 3)
        self.b = self.a
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = self.rnn(x)[0]
        h = torch.tanh(self.a(h.transpose(0, 1))).transpose(0, 1)
        return self.head(torch.tanh(self.b(h)).mean(1))


@pytest.mark.parametrize("case, engine", [("twice", "vmap"), ("batchnorm_twice", "vmap"), ("twice", "auto"),
                                          ("batchnorm_twice", "auto"), ("fallback", "auto")])
def test_a_module_registered_twice_is_scored_and_left_as_it_was(case, engine):
    """torch's functional_call(tie_weights=True) leaves a module registered under two
    names holding its stand-in tensors (pytorch/pytorch#164759): the user's model lost
    its Parameters, and a loop that ran after it differentiated parameters no longer
    used, so its norms were 0. Every engine leaves each parameter and buffer the object it
    was and equals the loop, before and after."""
    torch.manual_seed(0)
    if case == "fallback":
        model, x = _ShapeSwitch().double(), torch.randn(2, 2, 4, dtype=torch.float64)   # T == B
    else:
        lin = nn.Linear(4, 4)
        mid = nn.BatchNorm1d(4) if case == "batchnorm_twice" else nn.Tanh()
        model, x = nn.Sequential(lin, mid, lin, mid, nn.Linear(4, 3)).double().eval(), torch.randn(5, 4, dtype=torch.float64)
        if case == "batchnorm_twice":
            mid.running_mean.uniform_()
    y = torch.randint(0, 3, (x.shape[0],))
    before = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    ref = gs.Scorer(model, engine="loop")
    V = torch.randn(2, ref.num_params, dtype=torch.float64)
    want = ref.score_batch(x, y, refs=V)
    for params in (None, ["head.weight" if case == "fallback" else "0.weight"]):
        got = gs.Scorer(model, engine=engine, params=params).score_batch(x, y)
        after = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
        assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    got = gs.Scorer(model, engine=engine).score_batch(x, y, refs=V)
    torch.testing.assert_close(got.sq_norm, want.sq_norm, rtol=1e-10, atol=0)
    torch.testing.assert_close(got.dots, want.dots, rtol=1e-10, atol=1e-14)
    if case == "fallback":   # the Linear's own norms, through the fallback's loop, after a vmap attempt
        for name in ("a.weight", "a.bias"):
            one = gs.Scorer(model, engine=engine, params=[name]).score_batch(x, y).sq_norm
            torch.testing.assert_close(one, gs.Scorer(model, engine="loop", params=[name]).score_batch(x, y).sq_norm,
                                       rtol=1e-10, atol=0)
            assert (one > 0).all()


class CachedBias(nn.Module):
    """Caches a tensor made from a parameter in eval mode and reuses it in later calls, as
    timm's LeViT and EfficientViT-M cache their attention biases (cleared by ``train()``)."""

    def __init__(self):
        super().__init__()
        self.body, self.table, self.head = nn.Linear(4, 4), nn.Parameter(torch.randn(4)), nn.Linear(4, 3)
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):
        self.cache = {}
        return super().train(mode)

    def forward(self, x):
        bias = self.table * 2 if self.training else self.cache.setdefault("bias", self.table * 2)
        return self.head(torch.tanh(self.body(x) + bias))


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_a_parameter_the_loss_does_not_reach_is_named_in_a_warning(engine):
    """A model that reads its parameter through a tensor cached by an earlier call under
    torch.no_grad() (an accuracy check before scoring) gives that parameter no gradient:
    every engine agreed on the norms without it, silently (timm's LeViT: 1e-5 off). The
    first scored batch now warns naming it, once per Scorer."""
    torch.manual_seed(0)
    model = CachedBias().double().eval()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        model(x)
    scorer = gs.Scorer(model, engine=engine)
    with pytest.warns(gs.exceptions.GradscoreWarning, match=r"no gradient reaches 'table'.*cached"):
        scorer.score_batch(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer.score_batch(x, y)


@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_per_example_gradients_that_do_not_add_up_are_warned_of(engine):
    """With the cache made by the scoring's own forward, the fallback's functional call does
    not see the parameter behind it: ghost's numbers (vmap's from the second batch) missed
    it, silently. The check against autograd on the first examples' summed loss says so."""
    torch.manual_seed(0)
    model = CachedBias().double().eval()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    with pytest.warns(gs.exceptions.GradscoreWarning, match=r"do not add up|no gradient reaches 'table'"):
        gs.Scorer(model, engine=engine).score_batch(x, y)


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_a_model_that_changes_in_place_what_its_backward_reads_gets_the_fix(engine):
    """Hugging Face's RWKV in eval mode updates its cached state in place, so its backward
    fails: the error said to check that the inputs fit the model (vmap: to use 'auto', which
    failed too). It names the cause and the fix; with the cache off, it scores as the loop."""
    torch.manual_seed(0)
    model = EvalStateInPlace().double().eval()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    with pytest.raises(gs.EngineError, match=r"modified by an inplace.*changes in place.*use_cache = False"):
        gs.Scorer(model, engine=engine).score_batch(x, y)
    model.use_cache = False
    want = gs.Scorer(model, engine="loop").score_batch(x, y)
    torch.testing.assert_close(gs.Scorer(model, engine=engine).score_batch(x, y).sq_norm, want.sq_norm,
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "tokens"])
def test_a_model_whose_loss_reaches_every_parameter_scores_without_a_warning(engine, name):
    torch.manual_seed(0)
    model, x = ((PatchTokens(), torch.randn(5, 2, 6, 6)) if name == "tokens" else
                (mlp(d_in=6, hidden=8, n_classes=3), torch.randn(5, 6)) if name == "mlp" else
                (digits_cnn(channels=4, n_classes=3), torch.randn(5, 1, 8, 8)))
    model = model.double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gs.Scorer(model, engine=engine).score_batch(x.double(), torch.tensor([0, 2, 1, 1, 0]))


class AuxHead(nn.Module):
    """An auxiliary head that only training uses (Inception's)."""

    def __init__(self):
        super().__init__()
        self.main, self.aux = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.main(x) + (self.aux(x) if self.training else 0)


def test_a_head_the_forward_does_not_use_is_named():
    torch.manual_seed(0)
    model = AuxHead().double().eval()
    with pytest.warns(gs.exceptions.GradscoreWarning, match=r"no gradient reaches 'aux.weight', 'aux.bias'"):
        gs.Scorer(model).score_batch(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2]))


def test_a_tensor_the_model_kept_from_an_earlier_example_is_named_in_the_loops_error():
    """The loop's second example ran into the graph its first example's backward freed (the
    cache made with gradients): the error says what that means, not that the inputs do not
    fit the model."""
    torch.manual_seed(0)
    model = CachedBias().double().eval()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    with pytest.raises(gs.EngineError, match="a tensor the model kept from an earlier call"):
        gs.Scorer(model, engine="loop").score_batch(x, y)


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_in_a_channels_last_model_equals_the_same_model_contiguous(affine, functional):
    """A model in memory_format=channels_last computes the same function as in the default
    format; torch's InstanceNorm backward does not for one example (the loop's batches,
    a ghost batch of one). Every engine, on a batch of three and of one, equals the
    contiguous model's loop (the co-states: the next test); the norm as a module or
    called through ``F.instance_norm``."""
    torch.manual_seed(0)
    plain = ChannelsLastNorm(affine, functional=functional).double().eval()
    if affine:
        with torch.no_grad():
            plain.norm.weight.uniform_(0.5, 1.5)
            plain.norm.bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    channels_last_equals_contiguous(plain, x, y, batches=(slice(0, 3), slice(1, 2)))


@pytest.mark.parametrize("functional", [False, True])
def test_batchnorm_before_tokens_of_one_example_equals_the_batch_forward(functional):
    """torch's CPU BatchNorm backward is wrong for a batch of one example whose output
    gradient comes channels_last with another batch stride, as a ViT-style patch
    embedding (conv -> BatchNorm -> flatten(2).transpose(1, 2)) sends it back: timm's XCiT
    read 0.05% off in norms and 34% in dots through the loop. Every engine, on a batch of
    three and of one, equals each example's gradient from the whole batch's forward."""
    torch.manual_seed(0)
    model = PatchTokens(functional).double().eval()
    x, y = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 2, 1])
    G = batch_forward_gradients(model, x, y)
    V = torch.randn(2, G.shape[1], dtype=torch.float64)
    for engine in ("loop", "vmap", "auto"):
        for batch in (slice(0, 3), slice(1, 2)):
            got = gs.Scorer(model, engine=engine).score_batch(x[batch], y[batch], refs=V)
            where = f"{engine}, batch {batch}"
            torch.testing.assert_close(got.sq_norm, (G[batch] ** 2).sum(1), rtol=1e-10, atol=0, msg=where)
            torch.testing.assert_close(got.dots, G[batch] @ V.T, rtol=1e-10, atol=1e-13, msg=where)


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_a_norm_of_one_example_followed_by_an_in_place_relu(norm):
    """The workaround's identity after a norm of one example returns a copy: a model that
    changes the norm's output in place (ReLU(inplace=True), as ResNets and pix2pix
    generators do) ran into torch's refusal to change a custom Function's view in place,
    and the loop failed on every such model. Every engine equals the batch's forward."""
    torch.manual_seed(0)
    layer = nn.InstanceNorm2d(4, affine=True) if norm == "instance" else nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), layer, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(64, 3))
    model = model.double().eval()
    x, y = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 2, 1])
    G = batch_forward_gradients(model, x, y)
    for engine in ("loop", "vmap", "auto"):
        for batch in (slice(0, 3), slice(1, 2)):
            got = gs.Scorer(model, engine=engine).score_batch(x[batch], y[batch])
            torch.testing.assert_close(got.sq_norm, (G[batch] ** 2).sum(1), rtol=1e-10, atol=0, msg=engine)


def test_the_co_states_gradient_over_chunks_of_one_example_before_tokens(tmp_path):
    """The co-states' ∇ and Hessian-vector products over chunks of one example equal those
    over one chunk of the whole set (where torch's BatchNorm backward is right)."""
    from gradscore.io.datasets import load_dataset
    from gradscore.scores.costate import _Objective
    torch.manual_seed(0)
    model = PatchTokens().double().eval()
    ds = load_dataset(gs.save_dataset(tmp_path / "d.h5", torch.randn(3, 2, 6, 6).numpy(), np.array([0, 2, 1])))
    params = {n: p.detach() for n, p in model.named_parameters()}
    v = {n: torch.randn_like(p) for n, p in params.items()}
    got, want = ((o.gradient(params), o.hvp(params, v)) for o in
                 (_Objective(model, gs.resolve_loss("cross_entropy"), ds, size, 1.0) for size in (1, 3)))
    for a, b in zip(got, want):
        for n in v:
            torch.testing.assert_close(a[n], b[n], rtol=1e-8, atol=1e-12, msg=n)


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_the_co_states_gradient_of_one_example_in_a_channels_last_model(tmp_path, affine, functional):
    """The co-states' ∇ and Hessian-vector products over chunks of one example (torch.func's
    grad and jvp) equal the contiguous model's."""
    import copy

    from gradscore.io.datasets import load_dataset
    from gradscore.scores.costate import _Objective
    torch.manual_seed(0)
    plain = ChannelsLastNorm(affine, functional=functional).double().eval()
    model = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    ds = load_dataset(gs.save_dataset(tmp_path / "d.h5", torch.randn(3, 2, 4, 4).numpy(), np.array([0, 2, 1])))
    v = {n: torch.randn_like(p) for n, p in plain.named_parameters()}
    results = {}
    for name, m in (("channels_last", model), ("plain", plain)):
        params = {n: p.detach() for n, p in m.named_parameters()}
        objective = _Objective(m, gs.resolve_loss("cross_entropy"), ds, 1, 1.0)   # chunks of one example
        results[name] = (objective.gradient(params), objective.hvp(params, v))
    for got, want in zip(results["channels_last"], results["plain"]):
        for n in v:
            torch.testing.assert_close(got[n], want[n], rtol=1e-8, atol=1e-12, msg=n)


_GROUP_NORM_CHECK = """
import torch
from helpers import ChannelsLastNorm, channels_last_equals_contiguous
torch.manual_seed(0)
x, y = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
for C, functional in ((3, False), (1, False), (3, True), (1, True)):
    plain = ChannelsLastNorm(affine=True, group=True, channels=C, functional=functional).double().eval()
    with torch.no_grad():
        plain.norm.weight.uniform_(0.5, 1.5)
        plain.norm.bias.uniform_(-0.5, 0.5)
    for params in (["norm.*", "conv2.*", "head.*"], ["norm.*"], None):
        channels_last_equals_contiguous(plain, x, y, params=params)
print("compared")
"""


def test_group_norm_in_a_channels_last_model_scored_from_the_norm_on():
    """torch's CPU GroupNorm backward of a channels_last input crashes the process
    (segfault) when the input's gradient is not asked for: the loop scoring only the norm
    and what follows it. With one channel, the input's channels_last strides also pass
    as contiguous. Run in a child process, so that a crash fails this test alone. Every
    engine, over three parameter selections, equals the contiguous model's loop."""
    proc = python_child(_GROUP_NORM_CHECK, timeout=600)
    assert proc.returncode == 0 and "compared" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_the_norm_workarounds_leave_torch_as_they_found_it(monkeypatch):
    """The workarounds replace torch.instance_norm, torch.batch_norm and torch.group_norm
    while gradscore's blocks run (nested, or with the in-run watch inside), call what they
    replaced, and put back exactly that, a user's own wrapper included."""
    from gradscore.engines.workarounds import torch_workarounds, wrong_in_torch
    calls, names = [], ("instance_norm", "batch_norm", "group_norm")
    users = {}
    for name in names:
        def wrapper(*args, torch_own=getattr(torch, name), name=name, **kwargs):
            calls.append(name)
            return torch_own(*args, **kwargs)
        users[name] = wrapper
        monkeypatch.setattr(torch, name, wrapper)
    x = torch.randn(2, 3, 4, requires_grad=True)
    with torch_workarounds():
        assert all(getattr(torch, name) is not users[name] for name in names)
        with wrong_in_torch(nn.Linear(1, 1), []), torch_workarounds():
            torch.nn.functional.instance_norm(x).sum().backward()
            torch.nn.functional.batch_norm(x, None, None, training=True).sum().backward()
        assert torch.instance_norm is not users["instance_norm"]
        torch.nn.functional.group_norm(x, 3)
    assert all(getattr(torch, name) is users[name] for name in names)
    assert calls == list(names)


def test_recurrent_layers_run_without_cudnn_only_inside_the_workarounds(monkeypatch):
    """cuDNN's RNN backward refuses a module in eval mode, which scoring uses: on CUDA every
    engine failed on an LSTM (tests/test_cuda.py holds the engines equal there). Inside the
    workarounds, torch._VF's recurrent kernels run with cuDNN off for CUDA inputs, and are
    torch's own again after the last block; on CPU they compute the same values."""
    from gradscore.engines import workarounds
    from gradscore.engines.workarounds import torch_workarounds
    kernels = {name: getattr(torch._VF, name) for name in workarounds._RNN_KERNELS}
    torch.manual_seed(0)
    rnn, x = torch.nn.LSTM(4, 5, batch_first=True), torch.randn(2, 3, 4)
    want = rnn(x)[0]
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    with torch_workarounds():
        with torch_workarounds():
            assert all(getattr(torch._VF, n) is not k for n, k in kernels.items())
            assert torch.equal(rnn(x)[0], want)
        assert all(getattr(torch._VF, n) is not k for n, k in kernels.items())   # the outer block still open
    assert all(getattr(torch._VF, n) is k for n, k in kernels.items()) and "lstm" not in vars(torch._VF)
    # a CUDA input (faked): the kernel runs with cuDNN off, and cuDNN is on again after it; a CPU one as is
    seen = []
    kernel = workarounds._without_cudnn(lambda *a, **k: seen.append(torch.backends.cudnn.enabled))
    cuda_like = type("Cuda", (torch.Tensor,), {"is_cuda": property(lambda self: True)})
    kernel(torch.zeros(1).as_subclass(cuda_like))
    kernel(torch.zeros(1))
    assert seen == [False, True] and torch.backends.cudnn.enabled


@pytest.mark.parametrize("head, loss, says", [
    (nn.Softmax(dim=1), "cross_entropy", r"outputs are probabilities \(each row >= 0, summing to 1: a softmax at "
                                         r"its end\), and 'cross_entropy' takes logits"),
    (nn.Identity(), "nll", r"'nll' takes log-probabilities .* their logsumexp reaches [0-9.]+ \(0 for "
                           r"log-probabilities\)"),
    (nn.Softmax(dim=1), "nll", r"'nll' takes log-probabilities"),
    (nn.Identity(), "cross_entropy", None),
    (nn.LogSoftmax(dim=1), "cross_entropy", None),   # softmax(log_softmax(z)) = softmax(z): the same loss
    (nn.LogSoftmax(dim=1), "nll", None),
])
def test_an_output_the_loss_reads_as_another_kind_is_named_once(head, loss, says):
    """A classifier ending in a softmax scored with the default 'cross_entropy' (which
    applies its own) gave every loss, EL2N and gradient of softmax(probabilities), without a
    word; so did logits given to 'nll'. Now one warning, from the first batch, with the fix;
    none where the loss reads the output as what it is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), head).double().eval()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    scorer = gs.Scorer(model, loss=loss)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        scorer.score_batch(x, y)
        scorer.score_batch(x, y)
    said = [str(w.message) for w in seen if issubclass(w.category, gs.exceptions.GradscoreWarning)]
    if says is None:
        assert said == [], said
    else:
        assert len(said) == 1 and re.search(says, said[0]), said


def test_sparse_embedding_gradients_score_as_their_dense_twin(tmp_path):
    """nn.Embedding / EmbeddingBag(sparse=True) give sparse parameter gradients: every engine,
    the in-run targets and the co-states (pds, target_dot) score the model as the same model
    with dense gradients."""
    from tests_factory import embeddings
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 11, (24, 5), generator=g), torch.randint(0, 3, (24,), generator=g)
    tokens[:, 1] = tokens[:, 0]    # a token twice in one example
    gs.save_dataset(tmp_path / "train.h5", tokens.numpy(), y.numpy())
    gs.save_dataset(tmp_path / "val.h5", tokens[:6].numpy(), y[:6].numpy())
    V = torch.randn(2, sum(p.numel() for p in embeddings().parameters()), dtype=torch.float64, generator=g)
    got = {}
    for sparse in (False, True):
        model, root = embeddings(sparse).double(), tmp_path / str(sparse)
        for engine in ("loop", "vmap", "ghost", "auto"):
            out = gs.Scorer(model, engine=engine).score_batch(tokens, y, refs=V)
            got[sparse, engine] = torch.cat([out.sq_norm[:, None], out.dots], 1)
        rec = gs.InRun(model, loss="cross_entropy", out=root / "inrun.h5", targets=(tokens[:6], y[:6]))
        ckpts, writer = embeddings(sparse).double(), gs.CheckpointWriter(
            root / "ckpts", model_factory="tests_factory:embeddings", model_kwargs={"sparse": sparse},
            loss="cross_entropy")
        opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, ckpts)]
        for t in range(3):
            writer.save(ckpts, step=t, lr=0.5, epoch=t)
            with rec.step(torch.arange(24), y, lr=0.5):
                F.cross_entropy(model(tokens), y).backward()
            F.cross_entropy(ckpts(tokens), y).backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
        rec.close()
        gs.score(root / "ckpts", tmp_path / "train.h5", out=root / "s.h5", scores=("grand", "pds", "target_dot"),
                 target=tmp_path / "val.h5", dtype="float64", progress=False)
        got[sparse, "file"] = gs.load_scores(root / "s.h5")["scores"]
        got[sparse, "inrun"] = gs.load_scores(root / "inrun.h5")["scores"]
    for engine in ("loop", "vmap", "ghost", "auto"):
        torch.testing.assert_close(got[True, engine], got[False, "loop"], rtol=1e-10, atol=1e-14)
    for kind, names in (("file", ("grand", "pds", "target_dot")), ("inrun", ("grand", "inrun_value"))):
        for name in names:
            np.testing.assert_allclose(got[True, kind][name], got[False, kind][name], rtol=1e-10, atol=1e-14)
            assert np.isfinite(got[True, kind][name]).all() and np.abs(got[True, kind][name]).max() > 0
