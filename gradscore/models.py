"""Small reference models, importable as checkpoint factories (``"gradscore.models:mlp"``)."""
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
