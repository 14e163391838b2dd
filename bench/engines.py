"""Per-example gradient engines against one plain batched forward+backward, side by side.

    python -m bench.engines [--batches 64,256] [--json bench/results/engines_cpu.json --overwrite]
    gradscore bench ...        # the same, from a source checkout (pip install -e .)

Peers (optional): pip install -c <(pip freeze | grep '^torch==') opacus einops unfoldNd
and pip install --no-deps backpack-for-pytorch (pinning torch so pip never swaps it).

For each model (an MLP 784-1024-1024-10, the demo CNN and its 128-channel version of
0.56M parameters, a 25k-parameter CNN on 3x32x32 inputs with a strided and a
depthwise-separable conv, a 2-layer d=128 transformer on T=64 tokens, a 20k-parameter
ResNet with BatchNorm (eval) and residual blocks, torch's TransformerEncoderLayer, an LSTM
and a GRU + MultiheadAttention classifier on T=32 tokens, and with ``transformers``
installed the LM demo's GPT-2 (2 layers, d=64, causal LM loss) at T=128, batch 32) and
batch size, every method is timed (best of ``repeats`` after a warm-up, more for calls
shorter than 0.1 s) and its peak memory measured:

- ``plain``: forward + backward of the summed loss, the 1.0x line; it is timed again
  alternately with every method (best of each), and each ratio is to those paired runs;
- ``loop``: per-example autograd, norms + K=2 dots;  ``vmap_torch`` / ``vmap_fused``:
  vmap(grad) with the torch reference / fused kernel reduction, K=2;
- ``ghost_k0`` (norms only) and ``ghost_k2``, with their floor (2+K)/3 of plain: ghost
  needs the forward and the input gradients but not the weight gradients, plus about
  one matmul per reference vector. That floor holds for layers in the Gram form; a
  layer in the outer form (long sequences, convolutions over many positions) costs
  what its weight gradient costs, so each ghost row also gives ``flops``: the matmul
  and convolution flops of the call over plain's, counted by
  ``torch.utils.flop_counter`` — the model's own floor, free of timing noise;
- peers, when installed: ``opacus`` (GradSampleModule per-sample gradients, then norms and
  2 dots) and ``backpack_l2`` (BackPACK's BatchL2Grad, norms only).

Peak memory on CUDA is ``torch.cuda.max_memory_allocated``; on CPU it is the rise of the
process's resident-set high-water mark (reset through /proc/self/clear_refs) above the
resident set before the call, measured in a child process with glibc's mmap threshold
fixed (see ``MMAP_THRESHOLD``) so that the peak follows live tensors; reported as a
ratio to plain.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from gradscore._version import __version__
from gradscore.batch import Inputs, call_model, take
from gradscore.exceptions import GradscoreError
from gradscore.engines.workarounds import torch_workarounds
from gradscore.io.atomic import atomic_json
from gradscore.io.outputs import claim
from gradscore.losses import resolve_loss
from gradscore.demos.models import digits_cnn, mlp, recurrent_classifier, small_resnet, tiny_transformer
from gradscore.scorer import Scorer

K_REFS = 2


class Case(NamedTuple):
    """A benchmark model: factory, inputs of batch size B, its loss, fixed batch sizes."""

    factory: Callable[[], nn.Module]
    make_x: Callable[[int], Inputs]
    loss: str = "cross_entropy"
    batches: tuple[int, ...] | None = None   # None: the --batches given


def _cifar_cnn() -> nn.Module:
    """A CNN on 3x32x32 inputs (25k parameters): a 3x3 conv, a strided one, then a
    depthwise-separable block (3x3 depthwise, 1x1 pointwise), global pooling, linear."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(),
                         nn.Conv2d(64, 64, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class TinyViT(nn.Module):
    """A ViT on (B, T, 48) patches: a projection to d, a class token and a position
    embedding that the forward uses directly (the free-parameter rule), encoder layers
    without dropout, and a head on the class token."""

    def __init__(self, d: int = 128, T: int = 64, layers: int = 2, n_classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Linear(48, d)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, T + 1, d))
        self.blocks = nn.Sequential(*(nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
                                      for _ in range(layers)))
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], 1) + self.pos_embed
        return self.head(self.blocks(h)[:, 0])


def model_cases(device: str) -> dict[str, Case]:
    """name -> :class:`Case`. The GPT-2 cases (T = 128) need ``transformers``."""
    cases = {
        "mlp_784_1024_1024": Case(lambda: mlp(d_in=784, hidden=1024, n_classes=10, depth=2),
                                  lambda B: torch.randn(B, 784, device=device)),
        "digits_cnn": Case(lambda: digits_cnn(), lambda B: torch.rand(B, 1, 8, 8, device=device)),
        # the 0.56M-parameter CNN on 8x8 inputs that the ghost issue's peer figures were taken on
        "digits_cnn_c128": Case(lambda: digits_cnn(channels=128), lambda B: torch.rand(B, 1, 8, 8, device=device)),
        "cifar_cnn_dw": Case(_cifar_cnn, lambda B: torch.randn(B, 3, 32, 32, device=device)),
        "transformer_d128_T64": Case(lambda: tiny_transformer(vocab=1000, d=128, heads=4, layers=2, n_classes=10),
                                     lambda B: torch.randint(0, 1000, (B, 64), device=device)),
        "vit_d128_T64": Case(TinyViT, lambda B: torch.randn(B, 64, 48, device=device)),
        # a new user's ResNet: BatchNorm (eval) and residual blocks, 20k parameters
        "resnet_bn_20k": Case(small_resnet, lambda B: torch.randn(B, 3, 32, 32, device=device)),
        # torch's own attention layers, whose projections nn.MultiheadAttention uses functionally
        "torch_encoder_d64_T32": Case(lambda: nn.Sequential(
            nn.Embedding(1000, 64), nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True),
            nn.Flatten(), nn.Linear(64 * 32, 2)), lambda B: torch.randint(0, 1000, (B, 32), device=device)),
        "lstm_d64_T32": Case(lambda: recurrent_classifier(kind="LSTM"),
                             lambda B: torch.randint(0, 1000, (B, 32), device=device), batches=(64,)),
        "gru_attention_d64_T32": Case(lambda: recurrent_classifier(kind="GRU", attention=True),
                                      lambda B: torch.randint(0, 1000, (B, 32), device=device), batches=(64,)),
    }
    if importlib.util.find_spec("transformers") is not None:
        from gradscore.demos.lm import MODEL_KWARGS, VOCAB, gpt2_config
        from gradscore.integrations.hf import from_config
        def gpt2(vocab: int, batch: int) -> Case:
            return Case(lambda: from_config({**gpt2_config(128), "vocab_size": vocab}, **MODEL_KWARGS),
                        lambda B: {"input_ids": torch.randint(0, vocab - 1, (B, 128), device=device),
                                   "attention_mask": torch.ones(B, 128, dtype=torch.long, device=device)},
                        loss="causal_lm", batches=(batch,))
        cases["gpt2_d64_T128"] = gpt2(VOCAB, 32)
        # the same with a real vocabulary, where the (B, T, V) logits are the step's largest tensors
        cases["gpt2_d64_T128_V8192"] = gpt2(8192, 16)
        cases["gpt2_d64_T128_V32768"] = gpt2(32768, 16)
        # OPT: a learned position embedding with a forward of its own, and its MLP on (B·T, d) rows
        cases["opt_d64_T128"] = Case(lambda: from_config(
            {"model_type": "opt", "vocab_size": VOCAB, "hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 128, "word_embed_proj_dim": 64, "dropout": 0.0,
             "attention_dropout": 0.0}, **MODEL_KWARGS),
            lambda B: {"input_ids": torch.randint(3, VOCAB - 1, (B, 128), device=device),
                       "attention_mask": torch.ones(B, 128, dtype=torch.long, device=device)},
            loss="causal_lm", batches=(32,))
        # MPNet: T5's relative attention bias, an Embedding of the (T, T) offsets, one for the batch
        cases["mpnet_d64_T128"] = Case(lambda: from_config(
            {"model_type": "mpnet", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 256,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 160, "num_labels": 2,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, task="sequence_classification"),
            lambda B: {"input_ids": torch.randint(3, VOCAB - 1, (B, 128), device=device),
                       "attention_mask": torch.ones(B, 128, dtype=torch.long, device=device)},
            batches=(32,))
    return cases


#: glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MiB) in the heap,
#: and an RSS peak then counts that cache, which depends on what ran before (it moved
#: the ratios by up to 0.5x between runs). On CPU the peaks are therefore measured in a
#: child process whose threshold is fixed at glibc's initial 128 KiB, every method
#: alike: large blocks go back to the OS when freed and the RSS peak follows live
#: tensors. The timings run in the bench's own process, with the default allocator.
MMAP_THRESHOLD = 128 * 2**10


class _Memory:
    """Peak memory of a call: CUDA allocator stats, or the RSS high-water mark on Linux."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cpu_ok = os.path.exists("/proc/self/clear_refs")
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024

    @contextmanager
    def measure(self) -> Iterator[dict]:
        out: dict = {}
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            yield out
            torch.cuda.synchronize()
            out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
            return
        if not self.cpu_ok:
            yield out
            return
        if self._trim is not None:
            self._trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = self._status("VmRSS")
        yield out
        out["peak_bytes"] = max(0, self._status("VmHWM") - base)


def _methods(model: nn.Module, x: Inputs, y: torch.Tensor, V: torch.Tensor, loss: str
             ) -> dict[str, Callable[[], object]]:
    loss_fn = resolve_loss(loss).fn

    # each method frees what it made (gradients, grad samples) before it returns, so that
    # a call starts from the same memory as any other and its peak counts them
    def plain():   # under the engines' workarounds: in eval mode on CUDA, cuDNN's RNN backward refuses to run
        with torch_workarounds():
            loss_fn(call_model(model, x), y).sum().backward()
        model.zero_grad(set_to_none=True)

    def with_kernels(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            old = os.environ.get("GRADSCORE_KERNELS")
            os.environ["GRADSCORE_KERNELS"] = name
            try:
                return fn()
            finally:
                if old is None:
                    os.environ.pop("GRADSCORE_KERNELS")
                else:
                    os.environ["GRADSCORE_KERNELS"] = old
        return run

    loop, vm, gh = (Scorer(model, loss, engine=e) for e in ("loop", "vmap", "ghost"))
    methods = {
        "plain": plain,
        "loop": lambda: loop.score_batch(x, y, refs=V),
        "vmap_torch": with_kernels("torch", lambda: vm.score_batch(x, y, refs=V)),
        "vmap_fused": lambda: vm.score_batch(x, y, refs=V),
        "ghost_k0": lambda: gh.score_batch(x, y),
        "ghost_k2": lambda: gh.score_batch(x, y, refs=V),
    }
    if isinstance(x, torch.Tensor) and loss == "cross_entropy":  # the peers' own loss and call
        methods.update(_peers(model, x, y, V))
    return methods


def _peers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The installed peers' methods; one that refuses the model raises its refusal when
    called, so the bench says n/a and why."""
    peers: dict[str, Callable[[], object]] = {}
    for name, make in (("opacus", _opacus), ("backpack_l2", _backpack)):
        try:
            peers[name] = make(model, x, y, V)
        except ImportError:
            continue
        except Exception as e:  # noqa: BLE001 - a peer that does not take this model (Opacus: BatchNorm)
            peers[name] = _refusal(e)
    return peers


def _refusal(e: Exception) -> Callable[[], object]:
    def run():
        raise e
    return run


def _opacus(model: nn.Module, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor) -> Callable[[], object]:
    from opacus import GradSampleModule
    peer = copy.deepcopy(model)
    for m in peer.modules():  # Opacus captures activations in train mode only
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    gsm = GradSampleModule(peer.train(), batch_first=True, loss_reduction="sum")
    params = [p for p in gsm.parameters() if p.requires_grad]
    Vs = [v.reshape(V.shape[0], *p.shape) for v, p in
          zip(V.split([p.numel() for p in params], dim=1), params)]

    def opacus_run():
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
        gs = [p.grad_sample.reshape(x.shape[0], -1) for p in params]
        sq = sum(g.pow(2).sum(1) for g in gs)
        dots = sum(g @ v.reshape(V.shape[0], -1).T for g, v in zip(gs, Vs))
        del gs
        gsm.zero_grad(set_to_none=True)   # drops .grad and .grad_sample
        return sq, dots
    return opacus_run


def _backpack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor) -> Callable[[], object]:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad
    bp_model = extend(copy.deepcopy(model))
    bp_loss = extend(nn.CrossEntropyLoss(reduction="sum"))

    def backpack_run():
        with backpack(BatchL2Grad()):
            bp_loss(bp_model(x), y).backward()
        sq = sum(p.batch_l2 for p in bp_model.parameters())
        bp_model.zero_grad(set_to_none=True)
        return sq
    return backpack_run


FLOORS = {"ghost_k0": 2 / 3, "ghost_k2": (2 + K_REFS) / 3}


def results_options(p: argparse.ArgumentParser) -> None:
    """Every bench script's ``--json FILE`` and ``--overwrite``."""
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as a JSON report")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier results file (a gradscore JSON report only)")


def parsed(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """A bench script's arguments: ``p``'s and :func:`results_options`', parsed from ``argv``,
    with ``--json`` checked by :func:`claim_results` before anything is timed."""
    results_options(p)
    args = p.parse_args(argv)
    claim_results(args)
    return args


def claim_results(args: argparse.Namespace) -> None:
    """Check that ``args.json`` may be written (see :func:`gradscore.io.outputs.claim`), before
    anything is timed, not after."""
    if args.json:
        claim(args.json, "json", overwrite=args.overwrite)


def run_script(main: Callable[[list[str]], object]) -> None:
    """A bench script's ``__main__``: ``main(sys.argv[1:])``, with a gradscore error (a results
    file that may not be written) or Ctrl-C as one line and exit code 2 or 130, as in
    gradscore's own commands."""
    from gradscore.cli import run_and_report

    def call(argv: list[str]) -> int:
        code = main(argv)
        return code if isinstance(code, int) else 0
    sys.exit(run_and_report("bench", call, sys.argv[1:]))


def device_name(device: str = "cpu") -> str:
    """The name of the machine's GPU (``device`` "cuda") or CPU, for a results file."""
    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())


def write_results(path: str | Path, result: dict, indent: int = 1) -> None:
    """``result`` as a gradscore JSON report (its ``gradscore_version`` lets a rerun replace
    it with ``--overwrite``), standard JSON (an undefined figure as null), written atomically;
    claim the path before timing anything."""
    atomic_json(path, {**result, "gradscore_version": __version__}, indent=indent, default=str)


def saved(args: argparse.Namespace, result: dict) -> dict:
    """``result``, written to ``args.json`` (if given; indented, its path printed)."""
    if args.json:
        write_results(args.json, result, indent=2)
        print(f"-> {args.json}")
    return result


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Best wall time in seconds of ``repeats`` calls of ``fn`` (``sync`` waits for the device)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def pair_ratios(fn: Callable[[], object], plain: Callable[[], object], repeats: int,
                sync: Callable[[], None] = lambda: None, *, between: Callable[[], object] | None = None,
                alternate: bool = False) -> tuple[list[float], float, float]:
    """``fn`` and ``plain`` called alternately ``repeats`` times each: the ratio of each
    pair's wall times (neighbours in time, so the machine speeding up or slowing down moves
    both), and the best time of each. ``between``: called untimed before each pair (other
    work, as a real program does between the two); ``alternate``: every other pair runs
    ``fn`` first, so neither side always finds the caches the other left."""
    ratios, best_fn, best_plain = [], float("inf"), float("inf")
    for i in range(repeats):
        if between is not None:
            between()
        if alternate and i % 2:
            t_fn, t_plain = best_time(fn, 1, sync), best_time(plain, 1, sync)
        else:
            t_plain, t_fn = best_time(plain, 1, sync), best_time(fn, 1, sync)
        ratios.append(t_fn / t_plain)
        best_fn, best_plain = min(best_fn, t_fn), min(best_plain, t_plain)
    return ratios, best_fn, best_plain


def paired_times(fn: Callable[[], object], plain: Callable[[], object], repeats: int,
                 sync: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Best wall times of ``fn`` and of ``plain``, called alternately ``repeats`` times each,
    so that their ratio is not moved by the machine speeding up or slowing down between
    one method and the next."""
    _, best_fn, best_plain = pair_ratios(fn, plain, repeats, sync)
    return best_fn, best_plain


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """torch's count for a convolution's backward, with the weight gradient's divided by
    ``groups``: torch counts that part as a dense convolution, ``groups`` times too many
    flops for a depthwise conv, and b·groups times for the ghost conv rule's grouped form."""
    from torch.utils.flop_counter import conv_backward_flop
    on_shapes = getattr(conv_backward_flop, "__wrapped__", conv_backward_flop)   # torch's, unwrapped

    def count(mask: list[bool]) -> int:
        return on_shapes(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                         output_padding, groups, mask, out_shape)
    return count([output_mask[0], False, False]) + count([False, output_mask[1], False]) // groups


def counted_flops(fn: Callable[[], object]) -> int:
    """Matmul and convolution flops of one call of ``fn`` (``torch.utils.flop_counter``,
    with grouped convolutions' weight gradients counted per group), plus those of the
    ghost conv rule's sparse numba kernel, which torch does not see (the kernel counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    from gradscore.kernels.conv_sparse_numba import counting_flops
    with counting_flops() as sparse, FlopCounterMode(
            display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}) as counter:
        fn()
    return counter.get_total_flops() + sparse[0]


def _inputs(case: Case, model: nn.Module, B: int, device: str) -> tuple[Inputs, torch.Tensor, torch.Tensor]:
    """x, y and K_REFS reference vectors V (K, P) for a batch of B."""
    x = case.make_x(B)
    if case.loss == "causal_lm":
        y = x["input_ids"]
    else:
        with torch.no_grad():
            n_out = call_model(model, take(x, 0)).shape[-1]
        y = torch.randint(0, n_out, (B,), device=device)
    P = sum(p.numel() for p in model.parameters())
    return x, y, torch.randn(K_REFS, P, device=device)


def peak_memory(name: str, B: int, device: str) -> dict[str, int | None]:
    """{method: peak bytes of one call after a warm-up} for one model and batch size."""
    case = model_cases(device)[name]
    torch.manual_seed(0)
    model = case.factory().to(device).eval()
    memory, peaks = _Memory(device), {}
    for method, fn in _methods(model, *_inputs(case, model, B, device), case.loss).items():
        try:
            fn()
            with memory.measure() as mem:
                fn()
            peaks[method] = mem.get("peak_bytes")
        except Exception:  # noqa: BLE001 - a peer that does not support a layer
            peaks[method] = None
    return peaks


def measured_child(code: str) -> str:
    """Run Python ``code`` in a child process whose glibc mmap threshold is fixed at
    ``MMAP_THRESHOLD``, so that an RSS peak measured there follows live tensors; return
    its last line of output. RuntimeError, with the child's last error line, if it fails."""
    root = str(Path(__file__).resolve().parents[1])   # so the child imports bench.engines too
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1])
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError("the child printed nothing")
    return lines[-1]


def _peaks(name: str, B: int, device: str, echo: Callable[[str], None]) -> dict[str, int | None]:
    """:func:`peak_memory`, on CPU in a :func:`measured_child`; {} (and a line saying why)
    if that child fails."""
    if device == "cuda":
        return peak_memory(name, B, device)
    code = ("import json, sys; from bench.engines import peak_memory; "
            f"print(json.dumps(peak_memory({name!r}, {B}, {device!r})))")
    try:
        return json.loads(measured_child(code))
    except RuntimeError as e:
        echo(f"  peak memory n/a: the measuring child failed: {e}")
        return {}


def run_bench(batches: tuple[int, ...] = (64, 256), repeats: int = 3, device: str | None = None,
              models: tuple[str, ...] | None = None, echo: Callable[[str], None] = print) -> dict:
    """Time and measure every method on every model and batch; return the results dict."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cases = model_cases(device)
    results = []
    for name in models or tuple(cases):
        case = cases[name]
        torch.manual_seed(0)
        model = case.factory().to(device).eval()
        P = sum(p.numel() for p in model.parameters())
        for B in case.batches or batches:
            x, y, V = _inputs(case, model, B, device)
            peaks = _peaks(name, B, device, echo)
            base = None
            echo(f"\n{name} (P={P:,}), batch {B}:")
            echo(f"  {'method':<12} {'time':>9} {'x plain':>8} {'floor':>6} {'flops':>6} {'peak mem':>10} {'x plain':>8}")
            methods = _methods(model, x, y, V, case.loss)
            for method, fn in methods.items():
                try:
                    fn()
                    once = best_time(fn, 1, sync)
                    # fast calls get more repeats (about 0.3 s worth, at most 50): fewer are noise;
                    # plain runs between them, and the ratio is to those paired plain runs
                    best, paired = paired_times(fn, methods["plain"], max(repeats, min(50, int(0.3 / max(once, 1e-6)))), sync)
                except Exception as e:  # noqa: BLE001 - a peer that does not support a layer
                    echo(f"  {method:<12} n/a ({type(e).__name__}: {str(e).splitlines()[0][:60]})")
                    results.append({"model": name, "batch": B, "method": method, "error": str(e)[:200]})
                    continue
                mem = {"peak_bytes": peaks.get(method)}
                if method == "plain":
                    base = {"seconds": best, "peak_bytes": mem["peak_bytes"], "flops": counted_flops(fn)}
                # torch's flop counter does not see inside the fused recurrent kernels: no ratio there
                countable = not any(isinstance(m, nn.RNNBase) for m in model.modules())
                flops = (counted_flops(fn) / base["flops"] if method.startswith("ghost") and base["flops"]
                         and countable else None)
                row = {"model": name, "params": P, "batch": B, "method": method, "seconds": best,
                       "plain_seconds_paired": paired,
                       "ratio_to_plain": best / paired, "floor": FLOORS.get(method),
                       "flops_ratio_to_plain": flops, "peak_bytes": mem.get("peak_bytes")}
                if mem.get("peak_bytes") is not None and base["peak_bytes"]:
                    row["peak_ratio_to_plain"] = mem["peak_bytes"] / base["peak_bytes"]
                results.append(row)
                floor = f"{row['floor']:.2f}" if row["floor"] else ""
                flops = f"{flops:.2f}" if flops else ""
                peak = f"{row['peak_bytes'] / 2**20:.1f} MB" if row["peak_bytes"] is not None else "n/a"
                echo(f"  {method:<12} {best * 1e3:>7.1f}ms {row['ratio_to_plain']:>7.2f}x {floor:>6} {flops:>6} "
                     f"{peak:>10} {row.get('peak_ratio_to_plain', float('nan')):>7.2f}x")
    dev_name = device_name(device)
    return {"device": dev_name, "device_type": device, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "k_refs": K_REFS, "repeats": repeats, "rows": results}


def end_to_end(epochs: int = 3, repeats: int = 3, echo: Callable[[str], None] = print) -> dict:
    """Examples x checkpoints per second of ``gradscore.score`` on the demo setup, per engine."""
    from gradscore.pipeline import score
    from gradscore.io.datasets import save_dataset
    from gradscore.demos.digits import make_digits, train
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_digits()
        path = save_dataset(root / "train.h5", data["x_train"], data["y_train"], noisy=data["noisy"])
        train(data, root / "ckpts", epochs=epochs)
        work = len(data["y_train"]) * epochs
        res: dict = {"examples_x_checkpoints": work}
        echo(f"\nend to end: `run` on the demo digits CNN, {work} examples x checkpoints")
        for label, opts in [("ghost", {"engine": "ghost"}), ("vmap", {"engine": "vmap"}),
                            ("loop", {"engine": "loop"}), ("forward_only_el2n", {"scores": ("el2n", "loss")})]:
            best = best_time(lambda: score(root / "ckpts", path, out=root / f"{label}.h5",
                                           overwrite=True, progress=False, **opts), repeats)
            res[label] = {"seconds": best, "examples_per_second": work / best}
            echo(f"  {label:<18} {work / best:>9.0f} ex/s  ({best:.2f}s)")
        return res


def pds_timing(steps: int = 10, repeats: int = 2, echo: Callable[[str], None] = print) -> dict:
    """On the PDS demo setup: `costate` time against one epoch of plain training over the
    proxy set, and the scoring pass with K = 2 references (pds) against K = 0 (grand)."""
    from gradscore.pipeline import score
    from gradscore.scores.costate import CostateConfig, compute_costate
    from gradscore.io.datasets import load_dataset, save_dataset
    from gradscore.demos.digits import make_digits, train_full_batch
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_digits()
        proxy = save_dataset(root / "proxy.h5", data["x_train"], data["y_train"])
        target = save_dataset(root / "target.h5", data["x_test"], data["y_test"])
        train_full_batch(data, root / "ckpts", steps=steps)
        model = digits_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ds = load_dataset(proxy)

        def epoch():
            for a in range(0, len(ds), 256):
                x, y = ds.read(a, min(len(ds), a + 256))
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        t_epoch = best_time(epoch, repeats)
        cfg = CostateConfig(str(root / "ckpts"), str(proxy), str(target))
        t_cost = best_time(lambda: compute_costate(cfg, root / "c.h5", overwrite=True, progress=False), repeats)
        t_k0 = best_time(lambda: score(root / "ckpts", proxy, out=root / "k0.h5", scores=("grand",),
                                       overwrite=True, progress=False), repeats)
        t_k2 = best_time(lambda: score(root / "ckpts", proxy, out=root / "k2.h5", target=target,
                                       costate=str(root / "c.h5"), scores=("pds", "grand"),
                                       overwrite=True, progress=False), repeats)
        n_ckpt = steps + 1
        res = {"checkpoints": n_ckpt, "proxy_examples": len(ds), "plain_epoch_seconds": t_epoch,
               "costate_seconds": t_cost, "costate_over_epoch_per_checkpoint": t_cost / n_ckpt / t_epoch,
               "score_k0_seconds": t_k0, "score_k2_seconds": t_k2, "score_k2_over_k0": t_k2 / t_k0}
        echo(f"\nPDS on the demo setup ({n_ckpt} checkpoints, {len(ds)} proxy examples):")
        echo(f"  costate: {t_cost:.2f}s = {res['costate_over_epoch_per_checkpoint']:.1f} plain epochs per checkpoint "
             f"(one plain epoch: {t_epoch * 1e3:.0f}ms)")
        echo(f"  scoring pass K=2 (pds) {t_k2:.2f}s vs K=0 (grand) {t_k0:.2f}s: {res['score_k2_over_k0']:.2f}x")
        return res


def build_parser() -> argparse.ArgumentParser:
    """The options of `python -m bench.engines` (and of `gradscore bench`)."""
    p = argparse.ArgumentParser(prog="gradscore bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Time loop, vmap (torch and fused reduction) and ghost engines, "
                 "and Opacus/BackPACK when installed, as ratios to one plain batched "
                 "forward+backward, with peak memory, on an MLP, the demo CNN and its "
                 "128-channel version, a CNN on 32x32 inputs, a small transformer and (with "
                 "transformers installed) a small GPT-2; then `run` throughput and PDS "
                 "timings on the demo setup.")
    p.add_argument("--batches", default="64,256", help="comma-separated batch sizes")
    p.add_argument("--models", default=None, help="comma-separated subset of the models (default: all of "
                   "mlp_784_1024_1024, digits_cnn, digits_cnn_c128, cifar_cnn_dw, transformer_d128_T64, "
                   "resnet_bn_20k, torch_encoder_d64_T32, lstm_d64_T32, gru_attention_d64_T32, gpt2_d64_T128, "
                   "opt_d64_T128, mpnet_d64_T128)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--epochs", type=int, default=3, help="demo checkpoints for the end-to-end part")
    p.add_argument("--no-end-to-end", dest="end_to_end", action="store_false",
                   help="skip the end-to-end `run` throughput and the PDS timings (default: run them)")
    results_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; bad options are one line and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError as e:
        raise GradscoreError(f"--batches: '{args.batches}' is not a comma-separated list of integers") from e
    models = tuple(args.models.split(",")) if args.models else None
    unknown = set(models or ()) - set(model_cases("cpu"))
    if unknown:
        raise GradscoreError(f"--models: unknown {', '.join(sorted(unknown))}; choose from "
                             f"{', '.join(model_cases('cpu'))}")
    claim_results(args)
    result = run_bench(batches, args.repeats, device=args.device, models=models)
    if args.end_to_end:
        result["end_to_end"] = end_to_end(args.epochs, args.repeats)
        result["pds"] = pds_timing(repeats=args.repeats)
    saved(args, result)
    return 0


if __name__ == "__main__":
    run_script(main)
