"""The CUDA paths on a real GPU (`pytest -m cuda`, run by `python -m bench.gpu_check`): every
Triton kernel against the torch reference (fp32, fp16, bf16; K = 0, 1, 2, 16; odd sizes),
the ghost, vmap and auto engines against the loop on CUDA for an MLP, a CNN, a tiny GPT-2,
an LSTM and a GRU, the in-run recorder's records against the loop, and its training
with a relative attention bias bit for bit.
Skipped without a CUDA device; the same kernels run under Triton's interpreter on CPU in
test_kernels.py, and the engines on CPU everywhere else."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscore as gs
from gradscore.demos.models import digits_cnn, mlp, recurrent_classifier
from gradscore.kernels import norm_dot_reference
from gradscore.kernels.ghost_linear import ghost_linear, ghost_linear_reference
from helpers import PatchTokens, batch_forward_gradients

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: a reduced-precision input is read as is and accumulated in float32: its tolerance is its rounding
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [0, 1, 2, 16, 17])
@pytest.mark.parametrize("B, P", [(1, 1), (7, 37), (33, 4097), (257, 100_003), (64, 1_000_000)])
def test_triton_norm_dot_equals_the_reference(B, P, K, dtype):
    from gradscore.kernels.norm_dot_triton import norm_dot_triton
    G, V = _rand(B, P, seed=1, dtype=dtype), (_rand(K, P, seed=2, dtype=dtype) if K else None)
    sq, dots = norm_dot_triton(G, V)
    sq_ref, dots_ref = norm_dot_reference(G, V)
    torch.testing.assert_close(sq, sq_ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert dots.shape == (B, K)
    if K:
        torch.testing.assert_close(dots, dots_ref, rtol=TOL[dtype], atol=TOL[dtype] * P ** 0.5)
    again = norm_dot_triton(G, V)   # run to run identical: fixed summation order, no atomics
    assert torch.equal(sq, again[0]) and torch.equal(dots, again[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["gram", "outer"])
@pytest.mark.parametrize("K", [0, 2, 16])
@pytest.mark.parametrize("B, T, d_in, d_out", [(1, 1, 3, 5), (5, 17, 33, 19), (64, 128, 256, 64)])
def test_triton_ghost_linear_equals_the_reference(B, T, d_in, d_out, K, form, dtype):
    a, d = _rand(B, T, d_in, seed=3, dtype=dtype), _rand(B, T, d_out, seed=4, dtype=dtype)
    V = _rand(K, d_out, d_in, seed=5, dtype=dtype) if K else None
    sq, dots = ghost_linear(a, d, V, form=form, backend="triton")
    sq_ref, dots_ref = ghost_linear_reference(a.float(), d.float(), None if V is None else V.float())
    tol = TOL[dtype] * 10
    torch.testing.assert_close(sq.float(), sq_ref, rtol=tol, atol=tol)
    if K:
        torch.testing.assert_close(dots.float(), dots_ref, rtol=tol, atol=tol * (T * d_in * d_out) ** 0.5)


def _tiny_gpt2() -> tuple[nn.Module, dict, torch.Tensor, str]:
    pytest.importorskip("transformers")
    from gradscore.integrations.hf import from_config
    config = {"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 31, "n_positions": 16,
              "bos_token_id": 0, "eos_token_id": 0}
    model = from_config(config, attn_implementation="eager")
    ids = torch.randint(1, 31, (5, 9), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids, "causal_lm"


def _case(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        return mlp(d_in=12, hidden=16, n_classes=4, depth=2), torch.randn(9, 12), torch.randint(0, 4, (9,)), "cross_entropy"
    if name == "cnn":
        return digits_cnn(channels=8), torch.randn(9, 1, 8, 8), torch.randint(0, 10, (9,)), "cross_entropy"
    if name == "depthwise":   # CUDA has no grouped conv form: the outer form takes the groups at once
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                              nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
        return model, torch.randn(9, 3, 6, 6), torch.randint(0, 4, (9,)), "cross_entropy"
    if name == "tokens":      # a BatchNorm before tokens: torch's CPU backward of one example is wrong there
        return PatchTokens(), torch.randn(9, 2, 6, 6), torch.randint(0, 3, (9,)), "cross_entropy"
    if name in ("lstm", "gru"):   # scored in eval mode, whose backward cuDNN's RNN refuses
        model = recurrent_classifier(kind=name.upper(), vocab=20, d=8, layers=2, n_classes=3)
        return model, torch.randint(0, 20, (9, 6)), torch.randint(0, 3, (9,)), "cross_entropy"
    return _tiny_gpt2()


def _to(x, **kw):
    """x on the device; its floating-point tensors in the dtype too (token ids stay integers)."""
    def one(v: torch.Tensor) -> torch.Tensor:
        return v.to(**kw) if v.is_floating_point() else v.to(device=kw["device"])
    return {k: one(v) for k, v in x.items()} if isinstance(x, dict) else one(x)


@pytest.mark.parametrize("dtype, rtol, kernels", [(torch.float64, 1e-6, None), (torch.float32, 1e-3, None),
                                                  (torch.float32, 1e-3, "triton")],
                         ids=["float64", "float32", "float32-triton"])
@pytest.mark.parametrize("engine", ["ghost", "vmap", "auto"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "depthwise", "tokens", "gpt2", "lstm", "gru"])
def test_engines_on_cuda_equal_the_loop(name, engine, dtype, rtol, kernels, monkeypatch):
    """float64 checks the engines; float32 the kernels: these small blocks take torch by
    default, and the Triton kernels when forced."""
    if kernels is not None:
        monkeypatch.setenv("GRADSCORE_KERNELS", kernels)
    model, x, y, loss = _case(name)
    model = model.to(device="cuda", dtype=dtype).eval()
    x, y = _to(x, device="cuda", dtype=dtype), y.cuda()
    ref = gs.Scorer(model, loss, engine="loop")
    V = torch.randn(2, ref.num_params, device="cuda", dtype=dtype)
    want = ref.score_batch(x, y, refs=V)
    if engine == "vmap" and name in ("lstm", "gru"):   # as on CPU: vmap cannot batch torch's RNN kernels
        with pytest.raises(gs.GradscoreError, match="vmap cannot trace this model"):
            gs.Scorer(model, loss, engine=engine).score_batch(x, y, refs=V)
        return
    got = gs.Scorer(model, loss, engine=engine).score_batch(x, y, refs=V)
    torch.testing.assert_close(got.sq_norm.double(), want.sq_norm.double(), rtol=rtol, atol=rtol * 1e-3)
    torch.testing.assert_close(got.dots.double(), want.dots.double(), rtol=rtol,
                               atol=rtol * float(want.dots.abs().max()))
    assert got.sq_norm.device.type == "cuda"


def test_the_loop_on_cuda_equals_the_batch_forward_before_tokens():
    """Each example's gradient of the loop (a batch of one) equals the whole batch's forward,
    where a BatchNorm's output gradient comes back channels_last (wrong on CPU, fixed)."""
    model, x, y, _ = _case("tokens")
    model, x, y = model.to(device="cuda", dtype=torch.float64).eval(), x.to("cuda", torch.float64), y.cuda()
    G = batch_forward_gradients(model, x, y)
    got = gs.Scorer(model, engine="loop").score_batch(x, y)
    torch.testing.assert_close(got.sq_norm, (G ** 2).sum(1), rtol=1e-10, atol=0)


def test_the_default_cuda_backend_is_triton_and_no_kernel_failed():
    from gradscore.kernels import describe, get_backend
    from gradscore.kernels.dispatch import _runtime_failed
    assert get_backend("cuda").name == "triton", describe()
    assert not _runtime_failed, _runtime_failed


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_sketches_on_cuda_equal_the_cpu_ones(name):
    """Φ is drawn on the CPU, so a CUDA sketch equals the CPU sketch of the same batch."""
    from gradscore.sketches import Projection, SketchEngine
    torch.manual_seed(0)
    model = (mlp(d_in=64, hidden=32, n_classes=10, depth=2) if name == "mlp" else digits_cnn()).double().eval()
    x = torch.randn(16, 64, dtype=torch.float64) if name == "mlp" else torch.randn(16, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(16) % 10
    names = [n for n, _ in model.named_parameters()]
    proj = Projection.for_model(model, names, 512, seed=1)
    loss = gs.resolve_loss("cross_entropy")
    cpu = SketchEngine(model, loss, names, proj).sketch_batch(x, y).dots
    model = model.cuda()
    gpu = SketchEngine(model, loss, names, proj).sketch_batch(x.cuda(), y.cuda()).dots
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-11)


def test_small_blocks_take_torch_and_the_rest_the_triton_kernel():
    """A small block's call is its launch, cheaper in torch (bench/results/gpu_nvidia-h200.json);
    large blocks go to the kernel, with references too (its K row reductions read G faster than
    cuBLAS's product on the H200); a forced backend is obeyed."""
    from gradscore.kernels.norm_dot import CUDA_SMALL_BLOCK, takes_reference
    small, V = _rand(8, 1000, seed=0), _rand(2, 1000, seed=1)
    assert takes_reference(small, None, None) and takes_reference(small.bfloat16(), V.bfloat16(), None)
    assert not takes_reference(small, None, "triton")
    P = CUDA_SMALL_BLOCK // 4 + 1
    G, V = _rand(4, P, seed=0), _rand(2, P, seed=1)
    assert not takes_reference(G, V, None) and not takes_reference(G, None, None)
    assert not takes_reference(G.bfloat16(), V.bfloat16(), None) and not takes_reference(G, V, "triton")


def _family_cases():
    """One case in a few of each layer family's CPU grid (tests/test_families.py; of the
    recurrent grid, every kind, packed and padded), and every case of the structural
    rules' grids (norm-act, layer scale, weight-standardized conv); some of the free-parameter
    rule's (parameters used directly, a relative attention bias, windows of the batch)."""
    import test_families as f
    return (f.AFFINE_GRID[::6] + f.RNN_GRID[3::13] + f.MHA_GRID[::9] + f.BAG_GRID[::7] + f.CONV_GRID[::6]
            + f.NORM_GRID[::4] + f.OWN_GRID[::5] + f.NORM_ACT_GRID + f.SCALE_GRID + f.STD_CONV_GRID
            + f.FREE_GRID[::7] + f.RELATIVE_GRID[::3] + f.WINDOWS_GRID)


@pytest.mark.parametrize("family,config", _family_cases(), ids=lambda v: str(v))
@pytest.mark.parametrize("engine", ["auto"])
def test_the_layer_families_on_cuda_equal_the_loop_on_cpu(family, config, engine):
    """Every ghost rule's CUDA path in float64 against the CPU loop; ghost refuses on CUDA
    exactly where it refuses on CPU, auto never."""
    import copy

    from test_families import _prepare, _refs
    model, x, y = _prepare(family, config)
    loop = gs.Scorer(model, engine="loop")
    V = _refs(loop, 2)
    want = loop.score_batch(x, y, refs=V)
    try:
        gs.Scorer(copy.deepcopy(model), engine=engine).score_batch(x, y, refs=V)
        refused_on_cpu = None
    except gs.GradscoreError as e:
        refused_on_cpu = str(e)
    assert engine != "auto" or refused_on_cpu is None, refused_on_cpu
    scorer = gs.Scorer(copy.deepcopy(model).cuda(), engine=engine)
    if refused_on_cpu is not None:
        with pytest.raises(gs.GradscoreError):
            scorer.score_batch(x.cuda(), y.cuda(), refs=V.cuda())
        return
    got = scorer.score_batch(x.cuda(), y.cuda(), refs=V.cuda())
    torch.testing.assert_close(got.sq_norm.cpu(), want.sq_norm, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(got.dots.cpu(), want.dots, rtol=1e-6, atol=1e-9)
    assert got.sq_norm.device.type == "cuda"


#: where the in-run tests below run (a scratch run of them on "cpu" checks the tests themselves)
INRUN_DEVICE = "cuda"


class _SharedInput(nn.Module):
    """Token embeddings read by three Linear layers (q, k, v) of one attention. With T = 4
    and d = 32 the Gram form is the cheaper only when the three share their input's Gram,
    so the recorder forms it once per step for the three."""

    def __init__(self, vocab: int = 20, d: int = 32, n_classes: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x):
        h = self.emb(x)
        attn = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5, -1)
        return self.head((attn @ self.v(h)).mean(1))


@pytest.mark.parametrize("kernels", [None, "torch"], ids=["default", "torch-kernels"])
@pytest.mark.parametrize("family", ["mlp", "wide_mlp", "cnn", "shared_input"])
def test_inrun_records_on_cuda_equal_the_loop(tmp_path, family, kernels, monkeypatch):
    """The in-run recorder on CUDA in float64: every recorded quantity (loss, share, norms,
    target dots, margin) against the per-example loop at each step's θ_t, through the CUDA
    loss terms, the Linear rules' Gram form (an input's Gram shared by q, k and v), the
    target's factored form (wide layers) and the conv rules; with the default kernels and
    with GRADSCORE_KERNELS=torch."""
    from test_inrun import _data, _train

    from helpers import check_inrun_against_loop
    if kernels is not None:
        monkeypatch.setenv("GRADSCORE_KERNELS", kernels)
    torch.manual_seed(0)
    if family in ("mlp", "wide_mlp"):
        model, (x, y) = mlp(d_in=10, hidden=12 if family == "mlp" else 64, n_classes=4, depth=2), _data()
    elif family == "cnn":
        model, (x, y) = digits_cnn(n_classes=4, channels=3), _data(image=True)
        next(m for m in model if isinstance(m, nn.Dropout)).p = 0.0   # the loop runs without it
    else:
        g = torch.Generator().manual_seed(0)
        model = _SharedInput()
        x, y = torch.randint(0, 20, (48, 4), generator=g), torch.randint(0, 4, (48,), generator=g)
    model = model.to(INRUN_DEVICE, torch.float64)
    x, y = x.to(INRUN_DEVICE), y.to(INRUN_DEVICE)
    targets = (x[:6], y[:6])
    rec = gs.InRun(model, out=tmp_path / "r.h5", targets=targets)
    snaps: list = []
    _train(model, x, y, steps=3, batch=8, rec=rec, snapshots=snaps)
    check_inrun_against_loop(rec.close(), model, snaps, x, y, targets)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_inrun_records_of_a_padded_lm_on_cuda_equal_the_loop(tmp_path, kind):
    """A tiny padded GPT-2 and Llama on CUDA, one step through Hugging Face's loss: the
    language model's loss terms take the generic path on CUDA (test_inrun.py's CPU test
    takes numba's)."""
    from test_inrun import check_tiny_lm_with_padding
    check_tiny_lm_with_padding(tmp_path, kind, INRUN_DEVICE)


@pytest.mark.parametrize("kind", ["add", "sdpa", "gqa"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_a_relative_attention_bias_trains_bit_identically_with_the_recorder(tmp_path, kind, autocast):
    """T5's relative attention bias (an Embedding of the offsets, one output for the batch)
    on the GPU: the free-parameter rule runs the embedding's backward per example inside
    the step's, and as SDPA's attn_mask the mask reaches SDPA as it is (each example's
    gradient of the scores is recomputed from the output's δ). Three Adam steps with and
    without the recorder end with the same parameters, bit for bit, in float32 and under
    bf16 autocast (an expanded mask changed them under autocast on CPU)."""
    import contextlib

    import torch.nn.functional as F
    from helpers import RelativeBias
    g = torch.Generator().manual_seed(0)
    x = torch.randn(36, 4, 5, generator=g).to(INRUN_DEVICE)
    y = torch.randint(0, 3, (36,), generator=g).to(INRUN_DEVICE)

    def train(record: bool) -> dict:
        torch.manual_seed(0)
        model = RelativeBias(kind).to(INRUN_DEVICE)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        rec = gs.InRun(model, out=tmp_path / "r.h5") if record else None
        for t in range(3):
            idx = torch.arange(12 * t, 12 * t + 12, device=INRUN_DEVICE)
            with rec.step(range(12 * t, 12 * t + 12), y[idx], lr=1e-2) if rec else contextlib.nullcontext():
                with torch.autocast(INRUN_DEVICE, dtype=torch.bfloat16, enabled=autocast):
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
            opt.step()
            opt.zero_grad()
        if rec is not None:
            assert not rec.engine.fallback and set(rec.engine.free) == {"rel.weight"}
            rec.close()
        return model.state_dict()
    plain, recorded = train(False), train(True)
    assert all(torch.equal(plain[k], recorded[k]) for k in plain)
