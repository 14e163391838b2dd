"""Ghost engine: per-example ‖g_b‖² and ⟨g_b, V_k⟩ without the (B, P) gradient block.

One ordinary batched forward and one backward of Σ_b ℓ_b. For each ruled layer a
forward hook keeps the layer's input and hands the network ``_Probe(output, z)``, an
identity whose only other input is a zero scalar leaf z, one for the batch; the probe's
backward receives that layer's output gradient δ (row b belongs to example b alone: the
model is in eval mode), runs the layer's rule (``engines/rules/``) at once and lets δ
and the input go. The probe costs no copy of the output and no reduction of δ, and its
output shares the output's storage and version counter without being a view of it, so
in-place activations downstream (``ReLU(inplace=True)``) stay allowed and checked. The
backward is ``torch.autograd.grad(Σ ℓ, z)``: it needs every δ but no parameter gradient,
and returns only a scalar, so peak memory stays near one plain forward+backward. The
shares of the layers add up, since layers own disjoint parameters, except for tied
weights (one tensor owned by several modules, e.g. GPT-2's embedding and LM head): each
owner's rule gives its use's share, and the cross terms 2⟨g_i, g_j⟩ are added from the
rules' factors at the end of the batch.

A layer called with a first dimension of 1 while the batch has B > 1 rows (Hugging
Face's position embeddings look up ids of shape (1, T) once for the batch) has its
input and output expanded to B rows, so that row b of δ is example b's; this is exact
when the output is only added to batch rows, which the engine checks in the autograd
graph after the forward, sending the layer to vmap otherwise.

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

from ..batch import Inputs, batch_len, call_model
from ..exceptions import EngineError
from .base import Engine, RefBlocks, ScoreBatch, register_engine
from .rules import Factor, Rule, cross, find_rule
from .vmap import VmapEngine


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: Rule
    params: dict[str, str]                          # local name -> full parameter name
    tied: set[str] = field(default_factory=set)     # local names of weights shared with other layers
    acts: list[torch.Tensor] = field(default_factory=list)
    grads: dict[int, torch.Tensor] = field(default_factory=dict)   # call index -> δ
    calls: int = 0          # forward calls whose output needs a gradient
    seen: int = 0           # all forward calls
    problem: str | None = None   # why this layer must go to the vmap fallback after all
    shared: list = field(default_factory=list)      # autograd nodes of batch-broadcast outputs
    shared_ok: bool = False      # its broadcast output passed the check once: the graph is the same


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> the distinct modules that own it directly, with a name each."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for _, p in module.named_parameters(recurse=False):
            mods = owners.setdefault(id(p), [])
            if all(m is not module for _, m in mods):  # one module registered twice is one owner
                mods.append((mname or type(model).__name__, module))
    return owners


def plan_layers(model: nn.Module, param_names: list[str]) -> tuple[list[_Layer], dict[str, str]]:
    """Split scored parameters into ruled layers and {fallback parameter: reason}.

    A tensor owned by several modules (tied weights, e.g. an input embedding reused as
    the output layer) gets the sum of the uses as its gradient, g = g₁ + g₂: each owner's
    rule gives ‖g_i‖² and ⟨g_i, V⟩, and the cross terms 2⟨g_i, g_j⟩ come from the rules'
    factors (``rules.registry.cross``). Owners without factors send the tensor to vmap.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}  # the de-duplicated names
    wanted = set(param_names)
    fallback: dict[str, str] = {}
    tied: set[str] = set()
    for i, mods in _owners(model).items():
        if len(mods) < 2 or canonical[i] not in wanted:
            continue
        rules = [find_rule(m)[0] for _, m in mods]
        if all(r is not None and r.factors is not None for r in rules):
            tied.add(canonical[i])
        else:
            fallback[canonical[i]] = (f"shared by modules {' and '.join(n for n, _ in mods)}, not all "
                                      f"with a ghost rule for tied weights")
    layers, covered = [], set()
    for mname, module in model.named_modules():
        own = {local: canonical[id(p)] for local, p in module.named_parameters(recurse=False)}
        own = {k: v for k, v in own.items() if v in wanted and v not in fallback}
        if not own:
            continue
        rule, reason = find_rule(module)
        if rule is None:
            fallback.update({full: reason for full in own.values()})
            continue
        layers.append(_Layer(mname, module, rule, own, {k for k, v in own.items() if v in tied}))
        covered.update(own.values())
    for name in param_names:
        if name not in covered and name not in fallback:
            fallback[name] = "not owned by a module with a ghost rule"
    return layers, fallback


class _Pass:
    """State of one batch: running sums of the rules' results."""

    def __init__(self, refs: RefBlocks | None, index: dict[str, int], K: int) -> None:
        self.refs, self.index, self.K = refs, index, K
        self.sq: torch.Tensor | None = None
        self.dots: torch.Tensor | None = None
        self.factors: dict[str, list[Factor]] = {}   # tied weight -> one factor per owner

    def add(self, sq: torch.Tensor, dots: torch.Tensor) -> None:
        self.sq, self.dots = (sq, dots) if self.sq is None else (self.sq + sq, self.dots + dots)

    def run_rule(self, layer: _Layer) -> None:
        """Apply the layer's rule to the calls whose δ arrived, then drop them."""
        if layer.grads:
            lrefs = {local: (self.refs[self.index[full]] if self.refs is not None else None)
                     for local, full in layer.params.items()}
            order = sorted(layer.grads)
            acts, grads = [layer.acts[i] for i in order], [layer.grads[i] for i in order]
            self.add(*layer.rule.fn(layer.module, acts, grads, lrefs, self.K))
            if layer.tied:  # kept until every owner of the weight has reported
                fs = layer.rule.factors(layer.module, acts, grads)
                for local in layer.tied:
                    self.factors.setdefault(layer.params[local], []).append(fs[local])
        layer.acts, layer.grads = [], {}

    def add_cross_terms(self) -> None:
        """‖Σ_i g_i‖² = Σ_i ‖g_i‖² + 2 Σ_{i<j} ⟨g_i, g_j⟩ for each tied weight."""
        for fs in self.factors.values():
            for i in range(len(fs)):
                for j in range(i + 1, len(fs)):
                    self.sq = self.sq + 2 * cross(fs[i], fs[j]).to(self.sq.dtype)   # dots are linear: no cross term
        self.factors = {}


class _Probe(torch.autograd.Function):
    """Identity on a layer's output y whose backward hands δ = ∂L/∂y to a callback: the
    backward reaches the zero leaf z only through it. No copy of y in the forward and no
    reduction of δ in the backward (``y + z`` cost one of each). The output is ``y.detach()``,
    a new tensor on y's storage and version counter rather than a view of y, so in-place
    ops downstream (``ReLU(inplace=True)``) stay allowed and are checked as on y itself."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, z: torch.Tensor, on_grad) -> torch.Tensor:
        ctx.on_grad = on_grad
        return output.detach()

    @staticmethod
    def backward(ctx, delta: torch.Tensor):
        ctx.on_grad(delta)
        return delta, None, None


def _consumers(root, targets: set) -> dict:
    """{node in ``targets``: names of the autograd nodes that consume it}, walking the
    graph from ``root`` (the loss)."""
    found: dict = {}
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if nxt in targets:
                found.setdefault(nxt, set()).add(type(node).__name__)
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return found


#: consumers of a batch-broadcast output under which row b of the expanded output is
#: example b's alone: elementwise sums with a batch tensor (e.g. token + position embeddings)
_BROADCAST_OK = {"AddBackward0", "AddBackward1", "SubBackward0"}


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
        uses: dict[str, list[str]] = {}
        for layer in self.layers:
            for full in layer.params.values():
                uses.setdefault(full, []).append(f"{layer.rule.name} rule on {layer.name}: "
                                                 f"{type(layer.module).__name__}")
        out = {full: f"ghost ({' + '.join(u)}{'; tied, exact cross term' if len(u) > 1 else ''})"
               for full, u in uses.items()}
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
            layer.acts, layer.grads, layer.calls, layer.seen, layer.problem, layer.shared = [], {}, 0, 0, None, []

            def on_grad(delta, layer=layer, call=None):
                layer.grads[call] = delta
                if len(layer.grads) == layer.calls:  # every call's δ is in: reduce now
                    state.run_rule(layer)

            def hook(module, inputs, output, layer=layer):
                if not isinstance(output, torch.Tensor):
                    raise EngineError(f"layer '{layer.name}' returned {type(output).__name__}; "
                                      f"the ghost engine needs a tensor output")
                layer.seen += 1
                act = inputs[0]
                shared = B > 1 and act.shape[:1] == (1,) and output.shape[:1] == (1,)
                if shared:  # one row for the whole batch (position ids (1, T)): give each example its copy
                    act, output = act.expand(B, *act.shape[1:]), output.expand(B, *output.shape[1:])
                elif act.shape[:1] != (B,) or output.shape[:1] != (B,):
                    layer.problem = "was called on a tensor whose first dimension is not the batch"
                if not output.requires_grad:  # under no_grad: no gradient reaches this layer
                    return None
                call = layer.calls
                layer.calls += 1
                layer.acts.append(act.detach())
                if not probes:      # one zero leaf for every probe of the batch
                    probes.append(torch.zeros((), device=output.device, requires_grad=True))
                # reaching z in the backward needs ∂L/∂probed = δ; a broadcast output gets its B rows
                probed = _Probe.apply(output.contiguous() if shared else output, probes[0],
                                      lambda d, layer=layer, call=call: on_grad(d, layer, call))
                if shared:
                    layer.shared.append(probed.grad_fn)
                return probed
            handles.append(layer.module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def score_batch(self, x: Inputs, y: torch.Tensor, refs: RefBlocks | None) -> ScoreBatch:
        K = 0 if refs is None else refs[0].shape[0]
        B = batch_len(x)
        state, probes = _Pass(refs, self._index, K), []
        with self._hooks(state, probes, B):
            with torch.enable_grad():
                out = call_model(self.model, x)
                losses = self.loss.fn(out, y)
            if losses.shape != (B,):
                raise EngineError(f"the loss returned shape {tuple(losses.shape)}; it must return one "
                                  f"loss per example, shape ({B},)")
            self._check_shared(losses)
            replan = self._moved_to_fallback()
            if probes and not replan:
                torch.autograd.grad(losses.sum(), probes, allow_unused=True)
        if replan:  # some layers moved to the vmap fallback: redo this batch without their hooks
            return self.score_batch(x, y, refs)
        for layer in self.layers:  # calls whose output did not reach the loss add nothing
            state.run_rule(layer)
        if state.factors:
            state.add_cross_terms()
        fb = self._fallback(x, y, refs)
        if fb is not None:
            state.add(fb.sq_norm, fb.dots if fb.dots is not None else fb.sq_norm.new_zeros((B, 0)))
        if state.sq is None:
            acc = torch.float64 if out.dtype == torch.float64 else torch.float32
            state.add(out.new_zeros(B, dtype=acc), out.new_zeros((B, K), dtype=acc))
        return ScoreBatch(loss=losses.detach(), sq_norm=state.sq,
                          dots=state.dots if refs is not None else None, logits=out.detach())

    def _check_shared(self, losses: torch.Tensor) -> None:
        """A batch-broadcast output expanded to B rows gives exact per-example shares only
        when it is added to batch rows; any other use sends the layer to vmap."""
        nodes = {n: layer for layer in self.layers if not layer.shared_ok for n in layer.shared}
        if not nodes or losses.grad_fn is None:
            return
        for node, users in _consumers(losses.grad_fn, set(nodes)).items():
            if not users <= _BROADCAST_OK:
                nodes[node].problem = (f"returns one row for the whole batch, used by "
                                       f"{', '.join(sorted(users))} (only a sum with batch rows is exact)")
        for layer in nodes.values():  # checked on the first batch: the consumer of a layer is fixed
            layer.shared_ok = layer.problem is None

    def _moved_to_fallback(self) -> bool:
        """Send layers that were never called, or not called batch-first, to vmap; a weight
        tied to such a layer goes to vmap as a whole (it leaves its other owners too)."""
        moved = False
        for layer in self.layers:
            reason = ("was not called; its parameters are used by another module"
                      if layer.seen == 0 else layer.problem)
            if reason is None:
                continue
            self.fallback.update({full: f"{type(layer.module).__name__} '{layer.name}' {reason}"
                                  for full in layer.params.values()})
            moved = True
        if moved:
            for layer in self.layers:
                layer.params = {k: v for k, v in layer.params.items() if v not in self.fallback}
                layer.tied &= set(layer.params)
            self.layers = [layer for layer in self.layers if layer.params]
        return moved
