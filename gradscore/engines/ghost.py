"""Ghost engine: per-example ‖g_b‖² and ⟨g_b, V_k⟩ without the (B, P) gradient block.

One ordinary batched forward; forward hooks capture each ruled layer's input and output;
``torch.autograd.grad(Σ_b ℓ_b, outputs)`` then gives every layer's output gradient
(row b belongs to example b alone, as the model is in eval mode) without computing or
writing any parameter gradient. Each layer's rule (``engines/rules/``) turns
(input, output gradient) into its share of the norms and dots; the shares add up since
layers own disjoint parameters. Parameters whose module has no applicable rule go
through the vmap engine, for exactly those parameters; :meth:`GhostEngine.explain`
lists which path each parameter took.

Hooks are registered for the duration of one call and removed by a context manager;
nothing is stored on the model. A layer whose output is modified in place downstream
(e.g. ``ReLU(inplace=True)``) is detected by its version counter; from then on its
hook hands the network a copy, so that the captured output keeps its own gradient.
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
    params: dict[str, str]                     # local name -> full parameter name
    acts: list[torch.Tensor] = field(default_factory=list)
    outs: list[torch.Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


def plan_layers(model: nn.Module, param_names: list[str]) -> tuple[list[_Layer], dict[str, str]]:
    """Split scored parameters into ruled layers and {fallback parameter: reason}."""
    wanted = set(param_names)
    layers, covered = [], set()
    fallback: dict[str, str] = {}
    for mname, module in model.named_modules():
        own = {local: f"{mname}.{local}" if mname else local
               for local, _ in module.named_parameters(recurse=False)}
        own = {k: v for k, v in own.items() if v in wanted}
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


@register_engine("ghost")
class GhostEngine(Engine):
    """Norms and dots from one batched forward/backward with per-layer ghost rules."""

    def __init__(self, model, loss, param_names, chunk_bytes=256 * 2**20) -> None:
        super().__init__(model, loss, param_names, chunk_bytes)
        self.layers, self.fallback = plan_layers(model, self.param_names)
        self._fallback_engines: dict[tuple[str, ...], VmapEngine] = {}
        self._copy_outputs: set[str] = set()
        self._index = {n: i for i, n in enumerate(self.param_names)}

    def _fallback(self, x, y, refs, names: list[str]) -> ScoreBatch | None:
        """vmap over exactly ``names`` (in param_names order), or None when empty."""
        key = tuple(n for n in self.param_names if n in set(names))
        if not key:
            return None
        if key not in self._fallback_engines:
            self._fallback_engines[key] = VmapEngine(self.model, self.loss, list(key), self.chunk_bytes)
        return self._fallback_engines[key].score_batch(
            x, y, None if refs is None else [refs[self._index[n]] for n in key])

    def explain(self) -> dict[str, str]:
        """{parameter name: path}, e.g. 'ghost (linear rule on 0: Linear)' or 'vmap (reason)'."""
        out = {}
        for layer in self.layers:
            for full in layer.params.values():
                out[full] = f"ghost ({layer.rule.name} rule on {layer.name}: {type(layer.module).__name__})"
        for full, reason in self.fallback.items():
            out[full] = f"vmap ({reason})"
        return {n: out[n] for n in self.param_names}

    @contextlib.contextmanager
    def _hooks(self) -> Iterator[None]:
        handles = []
        for layer in self.layers:
            layer.acts, layer.outs, layer.versions = [], [], []

            def hook(module, inputs, output, layer=layer):
                if not isinstance(output, torch.Tensor):
                    raise EngineError(f"layer '{layer.name}' returned {type(output).__name__}; "
                                      f"the ghost engine needs a tensor output")
                layer.acts.append(inputs[0].detach())
                layer.outs.append(output)
                layer.versions.append(output._version)
                return output.clone() if layer.name in self._copy_outputs else None
            handles.append(layer.module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._hooks(), torch.enable_grad():
            out = self.model(x)
            losses = self.loss.fn(out, y)
        if losses.shape != (x.shape[0],):
            raise EngineError(f"the loss returned shape {tuple(losses.shape)}; it must return one "
                              f"loss per example, shape ({x.shape[0]},)")
        return out, losses

    def score_batch(self, x: torch.Tensor, y: torch.Tensor, refs: RefBlocks | None) -> ScoreBatch:
        K = 0 if refs is None else refs[0].shape[0]
        out, losses = self._forward(x, y)
        modified = {l.name for l in self.layers
                    if any(o._version != v for o, v in zip(l.outs, l.versions))}
        if modified - self._copy_outputs:
            self._copy_outputs |= modified
            out, losses = self._forward(x, y)
        targets = [(layer, i) for layer in self.layers for i, o in enumerate(layer.outs) if o.requires_grad]
        grads = torch.autograd.grad(losses.sum(), [layer.outs[i] for layer, i in targets],
                                    allow_unused=True) if targets else []
        B = x.shape[0]
        for layer in self.layers:
            reason = None
            if not layer.outs:  # parameters used without calling forward (e.g. MHA's out_proj)
                reason = "was not called; its parameters are used by another module"
            elif any(a.shape[:1] != (B,) or o.shape[:1] != (B,) for a, o in zip(layer.acts, layer.outs)):
                reason = "was called on a tensor whose first dimension is not the batch"
            if reason:
                for full in layer.params.values():
                    self.fallback[full] = f"{type(layer.module).__name__} '{layer.name}' {reason}"
        self.layers = [layer for layer in self.layers if layer.params and
                       not any(full in self.fallback for full in layer.params.values())]
        per_layer: dict[str, list] = {}
        for (layer, i), g in zip(targets, grads):
            if g is not None:
                per_layer.setdefault(layer.name, []).append((layer.acts[i], g))
        sq = dots = None
        for layer in self.layers:
            calls = per_layer.get(layer.name)
            if not calls:
                continue  # output unused or under no_grad: this layer's gradient is zero
            lrefs = {local: (refs[self._index[full]] if refs is not None else None)
                     for local, full in layer.params.items()}
            s, d = layer.rule.fn(layer.module, [c[0] for c in calls], [c[1] for c in calls], lrefs, K)
            sq, dots = (s, d) if sq is None else (sq + s, dots + d)
            layer.acts, layer.outs = [], []
        fb = self._fallback(x, y, refs, list(self.fallback))
        if fb is not None:
            fb_dots = fb.dots if fb.dots is not None else fb.sq_norm.new_zeros((x.shape[0], 0))
            sq, dots = (fb.sq_norm, fb_dots) if sq is None else (sq + fb.sq_norm, dots + fb_dots)
        if sq is None:
            acc = torch.float64 if out.dtype == torch.float64 else torch.float32
            sq, dots = out.new_zeros(x.shape[0], dtype=acc), out.new_zeros((x.shape[0], K), dtype=acc)
        return ScoreBatch(loss=losses.detach(), sq_norm=sq, dots=dots if refs is not None else None,
                          logits=out.detach())
