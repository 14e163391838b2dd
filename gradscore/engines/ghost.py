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
rules' factors at the end of the batch. Layers that read one input (a transformer's q, k
and v projections) are counted in the forward, and their rules form its Gram a aᵀ once
(``kernels.ghost_linear.SharedGrams``).

Each ruled layer's batch dimension is established on the first batch from evidence
(:mod:`.layout`: two probe runs on 1 and 2 copies of an example), never from a size
that happens to equal B. A sequence-first layer (T, B, d) whose rule acts on trailing
features only has its batch moved to dimension 0; a layer called with one row for the
whole batch (Hugging Face's position ids (1, T)) has its input and output expanded to
B rows, which layout has checked is exact (the output is only added to batch rows).

A parameter that a forward uses directly, broadcast over the batch (a ViT's class token
and position embedding, CaiT's and ConvNeXt's γ), takes the free-parameter rule
(:mod:`.free`): in each use it is expanded to the use's shape through a probe. Parameters
whose module has no applicable rule, is never called (its weights used functionally by
another module), or has no established batch dimension, go to the fallback
(:mod:`.fallback`): vmap over exactly those parameters, or the per-example loop where
vmap cannot trace the model. :meth:`GhostEngine.explain` says which path each
parameter took and why; it is final after the first batch. Hooks live for one call and
are removed by a context manager; nothing is stored on the model.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from ..batch import Inputs, batch_len, call_model
from ..exceptions import EngineError
from ..kernels import acc_dtype
from ..kernels.reference import autocast_off
from ..kernels.ghost_linear import SharedGrams, sharing
from .base import Engine, RefBlocks, ScoreBatch, register_engine
from .fallback import Fallback
from .free import FreeUses, candidates, graph_nodes, leaves, map_leaves
from .workarounds import torch_workarounds
from .layout import NOT_CALLED, NOT_ONE_OUTPUT, Layout, batchless, establish, observed
from .probe import probe
from .rules import Factor, Rule, computes_otherwise, find_rule, has_rule, tied_sq


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
    problem: str | None = None   # why this layer must go to the fallback after all
    layout: Layout | None = None  # established on the first batch
    skeletons: list = field(default_factory=list)  # probe_all rules: each call's output, leaves as indices
    idle: bool = False   # not called on the first batch, its weights tied to owners that were: its share is nothing
    absent: bool = False   # not called on this batch, and its loss reaches none of its parameters: no share in it
    pending: bool = False   # not called on the first batch, its parameters not used there: laid out when first called


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> the distinct modules that own it directly, with a name each."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for _, p in module.named_parameters(recurse=False):
            mods = owners.setdefault(id(p), [])
            if all(m is not module for _, m in mods):  # one module registered twice is one owner
                mods.append((mname or type(model).__name__, module))
    return owners


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


#: a layer called on a later batch that cannot be laid out there
LATE = "was called on this batch, but not on the first, whose layout is kept"

#: a layer called on a batch, but not by the model's runs on its examples that lay it out (in-run:
#: in eval mode, where a layer of training mode only is not called)
UNREPEATED = "was called on this batch, but not when the model ran again on its examples to lay it out"

#: the end of the reason of a ruled layer's parameter that its rule does not differentiate: the
#: free-parameter rule follows it instead, as it does a parameter of a layer without a rule
NOT_DIFFERENTIATED = " (a reparametrization such as weight_norm or prune, or a parameter of its own forward)"


def plan_layers(model: nn.Module, param_names: list[str]) -> tuple[list[_Layer], dict[str, str]]:
    """Split scored parameters into ruled layers and {fallback parameter: reason}.

    A tensor owned by several modules (tied weights, e.g. an input embedding reused as
    the output layer) gets the sum of the uses as its gradient, g = g₁ + g₂: each owner's
    rule gives ‖g_i‖² and ⟨g_i, V⟩, and the cross terms 2⟨g_i, g_j⟩ come from the rules'
    factors (``rules.tied_sq``). Owners without factors send the tensor to vmap.
    An owner without a rule that is an ancestor of one with a rule only holds the tensor
    (BERT's MLM head registers its decoder's bias as its own): the ruled owners take it,
    and a use of it by the ancestor's own ops is a stray at the layout (the fallback).
    """
    canonical = {id(p): n for n, p in model.named_parameters()}  # the de-duplicated names
    wanted = set(param_names)
    fallback: dict[str, str] = {}
    tied: set[str] = set()
    held: set[tuple[int, int]] = set()   # (id(module), id(parameter)): the module only holds it
    for i, mods in _owners(model).items():
        if len(mods) < 2 or canonical[i] not in wanted:
            continue
        found = [find_rule(m) for _, m in mods]
        ruled = [(n, m) for (n, m), (r, _) in zip(mods, found) if r is not None]
        holders = [(n, m) for (n, m), (r, _) in zip(mods, found)
                   if r is None and any(o.startswith(f"{n}.") or n == type(model).__name__ for o, _ in ruled)]
        if ruled and len(ruled) + len(holders) == len(mods):
            held.update((id(m), i) for _, m in holders)
            mods, found = ruled, [find_rule(m) for _, m in ruled]
            if len(mods) < 2:
                continue
        if all(r is not None and r.factors is not None for r, _ in found):
            tied.add(canonical[i])
        else:
            why = next((reason for r, reason in found if r is None), None) or "a rule without factors"
            fallback[canonical[i]] = (f"shared by modules {' and '.join(n for n, _ in mods)}, not all "
                                      f"with a ghost rule for tied weights: {why}")
    layers, covered, claimed = [], set(), set()
    for mname, module in model.named_modules():
        if id(module) in claimed:
            continue
        rule, reason = find_rule(module)
        own = {local: canonical[id(p)] for local, p in module.named_parameters(recurse=False)
               if (id(module), id(p)) not in held}
        for child in rule.children if rule is not None else ():   # submodules the rule uses functionally
            claimed.add(id(module.get_submodule(child)))
            own.update({f"{child}.{local}": canonical[id(p)]
                        for local, p in module.get_submodule(child).named_parameters()})
        own = {k: v for k, v in own.items() if v in wanted and v not in fallback}
        if not own:
            continue
        if rule is None:
            fallback.update({full: reason for full in own.values()})
            continue
        known = rule.knows(module)
        for local in [k for k in own if k not in known]:   # e.g. weight_norm's weight_g: `weight` is made from it
            fallback[own.pop(local)] = (f"'{local}' is not a parameter of {type(module).__name__} that its "
                                        f"{rule.name} rule differentiates{NOT_DIFFERENTIATED}")
        if not own:
            continue
        layers.append(_Layer(mname, module, rule, own, {k for k, v in own.items() if v in tied}))
        covered.update(own.values())
    for name in param_names:
        if name not in covered and name not in fallback:
            fallback[name] = "not owned by a module with a ghost rule"
    return layers, fallback


def _unchanged(out, versions: list[int]):
    """``out`` with each tensor leaf whose version is no longer the one in ``versions``
    (in :func:`map_leaves` order) replaced by None."""
    left = iter(versions)
    return map_leaves(out, lambda t: t if t._version == next(left) else None)


def _deltas_like(skeleton, grads: dict[int, torch.Tensor]):
    """A call's output structure with leaf index i replaced by its δ (None where none came)."""
    if isinstance(skeleton, tuple):
        return tuple(_deltas_like(s, grads) for s in skeleton)
    return grads.get(skeleton) if isinstance(skeleton, int) else None


class OutputPaths:
    """Checks that a backward reaches the ruled layers only through the model's output z:
    each layer's δ from a backward of z alone (:meth:`run`, with the step's own ∂L/∂z)
    against the step's. A loss term on an activation inside the model (a penalty, a batch
    term such as MoE load balancing, an auxiliary head) adds gradient there that belongs to
    no example's share of the output's loss."""

    def __init__(self, leaf: list[torch.Tensor]) -> None:
        self.leaf = leaf             # the probes' zero leaf, once the forward has made it
        self.alone: dict = {}        # (layer name, call) -> fingerprint of its δ from z alone
        self.running = False
        self.ran = False
        self.other: str | None = None   # the first layer the step's loss reaches another way

    def run(self, output: torch.Tensor | torch.autograd.graph.GradientEdge, delta: torch.Tensor) -> None:
        """The backward of ``output`` alone, with gradient ``delta``, to every probe; keeps
        the graph for the step's own backward."""
        if not self.leaf:
            return
        self.running = True
        try:
            torch.autograd.grad(output, self.leaf, delta, retain_graph=True, allow_unused=True)
            self.ran = True
        finally:
            self.running = False

    def see(self, name: str, call, delta: torch.Tensor) -> bool:
        """Take a probe's δ: its fingerprint kept while :meth:`run` runs (True: nothing more
        to do with it), else compared with the kept one."""
        if self.running:
            self.alone[(name, call)] = _fingerprint(delta.detach())
            return True
        if self.ran and self.other is None:   # fingerprinted only where there is one to compare with
            alone = self.alone.pop((name, call), None)
            if alone is None or not _same_fingerprint(_fingerprint(delta.detach()), alone):
                self.other = name
        return False


def _fingerprint(delta: torch.Tensor) -> tuple:
    """(shape, ‖δ‖, ⟨δ, r⟩) with r a fixed quasi-random ±½ pattern (period 2²⁰): an added
    gradient Δ moves ⟨δ, r⟩ by about ‖Δ‖/3.5 in any direction. Two scalars are kept, not a
    copy of δ: a language model's first step would hold every layer's δ at once."""
    flat = delta.reshape(-1)
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    period = min(flat.numel(), 1 << 20)
    r = torch.arange(period, device=flat.device, dtype=torch.float64).mul_(0.6180339887498949).frac_().sub_(0.5)
    r, proj = r.to(dtype), torch.zeros((), device=flat.device, dtype=torch.float64)
    for at in range(0, flat.numel(), period):   # chunks: no float32 copy of a half-precision δ at once
        part = flat[at:at + period]
        proj += torch.dot(part.to(dtype), r[:len(part)]).double()
    return tuple(delta.shape), float(torch.linalg.vector_norm(flat, dtype=dtype)), float(proj)


def _same_fingerprint(a: tuple, b: tuple) -> bool:
    """Fingerprints of the same δ up to rounding (10⁻⁴ of ‖δ‖: the same backward, its
    ops in any order). Two that are both NaN/Inf (a model that diverged) compare nothing:
    the same, and the step's records say they are not finite."""
    if not (math.isfinite(a[1]) or math.isfinite(b[1])):
        return a[0] == b[0]
    tol = 1e-4 * max(a[1], b[1]) + 1e-30
    return a[0] == b[0] and abs(a[1] - b[1]) <= tol and abs(a[2] - b[2]) <= tol


def _got_gradient(layer: _Layer) -> None:
    """A gradient reached a call of ``layer`` that the first batch showed none reaching."""
    layer.problem = layer.problem or ("got a gradient in a call that none reached on the first batch (a term on its "
                                      "output in the step's loss?)")


def _eager(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn``, run eagerly where torch.compile traces its caller (a hook in a compiled
    forward). torch.compiler.disable imports dynamo, which takes seconds: applied only there."""
    return torch.compiler.disable(fn) if torch.compiler.is_compiling() else fn


class _BatchSums:
    """One batch's accumulator: the running sums of the rules' ‖g‖² (B,) and dots (B, K), and the
    factors of tied weights until all their owners have reported."""

    def __init__(self, refs: RefBlocks | None, index: dict[str, int], K: int) -> None:
        self.refs, self.index, self.K = refs, index, K
        self.sq: torch.Tensor | None = None
        self.dots: torch.Tensor | None = None
        self.tied: dict[str, list[tuple[Factor, torch.Tensor]]] = {}   # tied weight -> (factor, ‖g_i‖²) per owner
        self.grams = SharedGrams()   # inputs read by several layers: their Grams, formed once
        self.again = False           # a δ came after its layer's rule had run: a second backward
        self.paths: OutputPaths | None = None   # in-run: the check that the loss reaches layers only through z
        self.free: FreeUses | None = None       # the free parameters' uses in this batch's forward
        # the batch's inputs and the context of the engine's own forwards on them: a layer first called on
        # this batch is laid out on it (None: such a call sends its layer to the fallback)
        self.late: tuple[Inputs, Callable[[], ContextManager]] | None = None

    def note_input(self, layer: _Layer, act) -> None:
        """A call of ``layer`` reads ``act``: counted, if its rule may form the input's Gram."""
        seq = self._gram_input(layer, act)
        if seq is not None:
            self.grams.note(seq)

    @staticmethod
    def _gram_input(layer: _Layer, act) -> torch.Tensor | None:
        if layer.rule.gram_input is None or "weight" not in layer.params or not isinstance(act, torch.Tensor):
            return None
        return layer.rule.gram_input(act)

    def add(self, sq: torch.Tensor | None, dots: torch.Tensor | None) -> None:
        """Add a share; ``dots`` None: the rule kept its dots itself (the sketch engine's buffer);
        ``sq`` None: added later (a tied weight's)."""
        if sq is not None:
            self.sq = sq if self.sq is None else self.sq + sq
        if dots is not None:
            self.dots = dots if self.dots is None else self.dots + dots

    def run_rule(self, layer: _Layer) -> None:
        """Apply the layer's rule to the calls whose δ arrived, then drop them."""
        if layer.grads:
            lrefs = {local: (self.refs[self.index[full]] if self.refs is not None else None)
                     for local, full in layer.params.items()}
            if layer.rule.probe_all:   # per call, the output's structure with each leaf's δ (or None)
                order = sorted({call for call, _ in layer.grads})
                grads = [_deltas_like(layer.skeletons[c], {i: d for (cc, i), d in layer.grads.items() if cc == c})
                         for c in order]
            else:
                order = sorted(layer.grads)
                grads = [layer.grads[i] for i in order]
            acts = [layer.acts[i] for i in order]
            if layer.rule.probe_all:   # ((args, kwargs), output), each output leaf changed in place since: None
                acts = [(call, _unchanged(out, versions)) for call, out, versions in acts]
            with autocast_off():   # in the dtypes the rule chooses (float32 for half types), not the region's
                own = {local: ref for local, ref in lrefs.items() if local not in layer.tied}
                if own:
                    self.add(*layer.rule.fn(layer.module, acts, grads, own, self.K))
                if layer.tied:   # a tied weight's ‖g_i‖² is kept until every owner of it has reported
                    fs = layer.rule.factors(layer.module, acts, grads)
                    for local in layer.tied:
                        sq, dots = layer.rule.fn(layer.module, acts, grads, {local: lrefs[local]}, self.K)
                        self.add(None, dots)
                        self.tied.setdefault(layer.params[local], []).append((fs[local], sq))
            for act in acts:
                seq = self._gram_input(layer, act)
                if seq is not None:
                    self.grams.used(seq)
        layer.acts, layer.grads, layer.skeletons = [], {}, []

    def add_cross_terms(self) -> None:
        """Add each tied weight's ‖Σ_i g_i‖² = Σ_i ‖g_i‖² + 2 Σ_{i<j} ⟨g_i, g_j⟩ (``rules.tied_sq``);
        its dots, linear, were added by each owner."""
        with autocast_off():
            for uses in self.tied.values():
                fs, own = zip(*uses)
                self.add(tied_sq(list(fs), list(own)), None)
        self.tied = {}


@register_engine("ghost")
class GhostEngine(Engine):
    """Norms and dots from one batched forward/backward with per-layer ghost rules; the
    parameters without one go to vmap, else the per-example loop (:mod:`.fallback`)."""

    #: whether parameters a forward uses directly take the free-parameter rule
    takes_free = True

    def __init__(self, model, loss, param_names, chunk_bytes=256 * 2**20) -> None:
        super().__init__(model, loss, param_names, chunk_bytes)
        self.layers, self.fallback = plan_layers(model, self.param_names)
        # free parameters (of modules without a rule), until the first batch shows how they are used
        owners = _owners(model)
        self.free = {n: p for n, p in candidates(model, list(self.fallback)).items()
                     if not any(has_rule(m) for _, m in owners[id(p)])
                     or self.fallback[n].endswith(NOT_DIFFERENTIATED)} if self.takes_free else {}
        self._free_why = {n: self.fallback.pop(n) for n in self.free}   # why no layer rule took each
        self._free_problems: dict[str, str] = {}   # a use the rule does not take, seen while scoring
        self._free_plan: dict[str, list[str]] = {}   # each free parameter's ops on the first batch (FreeUses)
        self._fallbacks: dict[tuple[str, ...], Fallback] = {}
        self._index = {n: i for i, n in enumerate(self.param_names)}
        self._laid_out = False
        self._coupled = False   # an example's output depends on its batch: everything to the fallback
        self._aside = False     # the engine's own forwards run inside a batch's (a late layout): hooks off

    def explain(self) -> dict[str, str]:
        """{parameter name: path}, e.g. 'ghost (linear rule on fc: Linear)', 'vmap (reason)'
        or 'loop (reason; vmap cannot trace this model (…))'. Final after the first batch, but for
        a layer not called yet, laid out on the first batch that calls it."""
        uses: dict[str, list[str]] = {}
        for layer in (layer for layer in self.layers if not layer.idle):
            # a recurrent layer's layout is its final state's: not said
            where = (", not called yet: laid out on the first batch that calls it" if layer.pending
                     else "" if layer.layout is None or (layer.layout.batch_dim == 0 and not layer.layout.merged)
                     or layer.rule.probe_all else f", {layer.layout.describe()}")
            for full in layer.params.values():
                uses.setdefault(full, []).append(f"{layer.rule.name} rule on {layer.name}: "
                                                 f"{type(layer.module).__name__}{where}")
        out = {full: f"ghost ({' + '.join(u)}{'; tied, exact cross term' if len(u) > 1 else ''})"
               for full, u in uses.items()}
        out.update({full: "ghost (free-parameter rule: per example in each use)"
                    for full in self.free})
        chain = self._fallbacks.get(self._fallback_key())
        reasons = ({n: "the model's output for an example depends on the rest of its batch" for n in self.param_names}
                   if self._coupled else self.fallback)
        for full, reason in reasons.items():
            if chain is not None and chain.path == "loop":
                out[full] = f"loop ({reason}; {chain.why_loop})"
            else:
                out[full] = f"vmap ({reason})"
        return {n: out[n] for n in self.param_names}

    def _fallback_key(self) -> tuple[str, ...]:
        if self._coupled:
            return tuple(self.param_names)
        return tuple(n for n in self.param_names if n in self.fallback)

    def _fallback(self, x, y, refs) -> ScoreBatch | None:
        """vmap (else the loop) over exactly the fallback parameters, or None."""
        key = self._fallback_key()
        if not key:
            return None
        return self._fallback_of(key).score_batch(x, y, None if refs is None else [refs[self._index[n]] for n in key])

    def _fallback_of(self, key: tuple[str, ...]) -> Fallback:
        """The fallback over exactly the parameters ``key``, made once."""
        if key not in self._fallbacks:
            self._fallbacks[key] = Fallback(self.model, self.loss, list(key), self.chunk_bytes)
        return self._fallbacks[key]

    def _lay_out(self, x: Inputs) -> None:
        """Establish every ruled layer's batch dimension (:mod:`.layout`) on the first batch;
        layers without one, and parameters used outside their layers' calls, go to the fallback."""
        tensors = dict(self.model.named_parameters())
        owners: dict[str, list[_Layer]] = {}
        for layer in self.layers:
            for full in layer.params.values():
                owners.setdefault(full, []).append(layer)

        def lay_out():
            return establish(self.model, {layer.name: (layer.module, layer.rule) for layer in self.layers}, x,
                             {full: (tensors[full], tuple(layer.name for layer in ls)) for full, ls in owners.items()
                              if full not in self.free}, self.free)
        found, self._coupled, strays, free, self._free_plan = lay_out()
        if self._to_free({layer.name: found[layer.name] for layer in self.layers}, owners, tensors, strays):
            found, self._coupled, strays, free, self._free_plan = lay_out()
        for full, why in free.items():
            if why is not None:
                self._free_to_fallback(full, why)
        for layer in self.layers:
            result = found[layer.name]
            if isinstance(result, Layout):
                layer.layout = result
            else:
                layer.problem = result
        for full, op in strays.items():
            first = owners[full][0]
            self.fallback[full] = (f"used outside {type(first.module).__name__} '{first.name}' (by {op}), "
                                   f"whose rule sees the layer's own calls only")
        self._laid_out = True
        self._moved_to_fallback(after_call=False)
        self._drop_fallback_params()   # the strays

    def _to_free(self, found: dict[str, Layout | str], owners: dict[str, list[_Layer]],
                 tensors: dict[str, torch.Tensor], strays: dict[str, str]) -> bool:
        """Give the free-parameter rule the weights of the layers whose output has no batch
        rows (:func:`.layout.batchless`: T5's and MPNet's relative attention bias, an Embedding
        of the (T, T) offsets), of the layers not called whose weights another op uses (``strays``:
        BEiT's ``F.linear(x, self.qkv.weight, bias)``), of the layers whose forward returns a
        tuple (PhiMoE's router, a Linear subclass), and of the look-alikes whose structural
        rule's check found they compute something else (layers without a rule): what the
        forward makes of them, and how it meets the batch, it follows like any parameter's
        (as it follows their other parameters, which their rule does not differentiate, from
        the start). Whether any layer moved."""
        moved = [layer for layer in self.layers if self.takes_free and isinstance(found[layer.name], str)
                 and (batchless(found[layer.name]) or found[layer.name] == NOT_ONE_OUTPUT
                      or (found[layer.name] == NOT_CALLED and any(f in strays for f in layer.params.values()))
                      or computes_otherwise(found[layer.name]))
                 and all(len(owners[f]) == 1 for f in layer.params.values())
                 and all(tensors[f].is_floating_point() for f in layer.params.values())]
        for layer in moved:
            self.layers.remove(layer)
            for full in layer.params.values():
                self.free[full] = tensors[full]
                self._free_why[full] = f"{type(layer.module).__name__} '{layer.name}' {found[layer.name]}"
        return bool(moved)

    def _lay_out_late(self, state: _BatchSums) -> None:
        """Lay out the pending layers (:attr:`_Layer.pending`) on ``state``'s batch, the first
        that calls one of them, inside its forward: the same runs as the first batch's, on
        the ruled layers not laid out yet. A layer called here that gets no layout its rule
        takes (or whose parameters another op uses, or a model whose output for an example
        depends on its batch) is given the reason: it goes to the fallback after the call."""
        pending = [layer for layer in self.layers if layer.pending]
        if state.late is None or torch._C._current_graph_task_id() != -1:   # no batch given; a backward's recompute
            for layer in pending:
                layer.pending, layer.problem = (False, LATE) if layer.seen else (True, None)
            return
        x, aside = state.late
        tensors = dict(self.model.named_parameters())
        owners = {full: tuple(o.name for o in self.layers if full in o.params.values())
                  for layer in pending for full in layer.params.values()}
        self._aside = True
        if state.free is not None:
            state.free.paused = True
        try:   # the runs save no tensor into an activation checkpoint the layer may be called in
            with aside(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
                found, coupled, strays, _, _ = establish(
                    self.model, {layer.name: (layer.module, layer.rule) for layer in pending}, x,
                    {full: (tensors[full], names) for full, names in owners.items()})
        finally:
            self._aside = False
            if state.free is not None:
                state.free.paused = False
        for layer in pending:
            result = found[layer.name]
            if result == NOT_CALLED and not layer.seen:   # not called on this batch either
                continue
            layer.pending = False
            stray = next((op for full, op in strays.items() if full in layer.params.values()), None)
            if result == NOT_CALLED:
                layer.problem = UNREPEATED
            elif coupled:
                self._coupled = True
                layer.problem = "is first called on a batch where an example's output depends on the rest of it"
            elif stray is not None:
                layer.problem = f"is first called on a later batch, where its parameters are also used by {stray}"
            elif isinstance(result, Layout):
                layer.layout = result
            else:
                layer.problem = f"{result} (on a later batch, the first that called it)"

    def _add_free(self, state: _BatchSums) -> None:
        """Add the free parameters' shares of the batch (their δ's, summed over their uses) to its sums."""
        if state.free is None:
            return
        refs = {n: (state.refs[state.index[n]] if state.refs is not None else None) for n in state.free.names()}
        sums = state.free.sums(refs, state.K)
        if sums is not None:
            state.add(*sums)
        state.free.clear()

    def _free_to_fallback(self, full: str, why: str) -> None:
        """``why``: what the free-parameter rule found ("": nothing worth adding to the reason no rule took it)."""
        self.fallback[full] = self._free_why[full] + (f"; as a free parameter it {why}" if why else "")
        del self.free[full]

    @contextlib.contextmanager
    def _hooks(self, state: _BatchSums, probes: list[torch.Tensor], B: int, contiguous: bool = True
               ) -> Iterator[None]:
        handles = []
        self._free_problems.clear()
        if self.free:   # active for the model's forward: from here to the end of its call
            state.free = FreeUses({id(t): n for n, t in self.free.items()}, B, probes, contiguous, self._free_problems,
                                  self._free_plan, None if state.paths is None else state.paths.see)
            state.free.__enter__()
            handles.append(self.model.register_forward_hook(lambda *_: None if self._aside else state.free.leave()))
        for layer in self.layers:
            layer.acts, layer.grads, layer.calls, layer.seen, layer.problem = [], {}, 0, 0, None
            layer.absent = False
            layer.skeletons = []

            def on_grad(delta, layer=layer, call=None, layout=None):
                if state.paths is not None and state.paths.see(layer.name, call, delta):
                    return
                if not layer.acts:   # its rule ran and let the inputs go: a second backward
                    state.again = True
                    return
                moved = layout is not None and (layout.batch_dim or layout.merged)   # as the rule saw the input
                layer.grads[call] = layout.rows(delta, B) if moved else delta
                if len(layer.grads) == layer.calls:  # every call's δ is in: reduce now
                    state.run_rule(layer)

            def hook(module, args, kwargs, output, layer=layer):
                if self._aside:   # the engine's own forwards (a late layout)
                    return None
                layer.seen += 1
                if not torch.is_grad_enabled():   # no gradient reaches this call (in-run: a pseudo-labelling call)
                    return None
                if layer.idle:   # its share was taken to be nothing: a call with gradient sends its weight away
                    if any(t.requires_grad for t in leaves(output)):
                        layer.problem = LATE
                    return None
                if layer.pending:   # its first call: laid out now, on this batch
                    _eager(self._lay_out_late)(state)   # its runs of the model are the engine's own
                    if layer.problem is not None:
                        return None
                rule, whole = layer.rule, output
                act, output = observed(rule, args, kwargs, whole)
                if layer.seen - 1 in layer.layout.dead:   # the first batch showed no gradient reaches this call
                    if isinstance(output, torch.Tensor) and output.requires_grad:
                        # in training, a gradient that reaches it after all (a term on it in the loss) is a problem
                        output.register_hook(lambda grad, layer=layer: _got_gradient(layer))
                    return None
                if not isinstance(act, torch.Tensor) or not isinstance(output, torch.Tensor):
                    layer.problem = "was called with a non-tensor input or output"
                    return None
                dim, merged = layer.layout.batch_dim, layer.layout.merged
                shared = dim is None and B > 1
                if dim is None and (act.shape[:1] != (1,) or output.shape[:1] != (1,)):
                    layer.problem = "returned one row for the whole batch at first, then more"
                elif dim is not None and (layer.layout.rows(act, B) is None or layer.layout.rows(output, B) is None
                                          or (merged and output.shape[0] != act.shape[0])):
                    layer.problem = ("was called with rows in dimension 0 that are not the same number per example"
                                     if merged else f"was called without the batch in dimension {dim}")
                if layer.problem or not output.requires_grad:  # no_grad: no gradient reaches it
                    return None
                if rule.call:  # the whole call, as the layer saw it
                    act = map_leaves((args, kwargs), torch.Tensor.detach)   # PackedSequence data too
                    if shared:   # Rule.expands: the rule expands what it reads of the call
                        output = output.expand(B, *output.shape[1:])
                elif shared:  # one row for the whole batch: give each example its copy
                    act, output = act.expand(B, *act.shape[1:]), output.expand(B, *output.shape[1:])
                elif dim or merged:   # sequence-first, or merged rows: the rule sees the batch in dimension 0
                    act = layer.layout.rows(act, B)
                if not probes:      # one zero leaf for every probe of the batch
                    probes.append(torch.zeros((), device=output.device, requires_grad=True))
                if rule.probe_all:  # every floating output that needs a gradient, each with its own δ
                    return self._probe_all(layer, whole, act, probes[0], on_grad, contiguous)
                call = layer.calls
                layer.calls += 1
                layer.acts.append(act.detach() if isinstance(act, torch.Tensor) else act)
                state.note_input(layer, layer.acts[-1])
                # reaching z in the backward needs ∂L/∂probed = δ; a broadcast output gets its B rows
                probed = probe(output.contiguous() if shared else output, probes[0],
                               lambda d, layer=layer, call=call: on_grad(d, layer, call, layer.layout),
                               contiguous)
                if rule.output_item is None:
                    return probed
                return type(whole)(probed if i == rule.output_item else v for i, v in enumerate(whole))
            # first among the layer's forward hooks: a rule needs δ of the layer's own output, before a user's hook
            # returns another (o·2); hooks registered after that see the probed output as the layer's
            handles.append(layer.module.register_forward_hook(hook, with_kwargs=True, prepend=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            if state.free is not None:
                state.free.leave()

    @staticmethod
    def _probe_all(layer: _Layer, whole, call_inputs, z: torch.Tensor, on_grad, contiguous: bool):
        """``whole`` with each floating leaf that needs a gradient probed; the call's δ's
        are keyed (call, leaf index), and its skeleton keeps the structure."""
        call, index, versions = len(layer.acts), [0], []
        # the output too, with its version, which tells whether it is still what the call returned
        kept = map_leaves(whole, lambda t: versions.append(t._version) or t.detach(), plain=True)
        layer.acts.append((call_inputs, kept, versions))

        def probe_leaf(t: torch.Tensor):
            if not (t.is_floating_point() and t.requires_grad):
                return t
            i, layer.calls = index[0], layer.calls + 1
            index[0] += 1
            return probe(t, z, lambda d: on_grad(d, layer, (call, i)), contiguous)

        probed = map_leaves(whole, probe_leaf)
        counter = iter(range(index[0]))
        layer.skeletons.append(map_leaves(whole, lambda t: next(counter) if t.is_floating_point()
                                           and t.requires_grad else None, plain=True))
        return probed

    def lay_out(self, x: Inputs) -> None:
        """Establish the ruled layers' batch dimensions on ``x`` (done by the first
        :meth:`score_batch` otherwise); layers without one, or whose rows are not the
        examples in order, go to the fallback. Runs the model on 1 and 2 copies of x's
        first example, then on x and on its first and last examples alone."""
        self._lay_out(x)

    @property
    def coupled(self) -> bool:
        """Whether an example's output depends on the rest of its batch (known after
        :meth:`lay_out`): then every parameter takes the fallback."""
        return self._coupled

    @contextlib.contextmanager
    def recording(self, B: int, refs: RefBlocks | None, check_paths: bool = False, x: Inputs | None = None,
                  aside: Callable[[], ContextManager] = contextlib.nullcontext) -> Iterator[_BatchSums]:
        """The hooks of one batch of B examples whose forward and backward the caller runs
        (in-run scoring: the training step's own). Yields the batch's sums; after the block
        every rule that received its δ has run (``.sq`` (B,), ``.dots`` (B, K), None if no
        δ arrived). ``check_paths``: ``.paths`` is an :class:`OutputPaths` whose ``run`` the
        caller calls when ∂L/∂z comes. ``x``: the batch's inputs, on which a layer the first
        batch did not call is laid out if this one calls it (inside ``aside()``: in-run, eval
        mode and the random state forked); without, such a layer goes to the fallback.
        Needs :meth:`lay_out` first; the caller checks :attr:`fallback`."""
        K = 0 if refs is None else refs[0].shape[0]
        state, probes = _BatchSums(refs, self._index, K), []
        state.paths = OutputPaths(probes) if check_paths else None
        state.late = None if x is None else (x, aside)
        with self._hooks(state, probes, B, contiguous=False), sharing(state.grams):   # δ passed on as it came
            yield state
            if state.again or (state.free is not None and state.free.again):
                raise EngineError("a second backward reached the model inside one rec.step; run one forward and "
                                  "one backward per rec.step (each micro-batch in its own)")
            for layer in self.layers:
                state.run_rule(layer)
            self._add_free(state)
        if state.tied:
            state.add_cross_terms()

    def note_output(self, out) -> None:
        """After a call of the model, before its backward: the layers it did not call whose
        parameters nothing of ``out`` (its output, or the losses) reaches have no share in this
        batch (a block skipped by LayerDrop) and keep their rule; the others that it did not
        call go to the fallback after the call (their weights used some other way)."""
        uncalled = [layer for layer in self.layers if layer.seen == 0 and not layer.idle and layer.problem is None]
        if not uncalled:
            return
        reached = {id(node.variable) for node in graph_nodes(out) if hasattr(node, "variable")}
        for layer in uncalled:
            layer.absent = not any(id(layer.module.get_parameter(local)) in reached for local in layer.params)

    def moved_to_fallback(self) -> bool:
        """After a call of the model under :meth:`recording`: send the layers it showed a
        problem with (or did not call) to the fallback; True if any moved."""
        return self._moved_to_fallback()

    def _score(self, x: Inputs, y: torch.Tensor, refs: RefBlocks | None) -> ScoreBatch:
        if not self._laid_out:
            self._lay_out(x)
        if self._coupled:   # every parameter, the losses and the logits from examples run alone
            return self._fallback(x, y, refs)
        K = 0 if refs is None else refs[0].shape[0]
        B = batch_len(x)
        state, probes = _BatchSums(refs, self._index, K), []
        state.late = (x, contextlib.nullcontext)
        with self._hooks(state, probes, B), torch_workarounds():
            with torch.enable_grad():
                out = call_model(self.model, x)
                losses = self.losses(out, y)
            self.note_output(losses)
            if losses.shape != (B,):
                raise EngineError(f"the loss returned shape {tuple(losses.shape)}; it must return one "
                                  f"loss per example, shape ({B},): reduction='none', each example's other "
                                  f"terms summed (or averaged) over its own dimensions")
            replan = self._moved_to_fallback()
            if probes and not replan:
                with sharing(state.grams):
                    torch.autograd.grad(losses.sum(), probes, allow_unused=True)
        if replan:  # some layers moved to the fallback: redo this batch without their hooks
            return self._score(x, y, refs)
        with sharing(state.grams):
            for layer in self.layers:  # calls whose output did not reach the loss add nothing
                state.run_rule(layer)
            self._add_free(state)
        if state.tied:
            state.add_cross_terms()
        fb = self._fallback(x, y, refs)
        if fb is not None:
            state.add(fb.sq_norm, fb.dots if fb.dots is not None else fb.sq_norm.new_zeros((B, 0)))
        if state.sq is None:
            acc = acc_dtype(out.dtype)
            state.add(out.new_zeros(B, dtype=acc), out.new_zeros((B, K), dtype=acc))
        return ScoreBatch(loss=losses.detach(), sq_norm=state.sq,
                          dots=state.dots if refs is not None else None, logits=out.detach())

    def _moved_to_fallback(self, after_call: bool = True) -> bool:
        """Send layers with a problem (after a call of the model, also those it did not
        call) to the fallback; a weight tied to such a layer goes there as a whole (it
        leaves its other owners too)."""
        moved = bool(self._free_problems)
        for full, why in self._free_problems.items():
            if full in self.free:
                self._free_to_fallback(full, why)
        self._free_problems.clear()
        for layer in self.layers:
            reason = (NOT_CALLED if after_call and layer.seen == 0 and layer.problem is None and not layer.idle
                      and not layer.absent
                      else layer.problem)
            if reason == NOT_CALLED and self._tied_to_called(layer, after_call):
                layer.idle, layer.problem = True, None   # T5's and BART's `shared` vocabulary: its owners' calls
                continue
            if reason == NOT_CALLED and not after_call and not any(f in self.fallback for f in layer.params.values()):
                layer.pending, layer.problem = True, None   # a head of another task, a branch of other data
                continue
            if reason is None:
                continue
            self.fallback.update({full: f"{type(layer.module).__name__} '{layer.name}' {reason}"
                                  for full in layer.params.values()})
            moved = True
        if moved:
            self._drop_fallback_params()
        return moved

    def _tied_to_called(self, layer: _Layer, after_call: bool) -> bool:
        """Whether every parameter of an uncalled ``layer`` is tied to another owner that was
        called (and laid out): then the layer's share of its gradient is nothing. A use of the
        weight outside its owners' calls is the op watch's (a stray: the fallback)."""
        others = [o for o in self.layers if o is not layer and not o.idle and o.problem is None
                  and (o.seen > 0 or not after_call)]
        return (bool(layer.params) and set(layer.params) == layer.tied
                and all(any(full in o.params.values() for o in others) for full in layer.params.values()))

    def _drop_fallback_params(self) -> None:
        """Take the fallback's parameters out of the ruled layers (and layers left with none)."""
        for layer in self.layers:
            layer.params = {k: v for k, v in layer.params.items() if v not in self.fallback}
            layer.tied &= set(layer.params)
        self.layers = [layer for layer in self.layers if layer.params]
