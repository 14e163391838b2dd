"""One small, deterministic minibatch-SGD loop for the demos, benchmarks and experiments.

SGD with momentum 0.9 on the mean cross-entropy, batches drawn from a generator seeded
with ``seed``: the same model, data and seed give the same parameters.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import torch


def train_sgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, order: np.ndarray | None = None, *,
              epochs: int, seed: int, lr: float = 0.05, batch_size: int = 64,
              on_epoch: Callable[[torch.nn.Module, int, int], None] | None = None,
              recorder: Any = None, ids: np.ndarray | None = None) -> torch.nn.Module:
    """Train ``model`` in place on examples ``order`` (indices into x, y; repeats allowed;
    default all), shuffled each epoch. ``on_epoch(model, epoch, optimizer steps)`` runs
    after every epoch. ``recorder``: a :class:`gradscore.InRun` that records every step,
    with example ids ``ids[index]`` (default: the index). Returns the model in eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    n = len(x) if order is None else len(order)
    index = None if order is None else torch.from_numpy(np.asarray(order))
    steps = 0
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for batch in (perm if index is None else index[perm]).split(batch_size):
            opt.zero_grad()
            with (contextlib.nullcontext() if recorder is None else
                  recorder.step(batch if ids is None else ids[batch.numpy()], y[batch], lr=lr, step=steps)):
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
            steps += 1
        if on_epoch is not None:
            on_epoch(model, epoch, steps)
    return model.eval()
