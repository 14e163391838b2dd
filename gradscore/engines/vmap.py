"""Per-example gradients with ``torch.func.vmap(grad)``, reduced by ``norm_dot``.

The batch is split into sub-batches whose (b, P) gradient block fits ``chunk_bytes``.
The block stays a list of per-parameter tensors: nothing is flattened or concatenated.
"""
from __future__ import annotations

import warnings

import torch
from torch.func import grad, vmap

from ..batch import Inputs, batch_len, call_functional, take, unsqueeze
from ..exceptions import EngineError, GradscoreError, cause, model_fix
from ..kernels import norm_dot
from .base import Engine, RefBlocks, ScoreBatch, dense_embeddings, register_engine


class VmapTraceError(EngineError):
    """``vmap`` cannot trace the model (recurrent layers, data-dependent shapes, values
    read into Python), although the model runs on the same batch without it."""


@register_engine("vmap")
class VmapEngine(Engine):
    """``vmap(grad(ℓ))`` over the batch with ``functional_call``; fused reduction."""

    def _sub_batch(self) -> int:
        named = dict(self.model.named_parameters())
        bytes_per_example = sum(named[n].numel() * named[n].element_size() for n in self.param_names)
        return max(1, self.chunk_bytes // max(1, bytes_per_example))

    def _score(self, x: Inputs, y: torch.Tensor, refs: RefBlocks | None) -> ScoreBatch:
        model, loss_fn, names = self.model, self.loss.fn, self.param_names
        scored = {n: p.detach() for n, p in model.named_parameters() if n in set(names)}
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in scored}
        fixed.update({n: b for n, b in model.named_buffers()})

        def loss_one(params, xb, yb):
            out = call_functional(model, (params, fixed), unsqueeze(xb))
            loss = loss_fn(out, yb.unsqueeze(0)).sum()
            return loss, (loss.detach(), out.detach()[0])

        per_example = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0, 0))
        step = self._sub_batch()
        parts = []
        for i in range(0, batch_len(x), step):
            xs, ys = take(x, i, i + step), y[i:i + step]
            try:
                with dense_embeddings(model), warnings.catch_warnings():
                    # torch's note to its own developers (an op without a batching rule), at every batch
                    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
                    grads, (loss, out) = per_example(scored, xs, ys)
            except GradscoreError:
                raise
            except Exception as e:
                self._diagnose(xs, ys, e)
            sq, dots = norm_dot([grads[n] for n in names], refs)
            parts.append((loss, sq, dots, out))
        loss, sq, dots, out = (torch.cat(p) for p in zip(*parts))
        return ScoreBatch(loss=loss, sq_norm=sq, dots=dots if refs is not None else None, logits=out)

    def _diagnose(self, x: Inputs, y: torch.Tensor, e: Exception) -> None:
        """Raise :class:`VmapTraceError` if the model and loss run on the batch without
        vmap, else an :class:`EngineError` with what fails there."""
        try:
            self.forward(x, y)
        except Exception as plain:
            raise EngineError(f"the model or loss fails on this batch ({cause(plain)}); check that "
                              f"the inputs and targets fit the model") from plain
        fix = model_fix(e) or ("use engine='auto', which falls back to the per-example loop, or engine='loop' (for "
                               "Hugging Face models with an attention_mask, attn_implementation='eager' also works)")
        raise VmapTraceError(f"vmap cannot trace this model ({cause(e)}); {fix}") from e
