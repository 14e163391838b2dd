"""In-run scoring (gs.InRun): training is bit-identical with the recorder; every recorded
quantity equals the per-example autograd loop at the step's parameters θ_t in float64."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import warnings

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscore as gs
from helpers import (BATCH_LOSSES, CellLoop, ChannelsLastNorm, EvalStateInPlace, ExpertsNet, FreeNet, MyStdConv2d,
                     NormActCNN, PatchTokens, RelativeBias, Reversed, Windows, check_inrun_against_loop,
                     inrun_reference)
from gradscore.demos.models import digits_cnn, mlp, recurrent_classifier
from gradscore.engines.rules.registry import FactoredRef
from gradscore.scores import inrun as inrun_scores


def _train(model, x, y, *, steps, batch, opt="sgd", rec=None, targets_every=1, micro=1, seed=0,
           loss_fn=None, snapshots=None):
    """A plain training loop; with ``rec`` the three added lines. Returns the model."""
    torch.manual_seed(seed)
    optim = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt == "sgd"
             else torch.optim.Adam(model.parameters(), lr=0.01))
    loss_fn = loss_fn or (lambda z, t: F.cross_entropy(z, t))
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        idx = torch.randperm(len(y), generator=g)[:batch]
        if snapshots is not None:
            snapshots.append(({n: p.detach().clone() for n, p in model.named_parameters()}, idx))
        for part in idx.chunk(micro):
            if rec is None:
                (loss_fn(model(x[part]), y[part]) / micro).backward()
            else:
                with rec.step(part, y[part], lr=0.1, step=t):
                    (loss_fn(model(x[part]), y[part]) / micro).backward()
        optim.step()
        optim.zero_grad()
    return model


def _data(n=48, d=10, c=4, seed=0, dtype=torch.float64, image=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype) if image else torch.randn(n, d, generator=g, dtype=dtype)
    return x, torch.randint(0, c, (n,), generator=g)


def _steps_as_the_loop(model, x, y, tmp_path, settings, prepare=lambda setting: None, keep_modes=False):
    """SGD steps with the recorder (a target of 6 examples), one per ``settings`` item
    (setting, B): ``prepare(setting)`` before the step (the layers it skips, the task it
    trains), then B examples. Every record against the per-example loop at each step's
    θ_t (``keep_modes`` as for :func:`inrun_reference`); returns the closed recorder."""
    targets = (x[:6], y[:6])
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=targets)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps: list = []
    for t, (setting, B) in enumerate(settings):
        prepare(setting)
        idx = torch.arange(8 * t, 8 * t + B)
        snaps.append(({k: v.clone() for k, v in model.state_dict().items()}, idx))
        with rec.step(idx, y[idx], lr=0.1):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    check_inrun_against_loop(rec.close(), model, snaps, x, y, targets, keep_modes=keep_modes)
    return rec


def _check_three_steps(model, x, y, tmp_path) -> None:
    """Three SGD steps of 8 examples with the recorder (a target of 6 examples): every
    record against the per-example loop at each step's θ_t."""
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:6], y[:6]))
    snaps: list = []
    _train(model, x, y, steps=3, batch=8, rec=rec, snapshots=snaps)
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[:6], y[:6]))


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_training_is_bit_identical_with_the_recorder(tmp_path, opt):
    x, y = _data(dtype=torch.float32)
    def fresh():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(10, 16), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(16, 4))
    plain = _train(fresh(), x, y, steps=6, batch=12, opt=opt)
    rng_plain = torch.get_rng_state()
    model = fresh()
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:8], y[:8]))
    recorded = _train(model, x, y, steps=6, batch=12, opt=opt, rec=rec)
    assert torch.equal(torch.get_rng_state(), rng_plain)     # dropout saw the same random numbers
    for (n, a), (_, b) in zip(plain.state_dict().items(), recorded.state_dict().items()):
        assert torch.equal(a, b), n
    rec.close()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("family", ["mlp", "wide_mlp", "wide_mlp_inplace", "cnn"])
@pytest.mark.parametrize("micro", [1, 2])
def test_every_recorded_quantity_equals_the_per_example_loop(tmp_path, family, micro):
    """Target dots in both forms: the reference-vector form (narrow layers) and the Gram
    form with the target batch's factors (wide Linear layers, 6 target examples)."""
    torch.manual_seed(0)
    if family == "mlp":
        model, (x, y) = mlp(d_in=10, hidden=12, n_classes=4, depth=2).double(), _data()
    elif family == "wide_mlp":
        model, (x, y) = mlp(d_in=10, hidden=64, n_classes=4, depth=2).double(), _data()
    elif family == "wide_mlp_inplace":   # an in-place op on a Linear's output: δ is the gradient before it
        model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(inplace=True), nn.Linear(64, 64),
                              nn.ReLU(inplace=True), nn.Linear(64, 4)).double()
        x, y = _data()
    else:
        model, (x, y) = digits_cnn(n_classes=4, channels=3).double(), _data(image=True)
        next(m for m in model if isinstance(m, nn.Dropout)).p = 0.0   # the loop below runs without it
    targets = (x[:6], y[:6])
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=targets)
    snaps: list = []
    _train(model, x, y, steps=4, batch=8, rec=rec, micro=micro, snapshots=snaps)
    forms = {type(r).__name__ for r in rec.target_gradient.cached[1]}
    assert (FactoredRef.__name__ in forms) == (family != "mlp") and "Tensor" in forms
    check_inrun_against_loop(rec.close(), model, snaps, x, y, targets)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_byte_labels_are_recorded_as_the_loop_on_each_path(tmp_path, backend, monkeypatch):
    """uint8 class labels, which F.cross_entropy takes, in training and in the target: the
    one-call CPU path and the generic one (CUDA's; forced here) record what the loop gives."""
    monkeypatch.setenv("GRADSCORE_KERNELS", backend)
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=12, n_classes=4, depth=2).double(), _data()
    targets = (x[:6], y[:6].to(torch.uint8))
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=targets)
    snaps: list = []
    _train(model, x, y.to(torch.uint8), steps=3, batch=8, rec=rec, snapshots=snaps)
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[:6], y[:6]))


@pytest.mark.parametrize("slopes", [1, 12])
def test_prelu_is_recorded_as_the_loop(tmp_path, slopes):
    """PReLU had no ghost rule: in-run scoring refused any model with one."""
    torch.manual_seed(0)
    (x, y) = _data()
    model = nn.Sequential(nn.Linear(10, 12), nn.PReLU(slopes), nn.Linear(12, 12), nn.PReLU(), nn.Linear(12, 4)).double()
    with torch.no_grad():
        model[1].weight.uniform_(-0.5, 0.8)
    _check_three_steps(model, x, y, tmp_path)


class _Bilinear(nn.Module):
    """nn.Bilinear on the two halves of x (B, 10), tanh, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Bilinear(4, 6, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x[:, :4], x[:, 4:])))


def test_a_bilinear_layer_is_recorded_as_the_loop(tmp_path):
    """Bilinear had no ghost rule: in-run scoring refused any model with one."""
    torch.manual_seed(0)
    (x, y) = _data()
    model = _Bilinear().double()
    _check_three_steps(model, x, y, tmp_path)


@pytest.mark.parametrize("stride, output_padding, groups", [(1, 0, 1), (2, 1, 2)])
def test_a_transposed_conv_is_recorded_as_the_loop(tmp_path, stride, output_padding, groups):
    """ConvTranspose had no ghost rule: in-run scoring refused any model with one (a
    decoder, a U-Net's up-sampling path)."""
    torch.manual_seed(0)
    (x, y) = _data()
    model = nn.Sequential(nn.Unflatten(1, (2, 5)), nn.ConvTranspose1d(2, 4, 3, stride=stride, padding=1,
                                                                      output_padding=output_padding, groups=groups),
                          nn.Tanh(), nn.Flatten(), nn.LazyLinear(4))
    model(x[:1].float())
    model = model.double()
    _check_three_steps(model, x, y, tmp_path)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_recurrent_cells_in_the_models_loop_are_recorded_as_the_loop(tmp_path, kind):
    """RNNCell, GRUCell and LSTMCell had no ghost rule: in-run scoring refused any model
    that runs one in a loop (a decoder, a custom recurrent network)."""
    torch.manual_seed(0)
    (x, y) = _data()
    model = CellLoop(kind).double()
    _check_three_steps(model, x, y, tmp_path)


class _MergedRows(nn.Module):
    """x (B, 10) as 5 steps of 2 features, a Linear and a LayerNorm on the (B·5, ·) rows
    (as OPT's MLP calls them), back to (B, 5, ·), a head on the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(2, 6), nn.LayerNorm(6), nn.Linear(6, 4)

    def forward(self, x):
        rows = torch.tanh(self.norm(self.fc(x.reshape(-1, 2))))
        return self.head(rows.reshape(len(x), 5, 6).mean(1))


def test_layers_on_rows_merged_with_the_batch_are_recorded_as_the_loop(tmp_path):
    """A Linear on (B·T, d) rows had no batch dimension: in-run scoring refused the model."""
    torch.manual_seed(0)
    (x, y) = _data()
    model = _MergedRows().double()
    _check_three_steps(model, x, y, tmp_path)


@pytest.mark.parametrize("where", ["before", "after"])
def test_forwards_without_gradient_inside_a_step_are_left_out(tmp_path, where):
    """Pseudo-labelling (FixMatch) or a metric: the model also runs under torch.no_grad
    inside the step, on another batch of another size, before or after the training
    forward. That call gives no gradient, so the records are the training forward's."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=64, n_classes=4, depth=2).double(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:6], y[:6]))
    snaps: list = []
    for t in range(3):
        idx = torch.arange(8 * t, 8 * t + 8)
        snaps.append(({n: p.detach().clone() for n, p in model.named_parameters()}, idx))
        with rec.step(idx, y[idx], lr=0.1, step=t):
            if where == "before":
                with torch.no_grad():
                    model(x[30:43]).argmax(1)
            z = model(x[idx])
            if where == "after":
                with torch.inference_mode():
                    model(x[30:43]).argmax(1)
            F.cross_entropy(z, y[idx]).backward()
        opt.step()
        opt.zero_grad()
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[:6], y[:6]))


class _WithAux(nn.Module):
    """An MLP that keeps its hidden activation and has an auxiliary head on it, for losses
    that reach the model other than through its output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.aux = nn.Linear(10, 12), nn.Linear(12, 4), nn.Linear(12, 4)
        self.h = self.aux_out = None

    def forward(self, x):
        self.h = torch.tanh(self.a(x))
        self.aux_out = self.aux(self.h)   # deep supervision's second head
        return self.b(self.h)


@pytest.mark.parametrize("extra", ["activation_penalty", "batch_penalty", "auxiliary_head"])
def test_a_loss_that_reaches_the_model_other_than_through_its_output_is_refused(tmp_path, extra):
    """An activation penalty, a batch-level term (MoE load balancing) or an auxiliary head
    (deep supervision) adds gradient inside the model, which no per-example share of the
    output's loss holds: the norms were 0.7-3.6x the loop's. The first step's backward is
    checked against one from the output alone, and the step is refused, naming the layer."""
    torch.manual_seed(0)
    model, (x, y) = _WithAux().double(), _data()
    with pytest.raises(gs.ConfigError, match="invalid value for 'hidden_terms'"):
        gs.InRun(model, out=tmp_path / "r.h5", hidden_terms="ignore")
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with pytest.raises(gs.EngineError, match=r"reaches layer '(a|aux)' other than through the model's output"):
        with rec.step(torch.arange(8), y[:8], lr=0.1):
            loss = F.cross_entropy(model(x[:8]), y[:8])
            if extra == "activation_penalty":
                loss = loss + model.h.pow(2).mean()
            elif extra == "batch_penalty":
                loss = loss + model.h.mean(0).pow(2).sum()
            else:
                loss = loss + 0.3 * F.cross_entropy(model.aux_out, y[:8])
            loss.backward()
    assert model.a.weight.grad is not None   # the step's own backward ran to the end


@pytest.mark.parametrize("name", [*BATCH_LOSSES, "per example"])
def test_a_loss_that_reads_the_batch_is_refused_in_training(tmp_path, name):
    """A user's loss whose value for an example reads the other rows of its batch, given to
    the recorder and trained with: the output gradient of each example was the batch's, so
    every share check passed and the records were of no per-example loss (the loop at θ_t
    gives others). Refused with the cause on the first step; a per-example loss of the
    user's own is recorded."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double(), _data()
    fn = BATCH_LOSSES.get(name, lambda z, t: F.cross_entropy(z, t, reduction="none"))
    rec = gs.InRun(model, loss=fn, out=tmp_path / "r.h5")
    with contextlib.ExitStack() as refused:
        if name != "per example":
            refused.enter_context(pytest.raises(gs.ConfigError, match=r"loss for an example depends on the other "
                                                                    r"examples of its batch \(the (loss|gradient) "
                                                                    r"of a row"))
        with rec.step(torch.arange(8), y[:8], lr=0.1):
            fn(model(x[:8]), y[:8]).mean().backward()
    if name == "per example":
        rec.close()
        assert len(gs.load_scores(tmp_path / "r.h5")["ids"]) == 8


@pytest.mark.parametrize("where", ["first batch", "second batch"])
def test_a_target_example_whose_loss_is_nan_is_refused_with_its_position(tmp_path, where):
    """A NaN in the target batch made the target gradient, so every dot and every
    example's inrun_value, NaN, with no warning. Refused at the first target step with the
    positions (over the target batches in order); a model that diverged (its parameters
    NaN) is not the targets' fault: its records say so, as before."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double(), _data()
    xt = x[30:40].clone()
    xt[[2, 7] if where == "first batch" else [7]] = float("nan")
    targets = (xt, y[30:40]) if where == "first batch" else iter([(xt[:5], y[30:35]), (xt[5:], y[35:40])])
    rec = gs.InRun(model, loss="cross_entropy", out=tmp_path / "r.h5", targets=targets)
    said = r"positions 2, 7 \(of 10\)" if where == "first batch" else r"position 7 \(of 10\)"
    with pytest.raises(gs.DataError, match=rf"invalid value for 'targets': target example\(s\) at {said} give a "
                                           rf"non-finite loss at step 0"):
        with rec.step(torch.arange(8), y[:8], lr=0.1):
            F.cross_entropy(model(x[:8]), y[:8]).backward()
    rec = gs.InRun(model, loss="cross_entropy", out=tmp_path / "d.h5", targets=(x[30:40], y[30:40]))
    for step in range(2):
        if step == 1:   # diverged: recorded, and named in the warnings
            torch.nn.init.constant_(next(model.parameters()), float("nan"))
        with rec.step(torch.arange(8 * step, 8 * step + 8), y[:8], lr=0.1):
            F.cross_entropy(model(x[:8]), y[:8]).backward()
    with pytest.warns(gs.GradscoreWarning, match="8 of 16 records have a non-finite loss"):
        rec.close()


def test_a_model_that_diverged_before_its_first_recorded_step_is_recorded_and_named(tmp_path):
    """NaN parameters at the first step: the loss-path check compared NaN fingerprints, which
    differ, and refused the step for a loss term "other than through the model's output".
    Nothing can be compared there; the records are non-finite and the warnings name them."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double(), _data()
    torch.nn.init.constant_(next(model.parameters()), float("nan"))
    rec = gs.InRun(model, loss="cross_entropy", out=tmp_path / "r.h5")
    with rec.step(torch.arange(8), y[:8], lr=0.1):
        F.cross_entropy(model(x[:8]), y[:8]).backward()
    with pytest.warns(gs.GradscoreWarning, match="8 of 8 records have a non-finite loss"):
        rec.close()


@pytest.mark.parametrize("router_loss", [True, False])
def test_a_mixture_of_experts_router_loss_is_refused(tmp_path, router_loss):
    """A Hugging Face Mixtral fine-tuned whole: with output_router_logits=True its loss adds
    the router's load-balancing term, which reaches the layers before each router; without
    it the step is recorded (the experts take their rule, the router the free-parameter rule)."""
    pytest.importorskip("transformers")
    from gradscore.integrations.hf import from_config
    torch.manual_seed(0)
    model = from_config({"model_type": "mixtral", "vocab_size": 31, "hidden_size": 16, "intermediate_size": 24,
                         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                         "max_position_embeddings": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
                         "output_router_logits": router_loss}, attn_implementation="eager").train()
    ids = torch.randint(1, 31, (4, 9), generator=torch.Generator().manual_seed(0))
    rec = gs.InRun(model, loss="causal_lm", out=tmp_path / "r.h5")
    with contextlib.ExitStack() as refused:
        if router_loss:
            refused.enter_context(pytest.raises(gs.EngineError, match="other than through the model's output"))
        with rec.step(range(4), ids, lr=0.1):
            model(input_ids=ids, labels=ids).loss.backward()
    if not router_loss:
        assert len(gs.load_scores(rec.close())["ids"]) == 4


def test_a_second_head_the_loss_does_not_read_is_recorded(tmp_path):
    """The same model trained on its output's loss alone: the check of the loss's paths
    passes (the second head gets no gradient), and every record equals the loop."""
    torch.manual_seed(0)
    model, (x, y) = _WithAux().double(), _data()
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:6], y[:6]))
    snaps: list = []
    _train(model, x, y, steps=2, batch=8, rec=rec, snapshots=snaps)
    model.h = model.aux_out = None   # the loop deep-copies the model
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[:6], y[:6]))


def test_a_users_forward_hook_that_changes_a_layers_output_in_training(tmp_path):
    """The training backward and the target's (Gram form, wide layers) read each layer's δ
    before the user's own forward hook (here ×2 and tanh) changes its output."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=64, n_classes=4, depth=2).double(), _data()
    model[1].register_forward_hook(lambda mod, args, out: out * 2)
    model[3].register_forward_hook(lambda mod, args, out: torch.tanh(out))
    _check_three_steps(model, x, y, tmp_path)


def test_instance_norm_with_running_stats_in_training(tmp_path):
    """In training mode a tracked InstanceNorm normalizes by each example's own statistics
    (and updates the running ones): the recorded ‖∇ℓ_b‖² is that of the training forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
                          nn.ReLU(), nn.Flatten(), nn.Linear(3 * 64, 4)).double()
    x, y = _data(image=True)
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    snaps: list = []
    _train(model, x, y, steps=3, batch=8, rec=rec, snapshots=snaps)
    from gradscore.io.store import load_inrun_rows
    rows = load_inrun_rows(rec.close())
    for t, (snap, idx) in enumerate(snaps):
        m = copy.deepcopy(model).train()
        m.load_state_dict(snap, strict=False)
        want = [float(sum((g ** 2).sum() for g in torch.autograd.grad(F.cross_entropy(m(x[b][None]), y[b][None]),
                                                                       list(m.parameters())))) for b in idx]
        np.testing.assert_allclose(rows["sq_norm"][rows["step"] == t], want, rtol=1e-9)


def test_loss_terms_read_a_few_examples_at_a_time_equal_the_loop(tmp_path, monkeypatch):
    """The output and its gradient are read in blocks of examples (a large vocabulary's
    float64 copies stay small): blocks of 2 examples give the loop's records too."""
    from gradscore.inrun import shares
    monkeypatch.setattr(shares, "_TERM_ELEMENTS", 8)     # 4 classes: 2 examples per block
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=12, n_classes=4, depth=2).double(), _data()
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:6], y[:6]))
    snaps: list = []
    _train(model, x, y, steps=3, batch=7, rec=rec, snapshots=snaps)
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[:6], y[:6]))


def test_an_auxiliary_term_on_a_hidden_layer_is_in_the_examples_gradient(tmp_path):
    """docs/inrun.md: with a per-example penalty on a hidden layer's output in the loss,
    declared (hidden_terms="per_example"), share_sq_norm and dot are of everything b adds
    to the step's loss (ℓ_b/B plus its penalty), in both target forms; loss and share are
    read at the output alone."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=64, n_classes=4, depth=2).double(), _data()
    hidden: list = []
    model[1].register_forward_hook(lambda mod, args, out: hidden.append(out))
    penalty = 0.3

    def loss_fn(z, t):
        return F.cross_entropy(z, t) + penalty * hidden[-1].pow(2).sum(1).mean()
    targets = (x[:6], y[:6])
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=targets, hidden_terms="per_example")
    snaps: list = []
    _train(model, x, y, steps=3, batch=8, rec=rec, snapshots=snaps, loss_fn=loss_fn)
    from gradscore.io.store import load_inrun_rows
    rows = load_inrun_rows(rec.close())
    for t, (snap, idx) in enumerate(snaps):
        m = copy.deepcopy(model).eval()
        m.load_state_dict(snap)
        params = list(m.parameters())
        gJ = torch.autograd.grad(F.cross_entropy(m(x[:6]), y[:6]), params)
        at, B = rows["step"] == t, len(idx)
        for b, i in enumerate(idx):
            z = m(x[i][None])
            term = (F.cross_entropy(z, y[i][None]) + penalty * hidden[-1].pow(2).sum()) / B
            g = torch.autograd.grad(term, params)
            np.testing.assert_allclose(rows["share_sq_norm"][at][b], float(sum((v ** 2).sum() for v in g)), rtol=1e-9)
            np.testing.assert_allclose(rows["dot"][at][b], float(sum((v * w).sum() for v, w in zip(g, gJ))),
                                       rtol=1e-9, atol=1e-14)
            np.testing.assert_allclose(rows["loss"][at][b], float(F.cross_entropy(z, y[i][None]).detach()), rtol=1e-10)
        np.testing.assert_allclose(rows["share"][at], 1 / B, rtol=1e-12)


def test_share_is_read_from_the_loss_sum_and_class_weights(tmp_path):
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double(), _data()
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    snaps: list = []
    _train(model, x, y, steps=2, batch=8, rec=rec, snapshots=snaps,
           loss_fn=lambda z, t: F.cross_entropy(z, t, weight=w))
    rec.close()
    with h5py.File(tmp_path / "r.h5") as f:
        share, step = f["inrun/share"][()], f["inrun/step"][()]
    for t, (_, idx) in enumerate(snaps):
        want = (w[y[idx]] / w[y[idx]].sum()).numpy()
        np.testing.assert_allclose(share[step == t], want, rtol=1e-10)


def test_a_loss_that_is_a_function_of_each_loss_has_that_share(tmp_path):
    """docs/inrun.md: focal loss f(ℓ_b) = −(1 − p)² log p is not a weighted sum of ℓ_b, but
    its output gradient is f′(ℓ_b)/B · ∂ℓ_b/∂z_b: share f′(ℓ_b)/B, sq_norm of ℓ_b alone and
    share_sq_norm of f(ℓ_b)/B, against the loop in float64."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double(), _data()

    def focal(z, t):
        lp = z.log_softmax(1).gather(1, t[:, None])[:, 0]
        return -(1 - lp.exp()) ** 2 * lp

    rec = gs.InRun(model, out=tmp_path / "r.h5")
    snaps: list = []
    _train(model, x, y, steps=2, batch=8, rec=rec, snapshots=snaps, loss_fn=lambda z, t: focal(z, t).mean())
    rec.close()
    with h5py.File(tmp_path / "r.h5") as f:
        sq, share_sq, step = f["inrun/sq_norm"][()], f["inrun/share_sq_norm"][()], f["inrun/step"][()]
    m = copy.deepcopy(model)
    for t, (snap, idx) in enumerate(snaps):
        m.load_state_dict(snap)
        params = list(m.parameters())
        for k, b in enumerate(idx):
            z = m(x[b][None])
            for loss, got in ((F.cross_entropy(z, y[b][None]), sq), (focal(z, y[b][None]).sum() / 8, share_sq)):
                g = torch.autograd.grad(loss, params, retain_graph=True)
                np.testing.assert_allclose(got[step == t][k], float(sum(v.pow(2).sum() for v in g)), rtol=1e-10)


def test_adam_preconditioned_target(tmp_path):
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double(), _data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:6], y[:6]), optimizer=opt)
    for t in range(3):
        idx = torch.arange(8 * t, 8 * t + 8)
        if t == 2:
            m = copy.deepcopy(model).eval()
            params = list(m.parameters())
            gJ = torch.autograd.grad(F.cross_entropy(m(x[:6]), y[:6]), params)
            pre = []
            for g, p in zip(gJ, model.parameters()):
                s = opt.state[p]
                v_hat = s["exp_avg_sq"] / (1 - 0.999 ** float(s["step"]))
                pre.append(g / (v_hat.sqrt() + 1e-8))
            want = []
            for b in idx:
                gb = torch.autograd.grad(F.cross_entropy(m(x[b][None]), y[b][None]), params)
                want.append(float(sum((a * c).sum() for a, c in zip(gb, pre))) / 8)
        with rec.step(idx, y[idx], lr=0.01):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    rec.close()
    with h5py.File(tmp_path / "r.h5") as f:
        dot, step = f["inrun/dot"][()], f["inrun/step"][()]
    np.testing.assert_allclose(dot[step == 2], want, rtol=1e-9)


@pytest.mark.parametrize("wide", [False, True])
def test_parameter_groups_with_their_own_learning_rates(tmp_path, wide):
    """An optimizer whose groups have their own learning rates (a slower body, a frozen bias
    at lr 0, a parameter it does not hold) moves each parameter by its group's η_g: the dot
    weighs each parameter's term by η_g/η of the step's η, so that Σ_t η_t·dot is the first-order
    change of J. ``wide``: the Gram form of the target (factored blocks) is weighed too."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=64 if wide else 8, n_classes=4, depth=2).double(), _data()
    lin = [m for m in model if isinstance(m, nn.Linear)]
    lr_of = {lin[0].weight: 0.02, lin[0].bias: 0.0, lin[1].weight: 0.1, lin[1].bias: 0.1, lin[2].weight: 0.1}
    opt = torch.optim.SGD([{"params": [lin[0].weight], "lr": 0.02}, {"params": [lin[0].bias], "lr": 0.0},
                           {"params": [lin[1].weight, lin[1].bias, lin[2].weight]}], lr=0.1)   # lin[2].bias: none
    lr_of[lin[2].bias] = 0.0
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:6], y[:6]), optimizer=opt)
    assert rec.config.preconditioner == "none"
    want = []
    for t in range(2):
        idx = torch.arange(8 * t, 8 * t + 8)
        m = copy.deepcopy(model).eval()
        params = list(m.parameters())
        gJ = torch.autograd.grad(F.cross_entropy(m(x[:6]), y[:6]), params)
        for b in idx:
            gb = torch.autograd.grad(F.cross_entropy(m(x[b][None]), y[b][None]), params)
            want.append(float(sum(lr_of[p] / 0.1 * (a * c).sum() for a, c, p in zip(gb, gJ, model.parameters()))) / 8)
        with contextlib.ExitStack() as warned:   # the parameter it does not hold: named, at the first step
            if t == 0:
                warned.enter_context(pytest.warns(gs.exceptions.GradscoreWarning, match="5.bias require grad"))
            with rec.step(idx, y[idx], lr=0.1):
                F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    if wide:
        assert any(isinstance(r, FactoredRef) for r in rec.target_gradient.cached[1])
    rec.close()
    with h5py.File(tmp_path / "r.h5") as f:
        dot, lr = f["inrun/dot"][()], f["inrun/lr"][()]
    np.testing.assert_allclose(dot, want, rtol=1e-9)
    np.testing.assert_allclose(lr, 0.1)   # the step's η, as given
    np.testing.assert_allclose(gs.load_scores(tmp_path / "r.h5")["scores"]["inrun_value"].sum(),
                               0.1 * np.sum(want), rtol=1e-9)


def test_an_optimizer_holding_none_of_the_parameters_is_named(tmp_path):
    """An optimizer over copies of the parameters (a wrapper's flat copies) says nothing of
    their learning rates: one warning, and the dot stays the plain one."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double(), _data()
    other = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.5)
    plain = gs.InRun(copy.deepcopy(model), out=tmp_path / "plain.h5", targets=(x[:6], y[:6]))
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:6], y[:6]), optimizer=other)
    with pytest.warns(gs.exceptions.GradscoreWarning, match="holds none of the model's parameters"):
        for r in (rec, plain):
            with r.step(range(8), y[:8], lr=0.1):
                F.cross_entropy(r.model(x[:8]), y[:8]).backward()
    dots = [gs.load_scores(r.close())["scores"]["inrun_value"] for r in (rec, plain)]
    np.testing.assert_allclose(dots[0], dots[1], rtol=1e-12)


def test_parameters_the_optimizer_does_not_hold_are_named(tmp_path):
    """A new head trained by a new optimizer the recorder was not given: the recorder's
    optimizer does not move it, so inrun_value weighs it 0. One warning names the
    parameters and the fix (set rec.optimizer), once per set of them."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:6], y[:6]), optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with rec.step(range(8), y[:8], lr=0.1):
            F.cross_entropy(model(x[:8]), y[:8]).backward()
    model[-1] = nn.Linear(8, 4).double()
    with pytest.warns(gs.exceptions.GradscoreWarning, match="3.weight, 3.bias require grad.*set rec.optimizer"):
        with rec.step(range(8, 16), y[8:16], lr=0.1, step=1):
            F.cross_entropy(model(x[8:16]), y[8:16]).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with rec.step(range(16, 24), y[16:24], lr=0.1, step=2):
            F.cross_entropy(model(x[16:24]), y[16:24]).backward()
    rec.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with rec.step(range(24, 32), y[24:32], lr=0.1, step=3):
            F.cross_entropy(model(x[24:32]), y[24:32]).backward()
    rec.close()


def test_probability_targets_have_the_el2n_of_their_probabilities(tmp_path):
    """F.cross_entropy takes class probabilities as targets (soft labels, mixup): the step's
    el2n is ‖softmax(z_b) − y_b‖, as for class indices, not the regression error ‖z_b − y_b‖;
    no margin, p_gold or correct (there is no single label). Norms against the loop."""
    from gradscore.io.store import load_inrun_rows
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double(), _data()
    soft = F.one_hot(y, 4).double() * 0.8 + 0.05
    before = copy.deepcopy(model)
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with rec.step(range(8), soft[:8]):
        F.cross_entropy(model(x[:8]), soft[:8]).backward()
    rows = load_inrun_rows(rec.close())
    z = before(x[:8])
    np.testing.assert_allclose(rows["el2n"], (torch.softmax(z, 1) - soft[:8]).norm(dim=1).detach(), rtol=1e-12)
    assert not {"margin", "p_gold", "correct"} & set(rows)
    want = [float(sum((g ** 2).sum() for g in torch.autograd.grad(
        F.cross_entropy(before(x[b:b + 1]), soft[b:b + 1]), list(before.parameters())))) for b in range(8)]
    np.testing.assert_allclose(rows["sq_norm"], want, rtol=1e-9)


def test_a_users_loss_named_cross_entropy_is_the_users(tmp_path):
    """A user's own per-example loss that happens to be called ``cross_entropy`` (here with
    label smoothing) is that function, not the built-in one its name matches: the fused
    paths and the soft-label metrics are the built-in's alone."""
    def cross_entropy(z, t):
        return F.cross_entropy(z, t, reduction="none", label_smoothing=0.1)
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double(), _data()
    before = copy.deepcopy(model)
    rec = gs.InRun(model, loss=cross_entropy, out=tmp_path / "r.h5")
    with rec.step(range(8), y[:8]):
        cross_entropy(model(x[:8]), y[:8]).mean().backward()
    with h5py.File(rec.close()) as f:
        loss, sq = f["inrun/loss"][()], f["inrun/sq_norm"][()]
    np.testing.assert_allclose(loss, cross_entropy(before(x[:8]), y[:8]).detach(), rtol=1e-12)
    want = [float(sum((g ** 2).sum() for g in torch.autograd.grad(cross_entropy(before(x[b:b + 1]), y[b:b + 1]).sum(),
                                                                   list(before.parameters())))) for b in range(8)]
    np.testing.assert_allclose(sq, want, rtol=1e-9)


def test_aggregates_over_presentations_by_hand():
    rows = {"row": np.array([0, 1, 0, 0, 1]), "step": np.array([0, 0, 1, 2, 2]),
            "loss": np.array([1.0, 2.0, 3.0, 5.0, 4.0]), "correct": np.array([1, 0, 0, 1, 0], dtype=np.int8),
            "margin": np.array([1.0, -1.0, -2.0, 4.0, -3.0]), "lr": np.array([0.1, 0.1, 0.2, 0.3, 0.3]),
            "dot": np.array([1.0, 2.0, np.nan, 2.0, -1.0]), "p_gold": np.array([0.5, 0.1, 0.3, 0.7, 0.2])}
    rows["target_norm"] = np.where(np.isnan(rows["dot"]), np.nan, 1.0)   # step 1 had no target gradient
    s = inrun_scores.aggregate(rows, 2, {"loss", "forgetting", "aum", "inrun_value", "confidence", "variability"})
    assert s["loss"].tolist() == [3.0, 3.0]
    assert s["aum"].tolist() == [1.0, -2.0]
    assert s["forgetting"].tolist() == [1.0, 2.0]       # 1 → 0 once; never correct: 2 presentations
    # example 0: 2 of its 3 presentations measured, so their sum times 3/2
    np.testing.assert_allclose(s["inrun_value"], [1.5 * (0.1 * 1 + 0.3 * 2), 0.1 * 2 - 0.3])
    np.testing.assert_allclose(s["confidence"], [0.5, 0.15])
    np.testing.assert_allclose(s["variability"], [np.std([0.5, 0.3, 0.7]), np.std([0.1, 0.2])])


def test_inrun_value_is_over_all_presentations_and_nan_where_none_was_measured():
    """With a target every k > 1 steps, an example's inrun_value is the sum over its measured
    presentations times presentations / measured: an estimate of the whole sum, in its units,
    whatever k is and however many of its presentations a target step happened to meet.
    Where none did, NaN: a 0 would read as "moved J by nothing". A step the loss scaler
    skipped (lr 0) is measured, and moved nothing, whatever its non-finite dot."""
    nan = np.nan
    rows = {"row": np.array([0, 1, 0, 0, 1, 2, 3, 3]), "step": np.array([0, 0, 1, 2, 2, 1, 3, 4]),
            "lr": np.array([0.1, 0.1, 0.2, 0.3, 0.3, 0.2, 0.0, 0.2]),
            "dot": np.array([1.0, 2.0, nan, 2.0, -1.0, nan, np.inf, 0.5]),   # an fp16 overflow at step 3
            "target_norm": np.array([1.0, 1.0, nan, 1.0, 1.0, nan, 1.0, 1.0]),
            "share_sq_norm": np.array([4.0, 4.0, 1.0, 4.0, 1.0, 1.0, np.inf, 1.0]),
            "sq_norm": np.array([4.0, 4.0, 1.0, 4.0, 1.0, 1.0, np.inf, 1.0])}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # 0 · inf is no warning to the user
        s = inrun_scores.aggregate(rows, 4, {"inrun_value", "inrun_value_cos"})
        terms = inrun_scores.dot_terms(lambda keys: [rows], 4)      # diagnose's reading: raw is inrun_value
    want = [1.5 * (0.1 * 1 + 0.3 * 2), 0.1 * 2 - 0.3, nan, 0.0 + 0.2 * 0.5]
    np.testing.assert_allclose(s["inrun_value"], want)
    assert np.isnan(s["inrun_value_cos"][2])
    np.testing.assert_allclose(terms["raw"], want)
    np.testing.assert_allclose(terms["cos"], [1.5 * (0.1 * 0.5 + 0.3 * 1.0), 0.1 * 1.0 - 0.3, nan, 0.2 * 0.5])


def test_a_target_every_k_steps_estimates_the_every_step_value(tmp_path):
    """The same training (bit-identical) recorded with a target every step and every 3rd:
    every 3rd gives each example its measured steps' sum times presentations / measured,
    NaN where no presentation met a target step (the close() warning counts them)."""
    x, y = _data()
    values, rows = {}, {}
    for every in (1, 3):
        torch.manual_seed(0)
        model = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double()
        rec = gs.InRun(model, out=tmp_path / f"e{every}.h5", targets=(x[:6], y[:6]), every=every)
        _train(model, x, y, steps=7, batch=8, rec=rec)
        if every == 3:
            with pytest.warns(gs.exceptions.GradscoreWarning,
                              match=r"(\d+) of (\d+) examples met no step with a target gradient \(every=3\): their "
                                    r"inrun_value and inrun_value_cos are NaN"):
                rec.close()
        else:
            rec.close()
        values[every] = gs.load_scores(tmp_path / f"e{every}.h5")["scores"]["inrun_value"]
        from gradscore.io.store import load_inrun_rows
        rows[every] = load_inrun_rows(tmp_path / f"e{every}.h5")
    r = rows[1]
    measured = r["step"] % 3 == 0
    n = len(values[1])
    seen = np.bincount(r["row"], minlength=n)
    met = np.bincount(r["row"][measured], minlength=n)
    total = np.bincount(r["row"][measured], (r["lr"] * r["dot"])[measured], minlength=n)
    want = np.where(met > 0, total * seen / np.maximum(met, 1), np.nan)
    assert np.isnan(want).any() and (met < seen).any() and (met == seen).any()   # all three cases occur
    np.testing.assert_allclose(values[3], want, rtol=1e-12)
    np.testing.assert_allclose(values[1], np.bincount(r["row"], r["lr"] * r["dot"], minlength=n), rtol=1e-12)
    # diagnose reads it over the examples that have a value, and says so
    ids = gs.load_scores(tmp_path / "e3.h5")["ids"]
    noisy = np.arange(len(y)) % 4 == 0
    data = gs.save_dataset(tmp_path / "d.h5", x.numpy(), y.numpy(), noisy=noisy)
    lines: list = []
    rep = gs.diagnose(tmp_path / "e3.h5", score="inrun_value", data=data, echo=lines.append)
    scored = int(np.isfinite(values[3]).sum())
    assert rep["flagging"]["-inrun_value_raw"]["scored"] == scored < len(ids)
    assert rep["flagging"]["loss"]["scored"] == len(ids)
    from sklearn.metrics import roc_auc_score
    ok = np.isfinite(values[3])
    assert rep["flagging"]["-inrun_value_raw"]["auroc"] == pytest.approx(roc_auc_score(noisy[ids][ok], -values[3][ok]))
    assert any(f"over the {scored} of {len(ids)} with a value" in line for line in lines)


def test_without_targets_no_target_score_is_written_and_asking_for_one_is_refused(tmp_path):
    """With no target gradient there is no inrun_value: the default scores leave the two
    target scores out (they were written as 0 for every example), and asking for them is one
    clear error naming targets=."""
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with rec.step(range(8), y[:8], lr=0.1):
        F.cross_entropy(model(x[:8]), y[:8]).backward()
    res = gs.load_scores(rec.close())
    assert {"loss", "grand", "aum"} <= set(res["scores"]) and not {"inrun_value", "inrun_value_cos"} & set(res["scores"])
    for scores in (("loss", "inrun_value"), "inrun_value_cos"):
        with pytest.raises(gs.ConfigError, match=r"invalid value for 'scores': inrun_value.* needs? a target "
                                                 r"gradient; pass targets="):
            gs.InRun(model, out=tmp_path / "s.h5", scores=scores)
    # every= spaces the target gradient; without one it changed nothing (each step is recorded)
    with pytest.raises(gs.ConfigError, match=r"invalid value for 'every': 10 spaces the target gradient's steps, "
                                             r"and there are no targets"):
        gs.InRun(model, out=tmp_path / "s.h5", every=10)
    assert not (tmp_path / "s.h5").exists()


def test_refusals_are_one_clear_line(tmp_path):
    x, y = _data(dtype=torch.float32)
    bn = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    rec = gs.InRun(bn, out=tmp_path / "a.h5")
    with pytest.raises(gs.EngineError, match="'1' \\(BatchNorm1d\\) is in training mode.*GroupNorm or LayerNorm"):
        with rec.step(range(8), y[:8]):
            pass
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    rec = gs.InRun(model, out=tmp_path / "b.h5")
    with pytest.raises(gs.ConfigError, match="not a weighted sum"):
        with rec.step(range(8), y[:8]):
            F.cross_entropy(model(x[:8]), y[:8], label_smoothing=0.1).backward()
    with pytest.raises(gs.ConfigError, match="or a y that is not the loss's targets"):
        with rec.step(range(8), (y[:8] + 1) % 4):   # the step's y, not the labels the loss used
            F.cross_entropy(model(x[:8]), y[:8]).backward()
    with pytest.raises(gs.EngineError, match="backward"):
        with rec.step(range(8), y[:8]):
            model(x[:8])
    with pytest.raises(gs.EngineError, match="called twice"):
        with rec.step(range(8), y[:8]):
            model(x[:8]) + model(x[:8])
    with pytest.raises(gs.ConfigError, match="ids"):
        rec.step(range(7), y[:8])
    with pytest.raises(gs.ConfigError, match="'ids': 3 appears 2 times in one step"):
        rec.step([0, 1, 2, 3, 3, 4, 5, 6], y[:8])
    with pytest.raises(gs.ConfigError, match="lr"):
        gs.InRun(model, out=tmp_path / "c.h5", targets=(x[:4], y[:4])).step(range(8), y[:8])
    with pytest.raises(gs.ConfigError, match="'scaler': float; give the torch.amp.GradScaler"):
        gs.InRun(model, out=tmp_path / "d.h5", scaler=65536.0)
    assert not (tmp_path / "d.h5").exists()
    with pytest.raises(gs.ConfigError, match="nothing written"):
        rec.close()
    assert not (tmp_path / "b.h5").exists()
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(gs.OutputError):
        gs.InRun(model, out=tmp_path / "mine.txt", overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_ids_that_would_be_stored_as_other_ids_are_refused(tmp_path):
    """Ids are stored as int64 or str: a fractional id (0.5 was stored as 0, beside the
    example whose id is 0), an unsigned id above 2⁶³ − 1 (it wrapped negative), a bool id,
    or integers in one step and strings in another (1 and "1" were one example) are one
    clear line; whole-number float ids are their integers."""
    x, y = _data(n=8, dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    for ids, why in [(np.array([0.5, 1.5, 0.7, 3.0]), "'ids': 0.5 is not a whole number"),
                     (np.array([np.nan, 1, 2, 3]), "'ids': nan is not a whole number"),
                     (np.array([1e20, 1, 2, 3]), r"'ids': 1e\+20 is outside ±2\*\*63, the ids stored"),
                     (np.array([2**63 + 1, 5, 6, 7], dtype=np.uint64), "'ids': 9223372036854775809 is above"),
                     (np.array([True, False, True, False]), "'ids': bool ids"),
                     (np.array([None, 1, 2, 3], dtype=object), "'ids': object ids")]:
        with pytest.raises(gs.ConfigError, match=why):
            rec.step(ids, y[:4])
    for t, ids in enumerate([torch.tensor([0., 1., 2., 3.]), np.arange(4, 8, dtype=np.uint8)]):
        with rec.step(ids, y[4 * t:4 * t + 4], step=t):
            F.cross_entropy(model(x[4 * t:4 * t + 4]), y[4 * t:4 * t + 4]).backward()
        model.zero_grad()
    with pytest.raises(gs.ConfigError, match="'ids': strings in step 2, integers before"):
        rec.step(["0", "1", "2", "3"], y[:4], step=2)
    ids = gs.load_scores(rec.close())["ids"]
    assert ids.dtype == np.int64 and ids.tolist() == list(range(8))
    rec = gs.InRun(model, out=tmp_path / "s.h5")
    with rec.step(np.array(["a", "b"], dtype=object), y[:2]):
        F.cross_entropy(model(x[:2]), y[:2]).backward()
    model.zero_grad()
    with pytest.raises(gs.ConfigError, match="'ids': integers in step 1, strings before"):
        rec.step(torch.arange(2), y[:2], step=1)
    assert gs.load_scores(rec.close())["ids"].tolist() == ["a", "b"]


@pytest.mark.parametrize("ids", ["positions", "dataset"])
def test_ids_that_are_batch_positions_are_said_to_mix_examples(tmp_path, ids):
    """rec.step(torch.arange(len(xb)), yb) over a shuffled loader, the batch's positions for
    ids: every step's "example 3" was another example, and every score mixed a dozen of
    them, silently. The records keep each example's label now, and an id met with two
    labels is named in the file's warnings and at close()."""
    x, y = _data(n=64, dtype=torch.float32)
    torch.manual_seed(0)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    for step, idx in enumerate(torch.randperm(64, generator=torch.Generator().manual_seed(0)).split(16) * 2):
        with rec.step(torch.arange(16) if ids == "positions" else idx, y[idx], step=step):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = gs.load_scores(rec.close())
    said = [str(w.message) for w in caught if "more than one label" in str(w.message)]
    stored = [w for w in res["warnings"] if "more than one label" in w]
    if ids == "dataset":
        assert said == stored == []
        return
    assert len(said) == 1 and len(stored) == 1 and said[0].endswith(stored[0])
    assert re.search(r"1[0-9] of 16 ids were given more than one label \(id \d+: \d and \d\): the ids must name the "
                     r"examples \(their indices in the dataset\), not their places in the batch", stored[0])

@pytest.mark.parametrize("how", ["weight_norm", "prune", "parametrizations"])
def test_a_weight_made_from_other_parameters_is_recorded_as_the_loop_scores_it(tmp_path, how):
    """Legacy weight_norm's weight_g and weight_v, or prune's weight_orig, have no rule of
    their own (the Linear rule gives the gradient of the weight made from them): the
    free-parameter rule follows them into the layer's F.linear (refused before), as it
    follows ``parametrizations.weight_norm``'s original0 and original1."""
    from torch.nn.utils import prune
    torch.manual_seed(0)
    model = mlp(d_in=20, hidden=8, n_classes=3, depth=1).double()
    if how == "prune":
        prune.random_unstructured(model[1], "weight", 0.4)
    elif how == "parametrizations":
        nn.utils.parametrizations.weight_norm(model[1])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            nn.utils.weight_norm(model[1])
    names = {"weight_norm": {"1.weight_g", "1.weight_v"}, "prune": {"1.weight_orig"},
             "parametrizations": {"1.parametrizations.weight.original0", "1.parametrizations.weight.original1"}}[how]
    _recorded_as_the_loop(model, 20, names, tmp_path)


def test_a_spectral_norm_of_two_rows_is_recorded_as_the_loop_scores_it(tmp_path):
    """``parametrizations.spectral_norm`` on a Linear of 2 outputs: W / σ(W) has 2 rows, as
    the layout's batch of 2 copies does, and was refused as a use over the batch. Recorded
    equal to the loop at θ_t (the layer in eval mode: σ from its stored vectors)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 2), nn.Tanh(), nn.Linear(2, 4)).double()
    nn.utils.parametrizations.spectral_norm(model[2])
    x, y = _data()
    model.train()
    model[2].eval()   # no power iteration in the step: the loop at θ_t meets the same σ
    rec = _steps_as_the_loop(model, x, y, tmp_path, [(None, 8)] * 3, keep_modes=True)
    assert set(rec.engine.free) == {"2.parametrizations.weight.original"} and not rec.engine.fallback


def test_a_weight_made_from_other_parameters_that_the_free_rule_cannot_follow_is_refused(tmp_path):
    """An Embedding's weight_norm: its weight_g and weight_v go into a lookup, which the
    free-parameter rule does not take: one line naming them and both reasons, at the
    first step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        nn.utils.weight_norm(model[0])
    x, y = torch.randint(0, 10, (6, 5)), torch.arange(6) % 3
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with pytest.raises(gs.EngineError, match="needs a ghost rule for every trainable parameter; 0.weight_g: "
                                             "'weight_g' is not a parameter of Embedding .*; as a free parameter "
                                             "it is made by embedding"):
        with rec.step(range(6), y):
            F.cross_entropy(model(x), y).backward()


class _TrainingOnly(nn.Module):
    """A parameter the forward uses in training mode only, after a Linear (B, T, d): written
    into masked steps (wav2vec2's SpecAugment, ``h[mask] = masked_spec_embed``) or added;
    or an auxiliary head called in training mode only (``how="head"``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.lin, self.head, self.aux = how, nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 3)
        self.embed = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = self.lin(x)
        if self.training and self.how == "mask":
            h[torch.arange(h.shape[1]) % 2 == 0 & torch.ones(h.shape[:2], dtype=torch.bool)] = self.embed.to(h.dtype)
        elif self.training and self.how == "add":
            h = h + self.embed
        z = self.head(torch.tanh(h).mean(1))
        return z + self.aux(h.mean(1)) if self.training and self.how == "head" else z


@pytest.mark.parametrize("how", ["mask", "add", "head"])
def test_a_parameter_used_in_training_mode_only_is_refused_with_the_fixes(tmp_path, how):
    """The recorder lays the model out in eval mode, where such a parameter is not used, so
    its use in the step has no layout: one line naming it, what uses it, and the fixes."""
    torch.manual_seed(0)
    model = _TrainingOnly(how)
    if how == "head":
        model.embed.requires_grad_(False)
    x, y = torch.randn(6, 5, 4), torch.arange(6) % 3
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    op = "__setitem__" if how == "mask" else "add"
    what = ("Linear 'aux' was called on this batch, but not when the model ran again on its examples to lay it out"
            if how == "head" else f"it is used by {op} on a later batch, not on the first")
    with pytest.raises(gs.EngineError, match=f"{'aux.weight, aux.bias' if how == 'head' else 'embed'}: .*{what}\\. .*"
                                             f"in training mode only.* freeze it \\(requires_grad_\\(False\\)\\)"):
        with rec.step(range(6), y):
            F.cross_entropy(model(x), y).backward()


def test_a_weight_used_outside_its_layer_is_refused_not_misread(tmp_path):
    """A tied output head written h @ E.T uses the embedding's weight outside its layer,
    where no rule sees it: one line naming it, at the first step."""
    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 4), nn.Linear(4, 4)

        def forward(self, ids):
            return torch.tanh(self.fc(self.emb(ids))).mean(1) @ self.emb.weight.T

    model, ids, y = TiedHead(), torch.randint(0, 10, (8, 5)), torch.randint(0, 10, (8,))
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with pytest.raises(gs.EngineError, match="emb.weight: used outside Embedding 'emb' \\(by .T\\)"):
        with rec.step(range(8), y):
            F.cross_entropy(model(ids), y).backward()


def test_a_softmax_output_given_to_cross_entropy_is_named_once(tmp_path):
    """A classifier ending in a softmax, recorded with the default 'cross_entropy': one
    warning at the first step, as gs.Scorer gives (test_engines.py), and the steps are
    recorded (they are of the loss as given). The file keeps the warning (it did not: a
    reader of the scores never saw it), once, before what its records show."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=1))
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            with rec.step(range(8), y):
                F.cross_entropy(model(x), y).backward()
    said = [str(w.message) for w in seen if issubclass(w.category, gs.exceptions.GradscoreWarning)]
    assert len(said) == 1 and "outputs are probabilities" in said[0], said
    scores = gs.load_scores(rec.close())
    assert len(scores["ids"]) == 8 and scores["warnings"] == said, scores["warnings"]


def test_a_warning_points_at_the_users_line(tmp_path):
    """A recorder's checks run inside torch's forward and backward, at no fixed depth below
    the user's line: a fixed stacklevel pointed the softmax warning at torch's
    autograd/graph.py and the optimizer's at gradscore's inrun/step.py. Every warning now
    names the line of the user's code that led to it, here and from gs.Scorer."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    softmax = nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=1))
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rec = gs.InRun(softmax, out=tmp_path / "a.h5")
        with rec.step(range(8), y):
            F.cross_entropy(softmax(x), y).backward()
        rec.close()
        rec = gs.InRun(model, out=tmp_path / "b.h5", targets=(x[:3], y[:3]),
                       optimizer=torch.optim.SGD(model[0].parameters(), lr=0.1))   # holds half of the model
        with rec.step(range(8), y, lr=0.1):
            F.cross_entropy(model(x), y).backward()
        rec.close()
        gs.Scorer(softmax).score_batch(x, y)
    found = [(str(w.message)[:40], w.filename) for w in seen if issubclass(w.category, gs.exceptions.GradscoreWarning)]
    assert len(found) == 3 and all(where == __file__ for _, where in found), found


def test_a_forward_random_in_eval_mode_is_refused_with_its_cause(tmp_path):
    """A forward that calls F.dropout(h, p) without training=self.training is random in eval
    mode too, where the recorder lays the model out: it was refused as one "whose output for
    an example depends on the rest of its batch", a wrong cause with no fix. Now its cause
    and fix; the same model with nn.Dropout trains with the recorder."""
    from tests_factory import drops_in_eval
    model = drops_in_eval(d_in=6, hidden=8, n_classes=3)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    rec = gs.InRun(model.train(), out=tmp_path / "r.h5")
    with pytest.raises(gs.EngineError, match=r"differs between two forwards of the same examples in eval mode: "
                                             r"its forward draws random numbers.*the recorder checks each layer's "
                                             r"batch dimension there.*F\.dropout\(x, p, training=self\.training\)"):
        with rec.step(range(8), y):
            F.cross_entropy(model(x), y).backward()
    torch.manual_seed(0)
    fixed = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    rec = gs.InRun(fixed, out=tmp_path / "fixed.h5")
    with rec.step(range(8), y):
        F.cross_entropy(fixed(x), y).backward()
    assert np.isfinite(gs.load_scores(rec.close())["scores"]["grand"]).all()


@pytest.mark.parametrize("kind", ["attention", "lstm"])
def test_dropout_inside_a_replayed_layer_is_refused_in_training(tmp_path, kind):
    """MultiheadAttention's attention dropout and a 2-layer LSTM's dropout between layers
    draw their masks inside torch's kernel, and their rules replay the layer without them:
    in training mode they are refused, named with the fix, whether the model is in training
    mode when the recorder is made or is put there later."""
    from gradscore.demos.models import recurrent_classifier
    torch.manual_seed(0)
    model = recurrent_classifier(kind="GRU", attention=True) if kind == "attention" else \
        recurrent_classifier(kind="LSTM", layers=2)
    layer = model.attn if kind == "attention" else model.rnn
    layer.dropout = 0.3
    ids, y = torch.randint(0, 1000, (8, 6)), torch.randint(0, 2, (8,))
    why = "dropout=0.3 in training mode, whose masks its rule cannot replay; set its dropout to 0"
    with pytest.raises(gs.EngineError, match=why) as refused:
        gs.InRun(model.train(), out=tmp_path / "a.h5")
    if kind == "attention":   # the parameters with one reason, named together
        assert "; attn.in_proj_weight, attn.in_proj_bias: MultiheadAttention with" in str(refused.value)
    rec = gs.InRun(model.eval(), out=tmp_path / "b.h5")
    with pytest.raises(gs.EngineError, match=why):
        with rec.step(range(8), y):
            F.cross_entropy(model.train()(ids), y).backward()
    layer.dropout = 0.0
    with rec.step(range(8), y):   # without dropout: recorded
        F.cross_entropy(model(ids), y).backward()
    assert np.isfinite(gs.load_scores(rec.close())["scores"]["grand"]).all()


class _Places(nn.Module):
    """Positions indexed along the batch: example 0 alone gives its batched output, the
    others do not; no example has a gradient of its own."""

    def __init__(self):
        super().__init__()
        self.lin, self.pos = nn.Linear(10, 4), nn.Embedding(8, 4)

    def forward(self, x):
        return self.lin(x) + self.pos(torch.arange(len(x)))


@pytest.mark.parametrize("cls, why", [(_Places, "depends on the rest of its batch"),
                                      (lambda: Reversed(10, 6, 4),
                                       "lin.weight.*rows are not the batch's examples in order")],
                         ids=["places", "reversed"])
def test_a_model_that_mixes_up_the_batch_is_refused(tmp_path, cls, why):
    """Its rules would record another example's gradient, or one no example has alone."""
    x, y = _data(dtype=torch.float32)
    model = cls()
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with pytest.raises(gs.EngineError, match=why):
        with rec.step(range(8), y[:8]):
            F.cross_entropy(model(x[:8]), y[:8]).backward()


def test_a_step_number_that_goes_back_is_refused(tmp_path):
    """Steps number the run's optimizer steps: a counter reset every epoch would make
    epoch 2's step 0 reuse epoch 1's target gradient (cached for micro-batches of one
    step) and misorder forgetting events; one clear error instead."""
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:4], y[:4]), every=2)
    for step in (0, 0, 1, 2):   # two micro-batches of step 0
        with rec.step(range(4), y[:4], lr=0.1, step=step):
            F.cross_entropy(model(x[:4]), y[:4]).backward()
    with pytest.raises(gs.ConfigError, match="invalid value for 'step': 0 after 2; .*never go back"):
        rec.step(range(4), y[:4], lr=0.1, step=0)
    # 3.5 was taken as 3, so a step 3.75 after it shared its target gradient as a micro-batch of one step
    for step in (3.5, -1, "4"):
        with pytest.raises(gs.ConfigError, match=r"invalid value for 'step': .*; give the optimizer step, a whole "
                                                 r"number >= 0"):
            rec.step(range(4), y[:4], lr=0.1, step=step)


def test_targets_that_do_not_fit_are_one_config_error_naming_them(tmp_path):
    """The recorder's own loss on the step's y, and its target pass, fail on a user's
    mistake with one ConfigError naming the argument, not torch's IndexError or shape
    error; y given as a list is taken as the tensor it stands for."""
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)

    def one_step(name, yy, **kw):
        rec = gs.InRun(model, out=tmp_path / f"{name}.h5", **kw)
        with rec.step(range(8), yy, lr=0.1):
            F.cross_entropy(model(x[:8]), y[:8]).backward()
        return rec.close()
    rows = gs.load_scores(one_step("list", y[:8].tolist()))
    assert np.isfinite(rows["scores"]["loss"]).all()
    with pytest.raises(gs.ConfigError, match="invalid value for 'y': the recorder's 'cross_entropy' loss failed .*"
                                             r"IndexError: Target \d+ is out of bounds"):
        one_step("range", y[:8] + 10)
    with pytest.raises(gs.ConfigError, match="invalid value for 'y'.*RuntimeError"):
        one_step("float", y[:8].float())
    with pytest.raises(gs.ConfigError, match=r"invalid value for 'y': None; give the step's targets, one per "
                                             r"example \(a tensor, an array or a list\)"):   # was torch's RuntimeError
        one_step("none", None)
    with pytest.raises(gs.ConfigError, match="invalid value for 'targets': the model or the 'cross_entropy' loss "
                                             "failed on them.*RuntimeError: mat1 and mat2 shapes"):
        one_step("shape", y[:8], targets=(x[:4, :5], y[:4]))
    with pytest.raises(gs.ConfigError, match="invalid value for 'targets'.*IndexError"):
        one_step("labels", y[:8], targets=(x[:4], y[:4] + 10))


@pytest.mark.parametrize("hidden", [12, 64])   # 64: the wide layers take the Gram form of the target's factors
def test_targets_from_a_loader_are_one_target_of_all_its_examples(tmp_path, hidden):
    """targets= a DataLoader (batches of 4, 4 and 2) is J = the mean loss of its 10 examples,
    as one batch of them: every record equals the per-example loop's with that batch."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=hidden, n_classes=4, depth=2).double(), _data()
    xt, yt = x[30:40], y[30:40]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=4)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=loader)
    assert rec.config.targets == 10
    snaps: list = []
    _train(model, x, y, steps=3, batch=8, rec=rec, snapshots=snaps)
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (xt, yt), dot_rtol=1e-8)


@pytest.mark.parametrize("hidden", [12, 64])   # 64: the wide layers' factors gather over the chunks
@pytest.mark.parametrize("micro", [1, 2])
def test_a_target_larger_than_the_training_batch_runs_in_chunks_of_it(tmp_path, hidden, micro):
    """A target batch of 20 with training (micro-)batches of 6 (or 3): the target's forwards
    see no more examples at once than the step's batch, so the target pass holds no more
    than the training step does, and every record equals the loop's with the 20 as one J."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=hidden, n_classes=4, depth=2).double(), _data()
    xt, yt = x[28:48], y[28:48]
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(xt, yt))
    snaps: list = []
    _train(model, x, y, steps=3, batch=6, micro=micro, rec=rec, snapshots=snaps)
    handle.remove()
    rows = 6 // micro
    late = seen[-(2 * (micro + -(-20 // rows))):]   # the last two steps: no first-step layout calls
    assert max(seen) == rows and sum(late) == 2 * (6 + 20)
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (xt, yt), dot_rtol=1e-8)


def test_norm_subclasses_with_an_activation_are_recorded_as_the_loop_scores_them(tmp_path):
    """timm's norm subclasses (their structure: a LayerNorm over the channels, a GroupNorm
    and a frozen BatchNorm, each followed by its own activation) have the norm-act rule,
    and its layer scale the layer-scale rule: recorded in training (refused before: no
    ghost rule), equal to the loop at θ_t."""
    torch.manual_seed(0)
    model = NormActCNN().double().train()
    with torch.no_grad():
        model.tail[0].running_mean.uniform_(-0.5, 0.5)
        model.tail[0].running_var.uniform_(0.5, 1.5)
    model.tail[0].eval()   # frozen statistics
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 2, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[8:], y[8:]))
    assert not rec.engine.fallback
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps = []
    for t, idx in enumerate([torch.arange(4), torch.tensor([7, 5, 6])]):
        snaps.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, idx))
        with rec.step(idx, y[idx], lr=0.1, step=t):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[8:], y[8:]), keep_modes=True)
    model.eval()   # and a saved checkpoint's scores: the GroupNorm's check reads the LayerNorm2d's channels_last output
    ref = gs.Scorer(model, engine="loop").score_batch(x, y)
    torch.testing.assert_close(gs.Scorer(model).score_batch(x, y).sq_norm, ref.sq_norm, rtol=1e-9, atol=0)


def test_target_batches_from_a_generator_or_with_labels_inside(tmp_path):
    """Any iterable of (x, y) batches is read once, when the recorder is made (a generator
    too); a batch that is a dict holding 'labels' (a Hugging Face collator's) is the other
    keys and the labels. The records equal those of the same examples given as one pair."""
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double()

        def forward(self, x):
            return self.net(x)

    x, y = _data()
    got = {}
    for kind in ("pair", "generator", "dicts"):
        torch.manual_seed(0)
        model = Named()
        targets = {"pair": ({"x": x[30:40]}, y[30:40]),
                   "generator": (({"x": x[a:b]}, y[a:b]) for a, b in ((30, 34), (34, 38), (38, 40))),
                   "dicts": [{"x": x[a:b], "labels": y[a:b]} for a, b in ((30, 34), (34, 38), (38, 40))]}[kind]
        if kind == "dicts":
            targets = iter(targets)
        rec = gs.InRun(model, out=tmp_path / f"{kind}.h5", targets=targets)
        for t in range(2):
            with rec.step(range(8 * t, 8 * t + 8), y[8 * t:8 * t + 8], lr=0.1):
                F.cross_entropy(model(x[8 * t:8 * t + 8]), y[8 * t:8 * t + 8]).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
        with h5py.File(rec.close()) as f:
            got[kind] = f["inrun/dot"][()], f["inrun/target_norm"][()]
    for kind in ("generator", "dicts"):
        np.testing.assert_allclose(got[kind][0], got["pair"][0], rtol=1e-10, atol=1e-16)
        np.testing.assert_allclose(got[kind][1], got["pair"][1], rtol=1e-12)


def test_arguments_a_user_may_get_wrong_are_refused_at_once(tmp_path):
    """targets not an (x, y) pair, empty or of two lengths; a learning rate below 0 or not
    finite: one ConfigError before any training, not an unpacking error at the first
    target step, a NaN ∇J or a silent NaN inrun_value. One score name given as a string
    is that score, not its letters."""
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    sampler = torch.utils.data.distributed.DistributedSampler(range(8), num_replicas=2, rank=0)
    for targets, why in [(x[:4], "give the target batch as a pair"), ((x[:0], y[:0]), "no examples"),
                         ((x[:4], y[:3]), "invalid input 'x': shape \\(4, 10\\) in a batch of 3"),
                         ({"x": x[:4]}, "give the target batch as a pair"),
                         (iter([]), "no examples"),
                         ([(x[:4], y[:4]), (x[4:8], y[4:8])], "give the target batch as a pair"),
                         (iter([(x[:4], y[:4]), (x[4:8],)]), "batch 1 of the target batches is a tuple of 1"),
                         (iter([(range(4), x[:4], y[:4])]), "batch 0 of the target batches is a tuple of 3"),
                         (iter([(x[:4], y[:4]), (x[4:8], y[4:7])]), "batch 1 of the target batches: invalid input 'x': shape \\(4, 10\\)"),
                         (torch.utils.data.DataLoader(list(zip(x[:8], y[:8])), sampler=sampler),
                          "DistributedSampler")]:
        with pytest.raises(gs.ConfigError, match=f"invalid value for 'targets': .*{why}"):
            gs.InRun(model, out=tmp_path / "t.h5", targets=targets)
    # a NaN flush_every never flushed (a crash lost every record); no score recorded nothing
    for kwargs, why in [({"flush_every": float("nan")}, "'flush_every': nan; give the seconds between"),
                        ({"flush_every": -1}, "'flush_every': -1; give the seconds between"),
                        ({"flush_every": "x"}, "'flush_every': 'x'; give the seconds between"),
                        ({"scores": ()}, "'scores': give at least one score"),
                        ({"scores": "loss,grand,loss"}, "'scores': loss is listed twice")]:
        with pytest.raises(gs.ConfigError, match=f"invalid value for {why}"):
            gs.InRun(model, out=tmp_path / "f.h5", **kwargs)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:4], y[:4]), scores="inrun_value")
    assert rec.config.scores == ("inrun_value",)
    for lr in (-0.1, float("nan"), float("inf")):
        with pytest.raises(gs.ConfigError, match="invalid value for 'lr': .*a finite learning rate >= 0"):
            rec.step(range(8), y[:8], lr=lr)
    with rec.step(range(8), y[:8], lr=torch.tensor(0.1)):
        F.cross_entropy(model(x[:8]), y[:8]).backward()
    assert np.isfinite(gs.load_scores(rec.close())["scores"]["inrun_value"]).all()


def test_a_read_only_folder_is_refused_before_training(tmp_path):
    from helpers import read_only_folder
    with read_only_folder(tmp_path / "ro") as ro, pytest.raises(gs.OutputError, match="cannot be written.*writable "
                                                                                      "folder"):
        gs.InRun(mlp(d_in=10, hidden=8, n_classes=4, depth=1), out=ro / "r.h5")


@pytest.mark.parametrize("where", ["journal", "scores file"])
def test_a_close_that_fails_on_a_full_disk_can_be_called_again(tmp_path, monkeypatch, where):
    # a second close() after a full disk returned the path of a file it never wrote
    import errno
    x, y = _data(dtype=torch.float32)
    files = {}
    for name in ("ref", "full"):
        torch.manual_seed(0)
        model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
        rec = gs.InRun(model, out=tmp_path / f"{name}.h5", targets=(x[:8], y[:8]))
        _train(model, x, y, steps=6, batch=12, rec=rec)
        if name == "full":
            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(os, "pwrite", full) if where == "scores file" else \
                monkeypatch.setattr(np, "savez", full)
            with pytest.raises(OSError, match="No space left") as e:
                rec.close()
            assert str(tmp_path) in e.value.filename and not rec.out.exists()
            monkeypatch.undo()
        files[name] = rec.close()
    a, b = gs.load_scores(files["full"]), gs.load_scores(files["ref"])
    assert a["scores"].keys() == b["scores"].keys()
    for k in b["scores"]:
        np.testing.assert_array_equal(a["scores"][k], b["scores"][k])
    assert not (tmp_path / "full.h5.partial").exists()


@pytest.mark.parametrize("where", ["journal", "scores file"])
def test_a_flush_that_fails_during_training_warns_and_training_goes_on(tmp_path, monkeypatch, where):
    """A full disk at a flush inside a step (the journal's row file, or the scores file's
    rewrite) stopped the training with the OSError. Now one warning says what is kept, the
    training continues bit for bit, and the next flush that can writes the records: the
    file at close equals one recorded without the failure."""
    import errno
    x, y = _data(dtype=torch.float32)
    real = {"journal": (np, "savez"), "scores file": (os, "pwrite")}[where]
    original = getattr(*real)
    full_steps = {1, 2, 3}
    step_now = [0]

    def maybe_full(*args, **kwargs):
        if step_now[0] in full_steps:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    from gradscore.inrun import recorder
    joined, moved = recorder.joined, []   # the records each failed flush moves to the host

    def counted(records):
        moved.append(sum(len(r["ids"]) for r in records))
        return joined(records)
    models, files, said = {}, {}, {}
    for name in ("ref", "full"):
        torch.manual_seed(0)
        model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
        rec = gs.InRun(model, out=tmp_path / f"{name}.h5", targets=(x[:8], y[:8]), flush_every=0)
        if name == "full":
            monkeypatch.setattr(*real, maybe_full)
            monkeypatch.setattr(recorder, "joined", counted)
        optim = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in range(6):
                step_now[0] = t
                rec._write_seconds = 0.0   # every step's flush rewrites the file (its pace: 10x its duration)
                idx = torch.randperm(len(y), generator=g)[:12]
                with rec.step(idx, y[idx], lr=0.1, step=t):
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                optim.step()
                optim.zero_grad()
        monkeypatch.undo()
        said[name] = [str(w.message) for w in caught if issubclass(w.category, gs.GradscoreWarning)]
        models[name], files[name] = model, rec.close()
    assert said["ref"] == []
    assert len(said["full"]) == 1, said["full"]   # once per failing stretch, not every step
    assert said["full"][0].startswith(f"{tmp_path / 'full.h5'}: ") and "No space left on device" in said["full"][0]
    assert "training goes on" in said["full"][0]
    # a step's 12 records per failed flush (those of the journal), each moved once: not again at every flush
    assert moved == ([12, 12, 12] if where == "journal" else []), moved
    for (n, a), (_, b) in zip(models["ref"].state_dict().items(), models["full"].state_dict().items()):
        assert torch.equal(a, b), n
    a, b = gs.load_scores(files["full"]), gs.load_scores(files["ref"])
    assert a["scores"].keys() == b["scores"].keys()
    for k in b["scores"]:
        np.testing.assert_array_equal(a["scores"][k], b["scores"][k])
    assert not (tmp_path / "full.h5.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.h5", "ref.h5"]


def test_nothing_is_written_when_training_stops(tmp_path):
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    with pytest.raises(KeyboardInterrupt):
        with gs.InRun(model, out=tmp_path / "r.h5") as rec:
            with rec.step(range(8), y[:8]):
                F.cross_entropy(model(x[:8]), y[:8]).backward()
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks for m in model.modules())


def test_the_scores_file_works_with_the_commands(tmp_path, capsys, monkeypatch):
    from gradscore.cli import main
    from gradscore.reports import plots
    titles = []
    histograms = plots.score_histograms
    monkeypatch.setattr(plots, "score_histograms", lambda *a, title, **k: titles.append(title) or histograms(
        *a, title=title, **k))
    overs, maps = [], plots.data_map
    monkeypatch.setattr(plots, "data_map", lambda *a, over, **k: overs.append(over) or maps(*a, over=over, **k))
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    with gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:8], y[:8])) as rec:
        _train(model, x, y, steps=12, batch=12, rec=rec)
    scores = gs.load_scores(tmp_path / "r.h5")
    assert set(scores["scores"]) == set(gs.inrun.recorder.DEFAULT_SCORES)
    assert len(scores["ids"]) == len(np.unique(scores["ids"])) <= 48
    for argv in (["info", str(tmp_path / "r.h5")],
                 ["diagnose", str(tmp_path / "r.h5"), "--out", str(tmp_path / "d")],
                 ["select", str(tmp_path / "r.h5"), "--by", "inrun_value", "--keep", "0.5",
                  "--out", str(tmp_path / "keep.json")],
                 ["flag", str(tmp_path / "r.h5"), "--score", "aum", "--out", str(tmp_path / "f.json")],
                 ["plot", str(tmp_path / "r.h5"), "--out", str(tmp_path / "map.png")],
                 ["plot", str(tmp_path / "r.h5"), "--kind", "hist", "--out", str(tmp_path / "hist.png")],
                 ["export", str(tmp_path / "r.h5"), "--format", "csv", "--out", str(tmp_path / "r.csv")]):
        assert main(argv) == 0, argv
    # the histograms' title: a recording has no checkpoints ("over 0 checkpoint(s)" before)
    assert titles == [f"score distributions of {len(scores['ids'])} examples recorded in training — r.h5"]
    assert overs == ["presentations", "presentations"]   # the data maps of diagnose and plot


def test_the_commands_say_a_recording_is_unfinished(tmp_path, capsys):
    """The file of a recording not closed (still training, or killed) holds the steps of its
    last rewrite. select, flag, export, plot and diagnose read it without a word: a selection
    made while training goes on, or after a crash, looked like one of the whole training."""
    from gradscore.cli import main
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    path = tmp_path / "r.h5"
    rec = gs.InRun(model, out=path)
    _train(model, x, y, steps=4, batch=12, rec=rec)
    rec.flush()
    says = (f"{path}: an unfinished in-run recording (still recording, or interrupted): its scores are of "
            f"steps 0 to 3, those flushed so far, not of the whole training")
    with pytest.warns(gs.GradscoreWarning, match=re.escape(says)):
        gs.load_scores(path)
    capsys.readouterr()
    for argv in (["select", str(path), "--by", "loss", "--keep", "0.5", "--out", str(tmp_path / "k.json")],
                 ["flag", str(path), "--out", str(tmp_path / "f.json")],
                 ["export", str(path), "--format", "csv", "--out", str(tmp_path / "r.csv")],
                 ["plot", str(path), "--out", str(tmp_path / "m.png")],
                 ["diagnose", str(path), "--score", "inrun_value"]):
        assert main(argv) == 0, argv
        assert f"gradscore {argv[0]}: warning: {says}" in capsys.readouterr().err, argv
    rec.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gs.GradscoreWarning)
        gs.load_scores(path)   # closed: the whole training


def test_a_recording_without_targets_with_the_commands(tmp_path, capsys, monkeypatch):
    """A recording made without targets= (norms, losses, margins) through the commands, where
    each said the wrong thing: diagnose --score inrun_value printed a decomposition "error
    0.00e+00" over no records, NaN tables and numpy's warnings; export td_metrics refused for
    a score it reads from confidence; select, flag and plot told to rerun `gradscore run`,
    which does not make a recording; plot --scores without --kind hist drew a data map."""
    import json

    from gradscore.cli import main
    from gradscore.reports import plots
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    path = tmp_path / "r.h5"
    with gs.InRun(model, out=path) as rec:
        _train(model, x, y, steps=12, batch=12, rec=rec)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["diagnose", str(path), "--score", "inrun_value"]) == 0
    text = capsys.readouterr().out
    assert "decomposition error" not in text and "nan" not in text, text
    assert (f"skipped: {path} has no inrun_value: it was recorded without a target gradient; record with "
            f"gs.InRun(..., targets=...) for the decomposition and the variants") in text, text
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]

    assert main(["export", str(path), "--format", "td_metrics", "--out", str(tmp_path / "td.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "td.jsonl").read_text().splitlines()]
    s = gs.load_scores(path)["scores"]
    assert [r["threshold_closeness"] for r in rows] == (s["confidence"] * (1 - s["confidence"])).tolist()

    advice = {"threshold_closeness": "record it in training: gs.InRun(..., scores=(..., 'threshold_closeness'))",
              "pds": "pds comes from saved checkpoints: `gradscore run --scores pds`"}
    for name, says in advice.items():
        assert main(["select", str(path), "--by", name, "--out", str(tmp_path / "k.json")]) == 2
        err = capsys.readouterr().err
        assert says in err and "rerun" not in err, err
    assert main(["flag", str(path), "--score", "mislabel", "--out", str(tmp_path / "f.json")]) == 2
    assert "mislabel comes from saved checkpoints: `gradscore run --scores mislabel`" in capsys.readouterr().err

    drawn = []
    monkeypatch.setattr(plots, "score_histograms", lambda scores, *a, **k: drawn.append(sorted(scores)))
    assert main(["plot", str(path), "--scores", "el2n,loss", "--out", str(tmp_path / "h.png")]) == 0
    assert drawn == [["el2n", "loss"]]
    assert main(["plot", str(path), "--kind", "datamap", "--scores", "el2n", "--out", str(tmp_path / "m.png")]) == 2
    assert "--scores applies to --kind hist only; leave it out, or use it with --kind hist" in capsys.readouterr().err
    assert main(["plot", str(path), "--kind", "hist", "--max-points", "10", "--out", str(tmp_path / "m.png")]) == 2
    assert "--max-points applies to --kind datamap only" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


_KILLED = """
import sys, time, torch, torch.nn.functional as F
import gradscore as gs
from gradscore.demos.models import mlp
torch.manual_seed(0)
model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
rec = gs.InRun(model, out=sys.argv[1], flush_every=0)
for t in range(10**6):
    idx = torch.arange(t % 8 * 8, t % 8 * 8 + 8)
    with rec.step(idx, y[idx], lr=0.1):
        F.cross_entropy(model(x[idx]), y[idx]).backward()
    opt.step(); opt.zero_grad()
    print(t, file=sys.stderr, flush=True)
"""


def test_a_killed_recording_leaves_a_readable_file_of_the_flushed_steps(tmp_path):
    import subprocess
    import sys
    from helpers import sigkill_when
    script, out = tmp_path / "train.py", tmp_path / "r.h5"
    script.write_text(_KILLED)
    partial = tmp_path / "r.h5.partial"
    sigkill_when([sys.executable, str(script), str(out)],
                 lambda: out.exists() and partial.exists() and len(list(partial.glob("rank*.npz"))) >= 5)
    res = gs.load_scores(out)            # complete and readable: the steps of its last rewrite
    steps = h5py.File(out)["inrun/step"][()]
    from gradscore.inrun.store import iter_rows
    from gradscore.io.journal import Journal
    journal = np.concatenate([c["step"] for c in iter_rows(Journal.attach(out, {}), ("step",))])   # every step flushed
    assert len(np.unique(journal)) >= 5 and set(steps) <= set(journal) and len(steps)
    assert set(res["scores"]) >= {"loss", "aum", "forgetting"}
    info = subprocess.run([sys.executable, "-m", "gradscore", "info", str(out)], capture_output=True, text=True)
    assert "interrupted or still recording (gs.InRun(..., resume=True) continues it)" in info.stdout
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    with pytest.raises(gs.OutputError, match="holds an interrupted in-run recording; pass resume=True .* overwrite"):
        gs.InRun(model, out=out)
    _resume_a_killed_recording(tmp_path, out, partial)
    rec = gs.InRun(model, out=out, overwrite=True)         # a new recording discards the old journal
    assert not list(partial.glob("rank*.npz"))
    x, y = _data(dtype=torch.float32)
    with rec.step(range(8), y[:8]):
        F.cross_entropy(model(x[:8]), y[:8]).backward()
    rec.close()
    assert len(h5py.File(out)["inrun/step"]) == 8 and not partial.exists()


def test_a_slow_rewrite_does_not_hold_back_the_journal(tmp_path):
    """Rewriting the scores file reads every record so far: at 10⁷ records it takes about
    20 s, so rewrites are spaced ten times their duration apart. The journal is not: each
    rank still appends its records every ``flush_every`` seconds, so a crash loses no more
    than those, however long the recording (it held them back with the rewrite)."""
    out = tmp_path / "r.h5"
    partial = tmp_path / "r.h5.partial"
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    rec = gs.InRun(model, out=out, flush_every=0)
    for t in range(6):
        with rec.step(range(t * 8, t * 8 + 8), y[t * 8:t * 8 + 8], lr=0.1):
            F.cross_entropy(model(x[t * 8:t * 8 + 8]), y[t * 8:t * 8 + 8]).backward()
        rec._write_seconds = 3600.0    # as if the last rewrite took an hour
    assert len(list(partial.glob("rank*.npz"))) == 6                       # every step in the journal
    assert np.unique(h5py.File(out)["inrun/step"][()]).tolist() == [0]    # the file from the first rewrite
    rec.close()
    assert np.unique(h5py.File(out)["inrun/step"][()]).tolist() == list(range(6))


def _resume_a_killed_recording(tmp_path, out, partial) -> None:
    """A copy of the killed recording, moved to another file, resumes two steps before its
    last flushed step: the records before stay as the kill left them, each step from there
    on holds this run's 8 records once (a temp file the kill left is no row file)."""
    import shutil
    copy_out = tmp_path / "moved" / "r2.h5"
    copy_out.parent.mkdir()
    shutil.copytree(partial, copy_out.with_name("r2.h5.partial"))
    shutil.copy(out, copy_out)
    chunks = list(gs.inrun.store.iter_rows(gs.io.journal.Journal.attach(copy_out, {}), ("ids", "step")))
    before = {k: np.concatenate([c[k] for c in chunks]) for k in ("ids", "step")}
    resume_at = int(before["step"].max()) - 1
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    rec = gs.InRun(model, out=copy_out, flush_every=0, resume=True)
    for t in range(resume_at, resume_at + 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gs.exceptions.GradscoreWarning)   # the replaced steps, said once
            with rec.step(range(t * 8, t * 8 + 8), y[:8], step=t):
                F.cross_entropy(model(x[:8]), y[:8]).backward()
    rec.close()
    with h5py.File(copy_out) as f:
        steps, row, ids = f["inrun/step"][()], f["inrun/row"][()], f["ids"][()]
    kept = before["step"] < resume_at
    np.testing.assert_array_equal(steps[:kept.sum()], before["step"][kept])
    np.testing.assert_array_equal(ids[row[:kept.sum()]], before["ids"][kept])
    assert np.array_equal(np.unique(steps[kept.sum():], return_counts=True)[1], [8, 8, 8])
    assert np.array_equal(ids[row[kept.sum():]], np.arange(resume_at * 8, resume_at * 8 + 24))


def test_demo_inrun_fast(tmp_path):
    """The demo runs and says its own caveats: no warning comes out of it (the momentum
    caveat of its first-order values is one line below its table)."""
    from gradscore.demos.inrun import run_inrun_demo
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_inrun_demo(tmp_path / "demo", epochs=2, n_train=200, progress=False, echo=lines.append)
    assert not [w for w in caught if issubclass(w.category, gs.GradscoreWarning)], [str(w.message) for w in caught]
    assert any("momentum 0.9 both only approximate" in x for x in lines)
    assert summary["bit_identical"] is True
    assert set(summary["inrun"]) == {"loss", "el2n", "grand", "aum", "forgetting", "confidence", "inrun_value",
                                     "inrun_value_cos"}
    assert all(0.0 <= auroc <= 1.0 for auroc, _ in summary["inrun"].values())
    assert summary["overhead_norms"] > 0 and any("bit-identical with the recorder: True" in x for x in lines)
    assert gs.load_scores(tmp_path / "demo" / "inrun.h5")["scores"]["loss"].shape == (200,)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tiny_lm_with_padding_through_the_hf_loss(tmp_path, kind):
    """The step's loss is Hugging Face's own: the token mean over the whole padded batch,
    so example b's share is its number of predicted tokens over the batch's. A Llama's
    RMSNorm layers take the structural rule (no rule before: refused in-run)."""
    check_tiny_lm_with_padding(tmp_path, kind, "cpu")


def check_tiny_lm_with_padding(tmp_path, kind: str, device: str) -> None:
    """A tiny padded GPT-2 or Llama on ``device``, one recorded step through Hugging Face's
    loss, each record against the per-example loop (test_cuda.py runs it on CUDA)."""
    pytest.importorskip("transformers")
    from helpers import tiny_gpt2
    from gradscore.integrations.hf import from_config
    from gradscore.losses import causal_lm
    torch.manual_seed(0)
    if kind == "gpt2":
        model = tiny_gpt2().train()
    else:
        model = from_config({"model_type": "llama", "vocab_size": 31, "hidden_size": 16, "intermediate_size": 24,
                             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "max_position_embeddings": 16}, attn_implementation="eager").double().train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(0.3 * torch.randn_like(p))
    model = model.to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 31, (6, 9), generator=g)
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    target = ({"input_ids": ids[4:], "attention_mask": mask[4:]}, labels[4:])
    snapshot = copy.deepcopy(model).eval()
    rec = gs.InRun(model, loss="causal_lm", out=tmp_path / "r.h5", targets=target)
    with rec.step(range(4), labels[:4], lr=0.1):
        model(input_ids=ids[:4], attention_mask=mask[:4], labels=labels[:4]).loss.backward()
    rec.close()
    with h5py.File(tmp_path / "r.h5") as f:
        rows = {k: f["inrun"][k][()] for k in f["inrun"]}
    loss_fn, params = causal_lm("mean").fn, list(snapshot.parameters())
    gJ = torch.autograd.grad(loss_fn(snapshot(**target[0]).logits, target[1]).mean(), params)
    tokens = (labels[:4, 1:] != -100).sum(1).double()
    for b in range(4):
        n = int(mask[b].sum())
        loss = loss_fn(snapshot(input_ids=ids[b:b + 1, :n]).logits, labels[b:b + 1, :n])[0]
        grads = torch.autograd.grad(loss, params)
        np.testing.assert_allclose(rows["loss"][b], float(loss.detach()), rtol=1e-10)
        # Hugging Face computes its loss in float32 (logits.float()): the share read from its
        # output gradient, and what is divided by it, are exact to float32's rounding
        np.testing.assert_allclose(rows["share"][b], float(tokens[b] / tokens.sum()), rtol=1e-6)
        np.testing.assert_allclose(rows["share_sq_norm"][b], float(sum((x ** 2).sum() for x in grads))
                                   * float(tokens[b] / tokens.sum()) ** 2, rtol=1e-6)
        np.testing.assert_allclose(rows["sq_norm"][b], float(sum((x ** 2).sum() for x in grads)), rtol=1e-6)
        np.testing.assert_allclose(rows["dot"][b], float(sum((x * y).sum() for x, y in zip(grads, gJ)))
                                   * float(tokens[b] / tokens.sum()), rtol=1e-6)


def test_a_float32_lm_with_a_real_vocabulary_has_readable_shares(tmp_path):
    """A float32 causal LM with a vocabulary and context of real size (8192 tokens, T = 128):
    every example's share is read and its ‖∇ℓ_b‖² equals the float64 loop. The rounding of
    ∂L/∂z grows with the positions a loss sums over, not with the vocabulary; a bound per
    output element called every example of such a batch 'fit' and recorded NaN."""
    pytest.importorskip("transformers")
    from helpers import tiny_gpt2
    from gradscore.losses import causal_lm
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=8192, n_positions=128, n_embd=8).float().train()
    ids = torch.randint(0, 8192, (3, 128), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[2, 40:] = -100                       # a shorter example: its share is its tokens' part
    snapshot = copy.deepcopy(model).double().eval()
    rec = gs.InRun(model, loss="causal_lm", out=tmp_path / "r.h5")
    with rec.step(range(3), labels, lr=0.1):
        model(input_ids=ids, labels=labels).loss.backward()
    rec.close()
    with h5py.File(tmp_path / "r.h5") as f:
        rows = {k: f["inrun"][k][()] for k in ("loss", "share", "sq_norm")}
    tokens = (labels[:, 1:] != -100).sum(1).double()
    loss_fn, params = causal_lm("mean").fn, list(snapshot.parameters())
    for b in range(3):
        loss = loss_fn(snapshot(input_ids=ids[b:b + 1]).logits, labels[b:b + 1])[0]
        sq = float(sum((g ** 2).sum() for g in torch.autograd.grad(loss, params)))
        np.testing.assert_allclose(rows["loss"][b], float(loss), rtol=1e-5)
        np.testing.assert_allclose(rows["share"][b], float(tokens[b] / tokens.sum()), rtol=1e-5)
        np.testing.assert_allclose(rows["sq_norm"][b], sq, rtol=1e-4)


@pytest.mark.parametrize("family", ["causal_lm", "masked_lm"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("B,T,V", [(4, 9, 31), (3, 1, 5), (0, 4, 7), (2, 6, 1)])
def test_language_model_terms_in_one_pass_equal_the_generic_path(B, T, V, reduction, family):
    """On CPU a causal or masked LM's loss, ‖∂ℓ_b/∂z‖², ⟨δ_b, ∂ℓ_b/∂z⟩ and ‖δ_b‖² come from
    one pass over the logits and δ (``kernels.softmax_ce_numba``): equal, in float64, to the
    generic path (the loss's autograd), with ignored labels, an example without a predicted
    token, T = 1 and B = 0. Targets the loss refuses (out of range, or int32 and bool
    labels) take the generic path, which says why."""
    import dataclasses

    from gradscore.inrun.shares import LossTerms
    from gradscore.losses import TOKEN_LOSSES
    loss = TOKEN_LOSSES[family](reduction)
    generic = dataclasses.replace(loss, softmax_rows=None)
    g = torch.Generator().manual_seed(B * 100 + T)
    z = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    if B > 1:
        y[0, 3:] = -100       # a short example
        y[1] = -100           # none to predict
    leaf = z.clone().requires_grad_(True)
    (loss.fn(leaf, y).sum() / max(B, 1)).backward()
    delta = leaf.grad + 1e-3 * torch.randn(z.shape, generator=g, dtype=torch.float64)  # not a multiple of d
    assert LossTerms._softmax_rows(loss, z, delta, y) is not None
    fast, slow = LossTerms.of(loss, z, delta, y), LossTerms.of(generic, z, delta, y)
    for name in ("losses", "d_sq", "dot", "delta_sq"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-12, atol=1e-300)
    assert fast.metrics == slow.metrics == {} and fast.width == T * V and fast.dtype == torch.float64
    if B and T > 1:
        for wrong in (V, -1):                    # out of the vocabulary; a negative label not -100
            bad = y.clone()
            bad[-1, -1] = wrong
            assert LossTerms._softmax_rows(loss, z, delta, bad) is None
            with pytest.raises((IndexError, RuntimeError)):
                LossTerms.of(loss, z, delta, bad)
        assert LossTerms._softmax_rows(loss, z, delta, y.double()) is None
        for kind in (torch.int32, torch.bool):   # label dtypes F.cross_entropy refuses: refused here too
            assert LossTerms._softmax_rows(loss, z, delta, (y > 0).to(kind)) is None
            with pytest.raises(RuntimeError, match="expected target dtype"):
                LossTerms.of(loss, z, delta, (y > 0).to(kind))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,C", [(7, 10), (1, 2), (0, 3), (5, 1)])
def test_classifier_terms_in_one_call_equal_the_generic_path(B, C, dtype, monkeypatch, default_kernels):
    """On CPU a small classifier's loss, ‖∂ℓ_b/∂z‖², ⟨δ_b, ∂ℓ_b/∂z⟩, ‖δ_b‖² and metrics (el2n,
    p_gold, correct, margin: the keys of ``classification_metrics``) come from one numba call:
    equal to the generic path (softmax in float64, then torch), with a tie at the top and
    B = 0. One logit (C = 1, where every loss is 0), labels outside [0, C), or of a dtype
    F.cross_entropy refuses (int32, bool), take the generic path, which says why."""
    from gradscore.inrun.shares import LossTerms
    from gradscore.kernels import softmax_ce_numba
    from gradscore.losses import resolve_loss
    loss = resolve_loss("cross_entropy")
    g = torch.Generator().manual_seed(B * 100 + C)
    z = (2 * torch.randn(B, C, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    if B > 2 and C > 2:
        y[1], z[1, 0], z[1, 1] = 1, z[1].max() + 1, z[1].max() + 1   # a tie: argmax is class 0
    delta = torch.randn(B, C, generator=g, dtype=torch.float64).to(dtype)
    if C == 1:
        assert LossTerms._classifier_rows(loss, z, delta, y) is None
        with pytest.raises(gs.EngineError, match="one logit per example"):
            LossTerms.of(loss, z, delta, y)
        return
    assert LossTerms._classifier_rows(loss, z, delta, y) is not None
    fast = LossTerms.of(loss, z, delta, y)
    monkeypatch.setattr(softmax_ce_numba, "CLASSIFIER_ELEMENTS", -1)
    assert LossTerms._classifier_rows(loss, z, delta, y) is None
    slow = LossTerms.of(loss, z, delta, y)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6   # the generic loss and margin are in z's dtype
    for name in ("losses", "d_sq", "dot", "delta_sq"):
        torch.testing.assert_close(getattr(fast, name).double(), getattr(slow, name).double(), rtol=rtol, atol=1e-300)
    assert fast.metrics.keys() == slow.metrics.keys() == {"el2n", "p_gold", "correct", "margin"}
    assert fast.metrics["correct"].dtype == slow.metrics["correct"].dtype == torch.int8
    assert torch.equal(fast.metrics["correct"], slow.metrics["correct"])
    for name in ("el2n", "p_gold", "margin"):
        torch.testing.assert_close(fast.metrics[name].double(), slow.metrics[name].double(), rtol=rtol, atol=1e-300)
    assert fast.width == slow.width == C and fast.dtype == slow.dtype == dtype
    if B > 2 and C > 2:
        assert fast.metrics["correct"][1] == 0
        monkeypatch.undo()
        bad = y.clone()
        bad[-1] = C
        assert LossTerms._classifier_rows(loss, z, delta, bad) is None
        with pytest.raises((IndexError, RuntimeError)):
            LossTerms.of(loss, z, delta, bad)
        for kind in (torch.int32, torch.bool):   # label dtypes F.cross_entropy refuses: refused here too
            assert LossTerms._classifier_rows(loss, z, delta, (y > 0).to(kind)) is None
            with pytest.raises(RuntimeError, match="expected target dtype"):
                LossTerms.of(loss, z, delta, (y > 0).to(kind))
        byte = LossTerms.of(loss, z, delta, y.to(torch.uint8))   # either path, as the backend chose
        torch.testing.assert_close(byte.losses.double(), fast.losses.double(), rtol=rtol, atol=1e-300)


def test_language_model_losses_of_bfloat16_logits_keep_float32_digits():
    """bfloat16 logits (a step under autocast): the one-pass losses come in float32, equal to
    the cross-entropy of the same bfloat16 values in float64, not rounded to 3 digits."""
    from gradscore.inrun.shares import LossTerms
    from gradscore.losses import causal_lm
    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(3, 7, 50, generator=g)).bfloat16()
    y = torch.randint(0, 50, (3, 7), generator=g)
    delta = torch.randn(z.shape, generator=g).bfloat16()
    loss = causal_lm("mean")
    terms = LossTerms.of(loss, z, delta, y)
    assert LossTerms._softmax_rows(loss, z, delta, y) is not None and terms.losses.dtype == torch.float32
    torch.testing.assert_close(terms.losses.double(), loss.fn(z.double(), y), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["causal_lm", "cross_entropy"])
def test_generic_path_losses_of_bfloat16_logits_keep_float32_digits(kind, monkeypatch):
    """bfloat16 logits on the generic path (CUDA, a forced torch backend, a wide classifier):
    the losses come in float32, equal to the cross-entropy of the same bfloat16 values in
    float64, not rounded to 3 digits; δ's terms agree with the one-pass path's."""
    import dataclasses

    from gradscore.inrun.shares import LossTerms
    from gradscore.kernels import softmax_ce_numba
    from gradscore.losses import causal_lm, resolve_loss
    g = torch.Generator().manual_seed(0)
    if kind == "causal_lm":
        loss = causal_lm("mean")
        z, y = (3 * torch.randn(3, 7, 50, generator=g)).bfloat16(), torch.randint(0, 50, (3, 7), generator=g)
        fast, generic = loss, dataclasses.replace(loss, softmax_rows=None)
    else:
        loss = fast = generic = resolve_loss("cross_entropy")
        z, y = (3 * torch.randn(9, 50, generator=g)).bfloat16(), torch.randint(0, 50, (9,), generator=g)
    delta = torch.randn(z.shape, generator=g).bfloat16()
    one_pass = LossTerms.of(fast, z, delta, y)
    monkeypatch.setattr(softmax_ce_numba, "CLASSIFIER_ELEMENTS", -1)
    terms = LossTerms.of(generic, z, delta, y)
    assert terms.losses.dtype == torch.float32
    torch.testing.assert_close(terms.losses.double(), loss.fn(z.double(), y), rtol=1e-6, atol=0)
    for name in ("d_sq", "dot", "delta_sq"):
        torch.testing.assert_close(getattr(terms, name), getattr(one_pass, name), rtol=1e-5, atol=0)


def test_a_memorized_sequence_records_nan_not_another_examples_share(tmp_path):
    """A language model's share depends on the example's token count (n_b/N for a token
    mean), so an example the loss no longer moves cannot take its batch's median share:
    it records NaN (and the scores leave it out), not a share off by n_b/n_median."""
    V, T = 12, 9
    model = nn.Embedding(V, V).double()              # a bigram model: logits of the next token
    with torch.no_grad():
        model.weight.copy_(40.0 * torch.roll(torch.eye(V, dtype=torch.float64), 1, dims=1))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (3, T), generator=g)
    tokens[0] = torch.arange(T) % V                  # follows the bigram: every token is predicted
    labels = tokens.clone()
    labels[1, 5:] = -100                             # lengths 8, 4 and 8 predicted tokens
    rec = gs.InRun(model, loss="causal_lm", out=tmp_path / "r.h5")
    with rec.step(range(3), labels, lr=0.1):
        logits = model(tokens)
        F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)).backward()
    with pytest.warns(gs.exceptions.GradscoreWarning, match="1 record is of examples the loss no longer moves"):
        rec.close()
    with h5py.File(tmp_path / "r.h5") as f:
        share, sq = f["inrun/share"][()], f["inrun/sq_norm"][()]
    np.testing.assert_allclose(share[1:], [4 / 20, 8 / 20], rtol=1e-9)
    assert np.isnan(share[0]) and np.isnan(sq[0])


_DDP = """
import os, sys, torch, torch.nn.functional as F
import gradscore as gs
from gradscore.demos.models import mlp
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    torch.distributed.init_process_group("gloo")
rank = int(os.environ.get("RANK", "0"))
torch.manual_seed(0)
net = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double()
model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
g = torch.Generator().manual_seed(1)
x, y = torch.randn(32, 10, generator=g, dtype=torch.float64), torch.randint(0, 4, (32,), generator=g)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
flush = 3600 if len(sys.argv) > 3 else 0   # a full disk at close: every row is still to write there
if sys.argv[2] == "wrapped":   # the recorder on the DDP model: it reads the world size from the wrapper
    rec = gs.InRun(model, out=sys.argv[1], targets=(x[:6], y[:6]), flush_every=flush)
else:                          # on the network inside it, as a trainer's callback has it: told the world size
    rec = gs.InRun(net, out=sys.argv[1], targets=(x[:6], y[:6]), flush_every=flush, data_parallel=world)
if rank == 1:   # an optimizer of none of the model's parameters: the same weights, and a warning on rank 1 alone
    rec.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
for t in range(6):
    batch = torch.randperm(32, generator=g)[:8]
    mine = batch.chunk(world)[rank]                 # each rank its share of the global batch
    with rec.step(mine, y[mine], lr=0.1):
        F.cross_entropy(model(x[mine]), y[mine]).backward()
    opt.step()
    opt.zero_grad()
if len(sys.argv) > 3:   # rank 0's disk fills at close (argv[3] bytes): every rank raises; with room, close writes
    import resource, signal
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 0:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails (EFBIG) as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), limits[1]))
    try:
        rec.close()
    except (OSError, gs.GradscoreError) as e:
        os.write(1, f"rank {rank}: {type(e).__name__}: {e}\\n".encode())   # one write: the ranks' lines stay whole
    else:
        raise SystemExit(f"rank {rank}: close did not fail")
    if rank == 0:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
rec.close()
if world > 1:
    torch.distributed.destroy_process_group()
    # DDP's teardown at interpreter exit aborts ("terminate called without an active exception")
    # about 1 run in 10 on 2 CPU cores, with or without the recorder: leave without it
    os._exit(0)
"""


# "wrapped" runs in CI too, in the test below (its rank 0 fails, then both close as one process)
@pytest.mark.parametrize("recorded", [pytest.param("wrapped", marks=pytest.mark.slow), "inner"])
def test_two_ddp_ranks_record_what_one_process_does(tmp_path, recorded):
    """Two gloo ranks, each recording its half of every global batch, give what one process
    gives on the whole batches: DDP averages the ranks' gradients, so each share is the
    local one / 2, whether the recorder is on the DDP model or (told ``data_parallel``) on
    the network inside it, as the Hugging Face and Lightning callbacks have it. A warning
    about the scores given on rank 1 alone is in the file (only rank 0's were)."""
    import subprocess
    import sys
    script = tmp_path / "ddp.py"
    script.write_text(_DDP)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.h5"), recorded], capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(tmp_path / "two.h5"), recorded], capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (gs.load_scores(tmp_path / f) for f in ("one.h5", "two.h5"))
    assert np.array_equal(a["ids"], b["ids"])
    assert [w for w in b["warnings"] if w not in a["warnings"]] == [   # rank 1's warning is kept too
        "the optimizer (SGD) holds none of the model's parameters, so their learning rates are unknown; "
        "inrun_value weighs every parameter by the step's lr"], b["warnings"]
    for name in a["scores"]:    # the same trajectory up to the all-reduce's rounding, in float64
        np.testing.assert_allclose(b["scores"][name], a["scores"][name], rtol=1e-9, atol=1e-12, err_msg=name)
    with h5py.File(tmp_path / "one.h5") as f, h5py.File(tmp_path / "two.h5") as g:
        key = [np.lexsort((h["inrun/row"][()], h["inrun/step"][()])) for h in (f, g)]
        for k in ("share", "sq_norm", "dot", "loss"):
            np.testing.assert_allclose(g["inrun"][k][()][key[1]], f["inrun"][k][()][key[0]], rtol=1e-9, err_msg=k)
    assert not (tmp_path / "two.h5.partial").exists()


@pytest.mark.parametrize("failing", ["two.h5.partial/rank000_", pytest.param("two.h5", marks=pytest.mark.slow)])
def test_two_ddp_ranks_both_stop_when_rank_0_cannot_write_and_both_close_again(tmp_path, failing):
    """Rank 0's disk fills at close (here a file size limit), in its last row file or in the
    scores file: rank 1 must not pass on or wait forever. Both raise, rank 1 with rank 0's
    error; the journal stays, and a second close on both ranks writes what one process
    writes. At the row file, rank 0 stopped alone before the fix."""
    import subprocess
    import sys
    script = tmp_path / "ddp.py"
    script.write_text(_DDP)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.h5"), "wrapped"], capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    # a limit below a row file's size, or between it and the scores file's (a rank's rows: a few KB)
    limit = 2000 if failing.endswith("rank000_") else (tmp_path / "one.h5").stat().st_size - 1000
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(tmp_path / "two.h5"), "wrapped", str(limit)], capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-1000:] + two.stderr[-3000:]
    said = sorted(line for line in two.stdout.splitlines() if line.startswith("rank "))
    error = f"[Errno 27] File too large: '{tmp_path / failing}"
    assert len(said) == 2 and said[0].startswith(f"rank 0: OSError: {error}"), two.stdout
    assert said[1].startswith(f"rank 1: OutputError: rank 0: {error}"), two.stdout
    a, b = (gs.load_scores(tmp_path / f) for f in ("one.h5", "two.h5"))
    for name in a["scores"]:
        np.testing.assert_allclose(b["scores"][name], a["scores"][name], rtol=1e-9, atol=1e-12, err_msg=name)
    assert not (tmp_path / "two.h5.partial").exists()


def _check_bf16_training(fresh, x, y, tmp_path, backward_inside: bool) -> None:
    """``fresh()``'s model trained 3 SGD steps of 12 examples under bf16 autocast, with and
    without the recorder (the backward inside the autocast region, or after it, as torch
    advises): the parameters equal bit for bit, and ‖∇ℓ_b‖² at step 1 is the float32
    loop's at θ_1 within bf16's precision."""
    def train(model, rec=None):
        opt, snaps = torch.optim.SGD(model.parameters(), lr=0.1), []
        for t in range(3):
            idx = torch.arange(12 * t, 12 * t + 12)
            snaps.append(copy.deepcopy(model.state_dict()))
            with (rec.step(idx, y[idx], lr=0.1) if rec else contextlib.nullcontext()):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    if backward_inside:
                        loss.backward()
                if not backward_inside:
                    loss.backward()
            opt.step()
            opt.zero_grad()
        return snaps

    plain, model = fresh(), fresh()
    train(plain)
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    snaps = train(model, rec)
    rec.close()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    with h5py.File(tmp_path / "r.h5") as f:
        sq, step = f["inrun/sq_norm"][()], f["inrun/step"][()]
    ref = fresh()
    ref.load_state_dict(snaps[1])
    want = gs.Scorer(ref.eval(), engine="loop").score_batch(x[12:24], y[12:24]).sq_norm
    np.testing.assert_allclose(sq[step == 1], want, rtol=0.1)    # bf16's 8 bits of mantissa


def test_autocast_bf16_training_is_recorded_and_unchanged(tmp_path):
    x, y = _data(dtype=torch.float32)

    def fresh():
        torch.manual_seed(0)
        return mlp(d_in=10, hidden=16, n_classes=4, depth=2)
    _check_bf16_training(fresh, x, y, tmp_path, backward_inside=True)


@pytest.mark.parametrize("kind", ["add", "sdpa"])
def test_an_embedding_of_the_offsets_trained_under_autocast_is_recorded_near_the_float32_loop(tmp_path, kind):
    """The relative attention bias under bf16 autocast: the embedding's backward, run per
    example from a use whose δ is bf16, takes δ in the table's float32. As SDPA's
    attn_mask the bias reaches SDPA as it is: an expanded mask changed training under
    autocast (SDPA reduces a broadcast mask's gradient in bf16, an expand in float32: the
    parameters after 3 steps differed); each example's gradient of the scores is
    recomputed from the output's δ instead."""
    x, y = _data(d=20, c=3, dtype=torch.float32)

    def fresh():
        torch.manual_seed(0)
        return _Tokens(kind, net=RelativeBias)
    _check_bf16_training(fresh, x, y, tmp_path, backward_inside=True)


@pytest.mark.parametrize("kind", ["linear_bias", "matmul", "cosine"])
def test_a_product_by_a_free_parameter_trained_under_autocast_is_recorded_near_the_float32_loop(tmp_path, kind):
    """The batch's rows times a parameter (F.linear, matmul: bf16 under autocast) as it is,
    its output probed: training unchanged, each example's weight gradient from the bf16 δ
    and the rows in float32."""
    x, y = _data(d=20, c=3, dtype=torch.float32)

    def fresh():
        torch.manual_seed(0)
        return _Tokens(kind)
    _check_bf16_training(fresh, x, y, tmp_path, backward_inside=True)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_recurrent_layers_trained_under_autocast_are_recorded_near_the_float32_loop(tmp_path, kind):
    """Under bf16 autocast torch's CPU GRU takes a float32 input and returns a float32 output
    computed through bf16 matmuls: its rows for an example alone and in the batch differ
    by bf16's rounding. The layout check compares them at the rounding of the autocast
    dtype, not of the rows' dtype (it took the GRU for a layer that reorders its batch and
    refused the step)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50, (36, 10), generator=g), torch.randint(0, 3, (36,), generator=g)

    def fresh():
        torch.manual_seed(0)
        return recurrent_classifier(kind=kind, vocab=50, d=16, layers=2, n_classes=3)
    _check_bf16_training(fresh, x, y, tmp_path, backward_inside=False)


@pytest.mark.parametrize("T,d", [(2, 16), (8, 4)])   # the Gram form, the outer form
def test_rules_compute_in_float32_under_autocast(tmp_path, T, d):
    """Under bf16 autocast the rules read the half-type a and δ and compute in float32, as
    outside it: here every value of the step is an integer bf16 holds exactly, but the
    Grams, the per-example gradients and their sums are not (above 256), so the norms equal
    the float64 loop only if no rule computes in bf16. Both forms of a Linear's rule."""
    g = torch.Generator().manual_seed(T)
    model = nn.Linear(d, 3 if d == 4 else d)
    with torch.no_grad():
        model.weight.copy_(torch.randint(-1, 2, model.weight.shape, generator=g))
        model.bias.copy_(torch.randint(-1, 2, model.bias.shape, generator=g))
    x = torch.randint(-1, 2, (6, T, d), generator=g).float()
    y = torch.randint(-3, 4, (6, T, model.out_features), generator=g).float()
    snap = copy.deepcopy(model).double()
    rec = gs.InRun(model, loss="mse", out=tmp_path / "r.h5")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with rec.step(torch.arange(6), y):
            ((model(x).float() - y) ** 2).sum().backward()
    rec.close()
    with h5py.File(tmp_path / "r.h5") as f:
        sq = f["inrun/sq_norm"][()]
    want = [float(sum((gr ** 2).sum() for gr in torch.autograd.grad(
        ((snap(x[b:b + 1].double()) - y[b:b + 1].double()) ** 2).sum(), list(snap.parameters()))))
        for b in range(6)]
    assert (torch.tensor(want).bfloat16().double() != torch.tensor(want)).any()   # bf16 would round them
    np.testing.assert_allclose(sq, want, rtol=1e-6)


def test_structural_rules_are_checked_in_full_precision_under_autocast(tmp_path):
    """Under bf16 autocast the RMSNorm layers of a Llama and of a Qwen3 (whose q_norm and
    k_norm read bf16 projections) and a Linear subclass with a forward of its own (Falcon's,
    with biases) take their structural rules: the check of what a layer computes runs with
    autocast off, its sample in the weights' dtype. Before, the half-precision forward
    missed the float32 expectation and in-run scoring refused the Qwen3 and the Falcon."""
    pytest.importorskip("transformers")
    from gradscore.integrations.hf import from_config
    from gradscore.losses import causal_lm
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 31, (4, 9), generator=g)
    labels = ids.clone()
    labels[1, 6:] = -100
    for family in ("llama", "qwen3", "falcon"):
        config = ({"model_type": family, "vocab_size": 31, "hidden_size": 16, "intermediate_size": 24,
                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                   "max_position_embeddings": 16} if family != "falcon" else
                  {"model_type": "falcon", "vocab_size": 31, "hidden_size": 16, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "new_decoder_architecture": False, "alibi": False, "bias": True})
        model = from_config(config, attn_implementation="eager").train()
        snapshot = copy.deepcopy(model).eval()
        rec = gs.InRun(model, loss="causal_lm", out=tmp_path / f"{family}.h5")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with rec.step(range(4), labels, lr=0.1):
                model(input_ids=ids, labels=labels).loss.backward()
        rec.close()
        paths = rec.engine.explain()
        assert all(v.startswith("ghost") for v in paths.values()), paths
        with h5py.File(tmp_path / f"{family}.h5") as f:
            sq = f["inrun/sq_norm"][()]
        params = list(snapshot.parameters())
        want = [float(sum((x ** 2).sum() for x in torch.autograd.grad(
            causal_lm("mean").fn(snapshot(input_ids=ids[b:b + 1]).logits, labels[b:b + 1])[0], params)))
            for b in range(4)]
        np.testing.assert_allclose(sq, want, rtol=0.1)    # bf16's 8 bits of mantissa


class _Tokens(nn.Module):
    """FreeNet (or ``net``, RelativeBias) on flat inputs (B, T·5), as _train and _data give them."""

    def __init__(self, kind: str, layout: str = "batch", net: type = FreeNet):
        super().__init__()
        self.net = net(kind, layout)

    def forward(self, x):
        return self.net(x.reshape(len(x), *self.net.shape))


@pytest.mark.parametrize("kind", ["vit", "twice", "inplace", "torch_add", "scale", "rank2", "gamma", "reshaped",
                                  "addcmul", "where", "slice", "table", "exp", "chain", "widen", "embedding",
                                  "interpolate", "sdpa", "linear_bias", "matmul", "cosine", "mm",
                                  "cat_params", "mlp", "setitem", "slice_zero", "read_then_inplace", "einsum",
                                  "stacked", "tiled_bmm", "tiled_reshape", "left", "conv1d", "conv2d"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_parameters_the_forward_uses_directly_train_bit_identically_with_the_recorder(tmp_path, kind, opt):
    """A ViT's class token and position embedding (the free-parameter rule: expanded over
    the batch in each use) leave training bit for bit what it is without the recorder, in
    float32, one use or two, broadcast over the batch alone or over the tokens too, of the
    parameter or of a slice, a table's rows or an elementwise function of it, or of what
    other ops make of it (whose backward the recorder runs per example within the step's),
    or the batch's rows times it (F.linear, matmul: its output probed, the op as it is)."""
    x, y = _data(d=20, c=3, dtype=torch.float32)

    def fresh():
        torch.manual_seed(1)
        return _Tokens(kind)
    plain = _train(fresh(), x, y, steps=5, batch=12, opt=opt)
    model = fresh()
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:8], y[:8]))
    recorded = _train(model, x, y, steps=5, batch=12, opt=opt, rec=rec)
    assert not rec.engine.fallback and set(rec.engine.free) == {"net.cls_token", "net.pos_embed"}
    for (n, a), (_, b) in zip(plain.state_dict().items(), recorded.state_dict().items()):
        assert torch.equal(a, b), n
    rec.close()


def _recorded_as_the_loop(model: nn.Module, d: int, free: set[str], tmp_path, micro: int = 2) -> None:
    """Three SGD steps of 6 examples (``micro`` micro-batches each) of a float64 model on
    inputs of d features, recorded with a target of 8: the free-parameter rule takes
    exactly ``free`` and every record equals the loop at the step's θ_t."""
    x, y = _data(d=d, c=3)
    targets = (x[40:], y[40:])
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=targets)
    snaps: list = []
    _train(model, x, y, steps=3, batch=6, rec=rec, micro=micro, snapshots=snaps)
    assert not rec.engine.fallback and set(rec.engine.free) == free
    check_inrun_against_loop(rec.close(), model, snaps, x, y, targets)


@pytest.mark.parametrize("kind", FreeNet.TAKEN)
@pytest.mark.parametrize("micro", [1, 2])
def test_parameters_the_forward_uses_directly_are_recorded_as_the_loop_scores_them(tmp_path, kind, micro):
    """The free-parameter rule in training (refused before: no ghost rule), equal to the loop at θ_t."""
    torch.manual_seed(0)
    _recorded_as_the_loop(_Tokens(kind).double(), 20, {"net.cls_token", "net.pos_embed"}, tmp_path, micro)


class _ScaledLinear(nn.Linear):
    """A Linear subclass whose own forward scales its weight: not x Wᵀ + b."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


class _LoRALinear(nn.Linear):
    """A Linear subclass with a low-rank update of its own: x Wᵀ + b + (x Aᵀ) Bᵀ."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out)
        self.lora_A, self.lora_B = nn.Parameter(0.3 * torch.randn(2, d_in)), nn.Parameter(0.3 * torch.randn(d_out, 2))

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_A.T) @ self.lora_B.T


class _GatedRMSNorm(nn.Module):
    """Named like Hugging Face's RMSNorm, gated by its input: not w · x̂."""

    def __init__(self, d: int):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.linspace(0.5, 1.5, d)), 1e-6

    def forward(self, x):
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x_hat * torch.sigmoid(x.mean(-1, keepdim=True))


class _LookAlikes(nn.Module):
    """A :class:`_ScaledLinear`, a :class:`_LoRALinear`, a :class:`_GatedRMSNorm` and a head
    on (B, 4, 5) rows."""
    shape = (4, 5)

    def __init__(self, kind: str = "", layout: str = "batch"):
        super().__init__()
        self.lin, self.lora, self.norm = _ScaledLinear(5, 6), _LoRALinear(6, 6), _GatedRMSNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.lora(self.lin(x)))).mean(1))


def test_look_alikes_their_rules_checks_refuse_are_recorded_as_the_loop_scores_them(tmp_path):
    """A layer whose structural rule's check finds it computes something else is a layer
    without a rule (refused before): the free-parameter rule follows its weights, and those
    of its own forward that its rule did not know (a LoRA look-alike's ``lora_A``), and
    every record equals the loop at θ_t."""
    torch.manual_seed(0)
    _recorded_as_the_loop(_Tokens("", net=_LookAlikes).double(), 20,
                          {"net.lin.weight", "net.lin.bias", "net.norm.weight", "net.lora.weight", "net.lora.bias",
                           "net.lora.lora_A", "net.lora.lora_B"}, tmp_path)


class _LayerDrop(nn.Module):
    """Residual blocks that a training step skips as a whole (LayerDrop: wav2vec2's
    ``layerdrop``, M2M100's): the skipped ones in the buffer ``drop``, which the test sets
    before each step, so that the loop at θ_t (the step's parameters and buffers) skips them
    too. In eval mode (the layout's and the target's forwards) none is skipped."""

    def __init__(self, d: int = 10, c: int = 4) -> None:
        super().__init__()
        self.blocks, self.head = nn.ModuleList(nn.Linear(d, d) for _ in range(3)), nn.Linear(d, c)
        self.register_buffer("drop", torch.zeros(3, dtype=torch.bool))

    def forward(self, x):
        for block, drop in zip(self.blocks, self.drop.tolist()):
            if not (self.training and drop):
                x = x + torch.tanh(block(x))
        return self.head(x)


def test_layers_a_step_skips_are_recorded_as_the_loop_scores_them(tmp_path):
    """A step that skips layers (LayerDrop) gives them no share, and they keep their rule:
    refused before ("was not called"), at the first step that skipped one. Every record
    equals the loop at θ_t, the first step's skipped layer and a step that skips them all
    included."""
    torch.manual_seed(0)
    model = _LayerDrop().double()
    x, y = _data()

    def skip(drop):
        model.drop[:] = False
        model.drop[list(drop)] = True
    rec = _steps_as_the_loop(model, x, y, tmp_path, [((1,), 8), ((), 8), ((0, 2), 8), ((0, 1, 2), 8)], skip)
    assert not rec.engine.fallback and all(v.startswith("ghost") for v in rec.engine.explain().values())


class _Tasks(nn.Module):
    """A shared encoder and a head per task; each step trains one task (the buffer ``task``,
    which the test sets before each step). Head 1 reads its input sequence-first, (2, B, 5);
    head 2 no step calls. ``scale``: a parameter of the model's own (the free-parameter rule's),
    used before the heads. ``p``: dropout on the logits, after the heads."""

    def __init__(self, d: int = 10, c: int = 4, p: float = 0.0) -> None:
        super().__init__()
        self.p, self.encoder, self.scale = p, nn.Linear(d, d), nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.heads = nn.ModuleList([nn.Linear(d, c), nn.Sequential(nn.Linear(5, 5), nn.Tanh()), nn.Linear(d, c)])
        self.out = nn.Linear(d, c)   # head 1's last layer
        self.register_buffer("task", torch.zeros((), dtype=torch.long))

    def forward(self, x, task=None):
        h = torch.tanh(self.encoder(x)) * self.scale
        task = int(self.task) if task is None else task
        if task != 1:
            return F.dropout(self.heads[task](h), self.p, self.training)
        seq = self.heads[1](h.view(len(h), 2, 5).transpose(0, 1))   # (2, B, 5): sequence-first
        return F.dropout(self.out(seq.transpose(0, 1).reshape(len(h), -1)), self.p, self.training)


def test_the_head_of_a_task_a_later_step_trains_first_is_recorded_as_the_loop_scores_it(tmp_path):
    """Multi-task training, one task a step: the first step does not call the other task's
    head, which is laid out on the step that first calls it (refused before: "was not called;
    its parameters are used by another module"), there with T == B == 2 in a sequence-first
    layout. Every record equals the loop at θ_t; a head no step calls stays waiting. With
    dropout after the heads, training is bit for bit what it is without the recorder (whose
    layout runs inside the step's forward)."""
    torch.manual_seed(0)
    model = _Tasks().double()
    x, y = _data()
    rec = _steps_as_the_loop(model, x, y, tmp_path, [(0, 8), (1, 2), (0, 8), (1, 5)], model.task.fill_)
    why = rec.engine.explain()
    assert not rec.engine.fallback and all(v.startswith("ghost") for v in why.values()), why
    assert why["heads.1.0.weight"] == "ghost (linear rule on heads.1.0: Linear, batch in dimension 1)"
    assert why["heads.2.weight"].endswith("not called yet: laid out on the first batch that calls it)")

    def train(model, rec=None):
        torch.manual_seed(2)   # the dropout masks
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for t, task in enumerate([0, 1, 0, 1]):
            model.task.fill_(task)
            idx = torch.arange(8 * t, 8 * t + 8)
            with rec.step(idx, y[idx], lr=0.01) if rec else contextlib.nullcontext():
                F.cross_entropy(model(x[idx].float()), y[idx]).backward()
            opt.step()
            opt.zero_grad()
        return model

    def fresh():
        torch.manual_seed(1)
        return _Tasks(p=0.3)
    plain, model = train(fresh()), fresh()
    rec = gs.InRun(model, out=tmp_path / "bits.h5", targets=(x[:6].float(), y[:6]))
    train(model, rec)
    assert rec.engine.explain()["out.weight"] == "ghost (linear rule on out: Linear)"
    for (n, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
    rec.close()


class _TaskAdapters(nn.Module):
    """Blocks under activation checkpointing, each with an adapter per task (the buffer
    ``task``): the first step that trains task 1 calls its adapters inside the checkpoint."""

    def __init__(self, d: int = 10, c: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"lin": nn.Linear(d, d), "adapters": nn.ModuleList(
            nn.Linear(d, d) for _ in range(2))}) for _ in range(2))
        self.head = nn.Linear(d, c)
        self.register_buffer("task", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _block(block, h, task):
        h = torch.tanh(block["lin"](h))
        return h + block["adapters"][task](h)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        for block in self.blocks:
            x = checkpoint(self._block, block, x, int(self.task), use_reentrant=False)
        return self.head(x)


def test_the_adapters_of_a_task_a_later_step_trains_first_under_checkpointing(tmp_path):
    """A layer first called inside ``torch.utils.checkpoint`` is laid out there: the
    recorder's runs of the model save nothing into the checkpoint (which raised "a
    different number of tensors was saved during the original forward and recomputation"
    in the step's backward). Every record equals the loop at θ_t."""
    torch.manual_seed(0)
    model = _TaskAdapters().double()
    x, y = _data()
    rec = _steps_as_the_loop(model, x, y, tmp_path, [(0, 8), (1, 8), (1, 8), (0, 8)], model.task.fill_)
    assert not rec.engine.fallback and all(v.startswith("ghost") for v in rec.engine.explain().values())


class _SharedMask(nn.Module):
    """Self-attention under a mask its caller gives as a keyword, shared by the batch: (T, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.att, self.out = nn.Linear(5, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp(x)
        return self.out((h + self.att(h, h, h, attn_mask=mask, need_weights=False)[0])[:, 0])


@pytest.mark.parametrize("B, T", [(4, 6), (6, 4), (4, 4)])
def test_a_mask_the_batch_shares_given_as_a_keyword(tmp_path, B, T):
    """``model(x=x, mask=causal)``, the (T, T) mask shared by the batch: where T != B every
    record equals the loop's with the mask; where T == B the recorder takes the mask's rows
    for the examples', and its runs of the model fail: refused, and the refusal now says
    that this may be why and what to do (it named only the layers and torch's error)."""
    torch.manual_seed(0)
    model, x, y = _SharedMask().double(), torch.randn(3 * B, T, 5, dtype=torch.float64), torch.randint(0, 3, (3 * B,))
    mask = torch.triu(torch.full((T, T), -1e9, dtype=torch.float64), 1)
    opt, snaps = torch.optim.SGD(model.parameters(), lr=0.1), []
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with contextlib.ExitStack() as refused:
        if T == B:
            refused.enter_context(pytest.raises(gs.EngineError, match=r"If the keyword 'mask' \(4, 4\) is one tensor "
                                                                    r"the whole batch shares"))
        for t in range(3):
            idx = torch.arange(t * B, t * B + B)
            snaps.append(({k: v.clone() for k, v in model.state_dict().items()}, idx))
            with rec.step(idx, y[idx], lr=0.1, step=t):
                F.cross_entropy(model(x=x[idx], mask=mask), y[idx]).backward()
            opt.step()
            opt.zero_grad()
    if T == B:
        return
    rec.close()
    from gradscore.io.store import load_inrun_rows
    rows = load_inrun_rows(tmp_path / "r.h5")
    for t, (snap, idx) in enumerate(snaps):
        m = copy.deepcopy(model)
        m.load_state_dict(snap)
        want = [sum((g ** 2).sum() for g in torch.autograd.grad(
            F.cross_entropy(m(x=x[b:b + 1], mask=mask), y[b:b + 1]), list(m.parameters()))) for b in idx]
        np.testing.assert_allclose(rows["sq_norm"][rows["step"] == t], torch.stack(want).detach(), rtol=1e-9)


def test_a_task_given_as_a_keyword_reaches_the_recorders_runs_of_the_model(tmp_path):
    """The step's keywords that are not tensors (``model(x=x, task=1)``) go with the batch to
    the recorder's own runs of the model: left out before, those ran the default task, whose
    head is not the step's, and the step was refused. Each example's loss, ‖∇ℓ_b‖² and
    target dot equal the loop's at θ_t, the target's J at the default task."""
    from gradscore.io.store import load_inrun_rows
    torch.manual_seed(0)
    model = _Tasks().double()
    x, y = _data()
    targets = (x[:6], y[:6])
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=targets)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps: list = []
    for t, task in enumerate([0, 1, 1]):
        idx = torch.arange(8 * t, 8 * t + 8)
        snaps.append((copy.deepcopy(model), idx, task))
        with rec.step(idx, y[idx], lr=0.1):
            F.cross_entropy(model(x=x[idx], task=task), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    assert rec.engine.explain()["out.weight"] == "ghost (linear rule on out: Linear)"
    rows = load_inrun_rows(rec.close())
    for t, (m, idx, task) in enumerate(snaps):
        params = list(m.parameters())
        gJ = torch.autograd.grad(F.cross_entropy(m(targets[0]), targets[1]), params, allow_unused=True)
        gJ = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gJ)]
        at = rows["step"] == t
        for j, i in enumerate(idx.tolist()):
            loss = F.cross_entropy(m(x=x[i:i + 1], task=task), y[i:i + 1])
            g = torch.autograd.grad(loss, params, allow_unused=True)
            g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]
            np.testing.assert_allclose(rows["loss"][at][j], float(loss.detach()), rtol=1e-10)
            np.testing.assert_allclose(rows["sq_norm"][at][j], float(sum((gi ** 2).sum() for gi in g)), rtol=1e-9)
            dot = float(sum((gi * gj).sum() for gi, gj in zip(g, gJ)))
            np.testing.assert_allclose(rows["dot"][at][j] * len(idx), dot, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("kind, layout", [("mixtral", "merged"), ("gpt_oss", "twice"), ("nemotron_h", "flat")])
def test_hugging_face_experts_are_recorded_as_the_loop_scores_them_and_train_bit_identically(tmp_path, kind, layout):
    """A mixture of Hugging Face's experts (refused before: no ghost rule) in training: every
    record equals the loop at θ_t in float64, and training with the recorder is bit for bit
    training without it (float32, SGD and Adam)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    _recorded_as_the_loop(_Tokens(kind, layout, net=ExpertsNet).double(), 20, set(), tmp_path)
    x, y = _data(d=20, c=3, dtype=torch.float32)
    for opt in ("sgd", "adam"):
        def fresh():
            torch.manual_seed(1)
            return _Tokens(kind, layout, net=ExpertsNet)
        plain = _train(fresh(), x, y, steps=4, batch=12, opt=opt)
        model = fresh()
        rec = gs.InRun(model, out=tmp_path / f"{opt}.h5", targets=(x[:8], y[:8]))
        recorded = _train(model, x, y, steps=4, batch=12, opt=opt, rec=rec)
        assert not rec.engine.fallback and rec.engine.explain()["net.experts.down_proj"].startswith("ghost (experts")
        for (n, a), (_, b) in zip(plain.state_dict().items(), recorded.state_dict().items()):
            assert torch.equal(a, b), n
        rec.close()


@pytest.mark.parametrize("kind", RelativeBias.TAKEN)
def test_an_embedding_of_the_offsets_is_recorded_as_the_loop_scores_it_and_trains_bit_identically(tmp_path, kind):
    """T5's relative attention bias (one Embedding output for the batch, added to every
    example's scores), refused before: recorded equal to the loop at θ_t in float64 (two
    micro-batches a step), and in float32 training stays bit for bit what it is without
    the recorder, which runs the embedding's backward per example inside the step's."""
    torch.manual_seed(0)
    _recorded_as_the_loop(_Tokens(kind, "TB", net=RelativeBias).double(), 15, {"net.rel.weight"}, tmp_path)
    x, y = _data(d=20, c=3, dtype=torch.float32)

    def fresh():
        torch.manual_seed(1)
        return _Tokens(kind, net=RelativeBias)
    plain = _train(fresh(), x, y, steps=5, batch=12, opt="adam")
    model = fresh()
    rec = gs.InRun(model, out=tmp_path / "f.h5", targets=(x[:8], y[:8]))
    recorded = _train(model, x, y, steps=5, batch=12, opt="adam", rec=rec)
    for (n, a), (_, b) in zip(plain.state_dict().items(), recorded.state_dict().items()):
        assert torch.equal(a, b), n
    rec.close()


@pytest.mark.parametrize("kind", ["add", "inplace", "sdpa"])
def test_a_bias_added_to_windows_of_the_batch_is_recorded_as_the_loop_scores_it(tmp_path, kind):
    """Swin's form: a table added to (B·2, 2, 5) windows, each example's together (refused
    before: the use had to have B rows): recorded equal to the loop at θ_t."""
    torch.manual_seed(0)
    _recorded_as_the_loop(_Tokens("example", kind, net=Windows).double(), 20, {"net.table"}, tmp_path)


@pytest.mark.parametrize("kind", ["einsum_outer", "reorder", "checkpoint", "setitem_after_use"])
def test_a_parameter_the_forward_uses_otherwise_is_refused_in_training_with_why(tmp_path, kind):
    """Refused before the first step changes anything (a checkpointed use would have
    crashed the step's backward: its recomputation saw other shapes)."""
    x, y = _data(d=20, c=3)
    model = _Tokens(kind).double()
    before = copy.deepcopy(model.state_dict())
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    said = {"einsum_outer": r"\.", "reorder": "; as a free parameter it is added to rows that are not",
            "checkpoint": "; as a free parameter it is used by mul under saved-tensor hooks",
            "setitem_after_use": r"; as a free parameter it is changed in place \(its copy or view\) before its use "
                                 "by mul"}[kind]
    with pytest.raises(gs.GradscoreError, match="net.pos_embed: no ghost rule for FreeNet" + said):
        _train(model, x, y, steps=1, batch=6, rec=rec)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("same", [False, True])
def test_weight_standardized_convs_are_recorded_as_the_loop_scores_them(tmp_path, same):
    """Convs that standardize their weight in their forward (timm's StdConv2d, and
    ScaledStdConv2d with a gain: BiT ResNets, NFNets; ``same``: ScaledStdConv2dSame, which
    pads its input TensorFlow's SAME way first) have the std-conv rule: recorded in
    training (refused before: no ghost rule), equal to the loop at θ_t."""
    torch.manual_seed(0)
    second = MyStdConv2d(4, 4, 3, stride=2, groups=2, gain=True, same_pad=True) if same else \
        MyStdConv2d(4, 4, 3, stride=2, groups=2, gain=True)
    model = nn.Sequential(MyStdConv2d(1, 4, 3, padding=1), nn.SiLU(), second,
                          nn.Flatten(), nn.Linear(64 if same else 36, 4)).double()
    x, y = _data(image=True)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[40:], y[40:]))
    assert not rec.engine.fallback
    snaps: list = []
    _train(model, x, y, steps=2, batch=6, rec=rec, snapshots=snaps)
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[40:], y[40:]), dot_rtol=1e-8)


def test_norm_act_layers_under_autocast_are_recorded_near_the_float32_loop(tmp_path):
    """Under bf16 autocast a LayerNorm2d and a GroupNorm run in float32 on bf16 inputs, and
    their activations after them in float32: the norm-act rule takes the gradient back
    through the activation in the dtype it ran in. Every parameter is ghost-ruled; the
    norms are the float32 loop's to bf16's precision."""
    torch.manual_seed(0)
    model = NormActCNN(batch_norm=False).train()
    snapshot = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 2, 3, 4, generator=g), torch.tensor([0, 1, 2, 1])
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with rec.step(range(4), y, lr=0.1):
            F.cross_entropy(model(x), y).backward()
    rec.close()
    assert all(v.startswith("ghost") for v in rec.engine.explain().values())
    with h5py.File(tmp_path / "r.h5") as f:
        sq = f["inrun/sq_norm"][()]
    params = list(snapshot.parameters())
    want = [float(sum((p ** 2).sum() for p in torch.autograd.grad(
        F.cross_entropy(snapshot(x[b:b + 1]), y[b:b + 1]), params))) for b in range(4)]
    np.testing.assert_allclose(sq, want, rtol=0.05)


def test_an_output_returned_as_a_cast_copy_is_read_where_the_loss_read_it(tmp_path):
    """A model that computes its loss inside and returns its output as a cast copy, which the
    loss does not read (Accelerate's float32 outputs of bf16 logits): δ is read at the values
    the model computed. An upcast copy holds them exactly (and its batch is not taken for
    coupled by a float64 rounding its values never had: the check's tolerance is of the
    least precise of the output's, the parameters' and autocast's dtypes); a rounded copy
    does not (a bfloat16 copy of float16 values, or the reverse, neither), and the step is
    refused with the reason. A loss that reads the copy itself is recorded at the copy."""
    class Cast(nn.Module):
        def __init__(self, net, dtype):
            super().__init__()
            self.net, self.dtype = net, dtype

        def forward(self, x, labels=None):
            z = self.net(x)
            if labels is not None:   # the loss inside, from the values before the copy
                self.loss = F.cross_entropy(z, labels)
            return z.to(self.dtype)
    x, y = _data()
    half = torch.bfloat16, torch.float16
    for net_dtype, dtype, inside in [(torch.float32, torch.float64, True), (torch.float64, torch.float32, True),
                                     (torch.float64, torch.float32, False), (*half, True), (*half[::-1], True)]:
        torch.manual_seed(0)
        model = Cast(mlp(d_in=10, hidden=8, n_classes=4, depth=1).to(net_dtype), dtype)
        rec = gs.InRun(model, out=tmp_path / "r.h5", overwrite=True)
        xb = x[:8].to(net_dtype)
        refused = inside and torch.promote_types(net_dtype, dtype) != dtype   # bf16 <-> fp16: rounded either way
        with (pytest.raises(gs.exceptions.EngineError, match=rf"in {dtype}, a rounded copy of the {net_dtype}")
              if refused else contextlib.nullcontext()):
            with rec.step(range(8), y[:8], lr=0.1):
                if inside:
                    model(x=xb, labels=y[:8])
                    model.loss.backward()
                else:
                    F.cross_entropy(model(xb).double(), y[:8]).backward()
        if refused:
            continue
        rec.close()
        with h5py.File(tmp_path / "r.h5") as f:
            loss = f["inrun/loss"][()]
        read = model.net(xb) if inside else model.net(xb).float()   # the values the loss read
        want = F.cross_entropy(read.double(), y[:8], reduction="none").detach()
        np.testing.assert_allclose(loss, want, rtol=1e-6)   # in the dtype of those values


class _SeqFirst(nn.Module):
    """Embedding, a sequence-first GRU and LayerNorm (T, B, d), then a linear head on the mean."""

    def __init__(self):
        super().__init__()
        self.emb, self.gru = nn.Embedding(11, 6), nn.GRU(6, 5)
        self.norm, self.head = nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, ids):                      # ids (B, T)
        h, _ = self.gru(self.emb(ids).transpose(0, 1))
        return self.head(self.norm(h).mean(0))


@pytest.mark.parametrize("T", [4, 1])
def test_sequence_first_layers_with_T_equal_to_B_and_T_1(tmp_path, T):
    """The layout of each layer comes from evidence on the first batch (B = 4 = T here, and
    T = 1), never from a size; every norm equals the loop at θ_t in float64."""
    torch.manual_seed(0)
    model = _SeqFirst().double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 11, (12, T), generator=g), torch.randint(0, 3, (12,), generator=g)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:3], y[:3]))
    snaps: list = []
    _train(model, x, y, steps=3, batch=4, rec=rec, snapshots=snaps)
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[:3], y[:3]), dot_rtol=1e-8)


class _TorchFamily(nn.Module):
    """Token ids (B, T) through one of torch's own layers, batch-first or sequence-first,
    then a linear head on the mean over positions."""

    def __init__(self, kind: str, batch_first: bool):
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        self.emb = nn.Embedding(11, 8)
        if kind == "encoder_post_norm" or kind == "encoder_pre_norm":
            self.body = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first,
                                                   norm_first=kind == "encoder_pre_norm")
        elif kind == "lstm_2_layers":
            self.body = nn.LSTM(8, 8, num_layers=2, batch_first=batch_first)
        elif kind == "lstm_projected":   # proj_size: h_t = W_hr (o_t ⊙ tanh c_t), bidirectional
            self.body = nn.LSTM(8, 6, num_layers=2, batch_first=batch_first, proj_size=4, bidirectional=True)
        else:   # "attention": nn.MultiheadAttention, its projections used functionally, then LayerNorm
            self.body, self.norm = nn.MultiheadAttention(8, 2, batch_first=batch_first), nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids if self.batch_first else ids.T)
        if self.kind.startswith("lstm"):
            h = self.body(h)[0]
        elif self.kind == "attention":
            h = self.norm(self.body(h, h, h, need_weights=False)[0] + h)
        else:
            h = self.body(h)
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("T", [4, 1])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["encoder_post_norm", "encoder_pre_norm", "lstm_2_layers", "lstm_projected",
                                  "attention"])
def test_torch_layer_families_in_training_equal_the_loop(tmp_path, kind, batch_first, T):
    """In training the recorder passes δ on as it came (the checkpoint engines make it
    contiguous), so torch's own layers get their in-run check too: B = 4 = T and T = 1,
    batch-first and sequence-first, every record against the loop at θ_t in float64."""
    torch.manual_seed(0)
    model = _TorchFamily(kind, batch_first).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 11, (12, T), generator=g), torch.randint(0, 3, (12,), generator=g)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:3], y[:3]))
    snaps: list = []
    _train(model, x, y, steps=3, batch=4, rec=rec, snapshots=snaps)
    assert all(path.startswith("ghost") for path in rec.engine.explain().values())
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[:3], y[:3]), dot_rtol=1e-8)


@pytest.mark.parametrize("warm_up", [0, 2])
def test_a_compiled_model_is_recorded_as_the_loop_and_trains_unchanged(tmp_path, warm_up):
    """A user's torch.compile'd model (AOTAutograd traces forward and backward): training
    with the recorder is bit-identical to the same compiled training without it, and every
    record equals the loop at θ_t in float64; also where the model was compiled and ran
    before the recorder's hooks existed (``warm_up`` steps without it: a recorder started
    late, or a callback added to a running training)."""
    x, y = _data()

    def fresh():
        torch.manual_seed(0)
        return mlp(d_in=10, hidden=12, n_classes=4, depth=2).double()
    plain = torch.compile(fresh(), backend="aot_eager")
    _train(plain, x, y, steps=warm_up, batch=8, seed=5)
    _train(plain, x, y, steps=3, batch=8)
    model = fresh()
    compiled = torch.compile(model, backend="aot_eager")
    _train(compiled, x, y, steps=warm_up, batch=8, seed=5)
    rec = gs.InRun(compiled, out=tmp_path / "r.h5", targets=(x[:6], y[:6]))
    snaps: list = []
    _train(compiled, x, y, steps=3, batch=8, rec=rec, snapshots=snaps)
    for (n, a), (_, b) in zip(plain.state_dict().items(), compiled.state_dict().items()):
        assert torch.equal(a, b), n
    snaps = [({k.removeprefix("_orig_mod."): v for k, v in snap.items()}, idx) for snap, idx in snaps]
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[:6], y[:6]))


@pytest.mark.slow   # compiles again; the compiled model's fast check is the test above
def test_the_head_of_a_task_a_later_step_trains_first_in_a_compiled_model(tmp_path):
    """The layout of a layer first called on a later step runs inside the compiled forward,
    eagerly (dynamo failed tracing it: "is already tracked for mutation"). Training is
    bit for bit the same compiled training without the recorder, and every record equals
    the loop at θ_t in float64."""
    x, y = _data()

    def train(compiled, model, rec=None, snaps=None):
        for t, task in enumerate([0, 1]):
            model.task.fill_(task)
            idx = torch.arange(8 * t, 8 * t + 8)
            if snaps is not None:
                snaps.append(({k: v.clone() for k, v in model.state_dict().items()}, idx))
            with rec.step(idx, y[idx], lr=0.1) if rec else contextlib.nullcontext():
                F.cross_entropy(compiled(x[idx]), y[idx]).backward()
            for p in model.parameters():
                if p.grad is not None:   # the heads the step did not train have none
                    p.data -= 0.1 * p.grad
                    p.grad = None

    def fresh():
        torch.manual_seed(0)
        return _Tasks().double()
    plain = fresh()
    train(torch.compile(plain, backend="aot_eager"), plain)
    model, snaps = fresh(), []
    compiled = torch.compile(model, backend="aot_eager")
    rec = gs.InRun(compiled, out=tmp_path / "r.h5", targets=(x[:6], y[:6]))
    train(compiled, model, rec, snaps)
    assert rec.engine.explain()["_orig_mod.out.weight"] == "ghost (linear rule on _orig_mod.out: Linear)"
    for (n, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[:6], y[:6]))


def test_an_empty_batch_records_nothing(tmp_path):
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with rec.step(range(8), y[:8]):
        F.cross_entropy(model(x[:8]), y[:8]).backward()
    with rec.step([], y[:0]):                    # B == 0: the model runs, nothing to record
        model(x[:0]).sum().backward()
    assert len(gs.load_scores(rec.close())["ids"]) == 8


def test_reports_read_the_data_by_id_not_by_position(tmp_path):
    """An in-run file lists its ids sorted; the data file keeps its own order. flag,
    select and diagnose must pair each scored example with its own label and mask."""
    from gradscore.io.datasets import scored_labels
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 10, generator=g), torch.randint(0, 4, (40,), generator=g)
    ids = np.random.default_rng(0).permutation(np.arange(500, 540))
    noisy = np.zeros(40, dtype=bool)
    noisy[:8] = True
    data = gs.save_dataset(tmp_path / "train.h5", x.numpy(), y.numpy(), ids=ids, noisy=noisy)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    with gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:4], y[:4])) as rec:
        for t in range(10):
            idx = torch.arange(t % 5 * 8, t % 5 * 8 + 8)
            with rec.step(ids[idx.numpy()], y[idx], lr=0.1):
                F.cross_entropy(model(x[idx]), y[idx]).backward()
    scored = gs.load_scores(tmp_path / "r.h5")["ids"]
    assert scored.tolist() == sorted(ids.tolist())
    labels, mask = scored_labels(data, scored)
    where = {int(i): k for k, i in enumerate(ids)}
    assert labels.tolist() == [int(y[where[int(i)]]) for i in scored]
    assert mask.tolist() == [bool(noisy[where[int(i)]]) for i in scored]
    report = gs.flag(tmp_path / "r.h5", score="aum", data=data)
    assert report["against_known_noisy"]["true_count"] == 8
    assert {c: v["n"] for c, v in report["per_class"].items()} == \
        {int(c): int((y.numpy() == c).sum()) for c in np.unique(y.numpy())}
    diag = gs.diagnose(tmp_path / "r.h5", score="inrun_value", data=str(data), echo=lambda s: None)
    assert diag["n_noisy"] == 8 and "|inrun_value|" in diag["flagging"] and set(diag["inflation"]) == {"raw", "cos",
                                                                                                      "clip"}
    from gradscore.io.store import inrun_blocks, load_inrun_rows
    from gradscore.scores.inrun import dot_terms
    whole = dot_terms(lambda keys: [load_inrun_rows(tmp_path / "r.h5", keys)], 40)
    np.testing.assert_allclose(whole["raw"], gs.load_scores(tmp_path / "r.h5")["scores"]["inrun_value"], rtol=1e-12)
    for k, v in dot_terms(inrun_blocks(tmp_path / "r.h5", block=7), 40).items():   # to the bit
        assert np.array_equal(v, whole[k], equal_nan=True), k
    with pytest.raises(gs.DataError, match="no example with id 500"):   # an id the data does not have
        scored_labels(gs.save_dataset(tmp_path / "other.h5", x.numpy(), y.numpy(), ids=np.arange(501, 541)), scored)


def test_flag_reads_a_recordings_fit_at_the_last_step_each_example_was_in(tmp_path):
    """In a recording, the model's fit at the end is each example's prediction at the last
    step it was in (the step's own forward): flag's ``fit_clean`` is the share of the
    examples it does not flag that were predicted as labelled there."""
    from gradscore.io.store import load_inrun_rows
    g = torch.Generator().manual_seed(1)
    y = torch.arange(60) % 4
    x = torch.randn(4, 10, generator=g)[y] * 2 + torch.randn(60, 10, generator=g)
    given = torch.where(torch.arange(60) < 10, (y + 1) % 4, y)
    torch.manual_seed(0)
    model = mlp(d_in=10, hidden=16, n_classes=4, depth=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gs.InRun(model, out=tmp_path / "r.h5") as rec:
        for _ in range(60):
            idx = torch.randperm(60, generator=g)[:20]
            with rec.step(idx, given[idx]):
                F.cross_entropy(model(x[idx]), given[idx]).backward()
            opt.step()
            opt.zero_grad()
    rows = load_inrun_rows(tmp_path / "r.h5", ("row", "step", "correct"))
    assert np.all(np.diff(rows["step"]) >= 0) and len(np.unique(rows["row"])) == 60
    first, last = {}, {}
    for r, c in zip(rows["row"].tolist(), rows["correct"].tolist()):
        first.setdefault(r, c)
        last[r] = c                                             # the later record wins
    report = gs.flag(tmp_path / "r.h5", score="aum")
    assert report["estimated_count"] == 10
    unflagged = sorted(set(range(60)) - {f["index"] for f in report["flagged"]})
    assert report["fit_clean"] == pytest.approx(np.mean([last[i] for i in unflagged]))
    assert np.mean([first[i] for i in unflagged]) < report["fit_clean"] - 0.2   # early steps do not count


def test_examples_the_loss_no_longer_moves_keep_the_batch_share(tmp_path):
    """A fit example (p_gold = 1 − 2·10⁻⁷) has 1 − p at float32's rounding in its output
    gradient: its share cannot be read from it. It takes its batch's share; nothing is
    refused (this stopped a long training), nothing divides by zero. A whole batch like
    that records no share (NaN), not a made-up one."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[16.0, 0, 0, 0], [0, 16.0, 0, 0], [0, 0, 16.0, 0]]))
        model.bias.zero_()
    x = torch.cat([torch.eye(4)[:3], torch.full((5, 4), 0.1)])   # 3 saturated examples, 5 uncertain
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with rec.step(range(8), y):
        F.cross_entropy(model(x), y).backward()
    with rec.step(range(8, 11), y[:3]):
        F.cross_entropy(model(x[:3]), y[:3]).backward()
    rec.close()
    with h5py.File(tmp_path / "r.h5") as f:
        share, sq, step = f["inrun/share"][()], f["inrun/sq_norm"][()], f["inrun/step"][()]
    np.testing.assert_allclose(share[step == 0], 1 / 8, rtol=1e-6)
    assert np.isfinite(sq[step == 0]).all() and (sq[step == 0] >= 0).all()
    assert np.isnan(share[step == 1]).all() and np.isnan(sq[step == 1]).all()


@pytest.mark.parametrize("loss", ["cross_entropy", "nll"])
def test_unlabeled_examples_of_a_classifier_are_one_clear_error(tmp_path, loss):
    """Labels of -100 (the loss's ignore_index: unlabeled examples in a semi-supervised
    batch) leave those examples out of the step's loss; they have no loss or margin of their
    own. One ConfigError that says so, not an index error that blames y's form."""
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    rec = gs.InRun(nn.Sequential(model, nn.LogSoftmax(1)) if loss == "nll" else model, loss=loss,
                   out=tmp_path / "r.h5")
    labels = y[:8].clone()
    labels[[2, 5]] = -100
    with pytest.raises(gs.ConfigError, match="2 of 8 labels are -100, the loss's ignore_index"):
        with rec.step(range(8), labels):
            z = rec.model(x[:8])
            (F.cross_entropy(z, labels) if loss == "cross_entropy" else F.nll_loss(z, labels)).backward()


def test_a_loss_per_pixel_is_one_clear_error_and_its_per_example_mean_is_recorded(tmp_path):
    """Segmentation: cross_entropy over (B, C, H, W) gives a loss per pixel; the recorder
    says that it needs one per example, and records the per-example mean given as loss=."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1)).double()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5, 6, 6))
    rec = gs.InRun(model, out=tmp_path / "a.h5")
    with pytest.raises(gs.ConfigError, match=r"gives shape \(5, 6, 6\) for an output of \(5, 3, 6, 6\); .* one loss "
                                             r"per example, \(5,\)"):
        with rec.step(range(5), y):
            F.cross_entropy(model(x), y).backward()
    per_example = lambda z, t: F.cross_entropy(z, t, reduction="none").flatten(1).mean(1)   # noqa: E731
    before = copy.deepcopy(model)
    rec = gs.InRun(model, loss=per_example, out=tmp_path / "b.h5")
    with rec.step(range(5), y):
        F.cross_entropy(model(x), y).backward()
    with h5py.File(rec.close()) as f:
        loss, sq = f["inrun/loss"][()], f["inrun/sq_norm"][()]
    want = [float(sum((g ** 2).sum() for g in torch.autograd.grad(per_example(before(x[b:b + 1]), y[b:b + 1]).sum(),
                                                                   list(before.parameters())))) for b in range(5)]
    np.testing.assert_allclose(loss, per_example(before(x), y).detach(), rtol=1e-12)
    np.testing.assert_allclose(sq, want, rtol=1e-9)


def test_examples_the_step_leaves_out_are_named(tmp_path):
    """A loss over part of the batch (a mask, a detached half, weight 0) sends some examples
    no gradient: their share is 0 and sq_norm cannot be read (NaN, left out of grand).
    The file says so; inrun_value counts the step as 0 for them (it moved nothing)."""
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[8:12], y[8:12]))
    keep = torch.arange(8) < 5
    with rec.step(range(8), y[:8], lr=0.1):
        F.cross_entropy(model(x[:8])[keep], y[:8][keep]).backward()
    with pytest.warns(gs.exceptions.GradscoreWarning, match=r"3 of 8 records have share 0 .* first at step 0, id 5"):
        res = rec.close()
    with h5py.File(tmp_path / "r.h5") as f:
        share, sq = f["inrun/share"][()], f["inrun/sq_norm"][()]
    np.testing.assert_allclose(share[:5], 1 / 5, rtol=1e-6)
    assert (share[5:] == 0).all() and np.isnan(sq[5:]).all() and np.isfinite(sq[:5]).all()
    scores = gs.load_scores(tmp_path / "r.h5")
    assert np.isnan(scores["scores"]["grand"][5:]).all() and (scores["scores"]["inrun_value"][5:] == 0).all()
    assert any("share 0" in w for w in scores["warnings"]) and res == tmp_path / "r.h5"


def test_examples_the_loss_no_longer_moves_take_their_class_share(tmp_path):
    """With class weights the shares differ by class, w_y / Σ_b w_(y_b): a fit example takes
    the median share of its batch's readable examples of its class (the true share), and
    of all readable ones where its class has none."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[16.0, 0, 0, 0], [0, 16.0, 0, 0], [0, 0, 16.0, 0]]))
        model.bias.zero_()
    fit = torch.eye(4)[:3]                            # saturated at classes 0, 1, 2
    x = torch.cat([fit, fit[:2], torch.full((6, 4), 0.1)])
    y = torch.tensor([0, 1, 2, 0, 1, 0, 1, 0, 1, 0, 1])   # class 2 has no readable example
    w = torch.tensor([1.0, 3.0, 0.5])
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with rec.step(range(11), y):
        F.cross_entropy(model(x), y, weight=w).backward()
    rec.close()
    with h5py.File(tmp_path / "r.h5") as f:
        ids = f["ids"][()][f["inrun/row"][()]].astype(int)
        share = f["inrun/share"][()][np.argsort(ids)]
    true = (w[y] / w[y].sum()).numpy()
    readable = np.arange(11) >= 5
    np.testing.assert_allclose(share[readable], true[readable], rtol=1e-5)
    np.testing.assert_allclose(share[[0, 1, 3, 4]], true[[0, 1, 3, 4]], rtol=1e-5)   # from their class
    lower_median = np.sort(true[readable])[(readable.sum() - 1) // 2]
    np.testing.assert_allclose(share[2], lower_median, rtol=1e-5)                    # class 2: from all


@pytest.mark.parametrize("B", [1, 7, 300])
@pytest.mark.parametrize("block", [5, 2**22])
def test_the_median_fill_equals_the_per_example_loop(B, block, monkeypatch):
    """The batched fill of the unreadable shares, in blocks of any size, equals the loop over
    examples it replaced: the median over readable examples of the same target, else over
    all readable ones, else NaN."""
    from gradscore.inrun import shares
    monkeypatch.setattr(shares, "_FILL_ELEMENTS", block)
    g = torch.Generator().manual_seed(B)
    s = torch.rand(B, dtype=torch.float64, generator=g)
    readable, y = torch.rand(B, generator=g) > 0.6, torch.randint(0, 4, (B,), generator=g)
    expected = torch.full_like(s, float("nan"))
    for b in range(B):
        same = readable & (y == y[b])
        pool = s[same] if same.any() else s[readable]
        if len(pool):
            expected[b] = pool.median()
    torch.testing.assert_close(shares.median_fill(s, readable, y), expected, equal_nan=True, rtol=0, atol=0)
    no_target = torch.full_like(s, s[readable].median() if readable.any() else float("nan"))
    torch.testing.assert_close(shares.median_fill(s, readable, None), no_target, equal_nan=True, rtol=0, atol=0)


def test_info_and_diagnose_read_only_the_records_they_use(tmp_path, monkeypatch):
    """An in-run file holds a record per (step, example): 10⁸ of them are gigabytes. `info`
    counts steps a block of records at a time; `diagnose` reads the fields of its
    decomposition and the predictions of its flag count, not all fourteen."""
    from gradscore.reports import info
    from gradscore.scores.inrun import DOT_TERM_FIELDS
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    with pytest.warns(gs.exceptions.GradscoreWarning, match="met no step with a target gradient"):
        with gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:8], y[:8]), every=3) as rec:
            _train(model, x, y, steps=12, batch=12, rec=rec)
    with h5py.File(tmp_path / "r.h5") as f:
        step, target = f["inrun/step"][()], np.isfinite(f["inrun/target_norm"][()])
        counted = (len(step), len(np.unique(step)), len(np.unique(step[target])))
        assert counted == (144, 12, 4)
        assert info._steps(f["inrun"], block=5) == info._steps(f["inrun"]) == counted
    read, plain = set(), h5py.Dataset.__getitem__

    def getitem(self, key):   # every read of a dataset's values, whole or in part
        if self.name.startswith("/inrun/"):
            read.add(self.name.split("/")[-1])
        return plain(self, key)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
    gs.diagnose(tmp_path / "r.h5", score="inrun_value", echo=lambda s: None)
    assert read == {*DOT_TERM_FIELDS, "correct"}   # correct: the flag count's fit, at each example's last step


def test_nonfinite_records_are_named_not_dropped_silently(tmp_path, capsys):
    x, y = _data(dtype=torch.float32)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    bad = x[:8].clone()
    bad[2, 0] = float("nan")                      # a corrupt input: that example's loss is NaN
    with rec.step(range(8), y[:8]):
        F.cross_entropy(model(x[:8]), y[:8]).backward()
    from gradscore.exceptions import GradscoreWarning
    with pytest.warns(GradscoreWarning, match="1 of 16 records .* non-finite .* step 1, id 2"):
        with rec.step(range(8), y[:8]):
            F.cross_entropy(model(bad), y[:8], reduction="sum").backward()
        rec.close()
    res = gs.load_scores(tmp_path / "r.h5")
    assert any("non-finite" in w for w in res["warnings"])
    from gradscore.cli import main
    assert main(["info", str(tmp_path / "r.h5")]) == 0
    assert "warning: 1 of 16 records" in capsys.readouterr().out


def _train_recorded(out, recorded, every=2, **kw):
    """6 SGD steps (2 epochs of 3 batches of 8) of a small MLP with a target every ``every``
    steps, recorded into ``out`` at the steps in ``recorded`` only (the others train plain)."""
    torch.manual_seed(0)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1).double()
    x, y = torch.randn(24, 10, dtype=torch.float64), torch.randint(0, 4, (24,))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rec = gs.InRun(model, out=out, **{"targets": (x[:4], y[:4]), "every": every, **kw})
    for t in range(6):
        idx = torch.randperm(24, generator=torch.Generator().manual_seed(t // 3))[t % 3 * 8:t % 3 * 8 + 8]
        with rec.step(idx, y[idx], lr=0.3, step=t) if t in recorded else contextlib.nullcontext():
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    return rec.close()


def _datasets(path):
    """{name: array} of every dataset in the HDF5 file ``path``, and its config and warnings."""
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: found.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        return found, json.loads(f.attrs["config"]), json.loads(f.attrs["warnings"])


def test_aggregate_cuts_an_inrun_recording_to_a_window_of_steps(tmp_path, capsys):
    """`aggregate --steps A:B` on an in-run file was refused ("whose rows are training steps"),
    so early-training in-run scores (Data Diet's) needed another recording. It writes what a
    recording of those steps alone writes: the ids they met, their records, the scores over
    them, to the bit (the training is bit-identical with and without the recorder)."""
    from gradscore.cli import main
    whole = _train_recorded(tmp_path / "whole.h5", range(6))
    late = _train_recorded(tmp_path / "late.h5", range(3, 6))
    assert main(["aggregate", str(whole), "--steps", "3:", "--out", str(tmp_path / "cut.h5")]) == 0
    (got, config, warned), (want, late_config, late_warned) = _datasets(tmp_path / "cut.h5"), _datasets(late)
    assert sorted(got) == sorted(want) and config == {**late_config, "steps": "3:", "out": str(tmp_path / "cut.h5")}
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert warned == late_warned
    assert main(["info", str(tmp_path / "cut.h5")]) == 0
    assert "(steps 3: of the recording)" in capsys.readouterr().out
    # the whole window gives the recording's scores; an early one meets fewer examples
    assert main(["aggregate", str(whole), "--steps", "0:", "--out", str(tmp_path / "all.h5")]) == 0
    everything, _, _ = _datasets(whole)
    for k, v in _datasets(tmp_path / "all.h5")[0].items():
        np.testing.assert_array_equal(v, everything[k], err_msg=k)
    assert main(["aggregate", str(whole), "--steps", ":1", "--scores", "loss,inrun_value", "--out",
                 str(tmp_path / "first.h5")]) == 0
    first = gs.load_scores(tmp_path / "first.h5")
    assert len(first["ids"]) == 8 and sorted(first["scores"]) == ["inrun_value", "loss"]
    assert np.isfinite(first["scores"]["inrun_value"]).all()   # step 0 has a target gradient (every 2)


def test_aggregate_shows_a_progress_bar_unless_quiet(tmp_path, monkeypatch):
    """Cutting 10⁸ records (or rewriting the rows of many checkpoints) takes minutes: a bar
    on the terminal (tqdm's own choice, after 5 s), over every record (every chunk of every
    checkpoint); --quiet turns it off, as on run and export."""
    from gradscore import pipeline
    from gradscore.cli import main
    from gradscore.inrun import store
    from helpers import progress_bars
    whole = _train_recorded(tmp_path / "whole.h5", range(6))
    bars = progress_bars(monkeypatch, store)
    assert main(["aggregate", str(whole), "--steps", "1:", "--out", str(tmp_path / "a.h5")]) == 0
    assert main(["aggregate", str(whole), "--steps", "1:", "--out", str(tmp_path / "b.h5"), "--quiet"]) == 0
    assert [(b.total, b.done, b.disable) for b in bars] == [(40, 40, None), (40, 40, True)]
    ckpts, data = tmp_path / "ckpts", tmp_path / "train.h5"
    torch.manual_seed(0)
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    gs.save_dataset(data, torch.randn(10, 10).numpy(), torch.randint(0, 4, (10,)).numpy())
    with gs.CheckpointWriter(ckpts, model_factory="gradscore.demos.models:mlp",
                             model_kwargs={"d_in": 10, "hidden": 8, "n_classes": 4, "depth": 1}) as writer:
        for t in range(3):
            writer.save(model, step=t, lr=0.1, epoch=t)
    gs.score(ckpts, data, out=tmp_path / "s.h5", scores=("loss",), chunk_size=4, progress=False)
    bars = progress_bars(monkeypatch, pipeline)
    assert main(["aggregate", str(tmp_path / "s.h5"), "--steps", "1:", "--out", str(tmp_path / "c.h5")]) == 0
    assert main(["aggregate", str(tmp_path / "s.h5"), "--steps", "1:", "--out", str(tmp_path / "d.h5"),
                 "--quiet"]) == 0
    assert [(b.total, b.done, b.disable) for b in bars] == [(6, 6, None), (6, 6, True)]   # 2 checkpoints × 3 chunks


@pytest.mark.parametrize("argv, says", [
    (["--epochs-upto", "1"], "whole.h5 is an in-run recording (gs.InRun), whose records are numbered by training "
                             "step, not epoch; give the window as --steps A:B"),
    ([], "invalid value for 'steps': "),
    (["--steps", "7:"], "whole.h5 has no record at steps 7: (it holds steps 0 to 5)"),
    (["--steps", "0:3", "--scores", "loss,pds"], "pds cannot be made from the records of"),
    (["--steps", "1:2", "--out", "{whole}"], "whole.h5: is the scores file, an input of this command"),
])
def test_aggregate_of_an_inrun_recording_refuses_what_it_cannot_cut(tmp_path, capsys, argv, says):
    from gradscore.cli import main
    whole = _train_recorded(tmp_path / "whole.h5", range(6))
    before = whole.read_bytes()
    argv = [a.format(whole=whole) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "cut.h5")]
    assert main(["aggregate", str(whole), *argv, *out]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert not (tmp_path / "cut.h5").exists() and whole.read_bytes() == before


def test_a_window_of_an_inrun_recording_is_cut_no_wider_nor_continued(tmp_path, capsys):
    """A file cut to steps 2:5 holds no record outside them: a wider window of it, and a
    recorder resuming it (it would continue a recording of some steps), are refused."""
    from gradscore.cli import main
    whole = _train_recorded(tmp_path / "whole.h5", range(6))
    assert main(["aggregate", str(whole), "--steps", "2:5", "--out", str(tmp_path / "cut.h5")]) == 0
    for window in ("1:5", "2:", "2:6"):
        assert main(["aggregate", str(tmp_path / "cut.h5"), "--steps", window, "--out", str(tmp_path / "w.h5")]) == 2
        assert "holds the records of steps 2:5 only" in capsys.readouterr().err
    assert main(["aggregate", str(tmp_path / "cut.h5"), "--steps", "3:4", "--out", str(tmp_path / "w.h5")]) == 0
    assert gs.load_scores(tmp_path / "w.h5")["config"]["steps"] == "3:4"
    with pytest.raises(gs.ConfigMismatchError, match="other settings"):
        _train_recorded(tmp_path / "cut.h5", range(5, 6), resume=True)
    untargeted = _train_recorded(tmp_path / "plain.h5", range(6), every=1, targets=None)
    assert main(["aggregate", str(untargeted), "--steps", "1:", "--scores", "loss,inrun_value", "--out",
                 str(tmp_path / "v.h5")]) == 2
    assert "inrun_value cannot be made from the records of" in capsys.readouterr().err


def test_demo_kinds_are_one_at_a_time(capsys):
    from gradscore.cli import main
    with pytest.raises(SystemExit) as e:
        main(["demo", "--pds", "--inrun"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_projections_of_one_input_share_its_gram_in_training(tmp_path):
    """The tiny transformer's q, k and v read one hidden state, whose Gram the rules share;
    every recorded norm and dot equals the loop at θ_t in float64."""
    from gradscore.demos.models import tiny_transformer
    torch.manual_seed(0)
    model = tiny_transformer(vocab=20, d=16, heads=2, layers=1, n_classes=3).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 20, (12, 7), generator=g), torch.randint(0, 3, (12,), generator=g)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:3], y[:3]))
    snaps: list = []
    _train(model, x, y, steps=3, batch=5, rec=rec, snapshots=snaps)
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[:3], y[:3]), dot_rtol=1e-8)


def test_a_second_backward_in_one_step_is_one_clear_error(tmp_path):
    """Two backwards inside one rec.step (retain_graph): one GradscoreError naming the fix,
    not an IndexError from the rules' bookkeeping."""
    model = mlp(d_in=10, hidden=8, n_classes=4, depth=1)
    x, y = _data(dtype=torch.float32)
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    with pytest.raises(gs.EngineError, match="a second backward reached the model inside one rec.step"):
        with rec.step(range(8), y[:8]):
            loss = F.cross_entropy(model(x[:8]), y[:8])
            loss.backward(retain_graph=True)
            loss.backward()


@pytest.mark.parametrize("first_frozen", [False, True])
def test_parameters_frozen_or_unfrozen_during_training(tmp_path, first_frozen):
    """Gradual unfreezing: each step records the gradient over the parameters it trains
    (those that require grad at that step), norms and target dots, against the loop. A
    layer frozen after the recorder was made was counted (its δ still flows to the layers
    before it), and one unfrozen after it was left out."""
    from gradscore.io.store import load_inrun_rows
    torch.manual_seed(0)
    x, y = _data()
    model = mlp(d_in=10, hidden=12, n_classes=4, depth=2).double()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    schedule = [[1], [], [1, 2], [0]] if first_frozen else [[0], [2], [], [1, 2]]   # frozen Linears per step
    linears[0].requires_grad_(not first_frozen)
    targets = (x[:6], y[:6])
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=targets)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    flags = []
    for t, frozen in enumerate(schedule):
        for i, layer in enumerate(linears):
            layer.requires_grad_(i not in frozen)
        idx = torch.arange(8 * t, 8 * t + 8)
        flags.append(([p.requires_grad for p in model.parameters()], copy.deepcopy(model.state_dict()), idx))
        with rec.step(idx, y[idx], lr=0.1, step=t):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    rows = load_inrun_rows(rec.close())
    for t, (trains, snap, idx) in enumerate(flags):
        for p, on in zip(model.parameters(), trains):
            p.requires_grad_(on)
        want = inrun_reference(model, snap, x[idx], y[idx], targets)
        at = rows["step"] == t
        np.testing.assert_allclose(rows["sq_norm"][at], want[:, 1], rtol=1e-9, err_msg=f"step {t}")
        np.testing.assert_allclose(rows["dot"][at], want[:, 2] / len(idx), rtol=1e-9, atol=1e-14, err_msg=f"step {t}")
        np.testing.assert_allclose(rows["target_norm"][at], want[:, 4], rtol=1e-10, err_msg=f"step {t}")


def test_a_layer_or_parameter_replaced_during_training(tmp_path):
    """A loop that puts a new head on the model, or a new Parameter into a layer, between
    steps: each step records the gradient of the model it trains, against the loop. Before,
    the recorder kept its first layers and refused the step with a wrong reason."""
    from gradscore.io.store import load_inrun_rows
    torch.manual_seed(0)
    x, y = _data()
    model = mlp(d_in=10, hidden=12, n_classes=4, depth=2).double()
    targets = (x[:6], y[:6])
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=targets)
    snaps = []
    for t in range(3):
        if t == 1:
            model[-1] = nn.Linear(12, 4).double()                               # a new head
        if t == 2:
            model[1].weight = nn.Parameter(torch.randn_like(model[1].weight))   # a new weight
        idx = torch.arange(8 * t, 8 * t + 8)
        snaps.append((copy.deepcopy(model), idx))
        with rec.step(idx, y[idx], lr=0.1, step=t):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        model.zero_grad()
    rows = load_inrun_rows(rec.close())
    for t, (then, idx) in enumerate(snaps):
        want = inrun_reference(then, then.state_dict(), x[idx], y[idx], targets)
        at = rows["step"] == t
        np.testing.assert_allclose(rows["sq_norm"][at], want[:, 1], rtol=1e-9, err_msg=f"step {t}")
        np.testing.assert_allclose(rows["dot"][at], want[:, 2] / len(idx), rtol=1e-9, atol=1e-14, err_msg=f"step {t}")


def test_a_target_gradient_the_model_cannot_take_in_eval_mode_gets_one_error(tmp_path):
    """The target gradient is taken in eval mode, where Hugging Face's RWKV (its cache on)
    updates its state in place: torch's RuntimeError came out of the recorder raw. One
    EngineError names the cause and the fix; the hooks are gone and the model is left in
    training mode; with the cache off the step records as the loop."""
    torch.manual_seed(0)
    x, y = _data(d=6, c=3)
    model, targets = EvalStateInPlace().double().train(), (x[:6], y[:6])
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=targets)
    with pytest.raises(gs.EngineError, match=r"target gradient.*modified by an inplace.*use_cache = False"):
        with rec.step(range(8), y[:8], lr=0.1):
            F.cross_entropy(model(x[:8]), y[:8]).backward()
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    assert model.training
    model.use_cache = False
    rec = gs.InRun(model, out=tmp_path / "s.h5", targets=targets)
    snaps: list = []
    _train(model, x, y, steps=2, batch=8, rec=rec, snapshots=snaps)
    check_inrun_against_loop(rec.close(), model, snaps, x, y, targets)


class _Checkpointed(nn.Module):
    """An MLP whose second half runs under torch.utils.checkpoint (recomputed in the backward)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.first, self.reentrant = nn.Linear(10, 12), reentrant
        self.rest = mlp(d_in=12, hidden=12, n_classes=4, depth=1)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.rest, torch.tanh(self.first(x)), use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_in_training(tmp_path, reentrant):
    """A checkpointed block (its forward hooks fire again in the recomputation) records what
    the loop gives, reentrant or not. The target gradient needs torch.autograd.grad, which a
    reentrant checkpoint refuses: one clear error naming the fix, not torch's RuntimeError
    from inside the recorder. So does the check of the loss's paths: one warning, naming
    the fix, and the step is recorded."""
    from gradscore.io.store import load_inrun_rows
    torch.manual_seed(0)
    x, y = _data()
    model = _Checkpointed(reentrant).double()
    targets = (x[:6], y[:6])
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=None if reentrant else targets)
    snaps: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, x, y, steps=3, batch=8, rec=rec, snapshots=snaps)
    unchecked = [w for w in caught if "could not check that the step's loss" in str(w.message)]
    assert len(unchecked) == reentrant and (not reentrant or "use_reentrant=False" in str(unchecked[0].message))
    path = rec.close()
    model.reentrant = False   # the same function; the loop's torch.autograd.grad takes only this checkpoint
    if not reentrant:
        check_inrun_against_loop(path, model, snaps, x, y, targets)
    else:
        rows = load_inrun_rows(path)
        for t, (snap, idx) in enumerate(snaps):
            want = inrun_reference(model, snap, x[idx], y[idx], targets)
            np.testing.assert_allclose(rows["loss"][rows["step"] == t], want[:, 0], rtol=1e-10)
            np.testing.assert_allclose(rows["sq_norm"][rows["step"] == t], want[:, 1], rtol=1e-9)
        model.reentrant = True
        rec = gs.InRun(model, out=tmp_path / "t.h5", targets=(x[:6], y[:6]))
        with pytest.raises(gs.EngineError, match="use_reentrant=True.*pass use_reentrant=False"):
            with rec.step(range(8), y[:8], lr=0.1):
                F.cross_entropy(model(x[:8]), y[:8]).backward()
        assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
        assert model.training


def _train_scaled(model, x, y, scaler, rec, *, steps, batch=8, snapshots=None, poisoned_step=None):
    """The loop of ``torch.amp`` fp16 training: the loss scaled by ``scaler`` before the
    backward, the step through it. At ``poisoned_step`` the first weight's gradient is made
    infinite (after the layers' output gradients, which the recorder reads), so the scaler
    skips that step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    for t in range(steps):
        idx = torch.randperm(len(y), generator=g)[:batch]
        if snapshots is not None:
            snapshots.append(({n: p.detach().clone() for n, p in model.named_parameters()}, idx))
        with rec.step(idx, y[idx], lr=0.1):
            loss = F.cross_entropy(model(x[idx]), y[idx])   # the target gradient came before: unpoisoned
            hook = first.register_hook(lambda grad: grad * float("inf")) if t == poisoned_step else None
            scaler.scale(loss).backward()
        if hook is not None:
            hook.remove()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()


def test_a_scaled_loss_is_recorded_unscaled_and_a_skipped_step_moves_nothing(tmp_path):
    """fp16 training's GradScaler multiplies the loss by a scale that changes from step to
    step: with ``scaler=`` every record is of the loss the update uses (the loop's), and the
    step the scaler skips (an infinite gradient) records lr 0, so inrun_value leaves it out."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=12, n_classes=4, depth=2).double(), _data()
    targets = (x[:6], y[:6])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)   # doubles each good step
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=targets, scaler=scaler)
    snaps: list = []
    _train_scaled(model, x, y, scaler, rec, steps=5, snapshots=snaps, poisoned_step=2)
    path = rec.close()
    assert all(torch.equal(snaps[2][0][n], snaps[3][0][n]) for n in snaps[2][0])   # step 2 was skipped
    check_inrun_against_loop(path, model, snaps, x, y, targets)
    from gradscore.io.store import load_inrun_rows
    rows = load_inrun_rows(path)
    np.testing.assert_array_equal(rows["lr"], np.where(rows["step"] == 2, 0.0, 0.1))
    want = np.bincount(rows["row"], np.where(rows["step"] == 2, 0.0, 0.1 * rows["dot"]))
    np.testing.assert_allclose(gs.load_scores(path)["scores"]["inrun_value"], want, rtol=1e-12, atol=1e-15)


def test_a_scaled_loss_without_its_scaler_is_named(tmp_path):
    """Without ``scaler=`` the shares read from a scaled loss are the scale times too large:
    the file's warning says so and names the fix."""
    torch.manual_seed(0)
    model, (x, y) = mlp(d_in=10, hidden=12, n_classes=4, depth=1).double(), _data()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    rec = gs.InRun(model, out=tmp_path / "r.h5")
    _train_scaled(model, x, y, scaler, rec, steps=2)
    from gradscore.exceptions import GradscoreWarning
    with pytest.warns(GradscoreWarning, match=r"16 of 16 records have a share above 1 .* scaler="):
        rec.close()


def test_the_file_warnings_count_one_record_in_the_singular():
    from gradscore.inrun.store import warnings_of
    rows = {"loss": np.array([1.0, np.nan, 2.0, 1.0]), "share_sq_norm": np.ones(4),
            "share": np.array([0.5, 0.5, 2.0, np.nan]), "ids": np.arange(4), "step": np.zeros(4, dtype=int)}
    found = warnings_of(rows)
    assert found[0].startswith("1 of 4 records has a non-finite loss")
    assert found[1].startswith("1 of 4 records has a share")
    assert found[2].startswith("1 record is of examples the loss no longer moves")


def test_a_target_of_one_example_in_a_channels_last_model(tmp_path):
    """The target pass is the recorder's own backward: with one target example it routes
    around torch's InstanceNorm backward for one example with a channels_last gradient
    (engines.workarounds), so ‖∇J‖ and the dots are the contiguous model's."""
    torch.manual_seed(0)
    plain = ChannelsLastNorm(affine=True).double()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    got = {}
    for name, model in (("channels_last", copy.deepcopy(plain).to(memory_format=torch.channels_last)),
                        ("plain", plain)):
        rec = gs.InRun(model, out=tmp_path / f"{name}.h5", targets=(x[4:], y[4:]))
        with rec.step(range(4), y[:4], lr=0.1):
            F.cross_entropy(model(x[:4]), y[:4]).backward()
        with h5py.File(rec.close()) as f:
            got[name] = f["inrun/target_norm"][()], f["inrun/dot"][()]
    for a, b in zip(got["channels_last"], got["plain"]):
        np.testing.assert_allclose(a, b, rtol=1e-10)


@pytest.mark.parametrize("functional, named", [(False, r"layer 'norm' \(BatchNorm2d\).*BatchNorm backward"),
                                               (True, r"F.batch_norm in the forward of the model \(PatchTokens\)")])
def test_a_training_batch_of_one_before_tokens_is_refused(tmp_path, functional, named):
    """torch's CPU BatchNorm backward is wrong for a batch of one example whose output
    gradient comes channels_last with another batch stride (a patch embedding's tokens):
    with frozen statistics (train mode is refused anyway) such a step is refused, naming
    the norm; batches of two are recorded and equal the loop."""
    torch.manual_seed(0)
    model = PatchTokens(functional).double().train()
    model.norm.eval()   # frozen statistics: no coupling of a batch's examples
    model.pos.requires_grad_(False)   # a bare parameter of the model: no ghost rule
    if functional:                    # nor has the norm's, read by the model's own forward
        model.norm.requires_grad_(False)
    _two_then_one_refused(tmp_path, model, torch.randn(5, 2, 6, 6, dtype=torch.float64), named,
                          compare=functional)   # the loop's reference trains the model as a whole


def _two_then_one_refused(tmp_path, model, x, named, compare=True):
    """A step of two examples recorded, then a step of one refused with an error matching
    ``named``; the refused step leaves no record; with ``compare``, the records equal the
    loop's."""
    y = torch.tensor([0, 2, 1, 1, 0])
    rec = gs.InRun(model, out=tmp_path / "a.h5", targets=(x[3:], y[3:]))
    snaps = [({k: v.detach().clone() for k, v in model.state_dict().items()}, torch.arange(2))]
    with rec.step(range(2), y[:2], lr=0.1, step=0):
        F.cross_entropy(model(x[:2]), y[:2]).backward()
    model.zero_grad()
    with pytest.raises(gs.GradscoreError, match=named + ".*batch of one"):
        with rec.step([2], y[2:3], lr=0.1, step=1):
            F.cross_entropy(model(x[2:3]), y[2:3]).backward()
    path = rec.close()
    with h5py.File(path) as f:
        assert sorted(f["inrun/step"][()]) == [0, 0]   # the refused step left no record
    if compare:
        check_inrun_against_loop(path, model, snaps, x, y, (x[3:], y[3:]))


@pytest.mark.parametrize("functional, named", [(False, r"layer 'norm' \(InstanceNorm2d\)"),
                                               (True, r"F.instance_norm in the forward of the model \(ChannelsLastNorm\)")])
def test_a_training_batch_of_one_that_torch_differentiates_wrongly_is_refused(tmp_path, functional, named):
    """torch's CPU InstanceNorm backward is wrong for a batch of one example whose output
    gradient comes channels_last; the training step is the user's, so its δ's, and every
    record of the layers before the norm, would be wrong. The step is refused with one
    error naming the norm (a layer, or F.instance_norm in a forward); batches of two in
    the same model are recorded and equal the loop."""
    torch.manual_seed(0)
    # F.instance_norm without affine (AdaIN's): with the norm's parameters the recorder would refuse the model
    model = ChannelsLastNorm(affine=not functional, functional=functional).double().to(memory_format=torch.channels_last)
    _two_then_one_refused(tmp_path, model, torch.randn(5, 2, 4, 4, dtype=torch.float64), named)


class _CachedBias(nn.Module):
    """timm's LeViT and EfficientFormer attention biases: in eval mode a table's rows are
    picked once and kept, until ``train(True)`` drops them."""

    def __init__(self):
        super().__init__()
        self.pre, self.head = nn.Linear(5, 5), nn.Linear(5, 3)
        self.table = nn.Parameter(torch.randn(3, 5))
        self.register_buffer("ids", torch.tensor([2, 0, 1, 2]), persistent=False)
        self.cache: dict = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.cache = {}
        return self

    def forward(self, x):
        if self.training:
            bias = self.table[self.ids]
        else:
            if "bias" not in self.cache:
                self.cache["bias"] = self.table[self.ids]
            bias = self.cache["bias"]
        return self.head(torch.tanh(self.pre(x.reshape(len(x), 4, 5)) + bias).mean(1))


def test_the_recorders_eval_forwards_leave_no_cache_in_the_model(tmp_path):
    """The recorder's own forwards (the layout, the target's) run in eval mode; what a
    model keeps from an eval forward (timm's cached attention biases) would be read by
    the user's own evaluation later, stale. Nothing is left: the training's model, evaluated
    after the step, equals the same model never recorded."""
    x, y = _data(d=20, c=3)
    torch.manual_seed(0)
    model = _CachedBias().double()
    plain = copy.deepcopy(model)
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[:4], y[:4]))
    with pytest.raises(gs.GradscoreError, match="is made into other tensors for one example than for two"):
        _train(model, x, y, steps=1, batch=6, rec=rec)
    assert model.cache == {}
    with torch.no_grad():
        model.table.add_(1.0)
        plain.table.add_(1.0)
    torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=0, atol=0)


class _TwoCalls(nn.Module):
    """A Linear called twice on the batch: once for the output, once for a tensor the
    model's output does not use (a statistic a user's forward hook may read)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(20, 8), nn.Linear(8, 3)

    def forward(self, x):
        self.a(2 * x)
        return self.head(torch.tanh(self.a(x)))


@pytest.mark.parametrize("penalty", [False, True])
def test_a_layer_call_the_output_does_not_reach_is_left_out_unless_the_loss_reaches_it(tmp_path, penalty):
    """The call whose output the model's output does not reach gets no gradient and is left
    out; a loss that reaches it after all (a penalty on it, read by the user's hook) is
    refused, not recorded without its term."""
    x, y = _data(d=20, c=3)
    torch.manual_seed(0)
    model = _TwoCalls().double()
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=(x[40:], y[40:]))
    if penalty:
        seen: list = []
        model.a.register_forward_hook(lambda module, args, out: seen.append(out))
        with pytest.raises(gs.GradscoreError, match="got a gradient in a call that none reached on the first batch"):
            _train(model, x, y, steps=2, batch=6, rec=rec,
                   loss_fn=lambda z, t: F.cross_entropy(z, t) + (seen[-2] ** 2).mean())
        return
    snaps: list = []
    _train(model, x, y, steps=2, batch=6, rec=rec, snapshots=snaps)
    assert not rec.engine.fallback and rec.engine.layers[0].layout.dead == (0,)
    check_inrun_against_loop(rec.close(), model, snaps, x, y, (x[40:], y[40:]))
