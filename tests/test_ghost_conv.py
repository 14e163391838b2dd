"""The ghost conv rule: every form (outer, gram, grouped, pixel, sparse) against the loop,
its memory bounds, and the plan that picks a form per layer."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from gradscore.demos.models import digits_cnn
from helpers import cancelling, compare_with_loop, ghost_case


def test_conv_in_slices_equals_one_piece(monkeypatch):
    from gradscore.engines.rules import conv
    model, x = ghost_case("cnn")
    whole = compare_with_loop(model, x, 2).score_batch(x.double(), torch.zeros(7, dtype=torch.long))
    monkeypatch.setattr(conv, "workspace_bytes", lambda *captured: 1)   # one example per slice
    sliced = compare_with_loop(model, x, 2).score_batch(x.double(), torch.zeros(7, dtype=torch.long))
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
    compare_with_loop(model, x, K)
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
@pytest.mark.slow   # spawns an interpreter to measure the resident-set peak
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
    model, x = (ConvTwice(), torch.randn(5, 3, 9, 10)) if name == "conv_twice" else ghost_case(name)
    compare_with_loop(model, x, K)


@pytest.mark.parametrize("dtype, least", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
@pytest.mark.parametrize("form", ["outer", "gram", "pixel", "grouped", "sparse"])
def test_every_conv_form_keeps_rows_whose_terms_cancel_exact(monkeypatch, form, dtype, least):
    """A 2x2 conv of stride 2 whose patches come in pairs (p, δ), (p + ε n, −δ): ‖g_b‖² within
    10⁻⁵ of the float64 per-example gradient of those very inputs for the Gram forms (their
    rows were noise there, some below 0); the forms that form g_b, within what they keep."""
    from gradscore.engines.rules import conv
    monkeypatch.setattr(conv, "plan", lambda *args, **kwargs: form)
    C, k, P = 3, 2, 3
    a, d = cancelling(6, P, C * k * k, seed=5, dtype=dtype, least=least)          # (6, 2P, 12), (6, 2P, 24)
    x = a.reshape(6, 2 * P, C, k, k).permute(0, 2, 3, 1, 4).reshape(6, C, k, 2 * P * k)   # patch t: columns tk..
    delta = d.transpose(1, 2).reshape(6, 2 * C * k * k, 1, 2 * P)
    layer = nn.Conv2d(C, 2 * C * k * k, k, stride=k, bias=False).to(dtype)
    sq = conv.conv(layer, [x], [delta], {"weight": None}, 0)[0]
    want = torch.stack([torch.nn.grad.conv2d_weight(x[b:b + 1].double(), layer.weight.shape, delta[b:b + 1].double(),
                                                    stride=k).pow(2).sum() for b in range(6)])
    assert sq.dtype == dtype
    torch.testing.assert_close(sq.double(), want, rtol=1e-5 if form in ("gram", "pixel") else 1e-2, atol=0)


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("form", ["outer", "gram"])
def test_grouped_conv_forms_take_the_groups_at_once(monkeypatch, form, K):
    """The outer and Gram forms of a grouped conv make no more calls for 16 groups than for 2
    (no loop over groups: on the H200 a depthwise CNN's ghost step took 14-26x its training
    step, where CUDA has no grouped form), and equal the per-group sums."""
    from torch.profiler import profile
    from gradscore.engines.rules import conv
    from gradscore.kernels.ghost_linear import ghost_linear_reference
    monkeypatch.setattr(conv, "plan", lambda *args, **kwargs: form)
    torch.manual_seed(0)
    ops = {}
    for G in (2, 16):
        layer = nn.Conv2d(16, 32, 3, padding=1, groups=G).double()
        x, d = torch.randn(5, 16, 6, 6, dtype=torch.float64), torch.randn(5, 32, 6, 6, dtype=torch.float64)
        refs = {"weight": torch.randn(K, *layer.weight.shape, dtype=torch.float64) if K else None}
        conv.conv(layer, [x], [d], refs, K)   # a kernel's first call checks it once
        with profile() as p:
            sq, dots = conv.conv(layer, [x], [d], refs, K)
        ops[G] = [e.name for e in p.events() if e.cpu_parent is None]   # the calls the rule makes
        a = conv._patches(layer, x)                                   # (B, L, C_in/G·9), group-major
        want_sq, want_dots = 0, 0
        for g, (ag, dg) in enumerate(zip(a.chunk(G, 2), d.flatten(2).chunk(G, 1))):
            V = refs["weight"][:, dg.shape[1] * g:dg.shape[1] * (g + 1)].reshape(K, dg.shape[1], -1) if K else None
            s, t = ghost_linear_reference(ag, dg.transpose(1, 2), V)
            want_sq, want_dots = want_sq + s, want_dots + t
        torch.testing.assert_close(sq, want_sq, rtol=1e-12, atol=0)
        if K:
            torch.testing.assert_close(dots, want_dots, rtol=1e-10, atol=1e-12)
    assert len(ops[16]) <= len(ops[2]), (len(ops[16]), len(ops[2]))   # (norm_dot's path follows the size)


@pytest.mark.parametrize("kernels,expected", [(None, "sparse"), ("torch", "grouped")])
def test_sparse_conv_form_follows_the_density_of_delta(monkeypatch, kernels, expected):
    """The demo CNN's second conv sits behind ReLU + max-pool: about 1 in 6 of its δ is
    non-zero, and the plan takes the sparse kernel, unless the torch kernels are forced;
    the numbers equal the loop's either way."""
    from gradscore.engines.rules import conv
    if kernels:
        monkeypatch.setenv("GRADSCORE_KERNELS", kernels)
    else:
        monkeypatch.delenv("GRADSCORE_KERNELS", raising=False)
    chosen = []

    def plan(layer, *args, **kwargs):
        form = original(layer, *args, **kwargs)
        chosen.append((layer.in_channels, kwargs.get("density", args[4] if len(args) > 4 else None), form))
        return form
    original = conv.plan
    monkeypatch.setattr(conv, "plan", plan)
    torch.manual_seed(0)
    compare_with_loop(digits_cnn(channels=16), torch.rand(24, 1, 8, 8), 2)
    # the batch's own plan (the first-batch check's pass over 8 examples plans again after it)
    density, form = next((dens, form) for c_in, dens, form in chosen if c_in == 16)
    assert form == expected
    assert (density is None) == (kernels == "torch")
    if density is not None:
        assert 0.05 < density < 0.3


@pytest.mark.parametrize("calls, cuda, density", [(1, False, None), (2, False, 0.2), (1, True, 0.2), (3, True, None)])
def test_conv_plan_never_picks_a_form_the_call_cannot_take(calls, cuda, density):
    """Whatever the costs: no grouped or sparse form on CUDA, no pixel or sparse form for a
    layer called several times, no sparse form where δ's density was not measured."""
    from gradscore.engines.rules.conv import _geometry, plan
    layers = [nn.Conv2d(1, 8, 3), nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1, groups=64),
              nn.Conv2d(128, 128, 3, padding=1), nn.Conv2d(32, 64, 1)]
    for layer in layers:
        for side in (8, 32):
            for K in (0, 2):
                form = plan(layer, _geometry(layer, (1, layer.in_channels, side, side)), calls, K, cuda, density)
                assert not (cuda and form in ("grouped", "sparse")), (layer, form)
                assert not (calls > 1 and form in ("pixel", "sparse")), (layer, form)
                assert not (density is None and form == "sparse"), (layer, form)


def test_conv_plan_picks_are_pinned_as_a_performance_regression_check():
    """A performance-regression check, not a correctness one (every form is exact, see
    above): the plan's picks under the constants of conv_costs.py, pinned so that a change
    of the cost model is deliberate. A refit that moves them updates this test with the
    conv-plan table of bench/README.md (``python -m bench.conv_plan``).

    Wide channels on a small image: the pixel Gram for norms, the outer form once the
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


class StridedPixel(nn.Module):
    """A conv reading one pixel per channel whose strides are not row-major (an adaptive pool
    of a channels-last input): torch takes such an input for channels_last and its weight
    gradient kernel then refuses it ("grad_weight must be contiguous")."""

    def __init__(self, dims: int):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
        self.pool, self.conv, self.head = pool(1), conv(2, 3, 3, padding=2, groups=1), nn.Linear(3 * 3 ** dims, 3)

    def forward(self, x):
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)   # channels-last strides, in any dimension
        return self.head(torch.tanh(self.conv(self.pool(x))).flatten(1))


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("form", ["outer", "gram", "pixel", "grouped", "sparse"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_every_conv_form_takes_a_pixel_with_any_strides(monkeypatch, dims, form, K):
    from gradscore.engines.rules import conv
    monkeypatch.setattr(conv, "plan", lambda *args, **kwargs: form)
    compare_with_loop(StridedPixel(dims), torch.randn(3, 2, *[4] * dims), K)
