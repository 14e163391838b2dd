"""Every norm_dot backend and ghost reduction against the torch reference.

Triton runs on CUDA when present, else in its interpreter on CPU (see conftest.py).
"""
from __future__ import annotations

import math

import pytest
import torch

from gradscore.kernels import (NormDotBackend, available_backends, describe, get_backend,
                               norm_dot, norm_dot_reference)
from gradscore.kernels.ghost_linear import ghost_linear, ghost_linear_reference, gram_blocks, plan
from helpers import cancelling

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [("torch", "cpu"), ("numba", "cpu"), ("triton", TRITON_DEVICE)]


def _rand(*shape, seed, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("B,P,K", [(1, 1, 0), (1, 5000, 1), (7, 4099, 16), (33, 300, 2), (5, 1000, 17)])
def test_backend_matches_reference_fp32(backend, device, B, P, K):
    G = _rand(B, P, seed=B * P + K, device=device)
    V = _rand(K, P, seed=K, device=device) if K else None
    sq, dots = norm_dot(G, V, backend=backend)
    sq_ref, dots_ref = norm_dot_reference(G.double(), None if V is None else V.double())
    assert sq.dtype == torch.float32 and sq.shape == (B,) and dots.shape == (B, K)
    torch.testing.assert_close(sq.double().cpu(), sq_ref.cpu(), rtol=2e-6, atol=0)
    scale = (G.double().norm(dim=1, keepdim=True) * (V.double().norm(dim=1)[None] if K else 1)).cpu()
    assert ((dots.double().cpu() - dots_ref.cpu()).abs() <= 2e-6 * scale + 1e-30).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("K", [0, 2])
def test_an_empty_batch_gives_empty_results(backend, device, K):
    """B = 0, as a last chunk of nothing or an empty data subset: (0,) and (0, K), no error."""
    V = _rand(K, 12, seed=K, device=device) if K else None
    for G in (torch.zeros(0, 12, device=device), [torch.zeros(0, 3, 4, device=device)]):
        sq, dots = norm_dot(G, V, backend=backend)
        assert sq.shape == (0,) and dots.shape == (0, K)
    for T in (1, 3):
        sq, dots = ghost_linear(torch.zeros(0, T, 4), torch.zeros(0, T, 3), _rand(K, 3, 4, seed=1) if K else None)
        assert sq.shape == (0,) and dots.shape == (0, K)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_blocks_and_lists(backend, device):
    G = _rand(300, 6, seed=1, device=device).T  # (6, 300) with stride (1, 6)
    V = _rand(3, 300, seed=2, device=device)
    sq, dots = norm_dot(G, V, backend=backend)
    sq_ref, dots_ref = norm_dot_reference(G.contiguous(), V)
    torch.testing.assert_close(sq, sq_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dots, dots_ref, rtol=1e-4, atol=1e-4)
    blocks = [G[:, :100].reshape(6, 10, 10), G[:, 100:]]
    vblocks = [V[:, :100].reshape(3, 10, 10), V[:, 100:]]
    sq2, dots2 = norm_dot(blocks, vblocks, backend=backend)
    torch.testing.assert_close(sq2, sq_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dots2, dots_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(backend, device, dtype):
    # 4096 squares of 100 sum to 4.1e7, far beyond fp16's 65504
    G = torch.full((3, 4096), 100.0, dtype=dtype, device=device)
    G[1] = -100.0
    V = torch.ones(2, 4096, dtype=dtype, device=device)
    sq, dots = norm_dot(G, V, backend=backend)
    assert sq.dtype == torch.float32 and torch.isfinite(sq).all()
    torch.testing.assert_close(sq.cpu(), torch.full((3,), 4096 * 1e4), rtol=1e-6, atol=0)
    torch.testing.assert_close(dots[:, 0].cpu(), torch.tensor([409600.0, -409600.0, 409600.0]),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    G, V = _rand(40, 9000, seed=3, device=device), _rand(4, 9000, seed=4, device=device)
    a, b = norm_dot(G, V, backend=backend), norm_dot(G, V, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_numba_result_does_not_depend_on_thread_count():
    import numba
    G, V = _rand(37, 20000, seed=5), _rand(3, 20000, seed=6)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = norm_dot(G, V, backend="numba")
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = norm_dot(G, V, backend="numba")
    finally:
        numba.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("K", [0, 1, 16])
def test_float64_blocks_equal_flat_loop(B, K):
    shapes = [(3, 5), (5,), (2, 2, 3)]
    G = [_rand(B, *s, seed=i, dtype=torch.float64) for i, s in enumerate(shapes)]
    V = [_rand(K, *s, seed=10 + i, dtype=torch.float64) for i, s in enumerate(shapes)]
    flatG = torch.cat([x.reshape(B, -1) for x in G], 1)
    flatV = torch.cat([v.reshape(K, math.prod(s)) for v, s in zip(V, shapes)], 1)
    sq, dots = norm_dot(G, V)  # default backend: float64 stays in float64
    assert sq.dtype == torch.float64
    torch.testing.assert_close(sq, torch.stack([row @ row for row in flatG]), rtol=1e-12, atol=0)
    torch.testing.assert_close(dots, torch.stack([flatV @ row for row in flatG]).reshape(B, K),
                               rtol=1e-12, atol=1e-12)


def test_errors():
    G = _rand(6, 8, seed=0)
    with pytest.raises(ValueError, match="blocks"):
        norm_dot([G], [torch.randn(1, 8), torch.randn(1, 8)])
    with pytest.raises(ValueError, match="columns"):
        norm_dot(G, torch.randn(1, 9))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        norm_dot(G, backend="nope")


def test_dispatch_defaults_and_env(monkeypatch, default_kernels):
    assert get_backend("cpu").name == "numba"
    assert describe()["cpu"] == "numba"
    monkeypatch.setenv("GRADSCORE_KERNELS", "torch")
    assert get_backend("cpu").name == "torch"
    for name in available_backends():
        b = get_backend("cpu", name)
        assert isinstance(b, NormDotBackend) and b.name == name and not type(b).__abstractmethods__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_blocks_take_torch_ops_only_under_the_default_backend(monkeypatch, dtype):
    """Under the default CPU backend a block of at most SMALL_BLOCK elements skips the
    numba kernel (and gives the reference's numbers); a larger block, or any block when
    a backend is asked for by name or by $GRADSCORE_KERNELS, goes to the kernel."""
    from gradscore.kernels.norm_dot import SMALL_BLOCK
    monkeypatch.delenv("GRADSCORE_KERNELS", raising=False)
    numba_backend = get_backend("cpu")        # chosen (and probed) before the count starts
    assert numba_backend is get_backend("cpu", "numba")
    seen = []
    kernel = numba_backend._kernel
    monkeypatch.setattr(numba_backend, "_kernel", lambda G, V: (seen.append(G.numel()), kernel(G, V))[1])
    small, large = _rand(4, SMALL_BLOCK // 4, seed=1, dtype=dtype), _rand(4, SMALL_BLOCK // 4 + 1, seed=2, dtype=dtype)
    for G in (small, large):
        V = _rand(3, G.shape[1], seed=3, dtype=dtype)
        sq, dots = norm_dot([G, G[:, :5]], [V, V[:, :5]])     # G's block, then a small one
        ref_sq, ref_dots = norm_dot_reference(torch.cat([G, G[:, :5]], 1), torch.cat([V, V[:, :5]], 1))
        torch.testing.assert_close(sq, ref_sq, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dots, ref_dots, rtol=1e-5, atol=1e-5)
    assert seen == [large.numel()]
    norm_dot(small, backend="numba")
    monkeypatch.setenv("GRADSCORE_KERNELS", "numba")
    norm_dot(small)
    assert seen == [large.numel()] + 2 * [small.numel()]


#: (B, T, d_in, d_out, K); T ≥ 48 forms the Grams in 2 (48, 97) and 4 (520) uneven blocks
GHOST_SHAPES = [(3, 5, 7, 6, 2), (2, 1, 40, 33, 0), (2, 20, 17, 9, 3), (1, 3, 5, 4, 16), (4, 17, 33, 18, 1),
                (2, 48, 5, 4, 1), (3, 97, 6, 5, 2), (1, 520, 3, 2, 0)]


@pytest.mark.parametrize("B,T,di,do,K", GHOST_SHAPES)
@pytest.mark.parametrize("form", ["gram", "outer"])
def test_ghost_linear_torch_float64_equals_per_example_loop(B, T, di, do, K, form):
    a, d = _rand(B, T, di, seed=1, dtype=torch.float64), _rand(B, T, do, seed=2, dtype=torch.float64)
    V = _rand(K, do, di, seed=3, dtype=torch.float64) if K else None
    sq, dots = ghost_linear(a, d, V, form=form)
    for b in range(B):  # the per-example gradient written out term by term
        g = sum(torch.outer(d[b, t], a[b, t]) for t in range(T))
        assert sq[b].item() == pytest.approx(float((g * g).sum()), rel=1e-10)
        for k in range(K):
            assert dots[b, k].item() == pytest.approx(float((g * V[k]).sum()), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("P, width", [(1, 64), (2, 300), (32, 16)])   # T = 64: the blocked Grams
@pytest.mark.parametrize("form", ["gram", "outer"])
@pytest.mark.parametrize("dtype, least", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_ghost_linear_rows_whose_terms_cancel_are_exact(P, width, form, dtype, least):
    """Inputs whose per-position terms cancel: ‖g_b‖² within 10⁻⁵ of the float64 sum of those
    very inputs (the Gram form's rows were noise there, some below 0), in float32 as in
    float64; the outer form, which rounds to u / √share, within what it keeps."""
    a, d = cancelling(6, P, width, seed=P, dtype=dtype, least=least)
    sq, _ = ghost_linear(a, d, None, form=form)
    want, _ = ghost_linear_reference(a.double(), d.double())
    assert sq.dtype == dtype
    torch.testing.assert_close(sq.double(), want, rtol=1e-5 if form == "gram" else 1e-2, atol=0)


@pytest.mark.parametrize("dtype, least", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_a_factored_target_gradients_norm_whose_rows_cancel_is_exact(dtype, least):
    """‖V‖² of a gradient held as its rows' factors (the in-run recorder's target gradient of a
    wide Linear, whose norm divides every cosine), its rows in pairs that cancel: within
    10⁻⁵ of the float64 norm of V formed from those very factors (the float32 Gram was noise)."""
    from gradscore.engines.rules.registry import FactoredRef
    a, d = cancelling(6, 4, 16, seed=7, dtype=dtype, least=least)      # 6 gradients of 8 rows each
    for b in range(6):
        want = float((d[b].double().T @ a[b].double()).pow(2).sum())
        assert FactoredRef(d[b], a[b]).sq_norm() == pytest.approx(want, rel=1e-5, abs=0), b


@pytest.mark.parametrize("dtype, least", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_a_tied_weights_uses_whose_terms_cancel_are_exact(dtype, least):
    """A vocabulary used by an embedding (ids, δ) and by a layer whose lefts are those ids'
    one-hot rows, with −δ + ε n: ‖g_b‖² of the sum within 10⁻⁵ of the float64 sum of those
    very factors (the uses' cross term rounded to 39× off in float32, 2.7× in float64)."""
    from gradscore.engines.rules import tied_sq
    from gradscore.engines.rules.registry import Factor
    _, d = cancelling(6, 4, 8, seed=5, dtype=torch.float64, least=least)      # (6, 8, 16): pairs (δ, −δ)
    eps = torch.logspace(-1, math.log10(least), 6, dtype=torch.float64)[:, None, None]
    ids = torch.randint(0, 7, (6, 4), generator=torch.Generator().manual_seed(5))
    hot = torch.nn.functional.one_hot(ids, 9).to(dtype)
    first, second = d[:, :4].to(dtype), (d[:, 4:] + eps * _rand(6, 4, 16, seed=6, dtype=torch.float64)).to(dtype)
    g = [hot.double().transpose(1, 2) @ r.double() for r in (first, second)]   # (6, 9, 16), exact in float64
    own = [x.pow(2).sum((1, 2)).to(dtype) for x in g]
    sq = tied_sq([Factor(ids, first, left_ids=True), Factor(hot, second)], own)
    assert sq.dtype == dtype
    torch.testing.assert_close(sq.double(), (g[0] + g[1]).pow(2).sum((1, 2)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("form", ["pairs", "rows"])
@pytest.mark.parametrize("dtype, least", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_embedding_rows_whose_terms_cancel_are_exact(form, dtype, least):
    """Token ids in pairs (id, δ), (id, −δ + ε n): an embedding's ‖g_b‖² within 10⁻⁵ of the
    float64 sums of those very δ by the pair form (CUDA's, whose rows were noise there); the
    row form, which sums the δ of each id first, within what it keeps."""
    from gradscore.engines.rules.embedding import sq_norms_by_pairs, sq_norms_by_rows
    _, d = cancelling(6, 4, 8, seed=3, dtype=torch.float64, least=least)      # (6, 8, 16): pairs (δ, −δ)
    eps = torch.logspace(-1, math.log10(least), 6, dtype=torch.float64)[:, None, None]
    d[:, 4:] += eps * _rand(6, 4, 16, seed=4, dtype=torch.float64)
    ids = torch.arange(4).repeat(6, 2)                                        # position t and t + 4: one id
    sq = (sq_norms_by_pairs if form == "pairs" else sq_norms_by_rows)(ids, d.to(dtype))
    want = sq_norms_by_rows(ids, d.to(dtype).double())
    assert sq.dtype == dtype
    torch.testing.assert_close(sq.double(), want, rtol=1e-5 if form == "pairs" else 1e-2, atol=0)


@pytest.mark.parametrize("B,T,di,do,K", GHOST_SHAPES)
@pytest.mark.parametrize("form", ["gram", "outer"])
def test_ghost_linear_triton(B, T, di, do, K, form):
    dev = TRITON_DEVICE
    a, d = _rand(B, T, di, seed=1, device=dev), _rand(B, T, do, seed=2, device=dev)
    V = _rand(K, do, di, seed=3, device=dev) if K else None
    sq, dots = ghost_linear(a, d, V, form=form, backend="triton")
    sq_ref, dots_ref = ghost_linear_reference(a.double(), d.double(), None if V is None else V.double())
    torch.testing.assert_close(sq.double().cpu(), sq_ref.cpu(), rtol=1e-5, atol=0)
    torch.testing.assert_close(dots.double().cpu(), dots_ref.cpu(), rtol=1e-4, atol=1e-4)
    again = ghost_linear(a, d, V, form=form, backend="triton")
    assert torch.equal(sq, again[0]) and torch.equal(dots, again[1])


@pytest.mark.parametrize("T,k", [(1, 1), (47, 1), (48, 2), (97, 2), (511, 2), (512, 4), (1023, 4), (1024, 8), (5000, 32)])
def test_gram_blocks_tile_the_sequence(T, k):
    """The row blocks of a blocked Gram: k of them, in order, every position once, sizes within one."""
    blocks = gram_blocks(T)
    assert len(blocks) == k
    assert [t for b in blocks for t in range(T)[b]] == list(range(T))
    assert max(b.stop - b.start for b in blocks) - min(b.stop - b.start for b in blocks) <= 1
    assert gram_blocks(T, cuda=True) == [slice(0, T)]   # whole on CUDA until the GPU kit measures blocks there


def test_ghost_plan_picks_the_cheaper_form():
    assert plan(T=1, d_in=512, d_out=512, K=0) == "gram"      # no sequence: ‖δ‖²‖a‖²
    assert plan(T=4096, d_in=64, d_out=64, K=0) == "outer"     # long sequence, small layer
    assert plan(T=64, d_in=64, d_out=64, K=8) == "outer"       # many refs: materialize once
    with pytest.raises(ValueError, match="must be"):
        ghost_linear(torch.zeros(2, 3), torch.zeros(2, 3))


@pytest.mark.cuda
def test_cuda_default_backend_is_triton():
    assert get_backend("cuda").name == "triton"
    G, V = _rand(64, 100_000, seed=7, device="cuda"), _rand(2, 100_000, seed=8, device="cuda")
    sq, dots = norm_dot(G, V)
    torch.testing.assert_close(sq, norm_dot_reference(G, V)[0], rtol=1e-5, atol=0)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 40), P=st.integers(1, 9000), K=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_numba_property_random_shapes(B, P, K, seed):
    G = _rand(B, P, seed=seed)
    V = _rand(K, P, seed=seed + 1) if K else None
    sq, dots = norm_dot(G, V, backend="numba")
    sq_ref, dots_ref = norm_dot_reference(G.double(), None if V is None else V.double())
    torch.testing.assert_close(sq.double(), sq_ref, rtol=2e-6, atol=0)
    if K:
        scale = G.double().norm(dim=1, keepdim=True) * V.double().norm(dim=1)[None]
        assert ((dots.double() - dots_ref).abs() <= 2e-6 * scale).all()


@pytest.mark.parametrize("T", [17, 100])
@pytest.mark.parametrize("form", ["gram", "outer"])
@pytest.mark.parametrize("d_in,d_out", [(6, 4), (4, 6)])
def test_ghost_linear_sub_batches_within_the_memory_budget(form, d_in, d_out, T):
    """A budget smaller than one example's block (or one reference's projection): one
    example (one reference) at a time, same numbers; either side may be the narrower, and
    the Grams whole (T = 17) or in blocks (T = 100)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, T, d_in, generator=g, dtype=torch.float64)
    d = torch.randn(5, T, d_out, generator=g, dtype=torch.float64)
    V = torch.randn(3, d_out, d_in, generator=g, dtype=torch.float64)
    whole = ghost_linear(a, d, V, form=form, backend="torch")
    pieces = ghost_linear(a, d, V, form=form, backend="torch", workspace=8)
    ref = ghost_linear_reference(a, d, V)
    torch.testing.assert_close(whole[0], ref[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(whole[1], ref[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pieces[0], whole[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(pieces[1], whole[1], rtol=1e-12, atol=0)


# (C_in, C_out, H, W, kernel, stride, padding, dilation, groups): the demo's second conv
# (rows of kw·C_in = 48), grouped and dilated with rows of C_in/G = 8, a strided/dilated
# non-square kernel, grouped, a first conv (one input channel: rows shorter than 8 take
# the running-sum path), depthwise 5x3, and a Conv1d as height 1
SPARSE_CONVS = [(16, 32, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1),
                (16, 6, 7, 7, (3, 3), (1, 1), (1, 1), (2, 2), 2),
                (3, 8, 9, 7, (3, 2), (2, 1), (1, 0), (1, 2), 1),
                (8, 8, 10, 10, (3, 3), (1, 2), (2, 1), (2, 1), 4),
                (1, 4, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
                (6, 6, 7, 7, (5, 3), (1, 1), (0, 0), (1, 1), 6),
                (4, 6, 1, 12, (1, 3), (1, 2), (0, 1), (1, 1), 2),
                (2, 4, 9, 9, (3, 3), (2, 1), (1, 1), (2, 2), 2)]


@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SPARSE_CONVS)
def test_sparse_conv_kernel_equals_per_example_weight_gradients(shape, dtype, density):
    """The numba conv kernel against each example's weight gradient from autograd's
    convolution backward (vmap over examples): ‖g_b‖² and ⟨g_b, V_k⟩, whatever δ's density."""
    from gradscore.kernels.conv_sparse_numba import conv_norm_dot_sparse
    c_in, c_out, H, W, k, stride, pad, dil, groups = shape
    x = _rand(5, c_in, H, W, seed=1, dtype=dtype)
    w_shape = (c_out, c_in // groups, *k)
    out = torch.nn.functional.conv2d(x, torch.zeros(w_shape, dtype=dtype), None, stride, pad, dil, groups)
    d = _rand(*out.shape, seed=2, dtype=dtype) * (torch.rand(out.shape, generator=torch.Generator().manual_seed(3))
                                                  < density)
    V = _rand(3, *w_shape, seed=4, dtype=dtype)
    g = torch.func.vmap(lambda xb, db: torch.nn.grad.conv2d_weight(
        xb[None].double(), w_shape, db[None].double(), stride, pad, dil, groups))(x, d).reshape(5, -1)
    sq, dots = conv_norm_dot_sparse(x, d, V, kernel=k, stride=stride, dilation=dil, padding=pad, groups=groups)
    assert sq.dtype == dtype and sq.shape == (5,) and dots.shape == (5, 3)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(sq.double(), g.pow(2).sum(1), rtol=rtol, atol=0)
    scale = g.norm(dim=1, keepdim=True) * V.double().reshape(3, -1).norm(dim=1)[None]
    assert ((dots.double() - g @ V.double().reshape(3, -1).T).abs() <= rtol * scale).all()
    assert (sq == 0).all() == (density == 0.0)
    none_sq, none_dots = conv_norm_dot_sparse(x, d, None, kernel=k, stride=stride, dilation=dil, padding=pad,
                                              groups=groups)
    assert torch.equal(none_sq, sq) and none_dots.shape == (5, 0)
    # with the bias: its gradient Σ_l δ_b[:, l] joins the weight's
    Vb = _rand(3, c_out, seed=5, dtype=dtype)
    gb = torch.cat([g, d.double().sum((2, 3))], 1)
    Vall = torch.cat([V.double().reshape(3, -1), Vb.double()], 1)
    sq, dots = conv_norm_dot_sparse(x, d, V, kernel=k, stride=stride, dilation=dil, padding=pad, groups=groups,
                                    bias=True, V_bias=Vb)
    torch.testing.assert_close(sq.double(), gb.pow(2).sum(1), rtol=rtol, atol=0)
    scale = gb.norm(dim=1, keepdim=True) * Vall.norm(dim=1)[None]
    assert ((dots.double() - gb @ Vall.T).abs() <= rtol * scale).all()


@pytest.mark.parametrize("c_in", [16, 1])          # long rows (sparse) and short rows (dense)
def test_sparse_conv_kernel_does_not_depend_on_thread_count(c_in):
    import numba

    from gradscore.kernels.conv_sparse_numba import conv_norm_dot_sparse
    x, d = _rand(40, c_in, 8, 8, seed=1), _rand(40, 32, 8, 8, seed=2).relu()
    V = _rand(2, 32, c_in, 3, 3, seed=3)
    kw = dict(kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=(1, 1), groups=1, bias=True,
              V_bias=_rand(2, 32, seed=4))
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = conv_norm_dot_sparse(x, d, V, **kw)
    finally:
        numba.set_num_threads(before)
    many = conv_norm_dot_sparse(x, d, V, **kw)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_a_triton_failure_at_run_time_falls_back_to_torch_with_one_line(monkeypatch, caplog):
    """A Triton compile failure mid-run (a new shape on a machine whose compiler breaks)
    never crashes the run: the torch reference takes over, with one logged line naming the
    reason, for norm_dot and for ghost_linear."""
    import logging

    from gradscore.kernels import dispatch, ghost_linear_triton, norm_dot_triton
    monkeypatch.setattr(dispatch, "_runtime_failed", {})

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed\nfull compiler log")
    monkeypatch.setattr(norm_dot_triton, "norm_dot_triton", broken)
    monkeypatch.setattr(ghost_linear_triton, "outer_triton", broken)
    backend = dispatch.TritonBackend()
    G, V = _rand(5, 300, seed=1), _rand(2, 300, seed=2)
    a, d, W = _rand(3, 4, 6, seed=3), _rand(3, 4, 5, seed=4), _rand(2, 5, 6, seed=5)
    with caplog.at_level(logging.WARNING, logger="gradscore.kernels"):
        for _ in range(3):
            sq, dots = backend.norm_dot(G, V)
            torch.testing.assert_close(sq, norm_dot_reference(G, V)[0])
            torch.testing.assert_close(dots, norm_dot_reference(G, V)[1])
            got = ghost_linear(a, d, W, form="outer", backend="triton")
            want = ghost_linear_reference(a, d, W)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("PassManager::run failed" in m and "torch reference" in m for m in lines), lines
    assert all("\n" not in m for m in lines)


@pytest.mark.parametrize("chunk", [1, 3, 128])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,V", [(0, 5), (1, 1), (9, 2), (9, 7), (6, 300)])
def test_softmax_ce_rows_kernel_equals_the_float64_reference(R, V, dtype, chunk):
    """The language model's terms per output row (loss, ‖d‖², ⟨δ, d⟩, ‖δ‖², d = p − onehot)
    against torch in float64 on the same values: rows without a loss (label −1), a row whose
    label is near certain (1 − p_y ~ 1e-5: no cancellation), one whose label is near
    impossible, δ a multiple of d and δ any."""
    from gradscore.kernels.reference import softmax_ce_rows_reference
    from gradscore.kernels.softmax_ce_numba import softmax_ce_rows_numba
    g = torch.Generator().manual_seed(R * 1000 + V)
    z = (3 * torch.randn(R, V, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, (R,), generator=g)
    if R > 2:
        labels[1] = -1
        z[0, labels[0]] = z[0].max() + 12           # p_y = 1 − O(V e^-12)
        z[2, labels[2]] = z[2].min() - 30           # p_y ~ e^-30
    delta = torch.randn(R, V, generator=g, dtype=torch.float64).to(dtype)
    ref = softmax_ce_rows_reference(z, delta, labels)
    if R > 3:   # a row whose δ is a multiple of its d: the share the recorder reads
        d3 = torch.softmax(z[3].double(), 0) - torch.nn.functional.one_hot(labels[3], V)
        delta[3] = (0.25 * d3).to(dtype)
        ref = softmax_ce_rows_reference(z, delta, labels)
    got = softmax_ce_rows_numba(z, delta, labels, chunk=chunk)
    assert got.shape == (R, 4) and got.dtype == torch.float64
    # the reference's own 1 − p_y, formed as p_y − 1, keeps 1e-16 / 1e-5 of it in float64
    rtol = 1e-10 if dtype == torch.float64 else 1e-6
    loss, d_sq, dot, delta_sq = ref.unbind(1)
    torch.testing.assert_close(got[:, 0], loss, rtol=rtol, atol=rtol * float(z.abs().max().double()) if R else 0)
    torch.testing.assert_close(got[:, 1], d_sq, rtol=rtol, atol=0)
    assert ((got[:, 2] - dot).abs() <= rtol * (d_sq * delta_sq).sqrt()).all()
    torch.testing.assert_close(got[:, 3], delta_sq, rtol=rtol, atol=0)
    if R > 3:
        share = 0.25 if dtype != torch.bfloat16 else dot[3] / d_sq[3]   # bfloat16's δ: a multiple to 3 digits
        torch.testing.assert_close(got[3, 2] / got[3, 1], torch.as_tensor(share, dtype=torch.float64), rtol=rtol,
                                   atol=0)
        assert (got[1, :3] == 0).all() and got[1, 3] > 0   # no loss, but its δ is counted


def test_softmax_ce_rows_kernel_does_not_depend_on_thread_count():
    import numba

    from gradscore.kernels.softmax_ce_numba import softmax_ce_rows_numba
    z, delta = _rand(37, 3000, seed=5), _rand(37, 3000, seed=6)
    labels = torch.randint(-1, 3000, (37,), generator=torch.Generator().manual_seed(7))
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = softmax_ce_rows_numba(z, delta, labels)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = softmax_ce_rows_numba(z, delta, labels)
    finally:
        numba.set_num_threads(before)
    assert torch.equal(one, many)


def test_softmax_ce_rows_kernel_bounds_its_buffer_by_elements(monkeypatch):
    """A wide vocabulary takes fewer rows per chunk (the buffer stays at ELEMENTS logits), with
    the same results; a row wider than ELEMENTS goes alone."""
    from gradscore.kernels import softmax_ce_numba
    from gradscore.kernels.reference import softmax_ce_rows_reference
    z, delta = _rand(9, 300, seed=1).double(), _rand(9, 300, seed=2).double()
    labels = torch.randint(-1, 300, (9,), generator=torch.Generator().manual_seed(3))
    chunks = []
    real_sums = softmax_ce_numba._sums
    monkeypatch.setattr(softmax_ce_numba, "_sums", lambda e, d, out: (chunks.append(len(e)), real_sums(e, d, out)))
    for elements, rows in [(1200, 4), (100, 1)]:
        monkeypatch.setattr(softmax_ce_numba, "ELEMENTS", elements)
        chunks.clear()
        got = softmax_ce_numba.softmax_ce_rows_numba(z, delta, labels)
        assert max(chunks) == rows and sum(chunks) == 9
        torch.testing.assert_close(got, softmax_ce_rows_reference(z, delta, labels), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,C", [(0, 3), (1, 1), (5, 2), (9, 10), (4, 257)])
def test_classifier_rows_kernel_equals_the_float64_reference(B, C, dtype):
    """A classifier's terms and metrics per row (loss, ‖d‖², ⟨δ, d⟩, ‖δ‖², margin, p_y, correct)
    against torch in float64 on the same values: a label near certain (1 − p_y ~ e^-12, no
    cancellation), one near impossible, a tie for the largest logit (torch's argmax takes the
    first), a row whose largest logit is the label's."""
    from gradscore.kernels.reference import classifier_rows_reference
    from gradscore.kernels.softmax_ce_numba import classifier_rows_numba
    g = torch.Generator().manual_seed(B * 1000 + C)
    z = (3 * torch.randn(B, C, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, C, (B,), generator=g)
    if B > 3 and C > 2:
        z[0, labels[0]] = z[0].max() + 12            # p_y = 1 − O(C e^-12)
        z[1, labels[1]] = z[1].min() - 30            # p_y ~ e^-30
        labels[2] = 1
        z[2, 0] = z[2, 1] = z[2].max() + 1           # a tie at the top: argmax is 0, not the label
        labels[3] = int(z[3].argmax())
    delta = torch.randn(B, C, generator=g, dtype=torch.float64).to(dtype)
    got, ref = classifier_rows_numba(z, delta, labels), classifier_rows_reference(z, delta, labels)
    assert got.shape == (B, 7) and got.dtype == torch.float64
    rtol = 1e-10 if dtype == torch.float64 else 1e-6   # float32 arithmetic of the reference's softmax
    scale = float(z.abs().max().double()) if B else 0.0
    torch.testing.assert_close(got[:, 0], ref[:, 0], rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(got[:, 1], ref[:, 1], rtol=rtol, atol=0)
    assert ((got[:, 2] - ref[:, 2]).abs() <= rtol * (ref[:, 1] * ref[:, 3]).sqrt()).all()
    torch.testing.assert_close(got[:, 3], ref[:, 3], rtol=rtol, atol=0)
    torch.testing.assert_close(got[:, 4], ref[:, 4], rtol=0, atol=0)   # a difference of two logits, exact
    torch.testing.assert_close(got[:, 5], ref[:, 5], rtol=rtol, atol=0)
    assert torch.equal(got[:, 6], ref[:, 6])
    if B > 3 and C > 2:
        assert got[2, 6] == 0 and got[3, 6] == 1 and got[0, 1] < 1e-9


def test_classifier_rows_kernel_nan_rows_and_labels_out_of_range():
    """A row with a NaN logit: NaN terms but ‖δ‖², and correct as torch's argmax (the first NaN) says;
    the other rows as without it. A label outside [0, C) (−100 included): None, for the
    caller's loss to say why."""
    from gradscore.kernels.reference import classifier_rows_reference
    from gradscore.kernels.softmax_ce_numba import classifier_rows_numba
    z, delta = _rand(4, 5, seed=1).double(), _rand(4, 5, seed=2).double()
    labels = torch.tensor([2, 0, 4, 1])
    z[1, 0] = z[2, 3] = float("nan")
    got, ref = classifier_rows_numba(z, delta, labels), classifier_rows_reference(z, delta, labels)
    nan = [0, 1, 2, 4, 5]
    assert torch.isnan(got[1:3, nan]).all() and torch.isnan(ref[1:3, nan]).all()
    torch.testing.assert_close(got[:, 3], ref[:, 3], rtol=1e-12, atol=0)
    assert torch.equal(got[:, 6], ref[:, 6]) and got[1, 6] == 1 and got[2, 6] == 0
    torch.testing.assert_close(got[[0, 3]], ref[[0, 3]], rtol=1e-12, atol=1e-12)
    for bad in (5, -1, -100):
        assert classifier_rows_numba(z, delta, torch.tensor([2, 0, bad, 1])) is None


def test_the_first_use_under_autocast_keeps_the_numba_backend():
    """The backend's probe (its result against the torch reference, once per process) runs
    with autocast off: a first use inside a bf16 autocast region (an in-run step, a scorer
    under autocast) compared a bf16 reference with float32 and turned numba off for the
    whole process, with a warning that it was unavailable."""
    import os
    import subprocess
    import sys
    code = ("import logging, torch\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            "from gradscore.kernels.dispatch import get_backend\n"
            "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
            "    print(get_backend('cpu').name)\n"
            "print(get_backend('cpu').name)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "GRADSCORE_KERNELS"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["numba", "numba"], (done.stdout, done.stderr[-2000:])
    assert "unavailable" not in done.stderr, done.stderr[-2000:]


def test_which_blocks_the_default_backend_hands_to_the_reference():
    """An empty batch always (the kernels' launch grids assume rows); on CPU a small block
    unless a backend is forced (the CUDA rule is tests/test_cuda.py's)."""
    from gradscore.kernels.norm_dot import SMALL_BLOCK, takes_reference
    small, large = torch.zeros(4, SMALL_BLOCK // 4), torch.zeros(4, SMALL_BLOCK // 4 + 1)
    V = torch.zeros(2, SMALL_BLOCK // 4)
    assert takes_reference(small, None, None) and takes_reference(small, V, None)
    assert not takes_reference(large, None, None) and not takes_reference(small, None, "numba")
    assert takes_reference(torch.zeros(0, 10), None, "numba")


def test_which_cuda_blocks_the_default_backend_hands_to_the_reference():
    """The CUDA rule without a GPU (tests/test_cuda.py runs it on real blocks): a block of at
    most CUDA_SMALL_BLOCK elements, with references or without (float64 goes to torch in the
    Triton backend itself)."""
    from types import SimpleNamespace

    from gradscore.kernels.norm_dot import CUDA_SMALL_BLOCK, takes_reference

    def block(rows, cols, dtype=torch.float32):   # what takes_reference reads of a CUDA tensor
        return SimpleNamespace(shape=(rows, cols), dtype=dtype, device=torch.device("cuda", 0),
                               numel=lambda: rows * cols)
    small, large = block(4, CUDA_SMALL_BLOCK // 4), block(4, CUDA_SMALL_BLOCK // 4 + 1)
    refs, none = block(2, 1), block(0, 1)
    assert takes_reference(small, None, None) and takes_reference(block(4, CUDA_SMALL_BLOCK // 4, torch.bfloat16),
                                                                   refs, None)
    assert not takes_reference(large, None, None) and not takes_reference(large, none, None)
    assert not takes_reference(large, refs, None)
    assert not takes_reference(block(4, CUDA_SMALL_BLOCK, torch.bfloat16), refs, None)
    assert not takes_reference(small, None, "triton")
