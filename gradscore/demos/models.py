"""Small reference models, importable as checkpoint factories (``"gradscore.demos.models:mlp"``)."""
from __future__ import annotations

import math

import torch
from torch import nn


def mlp(d_in: int = 64, hidden: int = 32, n_classes: int = 10, depth: int = 2) -> nn.Module:
    """MLP on flattened inputs: ``depth`` hidden Linear+Tanh layers, then a Linear head."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def digits_cnn(n_classes: int = 10, channels: int = 16, batchnorm: bool = False) -> nn.Module:
    """CNN for 1x8x8 images (scikit-learn digits): two 3x3 convs, 2x2 max-pool, MLP head.

    ``batchnorm=True`` adds BatchNorm2d after the first conv (scored in eval mode only).
    """
    c = channels
    layers: list[nn.Module] = [nn.Conv2d(1, c, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c))
    layers += [
        nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * c * 4 * 4, 64), nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, n_classes),
    ]
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, T, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).reshape(B, T, self.heads, d // self.heads).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Token classifier: Embedding + sinusoidal positions, pre-LN blocks, mean pool, head."""

    def __init__(self, vocab: int = 1000, d: int = 128, heads: int = 4, layers: int = 2,
                 max_len: int = 512, n_classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        pos = torch.arange(max_len)[:, None] / (10000 ** (torch.arange(0, d, 2) / d))[None]
        self.register_buffer("pos", torch.cat([pos.sin(), pos.cos()], 1), persistent=False)
        self.blocks = nn.Sequential(*(_Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]].to(self.embed.weight.dtype)
        return self.head(self.ln(self.blocks(x)).mean(1))


def tiny_transformer(**kwargs) -> nn.Module:
    """:class:`TinyTransformer` (2 layers, d=128 by default) from keyword arguments."""
    return TinyTransformer(**kwargs)


class _ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a strided 1x1 conv + BN where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                                  nn.ReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def small_resnet(n_classes: int = 10, width: int = 16) -> nn.Module:
    """A ResNet for 3x32x32 images (about 20k parameters at width 16): a conv stem, a
    residual block at 32x32 and a strided one to 2·width channels at 16x16, BatchNorm
    throughout (scored in eval mode), global average pooling, a linear head."""
    w = width
    return nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                         _ResidualBlock(w, w, 1), _ResidualBlock(w, 2 * w, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, n_classes))


class RecurrentClassifier(nn.Module):
    """Token classifier: Embedding, a recurrent layer (``"GRU"``, ``"LSTM"`` or ``"RNN"``),
    optionally self-attention over its outputs, mean pooling, a linear head."""

    def __init__(self, kind: str = "GRU", vocab: int = 1000, d: int = 64, layers: int = 1,
                 attention: bool = False, n_classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = getattr(nn, kind)(d, d, num_layers=layers, batch_first=True)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True) if attention else None
        self.head = nn.Linear(d, n_classes)

    def forward(self, tokens):
        h, _ = self.rnn(self.embed(tokens))
        if self.attn is not None:
            h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def recurrent_classifier(**kwargs) -> nn.Module:
    """:class:`RecurrentClassifier` from keyword arguments."""
    return RecurrentClassifier(**kwargs)
