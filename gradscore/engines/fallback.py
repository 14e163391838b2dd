"""The fallback for parameters without a ghost rule: vmap, else the per-example loop.

Over exactly the parameters it is given: vmap where it can trace the model; where it
cannot (recurrent layers, packed sequences, values read into Python: found on the
first batch and kept), the loop, which differentiates only those parameters.
"""
from __future__ import annotations

import torch

from ..batch import Inputs
from ..losses import Loss
from .base import Engine, RefBlocks, ScoreBatch
from .loop import LoopEngine
from .vmap import VmapEngine, VmapTraceError


class Fallback:
    """vmap, else the loop, over a fixed list of parameters; ``path`` says which."""

    def __init__(self, model: torch.nn.Module, loss: Loss, names: list[str], chunk_bytes: int) -> None:
        self.names = names
        self.engine: Engine = VmapEngine(model, loss, names, chunk_bytes)
        self.why_loop: str | None = None

    @property
    def path(self) -> str:
        return self.engine.name

    def score_batch(self, x: Inputs, y: torch.Tensor, refs: RefBlocks | None) -> ScoreBatch:
        if isinstance(self.engine, VmapEngine):
            try:
                return self.engine.score_batch(x, y, refs)
            except VmapTraceError as e:
                self.why_loop = str(e).split(";")[0]
                self.engine = LoopEngine(self.engine.model, self.engine.loss, self.names,
                                         self.engine.chunk_bytes)
        return self.engine.score_batch(x, y, refs)
