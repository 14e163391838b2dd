"""Ghost engine: per-example ‖g_b‖² and ⟨g_b, V_k⟩ without the (B, P) gradient block.

One ordinary batched forward and one backward of Σ_b ℓ_b. For each ruled layer a
forward hook keeps the layer's input and hands the network ``output + z`` instead of
``output``, where z is a zero scalar leaf; a tensor hook on the original output
receives that layer's output gradient δ during the backward (row b belongs to example
b alone: the model is in eval mode), runs the layer's rule (``engines/rules/``) at once
and lets δ and the input go. The hook sits on ``output + z``, not on ``output``: only
the former's gradient is needed to reach z. A hook registered before an in-place op
downstream (``ReLU(inplace=True)``) still receives the gradient of the value it was
registered on, so in-place activations are safe. The backward is ``torch.autograd.grad(Σ ℓ, [z, …])``:
it needs every δ but no parameter gradient, and returns only scalars, so peak memory
stays near one plain forward+backward. The shares of the layers add up, since layers
own disjoint parameters.

Parameters whose module has no applicable rule, whose module is never called (its
weights used functionally by another module), or whose module is called on tensors
whose first dimension is not the batch, go through the vmap engine, for exactly those
parameters; :meth:`GhostEngine.explain` says which path each parameter took and why.
Hooks live for one call and are removed by a context manager; nothing is stored on
the model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..exceptions import EngineError
from .base import Engine, RefBlocks, ScoreBatch, register_engine
from .rules import Rule, find_rule
from .vmap import VmapEngine


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: Rule
    params: dict[str, str]                          # local name -> full parameter name
    acts: list[torch.Tensor] = field(default_factory=list)
    grads: dict[int, torch.Tensor] = field(default_factory=dict)   # call index -> δ
    calls: int = 0          # forward calls whose output needs a gradient
    seen: int = 0           # all forward calls
    batch_ok: bool = True


def plan_layers(model: nn.Module, param_names: list[str]) -> tuple[list[_Layer], dict[str, str]]:
    """Split scored parameters into ruled layers and {fallback parameter: reason}.

    A tensor owned by several modules (tied weights, e.g. an input embedding reused as
    the output layer) gets the sum of both uses as its gradient, whose norm has a cross
    term no single rule sees: such parameters go to vmap (which ties them correctly).
    """
    canonical = {id(p): n for n, p in model.named_parameters()}  # the de-duplicated names
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False):
            where = mname or type(model).__name__
            if where not in owners.setdefault(id(p), []):
                owners[id(p)].append(where)
    wanted = set(param_names)
    layers, covered = [], set()
    fallback: dict[str, str] = {
        canonical[i]: f"shared by modules {' and '.join(o)} (tied weights: the ghost rules would miss the cross term)"
        for i, o in owners.items() if len(o) > 1 and canonical[i] in wanted}
    for mname, module in model.named_modules():
        own = {local: canonical[id(p)] for local, p in module.named_parameters(recurse=False)}
        own = {k: v for k, v in own.items() if v in wanted and v not in fallback}
        if not own:
            continue
        rule, reason = find_rule(module)
        if rule is None:
            fallback.update({full: reason for full in own.values()})
            continue
        layers.append(_Layer(mname, module, rule, own))
        covered.update(own.values())
    for name in param_names:  # e.g. a parameter shared by two modules: counted once, by vmap
        if name not in covered and name not in fallback:
            fallback[name] = "not owned by a module with a ghost rule"
    return layers, fallback


class _Pass:
    """State of one batch: running sums of the rules' results."""

    def __init__(self, refs: RefBlocks | None, index: dict[str, int], K: int) -> None:
        self.refs, self.index, self.K = refs, index, K
        self.sq: torch.Tensor | None = None
        self.dots: torch.Tensor | None = None

    def add(self, sq: torch.Tensor, dots: torch.Tensor) -> None:
        self.sq, self.dots = (sq, dots) if self.sq is None else (self.sq + sq, self.dots + dots)

    def run_rule(self, layer: _Layer) -> None:
        """Apply the layer's rule to the calls whose δ arrived, then drop them."""
        if layer.grads:
            lrefs = {local: (self.refs[self.index[full]] if self.refs is not None else None)
                     for local, full in layer.params.items()}
            order = sorted(layer.grads)
            self.add(*layer.rule.fn(layer.module, [layer.acts[i] for i in order],
                                    [layer.grads[i] for i in order], lrefs, self.K))
        layer.acts, layer.grads = [], {}


@register_engine("ghost")
class GhostEngine(Engine):
    """Norms and dots from one batched forward/backward with per-layer ghost rules."""

    def __init__(self, model, loss, param_names, chunk_bytes=256 * 2**20) -> None:
        super().__init__(model, loss, param_names, chunk_bytes)
        self.layers, self.fallback = plan_layers(model, self.param_names)
        self._fallback_engines: dict[tuple[str, ...], VmapEngine] = {}
        self._index = {n: i for i, n in enumerate(self.param_names)}

    def explain(self) -> dict[str, str]:
        """{parameter name: path}, e.g. 'ghost (linear rule on fc: Linear)' or 'vmap (reason)'."""
        out = {full: f"ghost ({layer.rule.name} rule on {layer.name}: {type(layer.module).__name__})"
               for layer in self.layers for full in layer.params.values()}
        out.update({full: f"vmap ({reason})" for full, reason in self.fallback.items()})
        return {n: out[n] for n in self.param_names}

    def _fallback(self, x, y, refs) -> ScoreBatch | None:
        """vmap over exactly the fallback parameters (in param_names order), or None."""
        key = tuple(n for n in self.param_names if n in self.fallback)
        if not key:
            return None
        if key not in self._fallback_engines:
            self._fallback_engines[key] = VmapEngine(self.model, self.loss, list(key), self.chunk_bytes)
        return self._fallback_engines[key].score_batch(
            x, y, None if refs is None else [refs[self._index[n]] for n in key])

    @contextlib.contextmanager
    def _hooks(self, state: _Pass, probes: list[torch.Tensor], B: int) -> Iterator[None]:
        handles = []
        for layer in self.layers:
            layer.acts, layer.grads, layer.calls, layer.seen, layer.batch_ok = [], {}, 0, 0, True

            def on_grad(delta, layer=layer, call=None):
                layer.grads[call] = delta
                if len(layer.grads) == layer.calls:  # every call's δ is in: reduce now
                    state.run_rule(layer)

            def hook(module, inputs, output, layer=layer):
                if not isinstance(output, torch.Tensor):
                    raise EngineError(f"layer '{layer.name}' returned {type(output).__name__}; "
                                      f"the ghost engine needs a tensor output")
                layer.seen += 1
                if inputs[0].shape[:1] != (B,) or output.shape[:1] != (B,):
                    layer.batch_ok = False
                if not output.requires_grad:  # under no_grad: no gradient reaches this layer
                    return None
                call = layer.calls
                layer.calls += 1
                layer.acts.append(inputs[0].detach())
                z = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
                probes.append(z)
                probed = output + z  # reaching z in the backward needs ∂L/∂probed = δ
                probed.register_hook(lambda d, layer=layer, call=call: on_grad(d, layer, call))
                return probed
            handles.append(layer.module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def score_batch(self, x: torch.Tensor, y: torch.Tensor, refs: RefBlocks | None) -> ScoreBatch:
        K = 0 if refs is None else refs[0].shape[0]
        B = x.shape[0]
        state, probes = _Pass(refs, self._index, K), []
        with self._hooks(state, probes, B):
            with torch.enable_grad():
                out = self.model(x)
                losses = self.loss.fn(out, y)
            if losses.shape != (B,):
                raise EngineError(f"the loss returned shape {tuple(losses.shape)}; it must return one "
                                  f"loss per example, shape ({B},)")
            replan = self._moved_to_fallback()
            if probes and not replan:
                torch.autograd.grad(losses.sum(), probes, allow_unused=True)
        if replan:  # some layers moved to the vmap fallback: redo this batch without their hooks
            return self.score_batch(x, y, refs)
        for layer in self.layers:  # calls whose output did not reach the loss add nothing
            state.run_rule(layer)
        fb = self._fallback(x, y, refs)
        if fb is not None:
            state.add(fb.sq_norm, fb.dots if fb.dots is not None else fb.sq_norm.new_zeros((B, 0)))
        if state.sq is None:
            acc = torch.float64 if out.dtype == torch.float64 else torch.float32
            state.add(out.new_zeros(B, dtype=acc), out.new_zeros((B, K), dtype=acc))
        return ScoreBatch(loss=losses.detach(), sq_norm=state.sq,
                          dots=state.dots if refs is not None else None, logits=out.detach())

    def _moved_to_fallback(self) -> bool:
        """Send layers that were never called, or not called batch-first, to vmap."""
        moved = False
        for layer in self.layers:
            if layer.seen == 0:
                reason = "was not called; its parameters are used by another module"
            elif not layer.batch_ok:
                reason = "was called on a tensor whose first dimension is not the batch"
            else:
                continue
            self.fallback.update({full: f"{type(layer.module).__name__} '{layer.name}' {reason}"
                                  for full in layer.params.values()})
            moved = True
        if moved:
            self.layers = [layer for layer in self.layers
                           if not any(full in self.fallback for full in layer.params.values())]
        return moved
