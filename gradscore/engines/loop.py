"""The per-example autograd loop: slow, obviously correct; the reference for tests."""
from __future__ import annotations

import torch

from ..batch import Inputs, batch_len, call_model, take
from .base import Engine, RefBlocks, ScoreBatch, param_grads, register_engine
from .workarounds import torch_workarounds


@register_engine("loop")
class LoopEngine(Engine):
    """One forward and one backward per example; full gradient flattened and reduced (with
    :func:`.workarounds.torch_workarounds`: torch's own backward is wrong for some layers on
    one example)."""

    def _score(self, x: Inputs, y: torch.Tensor, refs: RefBlocks | None) -> ScoreBatch:
        named = dict(self.model.named_parameters())
        params = [named[n] for n in self.param_names]
        V = None if refs is None else torch.cat([r.reshape(r.shape[0], p.numel()) for r, p in zip(refs, params)], dim=1)
        losses, sqs, dots, outs = [], [], [], []
        with torch_workarounds():
            for b in range(batch_len(x)):
                out = call_model(self.model, take(x, b))
                loss = self.loss.fn(out, y[b:b + 1]).sum()
                grads = param_grads(loss, params)
                g = torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                               for p, gi in zip(params, grads)])
                losses.append(loss.detach())
                outs.append(out.detach()[0])
                sqs.append(g @ g)
                if V is not None:
                    dots.append(V.to(g.dtype) @ g)
        return ScoreBatch(loss=torch.stack(losses), sq_norm=torch.stack(sqs),
                          dots=torch.stack(dots) if V is not None else None,
                          logits=torch.stack(outs))
