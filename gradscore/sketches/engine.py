"""Sketches Φ g_b of every example's gradient from one batched forward and backward.

The ghost engine (:mod:`gradscore.engines.ghost`) with each layer's rule turned into its
projection: a Kronecker block is projected from the rule's factors
(:meth:`.Projection.project_factor`), a dense block is the rule's dots with that block's
rows as the references. The engine's layouts (sequence-first, broadcast rows), tied
weights (the sketch is linear: the uses add up), free parameters (a dense block against
their per-example gradients) and fallback chain (vmap, else the loop, with the dense blocks
as references) are the ghost engine's.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..batch import Inputs, batch_len
from ..engines.base import ScoreBatch
from ..engines.ghost import GhostEngine
from ..kernels import acc_dtype
from .projection import Block, Projection


class _Coords:
    """Stands for parameter ``block.name``'s reference block of the whole sketch,
    (dim, *shape), without holding it: the rules get these and project instead."""

    def __init__(self, block: Block, dim: int) -> None:
        self.block, self.shape = block, (dim, *block.shape)


class SketchEngine(GhostEngine):
    """:meth:`sketch_batch` gives ``dots`` = Φ g_b (B, dim) (and the loss and logits;
    ``sq_norm`` is not computed: zeros). Its rules add their blocks to one buffer and
    return no dots of their own."""

    def __init__(self, model, loss, param_names, projection: Projection, chunk_bytes: int = 256 * 2**20) -> None:
        super().__init__(model, loss, param_names, chunk_bytes)
        self.projection = projection
        self.coords = [_Coords(projection.by_name[n], projection.dim) for n in self.param_names]
        self._out: torch.Tensor | None = None   # the batch's sketches, while sketch_batch runs
        for layer in self.layers:
            layer.rule = replace(layer.rule, fn=self._projecting(layer.rule))
            layer.tied = set()   # Φ(g₁ + g₂) = Φg₁ + Φg₂: no cross terms

    def sketch_batch(self, x: Inputs, y: torch.Tensor, dtype: torch.dtype | None = None) -> ScoreBatch:
        """Per-example loss (B,), logits, and ``dots`` = the sketches (B, dim): one (B, dim)
        buffer that each layer's projection adds its block to, in place. ``dtype``: the
        buffer's (default: the accumulation dtype); each block is computed in the
        accumulation dtype, so a float16 buffer only rounds what a float16 file would (and
        adds a tied weight's two uses in float16)."""
        B = batch_len(x)
        if B == 0:
            return self.score_batch(x, y, self.coords)
        like = dict(self.model.named_parameters())[self.param_names[0]]
        self._out = torch.zeros((B, self.projection.dim), dtype=dtype or acc_dtype(like.dtype), device=like.device)
        try:
            result = self.score_batch(x, y, self.coords)
        finally:
            out, self._out = self._out, None
        return replace(result, sq_norm=torch.zeros_like(result.loss, dtype=out.dtype), dots=out)

    def _place(self, parts: list[tuple[Block, torch.Tensor]]) -> None:
        for block, value in parts:
            self._out[:, block.offset:block.offset + block.k] += value.to(self._out.dtype)

    def _projecting(self, rule):
        """The rule as a projection: fn(layer, acts, grads, {local: _Coords}, dim) -> (0, Φ g)."""
        def fn(module, acts, grads, lrefs, K):
            parts = []
            kron = {local: c.block for local, c in lrefs.items() if c.block.kind == "kron"}
            if kron and rule.sketch is not None:   # the rule's own projection (a convolution's)
                parts += [(b, rule.sketch(module, acts, grads, *self.projection.factors(b.name, grads[0]))
                           .reshape(-1, b.k)) for b in kron.values()]
            elif kron:   # added to the buffer in sub-batches
                factors = rule.factors(module, acts, grads)
                for local, b in kron.items():
                    self.projection.project_factor(b.name, factors[local], self._out[:, b.offset:b.offset + b.k])
            for local, c in lrefs.items():   # dense blocks: the rule's dots with the block's rows
                if c.block.kind == "dense":
                    V = self.projection.dense(c.block.name, module.get_parameter(local))
                    _, dots = rule.fn(module, acts, grads, {local: V}, c.block.k)
                    parts.append((c.block, dots))
            self._place(parts)
            return self._out.new_zeros(self._out.shape[0]), None
        return fn

    def _add_free(self, state) -> None:
        """Each free parameter's dense block: its per-example gradients against the block's rows."""
        if state.free is None:
            return
        named = dict(self.model.named_parameters())
        parts = []
        for name in state.free.names():
            block = self.projection.by_name[name]
            V = self.projection.dense(name, named[name]).reshape(block.k, *named[name].shape)
            parts.append((block, state.free.terms(name, V, block.k)[1]))
        self._place(parts)
        state.free.clear()

    def _fallback(self, x, y, refs) -> ScoreBatch | None:
        """The fallback parameters' dense blocks, stacked as one reference set."""
        key = self._fallback_key()
        if not key or refs is None:
            return super()._fallback(x, y, refs)
        blocks = [self.projection.by_name[n] for n in key]
        named = dict(self.model.named_parameters())
        K = sum(b.k for b in blocks)
        V, row = [], 0
        for b in blocks:
            dense = self.projection.dense(b.name, named[b.name])
            V.append(torch.cat([dense.new_zeros((row, *b.shape)), dense, dense.new_zeros((K - row - b.k, *b.shape))]))
            row += b.k
        out = self._fallback_of(key).score_batch(x, y, V)
        parts, row = [], 0
        for b in blocks:
            parts.append((b, out.dots[:, row:row + b.k]))
            row += b.k
        self._place(parts)
        return replace(out, sq_norm=torch.zeros_like(out.sq_norm), dots=None)
