"""Small reference models, importable as checkpoint factories (``"gradscore.models:mlp"``)."""
from __future__ import annotations

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
