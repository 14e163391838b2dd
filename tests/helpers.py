"""What several test files share: a tiny training run made with the public API, a
SIGKILL helper, and the ghost engine's model cases with their comparison to the loop."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import re
import struct
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradscore as gs
from gradscore.batch import move
from gradscore.engines.workarounds import torch_workarounds
from gradscore.demos.models import digits_cnn, mlp, tiny_transformer

MLP_KWARGS = {"d_in": 12, "hidden": 8, "n_classes": 4, "depth": 1}


def make_run(root: Path, *, n: int = 90, n_ckpts: int = 3, seed: int = 0,
             kwargs: dict | None = None) -> tuple[Path, Path]:
    """Train an MLP a few SGD steps, saving a checkpoint after each; write a dataset."""
    kwargs = dict(MLP_KWARGS if kwargs is None else kwargs)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, kwargs["d_in"], generator=g)
    y = torch.randint(0, kwargs["n_classes"], (n,), generator=g)
    noisy = np.zeros(n, dtype=bool)
    noisy[::7] = True
    data = gs.save_dataset(root / "train.h5", x.numpy(), y.numpy(),
                           ids=np.arange(100, 100 + n), noisy=noisy)
    torch.manual_seed(seed)
    model = mlp(**kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with gs.CheckpointWriter(root / "ckpts", model_factory="gradscore.demos.models:mlp",
                             model_kwargs=kwargs, loss="cross_entropy") as w:
        for t in range(n_ckpts):
            w.save(model, step=t, lr=0.5, epoch=t)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return root / "ckpts", data


def assert_same_scores_file(a, b) -> None:
    """Equal scores files, bit for bit: every per-checkpoint row, score and checkpoint field."""
    ra, rb = gs.load_scores(a), gs.load_scores(b)
    for group in ("per_checkpoint", "scores", "checkpoints"):
        assert sorted(ra[group]) == sorted(rb[group]), group
        for k in ra[group]:
            np.testing.assert_array_equal(ra[group][k], rb[group][k], err_msg=f"{group}/{k}")
    np.testing.assert_array_equal(ra["ids"], rb["ids"])
    assert ra["config"] == rb["config"]


def per_checkpoint_rows_read(monkeypatch) -> list[str]:
    """The names of the (T, N) rows of scores files read from now on (``io.store.read_dataset``
    calls that read, not those that only open a dataset), as a list that fills."""
    from gradscore.io import store
    read, plain = [], store.read_dataset

    def spy(f, path, name, read_it=True):
        if read_it and name.startswith("per_checkpoint/"):
            read.append(name.split("/", 1)[1])
        return plain(f, path, name, read_it)
    monkeypatch.setattr(store, "read_dataset", spy)
    return read


def per_checkpoint_reads(monkeypatch) -> list[tuple[str, tuple[int, ...]]]:
    """(metric, shape read) for every read of a scores file's (T, N) per-checkpoint rows from
    now on, whole or in part: (N,) is one checkpoint's row, (T, N) all of them."""
    read, plain = [], h5py.Dataset.__getitem__

    def getitem(self, key):
        values = plain(self, key)
        if self.name.startswith("/per_checkpoint/"):
            read.append((self.name.split("/")[-1], np.shape(values)))
        return values
    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
    return read


def progress_bars(monkeypatch, module) -> list:
    """The tqdm bars ``module`` makes from now on, as a list that fills: each with ``total``,
    ``disable`` (tqdm's own: None shows it on a terminal, True never) and ``done``, what it
    was advanced by (``update(n)``, or the items iterated through it)."""
    bars = []

    class Bar:
        def __init__(self, iterable=None, total=None, disable=False, **kwargs):
            self.iterable, self.total, self.disable, self.done = iterable, total, disable, 0
            bars.append(self)

        def __iter__(self):
            for item in self.iterable:
                self.done += 1
                yield item

        def update(self, n=1):
            self.done += n

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(module, "tqdm", Bar)
    return bars


def flip_a_byte_of(path, name):
    """Flip one byte inside the stored data of dataset ``name`` of the HDF5 file ``path``."""
    with h5py.File(path, "r") as f:
        d = f[name]
        offset = d.id.get_chunk_info(0).byte_offset if d.chunks else d.id.get_offset()
        nbytes = d.id.get_chunk_info(0).size if d.chunks else d.id.get_storage_size()
    raw = bytearray(path.read_bytes())
    raw[offset + nbytes // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def numeric_datasets(path) -> list[str]:
    """Names of the HDF5 file's non-empty numeric datasets."""
    found = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.size
                     and obj.dtype.kind in "biuf" else None)
    return found


def unchecked_datasets(path) -> list[str]:
    """Names of the HDF5 file's datasets whose stored bytes no checksum covers: not empty,
    neither fletcher32 (chunks) nor compact (inside the checksummed object header)."""
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.size and not obj.fletcher32 and (
                obj.id.get_create_plist().get_layout() != h5py.h5d.COMPACT):
            found.append(name)
    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return found


def global_heap(raw: bytes) -> set[int]:
    """Offsets of HDF5's global heap collections ("GCOL", length at +8): where h5py keeps
    variable-length strings, which no HDF5 checksum covers, and where a damaged length
    makes HDF5 itself loop forever. Files gradscore writes have none (fixed-length text)."""
    return {i for m in re.finditer(b"GCOL", raw)
            for i in range(m.start(), m.start() + struct.unpack_from("<Q", raw, m.start() + 8)[0])}


def sigkill_when(cmd: list[str], ready, timeout: float = 120.0) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` is true; fail if it ends first."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    assert proc.poll() is None, f"{' '.join(map(str, cmd))} ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@contextlib.contextmanager
def read_only_folder(path: Path, fill: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """``path``, a folder no file can be created in, holding what ``fill(path)`` wrote: a tmpfs
    mounted there, then made read-only (root, which no chmod stops, may mount), else chmod 500;
    a pytest skip where neither holds."""
    import shutil
    import subprocess
    import pytest
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        if fill is not None:
            fill(path)
        if mounted:
            assert subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True).returncode == 0
        else:
            os.chmod(path, 0o500)
            if os.access(path, os.W_OK):
                pytest.skip("cannot make a read-only folder here")
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], capture_output=True)
        else:
            os.chmod(path, 0o700)
            shutil.rmtree(path, ignore_errors=True)


def python_child(code: str, timeout: float = 3000):
    """``python -c code`` in a child process, with tests/ importable (``helpers``, test
    modules): for checks whose failure may be a crash inside torch, which then fails one
    test rather than the session. Returns the CompletedProcess (text stdout and stderr)."""
    import subprocess
    import sys
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


# the ghost engine's model cases, compared with the per-example loop in float64


class NoGradPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x)
        return self.b(torch.tanh(h))


class EvalStateInPlace(nn.Module):
    """In eval mode, updates in place a tensor its backward needs, as Hugging Face's RWKV
    updates its cached state (``config.use_cache``): a backward in eval mode fails."""

    def __init__(self, use_cache: bool = True):
        super().__init__()
        self.a, self.b, self.use_cache = nn.Linear(6, 5), nn.Linear(5, 3), use_cache

    def forward(self, x):
        h = torch.sigmoid(self.a(x))   # sigmoid's backward reads its output
        if not self.training and self.use_cache:
            h.mul_(1.0)
        return self.b(h)


class SharedTwice(nn.Module):
    """One Linear applied twice (tied weights) plus a head."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class SharedBias(nn.Module):
    """Two Linear layers that share their bias (not their weights)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        self.b.bias = self.a.bias

    def forward(self, x):
        return self.a(x) * torch.tanh(self.b(x))


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


def tiny_gpt2(**config) -> nn.Module:
    """A Hugging Face GPT-2 from a config (no download), dropout off, eager attention,
    float64; ``config`` overrides the sizes."""
    from gradscore.integrations.hf import from_config
    cfg = {"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 31, "n_positions": 16,
           "bos_token_id": 0, "eos_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **config}
    return from_config(cfg, attn_implementation="eager").double()


class Reversed(nn.Module):
    """A Linear applied to the batch in reverse order, reversed back after it: its row b
    is another example's, which the layout's order check must see."""

    def __init__(self, d_in: int = 5, hidden: int = 4, classes: int = 3):
        super().__init__()
        self.lin, self.head = nn.Linear(d_in, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x.flip(0)).flip(0)))


def cell_steps(cell: nn.RNNCellBase, x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, object]:
    """``cell`` over the steps of x along ``dim``, its state fed back from none: the hidden
    states stacked along ``dim``, and the last state (h, or the LSTM's (h, c))."""
    state, hs = None, []
    for x_t in x.unbind(dim):
        state = cell(x_t, state)
        hs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(hs, dim), state


class CellLoop(nn.Module):
    """A recurrent cell (``kind``) over x (B, 10) read as 5 steps of 2 features, a linear
    head on the mean hidden state (and the LSTM's last cell state)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.cell = {"RNN": nn.RNNCell, "GRU": nn.GRUCell, "LSTM": nn.LSTMCell}[kind](2, 6)
        self.head = nn.Linear(12 if kind == "LSTM" else 6, 4)

    def forward(self, x):
        hs, state = cell_steps(self.cell, x.unflatten(1, (5, 2)))
        h = hs.mean(1)
        return self.head(torch.cat([h, state[1]], 1) if isinstance(state, tuple) else h)


class OwnPositions(nn.Embedding):
    """A learned position embedding with a forward of its own, as OPT's and BioGPT's: the
    positions it looks up from ``mask`` (B, T), plus an offset of 2. ``kind``: "mask" (the
    positions counted along the mask, OPT's), "arange" ((1, T): one row for the batch,
    BioGPT's), "expand" ((B, T) from one row, BART's, which reads ``self.weight.device``);
    the rule's look-alikes: "scaled" (rows
    times 2), "twice" (two lookups), "no_padding" (F.embedding without its padding_idx),
    "detached" (no gradient in the weight); "twice_later" (one lookup up to 4 steps, two after)."""

    def __init__(self, kind: str, steps: int, d: int):
        super().__init__(steps + 3, d, padding_idx=0 if kind == "no_padding" else None)
        self.kind = kind

    def forward(self, mask, position_ids=None):
        if self.kind in ("arange", "expand"):   # "expand": BART's, on the weight's device (a read of it)
            position_ids = torch.arange(mask.shape[1], device=self.weight.device)[None]
            position_ids = position_ids.expand(len(mask), -1) if self.kind == "expand" else position_ids
        else:
            position_ids = (mask.cumsum(1) * mask - 1).long()
        ids = position_ids + 2
        if self.kind == "scaled":
            return super().forward(ids) * 2
        if self.kind == "twice" or (self.kind == "twice_later" and mask.shape[1] > 4):
            return super().forward(ids) + super().forward(ids - 1)
        if self.kind == "no_padding":
            return F.embedding(ids, self.weight)
        if self.kind == "detached":
            return F.embedding(ids, self.weight.detach())
        return super().forward(ids)


class PositionsNet(nn.Module):
    """Token embeddings (11 ids; 0, masked, is padding) plus :class:`OwnPositions` for up to
    ``most`` steps, of width d, tanh, a head on the mean; ``steps``: the tokens read."""

    def __init__(self, kind: str, steps: int, most: int = 4, d: int = 5):
        super().__init__()
        self.tokens, self.positions, self.steps = nn.Embedding(11, d), OwnPositions(kind, most, d), steps
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        ids = ids[:, :self.steps]
        mask = (ids != 0).long()
        return self.head(torch.tanh(self.tokens(ids) + self.positions(mask, position_ids=None)).mean(1))


class NormIntoRNN(nn.Module):
    """InstanceNorm2d whose output a batch-first RNN reads as a sequence: the RNN's input
    gradient comes back laid out (T, B, C), a layout torch's instance-norm backward
    mishandles on CPU (torch 2.13: a wrong input gradient for B > 1)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True)
        self.rnn, self.head = nn.RNN(4, 3, batch_first=True), nn.Linear(3, 3)

    def forward(self, x):
        out, _ = self.rnn(self.norm(self.conv(x)).flatten(2).transpose(1, 2))
        return self.head(out.mean(1))


class ChannelsLastNorm(nn.Module):
    """conv -> norm -> conv: in channels_last, the norm's output gradient comes back
    channels_last, which torch's CPU InstanceNorm backward gets wrong for one example;
    with ``group=True`` a GroupNorm, whose CPU backward of a channels_last input crashes
    the process when the input's gradient is not asked for (only later parameters scored).
    ``functional``: the norm's forward is ``F.instance_norm`` / ``F.group_norm`` called with
    its parameters, as style-transfer (AdaIN) and diffusion code writes it."""

    def __init__(self, affine: bool, group: bool = False, channels: int = 3, functional: bool = False):
        super().__init__()
        C = channels   # 1: channels_last strides that also pass as contiguous
        norm = nn.GroupNorm(C, C, affine=affine) if group else nn.InstanceNorm2d(C, affine=affine)
        self.conv, self.norm, self.functional = nn.Conv2d(2, C, 3, padding=1), norm, functional
        self.conv2, self.head = nn.Conv2d(C, 2, 3, padding=1), nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        h, n = self.conv(x), self.norm
        if not self.functional:
            h = n(h)
        elif isinstance(n, nn.GroupNorm):
            h = F.group_norm(h, n.num_groups, n.weight, n.bias, n.eps)
        else:
            h = F.instance_norm(h, weight=n.weight, bias=n.bias, eps=n.eps)
        return self.head(torch.tanh(self.conv2(h)).flatten(1))


ACTS = {"none": nn.Identity, "relu_inplace": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "silu": nn.SiLU,
        "hardswish": nn.Hardswish}


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm2d, then a dropout and an activation, in a forward of its own (the
    structure of timm's BatchNormAct2d); ``act_first``: the activation before the norm,
    which the norm-act rule does not assume."""

    def __init__(self, C: int, act: str = "none", act_first: bool = False):
        super().__init__(C)
        self.act_first, self.drop, self.act = act_first, nn.Identity(), ACTS[act]()

    def forward(self, x):
        if self.act_first:
            x = self.act(x)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return x if self.act_first else self.act(self.drop(x))


class GroupNormAct(nn.GroupNorm):
    """F.group_norm, a dropout of p = 0 and an activation (timm's GroupNormAct's structure)."""

    def __init__(self, C: int, groups: int, act: str = "none"):
        super().__init__(groups, C)
        self.drop, self.act = nn.Dropout(0.0), ACTS[act]()

    def forward(self, x):
        return self.act(self.drop(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)))


class GroupNormOne(nn.GroupNorm):
    """One group, in a forward of its own (timm's GroupNorm1)."""

    def __init__(self, C: int):
        super().__init__(1, C)

    def forward(self, x):
        return F.group_norm(x, 1, self.weight, self.bias, self.eps)


class LayerNormAct2d(nn.LayerNorm):
    """A LayerNorm over the channels of (B, C, H, W) (timm's LayerNorm2d), then an
    activation; ``over_last``: over the last dimension despite its name (not what the
    rule assumes of a ``…2d``)."""

    def __init__(self, C: int, act: str = "none", over_last: bool = False):
        super().__init__(C)
        self.over_last, self.act = over_last, ACTS[act]()

    def forward(self, x):
        if self.over_last:
            return self.act(F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps))
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class LayerNormAct(nn.LayerNorm):
    """A LayerNorm over the last dimension, then an activation (timm's LayerNormAct)."""

    def __init__(self, D: int, act: str = "none", bias: bool = True, one_plus: bool = False):
        super().__init__(D, bias=bias)
        self.act, self.one_plus = ACTS[act](), one_plus

    def forward(self, x):
        weight = self.weight + 1 if self.one_plus else self.weight   # Nemotron's LayerNorm1P: (1 + γ)
        return self.act(F.layer_norm(x, self.normalized_shape, weight, self.bias, self.eps))


class NormActNet(nn.Module):
    """A norm subclass of :data:`NORM_ACT_KINDS` between a layer and a head. Images (B, 2, 3, 4)
    through a 3x3 conv to 4 channels (W = C, so a LayerNorm over the last dimension fits
    too); "ln": sequences (B, T, 4) through a Linear, in ``layout`` "batch", "seq_first"
    (transposed inside) or "TB" (T = B = 3). Norm weights and BatchNorm statistics drawn."""

    def __init__(self, kind: str, act: str = "none", layout: str = "batch", C: int = 4):
        super().__init__()
        self.kind, self.layout = kind, layout
        self.norm = {"bn": lambda: BatchNormAct(C, act), "bn_act_first": lambda: BatchNormAct(C, act, act_first=True),
                     "gn": lambda: GroupNormAct(C, 2, act), "gn1": lambda: GroupNormOne(C),
                     "ln2d": lambda: LayerNormAct2d(C, act), "ln2d_last": lambda: LayerNormAct2d(C, act, over_last=True),
                     "ln": lambda: LayerNormAct(C, act), "ln_nobias": lambda: LayerNormAct(C, act, bias=False),
                     "ln1p": lambda: LayerNormAct(C, act, one_plus=True)}[kind]()
        self.pre = nn.Linear(C, C) if kind.startswith("ln") and not kind.startswith("ln2d") else nn.Conv2d(2, C, 3, padding=1)
        self.head = nn.Linear(C if isinstance(self.pre, nn.Linear) else C * 12, 3)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            self.norm.weight.copy_(torch.rand(C, generator=g) + 0.5)
            if self.norm.bias is not None:
                self.norm.bias.copy_(torch.rand(C, generator=g) - 0.5)
            if isinstance(self.norm, nn.BatchNorm2d):
                self.norm.running_mean.copy_(torch.rand(C, generator=g) - 0.5)
                self.norm.running_var.copy_(torch.rand(C, generator=g) + 0.5)

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's input shape."""
        if isinstance(self.pre, nn.Conv2d):
            return (2, 3, 4)
        return (3, 4)

    def forward(self, x):
        if isinstance(self.pre, nn.Conv2d):
            return self.head(self.norm(self.pre(x)).flatten(1))
        seq_first = self.layout == "seq_first"
        h = self.norm(self.pre(x.transpose(0, 1) if seq_first else x))
        return self.head(h.mean(0 if seq_first else 1))


class LayerScale(nn.Module):
    """x ⊙ γ over the last dimension (timm's LayerScale); ``inplace``: ``x.mul_(γ)``;
    ``squared``: x² ⊙ γ (not a layer scale)."""

    def __init__(self, C: int, inplace: bool = False, squared: bool = False):
        super().__init__()
        self.inplace, self.squared = inplace, squared
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, C))

    def forward(self, x):
        if self.squared:
            return x * x * self.gamma
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class LayerScale2d(nn.Module):
    """γ per channel of (B, C, H, W) (timm's LayerScale2d)."""

    def __init__(self, C: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, C))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class ShapedScale(nn.Module):
    """``scale`` viewed as its ``shape`` (MetaFormer's Scale: (C, 1, 1) for NCHW, else (C,))."""

    def __init__(self, C: int, nchw: bool):
        super().__init__()
        self.shape = (C, 1, 1) if nchw else (C,)
        self.scale = nn.Parameter(torch.linspace(-1.0, 1.5, C))

    def forward(self, x):
        return x * self.scale.view(self.shape)


class ExpertsNet(nn.Module):
    """A mixture of experts as Hugging Face's MoE models call it: a router (Linear) scores 4
    experts per row, the top 2 weights normalized, one of Hugging Face's experts layers on the
    rows (``kind``: "mixtral" gated, "gpt_oss" its own gate on interleaved columns, transposed
    weights with biases, "nemotron_h" ungated), then tanh and a head on the mean. ``layout``:
    "merged" (the B·T rows of (B, T, D), example by example), "flat" (one row per example),
    "T1" and "TB" (merged, T = 1 and T = B = 3), "step" (the rows steps first: the fallback),
    "twice" (the experts called on the rows and on their negation). ``impl``: the experts'
    implementation as Hugging Face's config names it ("eager", "batched_mm", "grouped_mm",
    which needs rows of a multiple of 16 bytes); ``D``, ``I``: the rows' and the experts' widths."""

    def __init__(self, kind: str, layout: str = "merged", impl: str = "eager", D: int = 5, I: int = 6):
        super().__init__()
        import importlib
        tf = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
        self.shape, E = (4, D), 4
        if kind == "mixtral":
            config, cls = tf.MixtralConfig(hidden_size=D, intermediate_size=I, num_local_experts=E), tf.MixtralExperts
        elif kind == "gpt_oss":
            config, cls = tf.GptOssConfig(hidden_size=D, intermediate_size=I, num_local_experts=E), tf.GptOssExperts
        else:
            config, cls = tf.NemotronHConfig(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E), \
                tf.NemotronHExperts
        config._experts_implementation = impl
        self.layout, self.router, self.experts, self.head = layout, nn.Linear(D, E), cls(config), nn.Linear(D, 3)
        with torch.no_grad():
            for p in self.experts.parameters():
                p.normal_(0, 0.5)

    def route(self, rows: torch.Tensor) -> torch.Tensor:
        w, index = F.softmax(self.router(rows), -1).topk(2, -1)
        return self.experts(rows, index, w / w.sum(-1, keepdim=True))

    def forward(self, x):
        B, T, D = x.shape
        if self.layout == "flat":
            return self.head(torch.tanh(self.route(x[:, 0])))
        x = x[:, :{"T1": 1, "TB": 3}.get(self.layout, T)]
        T = x.shape[1]
        if self.layout == "step":
            h = self.route(x.transpose(0, 1).reshape(T * B, D)).reshape(T, B, D).transpose(0, 1)
        else:
            rows = x.reshape(B * T, D)
            h = self.route(rows) + (self.route(-rows) if self.layout == "twice" else 0)
        return self.head(torch.tanh(h.reshape(B, T, D)).mean(1))


class FreeNet(nn.Module):
    """A ViT's start on tokens (B, T, 5): a Linear, a class token expanded and concatenated,
    a position embedding (or another parameter the forward uses directly), then a head on
    the mean token. ``kind``: how the forward uses ``pos_embed``. Taken by the
    free-parameter rule: "vit" (added after the class token), "vit_after" (before it),
    "twice" (added, then multiplied), "radd" (pos + h), "inplace" (h.add_(pos)),
    "expand_as", "torch_add" (torch.add with alpha), "scale" (h * γ, γ (1, 1, 5)), "squeeze"
    (h + pos.squeeze(0)), "rank2" (h + w, w (1, 5): broadcast over the tokens too),
    "gamma" (h * γ, γ (5,): CaiT), "reshaped" (h * γ.reshape(1, 1, -1): ConvNeXt), "cast"
    (h + pos.to(h.dtype).clone()), "addcmul" (torch.addcmul(β, γ, h) with views of (5,)
    parameters: ConvNeXt-V2's GRN), "where" (torch.where(h > 0, h, pos)); and what the
    forward makes of pos first: "index" (pos[0]), "slice" (the middle tokens of a longer
    pos), "table" (rows of a (3, 5) table picked by a buffer of ids, repeats included: a
    relative position bias), "permute" (pos stored (5, n), transposed), "repeat" (the first
    token repeated), "exp" (pos.exp()), "sigmoid" (h * pos.sigmoid()), "chain" ((2 ·
    pos[0]).tanh().flip(0)), "const" (h * (pos / c), c a buffer), "widen" (γ (5,) times a
    (n + 1, 5) buffer, its last n rows), "three" (γ (5,) times a (3, 5) buffer, repeated to
    n rows: 3 rows, as many as the tests' batches, that are not the batch's), "none_index"
    (h * γ[None, None, :], γ (5,): one indexing, three autograd nodes), "sum" (pos summed over
    the tokens), "list" (torch.stack([pos])); and made by any other op of pos alone, each
    use then running that op's backward per example: "embedding" (F.embedding of the ids
    into a (3, 5) table: T5's relative attention bias), "embedding_twice" (that, added then
    multiplied), "interpolate" (F.interpolate: BEiT's table), "cat_slices" (torch.cat of
    two slices, one scaled), "sdpa" (a (T, T) attention mask looked up in the table, for
    F.scaled_dot_product_attention of the tokens, batch first in every layout); and the
    batch's rows times it: "linear" (F.linear(h, w), w (1, 5)), "linear_bias" (F.linear(h,
    a constant, β), β (5,)), "matmul" (h @ W, W (5, 5)), "matmul_t" (torch.matmul(h, W.t())),
    "cosine" (F.linear of h and W normalized row by row: a cosine classifier), "mm"
    (torch.mm of the (B·T, 5) rows by W, k = T rows per example), "einsum"
    (torch.einsum("btd,ed->bte", h, W)), "einsum_w_first" (torch.einsum("de,...d->...e", W, h)),
    "left" (W @ hᵀ, transposed back: Mamba's time-step projection), "conv1d" (F.conv1d of the
    tokens as channels (B, 5, n) by pos (5, 1, 3) through squeeze and unsqueeze, depthwise, padded
    2, its first n outputs: Mamba's causal conv), "conv_strided" (F.conv1d by pos (5, 5, 2) with
    stride 2, averaged over the positions), "conv2d" (F.conv2d of the tokens as a one-channel
    image by pos (1, 1, 3, 3), padded 1), "train_cast" (added, after a cast of pos in training
    mode only, whose result nothing reads: eval mode, where the rule's plan is made, has one op
    fewer), "stacked" (torch.matmul of
    the rows repeated to (B, 2, n, 5) by W (1, 2, 5, 5): DeBERTa's position keys), "stacked_3d"
    (the same with W (2, 5, 5)); repeated over the batch: "tiled_bmm" (W (2, 5, 5) repeated to
    (2B, 5, 5), torch.bmm of the rows repeated twice per example by it: DeBERTa-v2's position
    keys), "tiled_t" (the same transposed),
    "tiled_add" (pos (1, n, 5) repeated to (B, n, 5), added), "tiled_reshape" (pos (1, 5, n)
    repeated, reshaped to (B, -1, n) and permuted, added: XCiT's position encoding),
    "tiled_const" (pos repeated twice, whatever the batch, then averaged: not over the
    batch, though the count is the batch's for two examples); and made of it and
    cls_token together: "cat_params" (torch.cat of pos (2,), a zero and 2 elements of
    cls_token: BEiT's q_bias, k_bias, v_bias), "mlp" (tanh(F.linear(coords, pos, cls_token)),
    coords a (1, T, 5) buffer: Swin-v2's position MLP), "mlp_inplace" (that with
    F.relu(inplace=True) for tanh); changed in place before any use: "setitem" (a copy of
    pos with one token zeroed, then added), "view_setitem" (the same through a view of the
    copy), "slice_zero" (F.linear's bias a copy of pos, (5,), with a slice zeroed by
    ``zero_()``: torchvision's Swin-v2 k bias), "read_then_inplace" (G = torch.cat of pos's
    slices, E = 2·G made, then G.relu_(), both added: E keeps the values and gradient from
    before the change). Not taken: "inplace_after_use" (F.linear(coords, pos)
    added, then doubled in place and multiplied: a change after a use), "setitem_after_use"
    (a copy of pos added, then a token of it zeroed, then multiplied), "view_before_setitem"
    (a view of the copy made, then a token of the copy zeroed, then the view added),
    "einsum_outer" (torch.einsum("btd,de->btde", h, W) summed over e: no contraction),
    "tiled_inplace" (as "tiled_bmm" of a copy of W doubled in place after the repeat),
    "conv_even_same" (F.conv1d by pos (5, 5, 2) with padding="same": one more position after
    than before), "reorder"
    (added to the batch's rows reversed; "reorder_table": rows of the table looked up by
    F.embedding), "function" (a custom autograd.Function of h and pos: its forward runs
    without gradients), "tuple" (torch.broadcast_tensors, whose result is
    a tuple), "checkpoint" (h * pos inside torch.utils.checkpoint, which would recompute it
    with pos itself), "into" (pos written into a zero tensor, then added), "batch_shaped"
    (pos times ones of shape (n, B, 5), then example 0's slice added: its shape follows the
    batch's). ``layout``: "batch", "TB" (2 tokens:
    B = 3 with the class token), "T1" (1 token), "seq_first" (tokens (T, B, 5) inside; the
    class token expanded to (1, B, 5), the embedding broadcast over T: neither is over the
    batch)."""

    TAKEN = ("vit", "vit_after", "twice", "radd", "inplace", "expand_as", "torch_add", "scale", "squeeze", "rank2",
             "gamma", "reshaped", "cast", "addcmul", "where", "index", "slice", "table", "permute", "repeat", "exp",
             "sigmoid", "chain", "const", "widen", "three", "none_index", "sum", "list", "embedding",
             "embedding_twice", "interpolate", "cat_slices", "sdpa", "linear", "linear_bias", "matmul", "matmul_t",
             "cosine", "mm", "cat_params", "mlp", "mlp_inplace", "setitem", "view_setitem", "slice_zero",
             "read_then_inplace", "einsum", "einsum_w_first", "stacked", "stacked_3d", "tiled_bmm", "tiled_t",
             "tiled_add", "tiled_reshape", "tiled_const", "left", "conv1d", "conv_strided", "conv2d", "train_cast")
    KINDS = TAKEN + ("inplace_after_use", "setitem_after_use", "view_before_setitem", "einsum_outer",
                     "tiled_inplace", "conv_even_same", "reorder", "reorder_table", "function", "tuple", "checkpoint",
                     "into", "batch_shaped")
    #: taken with the tokens sequence-first too: the use is batch first whatever the layout
    BATCH_FIRST = ("sdpa", "tiled_bmm", "tiled_t", "conv1d", "conv_strided", "conv2d")

    def __init__(self, kind: str, layout: str = "batch", D: int = 5):
        super().__init__()
        self.kind, self.layout = kind, layout
        self.T = {"TB": 2, "T1": 1}.get(layout, 4)
        seq = layout == "seq_first"
        self.pre, self.head = nn.Linear(D, D), nn.Linear(D, 3)
        self.cls_token = nn.Parameter(0.5 * torch.randn(1, 1, D))
        n = self.T + (kind != "vit_after")
        shape = ((1, D) if kind in ("linear", "rank2")
                 else (D, D) if kind in ("matmul", "matmul_t", "cosine", "mm", "einsum", "einsum_w_first",
                                       "einsum_outer", "left", "mlp", "mlp_inplace", "inplace_after_use")
                 else (2,) if kind == "cat_params"
                 else (1, 2, D, D) if kind == "stacked"
                 else (2, D, D) if kind in ("stacked_3d", "tiled_bmm", "tiled_t", "tiled_inplace")
                 else (1, D, n) if kind == "tiled_reshape"
                 else (D,) if kind in ("gamma", "reshaped", "addcmul", "widen", "three", "none_index", "linear_bias",
                                       "slice_zero")
                 else (3, D) if kind in ("table", "embedding", "embedding_twice", "sdpa", "reorder_table")
                 else (D, 1, 3) if kind == "conv1d"
                 else (D, D, 2) if kind in ("conv_strided", "conv_even_same")
                 else (1, 1, 3, 3) if kind == "conv2d"
                 else (D, n) if kind == "permute"
                 else ((n + 2, 1, D) if seq else (1, n + 2, D)) if kind == "slice"
                 else (1, 1, D) if seq or kind == "scale" else (1, n, D))
        self.pos_embed = nn.Parameter(0.5 * torch.randn(*shape))
        self.register_buffer("ids", torch.tensor([0, 2, 1, 2, 0])[:n], persistent=False)
        self.register_buffer("rel", (torch.arange(n)[:, None] - torch.arange(n)[None]) % 3, persistent=False)
        self.register_buffer("coords", torch.linspace(-1, 1, n * D).reshape(1, n, D), persistent=False)
        self.register_buffer("c", 0.5 + torch.rand((n + 1, D) if kind == "widen" else (3, D) if kind == "three"
                                                   else shape), persistent=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's input shape."""
        return (self.T, self.pre.in_features)

    def forward(self, x):
        seq = self.layout == "seq_first"
        h = self.pre(x)
        h = h.transpose(0, 1) if seq else h
        rows, tokens = (1, 0) if seq else (0, 1)
        B = h.shape[rows]
        cls = self.cls_token.expand(*((1, B, -1) if seq else (B, -1, -1)))
        pos, kind = self.pos_embed, self.kind
        if kind == "vit_after":
            return self.head(torch.tanh(torch.cat([cls, h + pos], tokens)).mean(tokens))
        h = torch.cat([cls, h], tokens)
        if kind in ("vit", "rank2"):
            h = h + pos
        elif kind in ("scale", "gamma"):
            h = h * pos
        elif kind == "twice":
            h = (h + pos) * pos
        elif kind == "radd":
            h = pos + h
        elif kind == "inplace":
            h.add_(pos)
        elif kind == "expand_as":
            h = h + pos.expand_as(h)
        elif kind == "torch_add":
            h = torch.add(h, pos, alpha=0.5)
        elif kind == "squeeze":
            h = h + pos.squeeze(0)
        elif kind == "reshaped":
            h = h.mul(pos.reshape(1, 1, -1))
        elif kind == "cast":
            h = h + pos.to(h.dtype).clone()
        elif kind == "addcmul":
            h = h + torch.addcmul(self.cls_token.view(1, 1, -1), pos.view(1, 1, -1), h)
        elif kind == "where":
            h = torch.where(h > 0, h, pos)
        elif kind == "index":
            h = h + pos[0]
        elif kind == "slice":
            h = h + pos[(slice(None),) * tokens + (slice(1, h.shape[tokens] + 1),)]
        elif kind == "table":
            h = h + pos[self.ids].unsqueeze(rows)
        elif kind == "permute":
            h = h + pos.t().unsqueeze(rows)
        elif kind == "repeat":
            times = [1, 1, 1]
            times[tokens] = h.shape[tokens]
            h = h + pos[(slice(None),) * tokens + (slice(0, 1),)].repeat(*times)
        elif kind == "sigmoid":
            h = h * pos.sigmoid()
        elif kind == "chain":
            h = h + (2 * pos[0]).tanh().flip(0)
        elif kind == "const":
            h = h * (pos / self.c)
        elif kind == "widen":
            h = h + (pos * self.c)[1:].unsqueeze(rows)
        elif kind == "three":   # (3, 5): as many rows as the tests' batches have, not the batch's
            h = h + (pos * self.c).repeat(2, 1)[:h.shape[tokens]].unsqueeze(rows)
        elif kind == "none_index":   # several autograd nodes from one op (DeBERTa's q_bias[None, None, :])
            h = h * pos[None, None, :]
        elif kind == "embedding":
            h = h + F.embedding(self.ids, pos).unsqueeze(rows)
        elif kind == "embedding_twice":
            b = F.embedding(self.ids, pos).unsqueeze(rows)
            h = (h + b) * b
        elif kind == "interpolate":
            h = h + F.interpolate(pos, size=2 * pos.shape[-1], mode="linear")[..., ::2]
        elif kind == "cat_slices":
            h = h + torch.cat([pos[..., :2], 2 * pos[..., 2:]], -1)
        elif kind == "sdpa":
            b = h.movedim(rows, 0)
            mask = F.embedding(self.rel, pos)[..., 0]
            h = h + F.scaled_dot_product_attention(b, b, b, attn_mask=mask).movedim(0, rows)
        elif kind == "sum":
            h = h + pos.sum(tokens, keepdim=True)
        elif kind == "batch_shaped":
            wide = pos.reshape(-1, 1, pos.shape[-1]) * torch.ones(h.shape[tokens], B, pos.shape[-1], dtype=h.dtype)
            h = h + wide.select(1, 0).unsqueeze(rows)
        elif kind == "linear":
            h = h + F.linear(h, pos)
        elif kind == "linear_bias":
            h = h + F.linear(h, 0.5 * torch.eye(h.shape[-1], dtype=h.dtype), pos)
        elif kind == "matmul":
            h = h + h @ pos
        elif kind == "matmul_t":
            h = h + torch.matmul(h, pos.t())
        elif kind == "cosine":
            h = h + F.linear(F.normalize(h, dim=-1), F.normalize(pos, dim=-1))
        elif kind == "mm":
            h = h + torch.mm(h.reshape(-1, h.shape[-1]), pos).reshape(h.shape)
        elif kind == "cat_params":
            h = h + torch.cat([pos, torch.zeros(1, dtype=pos.dtype), self.cls_token.view(-1)[:2]])
        elif kind == "mlp":
            h = h + torch.tanh(F.linear(self.coords, pos, self.cls_token.view(-1))).movedim(1, tokens)
        elif kind == "mlp_inplace":
            h = h + F.relu(F.linear(self.coords, pos, self.cls_token.view(-1)), inplace=True).movedim(1, tokens)
        elif kind == "inplace_after_use":
            b = F.linear(self.coords, pos).movedim(1, tokens)
            h = h + b
            b.mul_(2)
            h = h * b
        elif kind == "einsum":
            h = h + torch.einsum("btd,ed->bte", h, pos)
        elif kind in ("tiled_bmm", "tiled_t", "tiled_inplace"):
            b = h.movedim(rows, 0)
            copy = pos.clone()
            keys = (copy if kind == "tiled_inplace" else pos).repeat(B, 1, 1)
            copy.mul_(2)
            keys = keys.transpose(-1, -2) if kind == "tiled_t" else keys
            q = b.unsqueeze(1).expand(-1, 2, -1, -1).reshape(2 * B, *b.shape[1:])
            h = h + torch.bmm(q, keys).reshape(B, 2, *b.shape[1:]).mean(1).movedim(0, rows)
        elif kind == "tiled_add":
            h = h + pos.repeat(B, 1, 1).movedim(0, rows)
        elif kind == "tiled_reshape":
            h = h + pos.repeat(B, 1, 1).reshape(B, -1, pos.shape[-1]).permute(0, 2, 1).movedim(0, rows)
        elif kind == "tiled_const":
            h = h + pos.repeat(2, 1, 1).mean(0, keepdim=True)
        elif kind in ("stacked", "stacked_3d"):
            h = h + torch.matmul(h.unsqueeze(1).repeat(1, 2, 1, 1), pos).mean(1)
        elif kind == "einsum_w_first":
            h = h + torch.einsum("de,...d->...e", pos, h)
        elif kind == "einsum_outer":
            h = h + torch.einsum("btd,de->btde", h, pos).sum(-1)
        elif kind == "left":
            h = h + (pos @ h.transpose(-1, -2)).transpose(-1, -2)
        elif kind in ("conv1d", "conv_strided", "conv_even_same"):   # channels (B, 5, n), batch first in any layout
            c = h.movedim(rows, 0).transpose(1, 2)
            if kind == "conv1d":   # Mamba's causal depthwise conv: the weight through its views, the first n outputs
                c = F.conv1d(c, pos.squeeze(1).unsqueeze(1), padding=2, groups=c.shape[1])[..., :c.shape[-1]]
            else:
                c = F.conv1d(c, pos, **({"stride": 2} if kind == "conv_strided" else {"padding": "same"}))
                c = c.mean(-1, keepdim=True)
            h = h + c.transpose(1, 2).movedim(0, rows)
        elif kind == "conv2d":   # the tokens as a one-channel image (B, 1, n, 5)
            h = h + F.conv2d(h.movedim(rows, 0).unsqueeze(1), pos, padding=1).squeeze(1).movedim(0, rows)
        elif kind == "exp":
            h = h + pos.exp()
        elif kind == "train_cast":   # Mamba's: a cast in training mode only, for a fused kernel that is absent
            if self.training:
                pos.float()
            h = h + pos
        elif kind == "reorder":
            h = (h.flip(rows) + pos).flip(rows)
        elif kind == "reorder_table":   # through the backward of F.embedding
            h = (h.flip(rows) + F.embedding(self.ids, pos).unsqueeze(rows)).flip(rows)
        elif kind == "function":
            h = _Add.apply(h, pos)
        elif kind == "tuple":
            h = sum(torch.broadcast_tensors(h, pos))
        elif kind == "list":
            h = h + torch.stack([pos]).squeeze(0)
        elif kind == "checkpoint":
            h = torch.utils.checkpoint.checkpoint(torch.mul, h, pos, use_reentrant=False)
        elif kind == "setitem":
            q = pos.clone()
            q[..., 0] = 0
            h = h + q
        elif kind == "view_setitem":
            q = pos.clone()
            q.view(-1)[:2] = 0
            h = h + q
        elif kind == "slice_zero":
            q = pos.clone()
            q[1:3].zero_()
            h = h + F.linear(h, 0.5 * torch.eye(h.shape[-1], dtype=h.dtype), q)
        elif kind == "read_then_inplace":
            g = torch.cat([pos[..., :2], pos[..., 2:]], -1)
            e = 2 * g
            g.relu_()
            h = h + e + g
        elif kind == "view_before_setitem":
            q = pos.clone()
            v = q.view(-1)
            q[..., 0] = 0
            h = h + v.view(q.shape)
        elif kind == "setitem_after_use":
            q = pos.clone()
            h = h + q
            q[..., 0] = 0
            h = h * q
        elif kind == "into":
            q = torch.zeros_like(pos)
            q[...] = pos
            h = h + q
        return self.head(torch.tanh(h).mean(tokens))


class Windows(nn.Module):
    """Tokens (B, 4, 5) through a Linear, cut into windows of 2 tokens, (2B, 2, 5) (Swin's
    windows: the batch merged with the window), a bias per token of the window from a (3,
    5) table added (the free-parameter rule: k = 2 rows per example), the windows put back,
    a head on the mean token. ``order``: "example" (each example's windows together: taken)
    or "step" (the first window of every example, then the second: the fallback).
    ``kind``: "add" (windows + bias), "inplace" (windows.add_(bias)), "sdpa" (attention
    within each window, its scores + a (2, 2) bias from the table: SDPA's attn_mask)."""

    def __init__(self, order: str, kind: str = "add"):
        super().__init__()
        self.order, self.kind = order, kind
        self.lin, self.head = nn.Linear(5, 5), nn.Linear(5, 3)
        self.table = nn.Parameter(0.5 * torch.randn(3, 5))
        self.register_buffer("ids", torch.tensor([[0, 1], [2, 0]]), persistent=False)

    shape = (4, 5)

    def forward(self, x):
        h = self.lin(x)
        B = len(h)
        w = (h.reshape(B * 2, 2, 5) if self.order == "example"
             else h.reshape(B, 2, 2, 5).transpose(0, 1).reshape(2 * B, 2, 5))
        if self.kind == "sdpa":
            w = w + F.scaled_dot_product_attention(w, w, w, attn_mask=self.table[self.ids][..., 0])
        elif self.kind == "inplace":
            w = w.clone()
            w.add_(self.table[self.ids[0]])
        else:
            w = w + self.table[self.ids[0]]
        h = w.reshape(B, 4, 5) if self.order == "example" else w.reshape(2, B, 2, 5).transpose(0, 1).reshape(B, 4, 5)
        return self.head(torch.tanh(h).mean(1))


class RelativeBias(nn.Module):
    """Self-attention on tokens (B, T, 5), 2 heads of 2, whose scores get a bias per head
    and relative offset from an ``nn.Embedding`` of the (T, T) offsets: one output for the
    whole batch (T5's and MPNet's relative attention bias), then a head on the mean token.
    ``kind``: how the bias meets the scores. Taken (the Embedding's weight, by the
    free-parameter rule through the embedding's backward): "add" (scores + bias), "sdpa"
    (F.scaled_dot_product_attention's attn_mask), "masked" (a causal mask added to the
    bias first: T5's decoder), "shared" (a second attention over the first's output,
    reusing the bias: T5's blocks), "expand" (the bias expanded to (B, 2, T, T): MPNet's),
    "gqa" (SDPA's mask, with one key and value head for the two query heads, enable_gqa,
    and a scale of its own). Not taken: "matmul" (bias @ v, not a sum with the scores). ``layout``: "batch",
    "seq_first" (tokens (T, B, 5) into the projection, attention batch first), "T1" (one
    token: the Embedding returns one row), "TB" (T == B == 3)."""

    TAKEN = ("add", "sdpa", "masked", "shared", "expand", "gqa")
    KINDS = TAKEN + ("matmul",)

    def __init__(self, kind: str, layout: str = "batch"):
        super().__init__()
        self.kind, self.layout = kind, layout
        self.T = {"TB": 3, "T1": 1}.get(layout, 4)
        self.qkv, self.head = nn.Linear(5, 12), nn.Linear(4, 3)
        self.rel = nn.Embedding(5, 2)
        offsets = torch.arange(self.T)[None] - torch.arange(self.T)[:, None]
        self.register_buffer("buckets", offsets.clamp(-2, 2) + 2, persistent=False)
        self.register_buffer("causal", -1e4 * torch.ones(self.T, self.T).triu(1), persistent=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's input shape."""
        return (self.T, 5)

    def _attend(self, q, k, v, bias):
        if self.kind == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if self.kind == "gqa":
            return F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], attn_mask=bias, scale=0.3, enable_gqa=True)
        scores = q @ k.transpose(-1, -2) / 2 ** 0.5
        if self.kind == "matmul":
            return scores.softmax(-1) @ v + bias @ v
        if self.kind == "expand":
            bias = bias.expand(len(q), -1, -1, -1)
        return (scores + bias).softmax(-1) @ v

    def forward(self, x):
        seq = self.layout == "seq_first"
        q, k, v = self.qkv(x.transpose(0, 1) if seq else x).chunk(3, -1)
        if seq:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        B, T = q.shape[:2]
        q, k, v = (t.reshape(B, T, 2, 2).transpose(1, 2) for t in (q, k, v))
        bias = self.rel(self.buckets).permute(2, 0, 1).unsqueeze(0)   # (1, 2, T, T)
        if self.kind == "masked":
            bias = bias + self.causal.to(bias.dtype)
        out = self._attend(q, k, v, bias)
        if self.kind == "shared":
            out = self._attend(torch.tanh(out), out, out, bias)
        return self.head(torch.tanh(out.transpose(1, 2).reshape(B, T, 4)).mean(1))


class _Add(torch.autograd.Function):
    """a + b with broadcasting, as a custom Function: ops in its forward run without gradients."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = a.shape, b.shape
        return a + b

    @staticmethod
    def backward(ctx, g):
        return g.sum_to_size(ctx.shapes[0]), g.sum_to_size(ctx.shapes[1])


class ScaleNet(nn.Module):
    """A layer scale between a layer and a head: "last", "inplace", "squared", "shaped" and
    "prelu" (one PReLU weight) on sequences (B, 3, 4) through a Linear, in ``layout``
    "batch", "seq_first", "TB" (T = B = 3) or "flat" (B, 4); "prelu_c" (a PReLU weight per
    channel) "flat" only; "2d", "shaped_nchw" and "prelu_nchw" on images (B, 2, 3, 4)
    through a 3x3 conv to 4 channels."""

    def __init__(self, kind: str, layout: str = "batch", C: int = 4):
        super().__init__()
        self.layout = layout
        self.scale = {"last": lambda: LayerScale(C), "inplace": lambda: LayerScale(C, inplace=True),
                      "squared": lambda: LayerScale(C, squared=True), "shaped": lambda: ShapedScale(C, False),
                      "2d": lambda: LayerScale2d(C), "shaped_nchw": lambda: ShapedScale(C, True),
                      "prelu": lambda: nn.PReLU(), "prelu_c": lambda: nn.PReLU(C), "prelu_nchw": lambda: nn.PReLU(C),
                      }[kind]()
        if kind.startswith("prelu"):   # a slope per channel of its own, not torch's 0.25 everywhere
            with torch.no_grad():
                self.scale.weight.copy_(torch.linspace(0.1, 0.7, self.scale.weight.numel()))
        self.image = kind in ("2d", "shaped_nchw", "prelu_nchw")
        self.pre = nn.Conv2d(2, C, 3, padding=1) if self.image else nn.Linear(C, C)
        self.head = nn.Linear(C * 12 if self.image else C, 3)

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's input shape."""
        return (2, 3, 4) if self.image else (4,) if self.layout == "flat" else (3, 4)

    def forward(self, x):
        if self.image:
            return self.head(torch.tanh(self.scale(self.pre(x))).flatten(1))
        seq_first = self.layout == "seq_first"
        h = torch.tanh(self.scale(self.pre(x.transpose(0, 1) if seq_first else x)))
        return self.head(h if self.layout == "flat" else h.mean(0 if seq_first else 1))


class NormActCNN(nn.Module):
    """timm's layers' structure on (B, 2, 3, 4): a 3x3 conv to 4 channels, a LayerNorm over
    the channels with GELU, a GroupNorm of 2 groups with SiLU, and (``batch_norm``) a
    BatchNorm with ReLU in place and a per-channel layer scale, then a head."""

    def __init__(self, batch_norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.ln = LayerNormAct2d(4, "gelu")
        self.gn = GroupNormAct(4, 2, "silu")
        self.tail = nn.Sequential(BatchNormAct(4, "relu_inplace"), LayerScale2d(4)) if batch_norm else nn.Identity()
        self.head = nn.Linear(48, 3)

    def forward(self, x):
        return self.head(self.tail(self.gn(self.ln(self.conv(x)))).flatten(1))


class MyStdConv2d(nn.Conv2d):
    """A conv whose weight is standardized per output channel in its forward (timm's
    StdConv2d's structure; ``gain``: ScaledStdConv2d's, a per-channel gain times 1/√fan-in);
    ``plain``: named so but not standardizing (not what the rule assumes). Its forward
    calls ``F.conv2d`` with its padding, as timm's does, which pads with zeros whatever its
    ``padding_mode``; ``by_mode``: through ``_conv_forward``, as torch's Conv2d pads.
    ``same_pad``: timm's ScaledStdConv2dSame, which pads its input TensorFlow's "SAME" way
    first (the extra row and column of an odd padding after); "left": before, not SAME."""

    def __init__(self, *args, gain: bool = False, plain: bool = False, eps: float = 1e-5, by_mode: bool = False,
                 same_pad: bool | str = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps, self.plain, self.by_mode, self.same_pad = eps, plain, by_mode, bool(same_pad)
        self.left = same_pad == "left"
        if gain:
            self.gain = nn.Parameter(torch.linspace(0.5, 1.5, self.out_channels).reshape(-1, 1, 1, 1))
            self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        if self.plain:
            return super().forward(x)
        c = (self.gain * self.scale).view(-1) if hasattr(self, "gain") else None
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=c, training=True,
                         momentum=0.0, eps=self.eps).reshape_as(self.weight)
        if self.same_pad:
            pads = []
            for size, k, st, dil in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
                total = max((-(-size // st) - 1) * st + (k - 1) * dil + 1 - size, 0)
                pads += [total - total // 2, total // 2] if self.left else [total // 2, total - total // 2]
            x = F.pad(x, pads)
        if self.by_mode:
            return self._conv_forward(x, w, self.bias)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PatchTokens(nn.Module):
    """A ViT-style patch embedding, as timm's XCiT writes it: conv -> BatchNorm -> tokens
    (B, N, C) by ``flatten(2).transpose(1, 2)``, + a position, LayerNorm, mean, head. For one
    example the BatchNorm's output gradient comes back channels_last with a batch stride
    of C, which torch's CPU BatchNorm backward gets wrong. ``functional``: the norm called
    through ``F.batch_norm``. Eval mode, random running statistics."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.conv, self.norm, self.functional = nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), functional
        self.pos, self.ln, self.head = nn.Parameter(torch.randn(1, 9, 4)), nn.LayerNorm(4), nn.Linear(4, 3)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h, n = self.conv(x), self.norm
        h = (F.batch_norm(h, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)
             if self.functional else n(h))
        return self.head(self.ln(h.flatten(2).transpose(1, 2) + self.pos).mean(1))


#: users' losses (out (B, C), y (B,)) -> (B,) whose value for an example reads the other rows of its batch
BATCH_LOSSES = {
    "log_softmax over dim 0": lambda z, y: -torch.log_softmax(z, 0).gather(1, y[:, None])[:, 0],   # a common slip
    "minus the batch mean": lambda z, y: (lambda l: l - l.mean())(F.cross_entropy(z, y, reduction="none")),
    "batch-normalized logits": lambda z, y: F.cross_entropy(z - z.mean(0).detach(), y, reduction="none"),
    # the values of cross_entropy, and a gradient by each row's output that reads the batch's
    "gradient by the batch": lambda z, y: (F.cross_entropy(z, y, reduction="none")
                                           + ((z - z.detach()) * z.detach().sum(0)).sum(1)),
}


def batch_forward_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, P) each example's gradient of its cross-entropy, from the whole batch's forward
    and a backward of its loss alone (for a model whose examples do not interact), in
    ``model.parameters()`` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [torch.autograd.grad(F.cross_entropy(model(x)[b:b + 1], y[b:b + 1]), params) for b in range(len(x))]
    return torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])


def channels_last_equals_contiguous(plain: nn.Module, x, y, params=None, batches=(slice(None),)) -> None:
    """``plain`` (float64, eval) converted to channels_last, its inputs too, scored by every
    engine on each of ``batches`` of x, equals ``plain``'s loop (assert): the same function
    in another layout."""
    model = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    ref = gs.Scorer(plain, engine="loop", params=params)
    V = torch.randn(2, ref.num_params, dtype=torch.float64)
    for batch in batches:
        want = ref.score_batch(x[batch], y[batch], refs=V)
        for engine in ("loop", "auto", "vmap"):
            got = gs.Scorer(model, engine=engine, params=params).score_batch(
                x[batch].contiguous(memory_format=torch.channels_last), y[batch], refs=V)
            where = f"{engine}, params {params}, batch {batch}"
            torch.testing.assert_close(got.sq_norm, want.sq_norm, rtol=1e-10, atol=0, msg=where)
            torch.testing.assert_close(got.dots, want.dots, rtol=1e-10, atol=1e-13, msg=where)


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


def ghost_case(name):
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
    if name == "instance_norm_into_rnn":
        return NormIntoRNN(), torch.randn(5, 1, 4, 4, generator=g)
    raise KeyError(name)


GHOST_CASES = ["mlp_inplace_relu", "bn_eval", "cnn", "digits_cnn", "conv1d_groupnorm_seq_linear",
         "embedding_repeated_tokens", "transformer", "no_grad_region", "shared_twice", "instance_norm_into_rnn"]


def compare_with_loop(model, x, K, engine="ghost", **kw):
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


# random models (tests/test_random_models.py, tests/test_random_images.py) against the loop


def random_selection(seed: int, model: nn.Module) -> list[str] | None:
    """Which parameters a random model (its layers in ``model.blocks``, then ``model.head``)
    is scored on: all (None); or, a third of the time each, the blocks from a random one
    on (``params=``, as a user scores the last layers), or all after freezing a random set
    of blocks (``requires_grad=False``). Drawn from its own stream: the model's draw from
    ``seed`` stays what it was."""
    rng = random.Random(seed + 10**6)
    way, start = rng.choice(["all", "from", "frozen"]), rng.randrange(len(model.blocks) + 1)
    if way == "from":   # a block with no parameter of its own (a pool, a Linear registered twice) has no pattern
        names = [n for n, _ in model.named_parameters()]
        return [f"blocks.{i}.*" for i in range(start, len(model.blocks))
                if any(n.startswith(f"blocks.{i}.") for n in names)] + ["head.*"]
    if way == "frozen":
        for block in model.blocks:
            if rng.random() < 0.5:
                block.requires_grad_(False)
    return None


def check_random_model(seed: int, model: nn.Module, x, y, what: str, engines=("auto",)) -> bool:
    """A random float64 model in eval mode, on the parameters :func:`random_selection` draws:
    each of ``engines`` equals the loop (assert, ``what`` describes the model) on a batch
    that follows an empty one, or torch refused it; ``vmap`` may refuse a model it cannot
    trace with its GradscoreError. The sketches too (:func:`_check_sketch`), and ``auto``
    in float32 (:func:`check_float32`). Returns whether it was compared."""
    params = random_selection(seed, model)
    loop = gs.Scorer(model, engine="loop", params=params)
    V = torch.randn(2, loop.num_params, dtype=torch.float64)
    try:
        want = loop.score_batch(x, y, refs=V)
    except gs.GradscoreError:   # a layer torch itself refuses (GroupNorm of one value, reflect padding of T = 1)
        return False
    if not (torch.isfinite(want.sq_norm).all() and want.sq_norm.max() < 1e8):
        return False   # a normalization of a constant: the gradient is rounding noise blown up, in any engine
    for engine in engines:
        try:
            scorer = gs.Scorer(model, engine=engine, params=params)
            empty = scorer.score_batch(x[:0], y[:0], refs=V)   # B == 0 first: nothing to lay out from
            assert empty.sq_norm.shape == (0,) and empty.dots.shape == (0, 2), (engine, empty)
            got = scorer.score_batch(x, y, refs=V)
        except gs.GradscoreError:
            if engine == "vmap":   # a channels_last conversion, which vmap does not support
                continue
            raise
        where = f"seed {seed}, {engine}, params {params}, {what}"
        try:
            torch.testing.assert_close(got.sq_norm, want.sq_norm, rtol=1e-7, atol=1e-12, msg=lambda m: f"{where}\n{m}")
            torch.testing.assert_close(got.dots, want.dots, rtol=1e-7, atol=1e-9, msg=lambda m: f"{where}\n{m}")
        except AssertionError:
            if not _within_the_loops_own_noise(loop, x, y, V, want, got):
                raise
    _check_sketch(seed, model, x, y, params, f"seed {seed}, sketch, params {params}, {what}")
    check_float32(model, x, y, params, V, want, f"seed {seed}, float32, params {params}, {what}")
    return True


def _within_the_loops_own_noise(loop, x, y, V, want, got) -> bool:
    """Whether ``got`` differs from the loop's ``want`` by no more than 10x what the loop
    itself moves when the inputs move by 1e-14 of their size: a normalization of a constant
    (LayerNorm over one channel, then GroupNorm of its constant map) has a true gradient of 0
    for some parameters, which every engine computes as rounding noise amplified by each
    normalization's 1/√eps. Integer inputs (token ids) cannot move: no."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return False
    g = torch.Generator().manual_seed(0)
    moved = loop.score_batch(x + 1e-14 * x.abs().max() * torch.randn(x.shape, generator=g, dtype=x.dtype), y, refs=V)
    def within(field: str, atol: float) -> bool:
        a, b, m = (getattr(r, field) for r in (got, want, moved))
        far = lambda u, v: float((u - v).abs().max()) if u.numel() else 0.0   # noqa: E731
        return far(a, b) <= max(10 * far(m, b), atol + 1e-7 * far(b, torch.zeros_like(b)))
    return within("sq_norm", 1e-12) and within("dots", 1e-9)


def _errors(got, want, V) -> tuple[float, float]:
    """The largest relative error of ‖g_b‖², and of ⟨g_b, v_k⟩ in units of ‖g_b‖·‖v_k‖."""
    sq = want.sq_norm.double()
    sq_err = ((got.sq_norm.double() - sq).abs() / (sq + 1e-6 * sq.max() + 1e-30)).max()
    scale = sq.sqrt()[:, None] * V.double().norm(dim=1)[None] + 1e-30
    return float(sq_err), float(((got.dots.double() - want.dots.double()).abs() / scale).max())


def check_float32(model: nn.Module, x, y, params, V, want, where: str, loss: str = "cross_entropy") -> None:
    """The model in float32, as users run it, scored by ``auto``, against the float64 loop
    (assert): within 10⁻⁴, or 100 times the float32 loop's own error if that is larger.
    Skipped where the float32 loop is off by over 10⁻⁵: ill-conditioned in float32 (a
    normalization of a near-constant amplifies each rounding by up to 1/√eps). ``x``: a
    tensor or a dict of them (a Hugging Face model's keywords)."""
    m32 = copy.deepcopy(model).float()
    V32 = V.float()
    x32 = move(x, V32)   # floating inputs in float32, token ids kept
    loop_err = max(_errors(gs.Scorer(m32, loss, engine="loop", params=params).score_batch(x32, y, refs=V32), want, V))
    if loop_err > 1e-5:
        return
    got_sq, got_dot = _errors(gs.Scorer(m32, loss, engine="auto", params=params).score_batch(x32, y, refs=V32),
                              want, V)
    assert max(got_sq, got_dot) < max(1e-4, 100 * loop_err), (
        f"{where}: relative error {got_sq:.2e} (‖g‖²), {got_dot:.2e} (dots); the float32 loop's {loop_err:.2e}")


def _normal(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def cancelling(B: int, P: int, width: int, seed: int, dtype=torch.float32, least: float = 1e-4
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose gradient terms cancel: a (B, 2P, width) and δ (B, 2P, 2·width), P pairs
    (a_t, δ_t), (a_t + ε_b n_t, −δ_t) with ε_b from 10⁻¹ down to ``least`` over the examples,
    so g_b = −ε_b Σ_t δ_t n_tᵀ is up to 1/least² times smaller than Σ_t ‖a_t‖²‖δ_t‖²."""
    eps = torch.logspace(-1, math.log10(least), B, dtype=torch.float64)[:, None, None]
    a = _normal(B, P, width, seed=seed) * 10
    d = _normal(B, P, 2 * width, seed=seed + 1)
    near = a + eps * _normal(B, P, width, seed=seed + 2)
    return torch.cat([a, near], 1).to(dtype), torch.cat([d, -d], 1).to(dtype)


def loop_grads(model: nn.Module, x, y, names: list[str]) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)} per-example gradients of the cross-entropy ℓ_b, one autograd call
    per example, under gradscore's workarounds for torch's CPU norm bugs (as the loop engine)."""
    named = dict(model.named_parameters())
    with torch_workarounds():
        per = [torch.autograd.grad(F.cross_entropy(model(x[b:b + 1]), y[b:b + 1]), [named[n] for n in names])
               for b in range(len(y))]
    return {n: torch.stack([g[i] for g in per]) for i, n in enumerate(names)}


def vmap_grads(model: nn.Module, x, y, names: list[str]) -> dict[str, torch.Tensor] | None:
    """The same gradients by torch.func (vmap of grad): other kernels, other rounding; None
    where vmap cannot trace the model."""
    from torch.func import functional_call, grad, vmap
    model = copy.deepcopy(model)   # a failed trace can leave vmap's wrappers in a module (an RNN's weights)
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def loss(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb[None],)), yb[None])
    try:
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    except (RuntimeError, NotImplementedError, ValueError):   # e.g. torch's RNN kernels
        return None


def _check_sketch(seed: int, model: nn.Module, x, y, params, where: str) -> None:
    """The sketch of each example (``Scorer.sketch_batch``, as ``gradscore sketch`` runs it)
    equals Φ·g_b of its gradient from a per-example autograd loop (assert)."""
    from gradscore.sketches import Projection
    scorer = gs.Scorer(model, params=params)
    proj = Projection.for_model(model, scorer.param_names, 40, seed=seed)
    assert scorer.sketch_batch(x[:0], y[:0], proj).dots.shape == (0, proj.dim), where
    got = scorer.sketch_batch(x, y, proj).dots
    want = proj.apply(loop_grads(model, x, y, scorer.param_names))
    # the rounding that two exact references already disagree by: an ill-conditioned example
    # (a LayerNorm of two near-equal values) amplifies it far past float64's
    other = vmap_grads(model, x, y, scorer.param_names)
    noise = 0.0 if other is None or not len(y) else float((proj.apply(other) - want).abs().max())
    torch.testing.assert_close(got, want, rtol=1e-7, atol=max(1e-9, 10 * noise), msg=lambda m: f"{where}\n{m}")


# the in-run recorder's records against the per-example loop at each step's θ_t


def check_random_inrun(model: nn.Module, x, y, B: int, out: Path, input_grad: bool = False) -> bool:
    """A random float64 model trained for 3 SGD steps on batches of B from ``x``, ``y`` (the
    last 3 examples are the target) through the in-run recorder: every record equals the
    loop at the step's θ_t (assert), or the recorder refused the model with a GradscoreError.
    ``input_grad``: the step's input requires grad (torch's own CPU GroupNorm backward
    crashes, in training too, on a channels_last input that does not). Returns whether
    it was compared."""
    targets = (x[-3:], y[-3:])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    snaps = []
    try:
        rec = gs.InRun(model.train(), out=out, targets=targets)
        for t in range(3):
            idx = torch.arange(t * B, t * B + B)
            snaps.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, idx))
            with rec.step(idx, y[idx], lr=0.05, step=t):
                F.cross_entropy(model(x[idx].clone().requires_grad_(input_grad)), y[idx]).backward()
            opt.step()
            opt.zero_grad()
        path = rec.close()
    except gs.GradscoreError:   # refused: a layer without a rule, a model that mixes its batch, ...
        return False
    check_inrun_against_loop(path, model, snaps, x, y, targets, dot_rtol=1e-7, rtol=1e-7)
    return True


def _grads(loss, params):
    """∂loss/∂p for each of ``params``, zeros for those it does not use."""
    return [torch.zeros_like(p) if g is None else g
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]


def inrun_reference(model, snapshot, x, y, targets, keep_modes=False):
    """Per-example loop at θ_t (the parameters and buffers ``snapshot``): ℓ_b, ‖∇ℓ_b‖²,
    ⟨∇ℓ_b, ∇J⟩, margin; the examples in training mode, as the step ran them (``keep_modes``:
    each module in the mode it has in ``model``, a frozen BatchNorm's eval), J in eval mode.
    Under gradscore's workarounds for torch's own CPU norm bugs, as the loop engine runs
    (each checked against a contiguous model in test_engines.py)."""
    for module in model.modules():   # weight_norm's and prune's weight, made again by each forward's pre-hook
        for name, t in [(k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor) and not v.is_leaf]:
            setattr(module, name, t.detach())   # (a tensor of the graph, which deepcopy refuses)
    m = copy.deepcopy(model).eval()
    missing, unexpected = m.load_state_dict(snapshot, strict=False)   # a snapshot of parameters may leave out buffers
    assert not unexpected and set(missing) <= {n for n, _ in m.named_buffers()}, (missing, unexpected)
    params = [p for p in m.parameters() if p.requires_grad]   # what the step trains
    xt, yt = targets
    out = []
    with torch_workarounds():
        gJ = _grads(F.cross_entropy(m(xt), yt), params)
        norm_J = float(sum((g ** 2).sum() for g in gJ).sqrt())
        m.train()
        if keep_modes:
            for mine, theirs in zip(m.modules(), model.modules()):
                mine.training = theirs.training
        for xb, yb in zip(x, y):
            z = m(xb[None])
            loss = F.cross_entropy(z, yb[None])
            g = _grads(loss, params)
            other = z[0].clone()
            other[yb] = -torch.inf
            out.append([float(v) for v in (loss.detach(), sum((gi ** 2).sum() for gi in g),
                                           sum((gi * gj).sum() for gi, gj in zip(g, gJ)),
                                           (z[0, yb] - other.max()).detach(), norm_J)])
    return np.array(out)


def check_inrun_against_loop(path, model, snaps, x, y, targets, dot_rtol=1e-9, rtol=1e-9, keep_modes=False):
    """Every record of ``path`` against the per-example loop at each step's θ_t (``snaps``:
    (parameters, batch indices) per step), for a mean loss over each step's batch; ``rtol``
    of the norms, ``dot_rtol`` of the dots; ``keep_modes`` as for :func:`inrun_reference`."""
    from gradscore.io.store import load_inrun_rows
    rows, ids = load_inrun_rows(path), gs.load_scores(path)["ids"]
    for t, (snap, idx) in enumerate(snaps):
        at = rows["step"] == t
        assert ids[rows["row"][at]].tolist() == idx.tolist()     # recorded in the batch's order
        want = inrun_reference(model, snap, x[idx], y[idx], targets, keep_modes)
        # a loss near 0 is a difference of logits (logsumexp − z_y): float64 keeps it to ~1e-15 of them, not of it
        np.testing.assert_allclose(rows["loss"][at], want[:, 0], rtol=1e-10, atol=1e-13)
        # no share is read for a batch the loss no longer moves at all (documented: NaN, and a warning)
        read = ~np.isnan(rows["share"][at])
        assert (want[~read, 1] < 1e-18).all(), (t, want[~read, 1])
        assert np.isnan(rows["sq_norm"][at][~read]).all()
        np.testing.assert_allclose(rows["sq_norm"][at][read], want[read, 1], rtol=rtol)
        # a mean over B (·micro); read as a ratio of ∂L/∂z to ∂ℓ/∂z, which a confident example has near 0
        np.testing.assert_allclose(rows["share"][at][read], 1 / len(idx), rtol=1e-9)
        np.testing.assert_allclose(rows["share_sq_norm"][at], want[:, 1] / len(idx) ** 2, rtol=rtol)  # ‖∇L_b‖²: all
        np.testing.assert_allclose(rows["dot"][at], want[:, 2] / len(idx), rtol=dot_rtol, atol=1e-14)
        np.testing.assert_allclose(rows["margin"][at], want[:, 3], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(rows["target_norm"][at], want[:, 4], rtol=1e-10)


def strict_json(text: str):
    """``text`` read as standard JSON, which has no NaN or Infinity (jq and JavaScript refuse them)."""
    def refuse(token: str):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


#: the user's own model code, in two files of their folder: a model, the helpers its forward calls
USERHELP = """import torch

SCALE = 1.0
GAIN = 1.0
KINDS = frozenset({"tanh", "sin", "cos", "relu"})   # its order differs between processes
squash = torch.tanh


def act(x):
    assert "tanh" in KINDS
    return squash(x) * SCALE
"""
USERNET = """import torch
from torch import nn

import userhelp
from userhelp import act


class Base(nn.Module):
    def mix(self, h):
        return h


class Net(Base):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(self.mix(_local(act(self.a(x))))) * userhelp.GAIN


def _local(h):
    return h


def unused():
    return 1


def make():
    torch.manual_seed(0)
    return Net()
"""
#: (file, text, replacement, the name a refusal gives): a user's edit of code the model's forward runs
FORWARD_EDITS = {
    "a helper beside the model": ("usernet.py", "    return h\n\n\ndef unused", "    return 2 * h\n\n\ndef unused",
                                  "usernet._local"),
    "a helper imported from another file": ("userhelp.py", "squash(x) * SCALE", "squash(x) * SCALE + 1",
                                            "userhelp.act"),
    "a library function bound to a name": ("userhelp.py", "squash = torch.tanh", "squash = torch.sin",
                                           "userhelp.squash"),
    "an inherited method": ("usernet.py", "def mix(self, h):\n        return h", "def mix(self, h):\n        return h + 1",
                            "usernet.Base"),
    "a constant read through its module": ("userhelp.py", "GAIN = 1.0", "GAIN = 2.0", "userhelp.GAIN"),
    "a constant a helper reads": ("userhelp.py", "SCALE = 1.0", "SCALE = 0.5", "userhelp.SCALE"),
}


def user_code_run(tmp_path: Path, monkeypatch, files: dict[str, str]) -> tuple[Path, Path]:
    """The user's model code ``files`` ({name: text}, as :data:`USERNET` and :data:`USERHELP`)
    written and imported fresh, one checkpoint of ``usernet:make`` and a dataset: (ckpts, data)."""
    import sys
    # no bytecode: Python takes a .pyc whose source has the same size and mtime in whole
    # seconds, so an edit of the same size within the second of the first import was not seen
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("usernet", "userhelp"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import usernet
    with gs.CheckpointWriter(tmp_path / "ckpts", model_factory="usernet:make") as w:
        w.save(usernet.make(), step=0, lr=0.1)
    g = torch.Generator().manual_seed(0)
    data = gs.save_dataset(tmp_path / "d.h5", torch.randn(10, 12, generator=g).numpy(), np.arange(10) % 4)
    return tmp_path / "ckpts", data
