"""Where each ruled layer keeps the batch: established from evidence, once per engine.

A ghost rule needs row b of a layer's input and output gradient to be example b's. A
layer's first dimension having B rows is no evidence: a sequence-first layer sees
(T, B, d), and T can equal B. So, on the first batch, the model runs twice more on
sub-batches of 1 and 2 copies of its first example (grad enabled, nothing kept), and a
forward hook records the shapes each ruled layer sees. A dimension *follows the batch*
when it is 1 in the first run and 2 in the second; repeated rows keep every
data-dependent size (sequence lengths) the same in both runs.

- Exactly one dimension follows, the same in input and output: that is the layer's
  batch dimension (:class:`Layout`); rules accept dimension 0, row-wise ones also 1.
- None follows, and the first dimension is k > 1 in the first run and 2k in the second,
  the other dimensions the same, in input and output alike, for a rule that acts on
  trailing features only: the batch merged with the next dimension, example by example
  (OPT's MLP calls its Linears on ``h.reshape(-1, d)``, (B·T, d)) (:attr:`Layout.merged`).
  The engine views each call's rows as (B, k, ...), k read per call. Rows of the steps
  first, or of the batch stacked on itself, double too: the order check below sends them
  to the fallback, and so a first batch of one example, which cannot show the order.
  (Rows of nearly equal values can hide another order from that check's comparison of
  values: see :func:`_leaky` below.)
- None follows and the first dimension is 1 in both runs (Hugging Face position ids
  (1, T)): one row for the whole batch. The engine expands it to B rows, which is
  exact only when every use of the output is a sum with a tensor of batch rows: each
  op that consumes the output is recorded in both runs (a ``TorchFunctionMode``), and
  each must be an add or subtract whose other operand has the output's rank, the batch
  in dimension 0 (1 then 2 rows) and the result's shape.
- Anything else, or a layer that is not called, or called in different layouts, gets
  a reason and its parameters go to the fallback.

Copies of one example cannot show the order of a batch's rows. So the batch itself, and
its first and last examples alone, run once more (nothing kept), and each laid-out
layer's rows 0 and B − 1 must be the first and last examples' own rows: a model that
sorts its batch (by length, before packing a sequence) or permutes it gives a layer
another example's row, and that layer goes to the fallback. Rows of nearly equal values
(duplicate examples; a LayerNorm over 2 features) can pass that comparison in another
order, so the first and last examples also run as a pair with each layer's rows of one
of them changed: the other's output must stay as it is (:func:`_leaky`). The outputs of the two
examples alone are what :func:`couples_examples` compares with the batch's.

The same runs watch the ruled parameters: a rule sees its layer's own calls only, so a
parameter that an op uses, with a result that needs a gradient, while none of its layers
is running (a tied output head written ``h @ emb.weight.T``, ``F.linear(h, fc.weight)``)
is reported, and goes to the fallback whole. They also watch the free parameters
(:mod:`.free`): each use with a gradient must broadcast the parameter over 1 row for one
example and 2 for two, and its result's rows 0 and B − 1 must be the first and last
examples' own; in the pair run, one example's rows of each use's result are changed as a
layer's output is, and the other example's output must not move.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..batch import Inputs, batch_len, call_model, concat, move, take
from ..exceptions import EngineError, GradscoreError
from ..kernels.reference import autocast_dtypes, autocast_off
from .free import (MERGED, TILED, Views, graph_nodes, in_place, last_node, map_leaves, misfit, needs_grad, op_nodes,
                   result, unseen_uses)
from .rules import Rule
from .rules.registry import close
from .workarounds import torch_workarounds

#: ops under which a batch-broadcast output, expanded to B rows, stays exact
_SUMS = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__"}
#: ops that pass a tensor on unchanged in shape and rows (their result is tracked instead)
_PASS = {"to", "contiguous", "clone", "type", "float", "double", "half", "bfloat16"}


@dataclass(frozen=True)
class Layout:
    """A layer's batch dimension in its input and output (None: one row for the batch), and
    which of its calls in a forward get no gradient (``dead``, by call number: their output
    reaches the model's by no path, as DoRA's adapters called on an identity matrix for a
    detached norm): those are no example's, and have no batch to find."""

    batch_dim: int | None
    dead: tuple[int, ...] = ()
    merged: bool = False   # dimension 0 holds B·k rows, example by example: viewed as (B, k, ...)

    def describe(self) -> str:
        if self.batch_dim is None:
            return "one row for the whole batch, expanded"
        if self.merged:
            return "the batch merged with the next dimension in dimension 0, example by example"
        return f"batch in dimension {self.batch_dim}"

    def rows(self, t: torch.Tensor, B: int) -> torch.Tensor | None:
        """``t`` with the batch in dimension 0 as the rule sees it ((B, k, ...) for merged
        rows), or None where its shape does not hold B examples' rows in this layout."""
        dim = self.batch_dim
        if dim is None or t.is_nested or t.dim() <= dim:
            return None
        if self.merged:
            return t.unflatten(0, (B, t.shape[0] // B)) if B and t.shape[0] % B == 0 else None
        return (t.movedim(dim, 0) if dim else t) if t.shape[dim] == B else None


@dataclass
class _Record:
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # per call
    uses: list[list[tuple[str, list[tuple[int, ...]], tuple[int, ...] | None]]] = field(default_factory=list)
    sample: tuple[torch.Tensor, torch.Tensor] | None = None   # the first call's input and output
    outputs: list = field(default_factory=list)   # per call, its output (for its autograd node, read after)
    dead: tuple[int, ...] = ()   # the calls whose output the model's output does not reach
    problem: str | None = None   # why the layer does not compute what its rule assumes (Rule.verify)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    """The tensors among an op's arguments, one level into lists and tuples."""
    flat = []
    for a in (*args, *(kwargs or {}).values()):
        flat.extend(a if isinstance(a, (list, tuple)) else (a,))
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _op_name(func) -> str:
    """An op's name; a tensor property's (``w.T``) as ``.T``."""
    name = getattr(func, "__name__", str(func))
    owner = getattr(func, "__self__", None)
    return f".{owner.__name__}" if name == "__get__" and hasattr(owner, "__name__") else name


class _Uses(TorchFunctionMode):
    """Records every op that consumes a watched tensor: (op name, other tensor operands'
    shapes, result shape); and, for the ruled parameters ``params`` (id -> (name, the layers
    whose rule covers it)), the first op that uses one while none of those layers runs."""

    def __init__(self, params: dict[int, tuple[str, tuple[str, ...]]], free: dict[int, str], B: int,
                 plan: dict[str, list[str]] | None = None, untiled: frozenset[str] = frozenset(),
                 constants: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.plan = plan   # the free parameters' ops ("use", "made", …) in a run of 2 examples, which this one follows
        self.watched: dict[int, list] = {}   # id(tensor) -> that call's list of uses
        self.alive: list[torch.Tensor] = []  # keeps ids from being reused during the run
        self.params = params
        self.running: dict[str, int] = {}    # layer name -> its calls under way
        self.strays: dict[str, str] = {}     # parameter name -> the op that used it outside its layers
        # free parameters {id: name}, what is made of them (the model's buffers ``constants`` no batch's), the batch
        self.views, self.B = Views(free, B, untiled, constants), B
        # per use: (what does not fit or None, whether it has the form the rule takes)
        self.free_uses: dict[str, list[tuple[str | None, bool]]] = {n: [] for n in free.values()}
        self.consumers: set = set()          # the autograd nodes of those uses (and of their views)
        self.unseen: dict[str, str] = {}     # free parameter -> a node that uses it where no op was seen
        self.unfit: dict[str, str] = {}      # free parameter -> why its copy is no longer it (Views.unfit)
        self.use_rows: dict[str, list[int]] = {}   # free parameter -> each use's result rows (dimension 0)

    def watch(self, t: torch.Tensor, uses: list) -> None:
        self.watched[id(t)] = uses
        self.alive.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        seen = self.views.hits(args, kwargs or {})
        tracked = [t for t in seen if t.requires_grad]
        unfit = self.views.unfit(func, args, kwargs or {}, tracked) if tracked else None   # before it runs
        before = last_node((args, kwargs or {})) if seen else -1
        out = func(*args, **(kwargs or {}))
        if unfit is not None and (needs_grad(out) or in_place(func, kwargs)):
            for name in self.views.names(tracked):
                self.unfit.setdefault(name, unfit)
            return out
        tensors = _tensors(args, kwargs)
        if isinstance(out, torch.Tensor) and out.requires_grad:   # .dtype, .shape, .detach(): no gradient flows
            for t in tensors:
                name, layers = self.params.get(id(t), (None, ()))
                if name is not None and not any(self.running.get(n) for n in layers):
                    self.strays.setdefault(name, _op_name(func))
        res = result(func, args, kwargs, out)   # x[i] = v: x
        if not seen:
            self.views.follow_constants(args, kwargs or {}, res)
        if seen and needs_grad(res):
            self.consumers.update(op_nodes(res, before))
            hits = tracked
            kind = self.views.planned_kind(func, args, hits, self.plan)
            made = (self.views.note(func, args, kwargs or {}, res, planned=kind) if kind is not None
                    else self.plan is None and self.views.note(func, args, kwargs or {}, res))
            if not made:   # a use; where the run of 2 made another tensor here, the steps differ (_free_layout)
                fits = [self.views.tiled_fit(func, args, kwargs or {}, t) if id(t) in self.views.tiled
                        else misfit(func, args, kwargs or {}, t, self.B) for t in hits]
                for t, fit in zip(hits, fits):
                    for name in self.views.of[id(t)]:
                        self.free_uses[name].append(fit)
                taken = [t for t, (why, _) in zip(hits, fits) if why is None]
                for name in self.views.names(taken):   # as Views.used: one step per op
                    self.use_rows.setdefault(name, []).append(out.shape[0] if isinstance(out, torch.Tensor) else -1)
                self.views.used(taken)
        hit = [t for t in tensors if id(t) in self.watched]
        if not hit or not isinstance(out, torch.Tensor):   # .shape, .dim(), .size(): no data flows on
            return out
        name = _op_name(func)
        for t in hit:
            uses = self.watched[id(t)]
            if name in _PASS:
                self.watch(out, uses)
            else:
                uses.append((name, [tuple(o.shape) for o in tensors if o is not t], tuple(out.shape)))
        return out


def observed(rule: Rule, args: tuple, kwargs: dict, output) -> tuple:
    """(the input, the output tensor) whose shapes tell a call's layout: the first input,
    positional or keyword (a whole-call rule: the output again, which alone tells), and
    the output itself, item ``output_item`` of a tuple output, or ``output_item(output)``."""
    item = rule.output_item
    if callable(item):
        output = item(output)
    elif item is not None and isinstance(output, (tuple, list)):
        output = output[item]
    if rule.call:
        return output, output
    return (args[0] if args else next(iter(kwargs.values()), None)), output


def _record(model: nn.Module, layers: dict[str, tuple[nn.Module, Rule]], x: Inputs,
            params: dict[int, tuple[str, tuple[str, ...]]], free: dict[int, str], verify: bool = False,
            plan: dict[str, list[str]] | None = None, untiled: frozenset[str] = frozenset()
            ) -> tuple[dict[str, _Record], _Uses]:
    """Each ruled layer's call shapes and output uses on ``x``, and the op watch (the
    parameters used outside their layers, the free parameters' uses, following ``plan``
    if given, their repeats never taken as over the batch for ``untiled``, :class:`_Uses`);
    with ``verify``, each rule's :attr:`Rule.verify` of its first call."""
    records = {name: _Record() for name in layers}
    mode = _Uses(params, free, batch_len(x), plan, untiled, frozenset(id(b) for b in model.buffers()))

    def enter(name):
        mode.running[name] = mode.running.get(name, 0) + 1

    def hook(module, args, kwargs, output, record, rule, name):
        mode.running[name] -= 1
        act, output = observed(rule, args, kwargs, output)
        if not isinstance(act, torch.Tensor) or not isinstance(output, torch.Tensor):
            if isinstance(act, torch.Tensor) and record.problem is None:
                record.problem = NOT_ONE_OUTPUT
            record.shapes.append(((), ()))
            record.outputs.append(None)
            return
        record.shapes.append((tuple(act.shape), tuple(output.shape)))
        record.outputs.append(output)   # its autograd node is read after the forward (torch.compile may trace this)
        if verify and rule.verify is not None and record.sample is None:   # a whole-call rule: its call
            record.sample = (map_leaves((args, kwargs), torch.Tensor.detach) if rule.call else act.detach(),
                             output.detach())
        uses: list = []
        record.uses.append(uses)
        mode.watch(output, uses)

    # a layer runs from after its pre-hooks (a user's pre-hook is outside it) to before its forward hooks
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: enter(n)) for n, (m, _) in layers.items()]
    handles += [m.register_forward_hook(lambda mod, a, kw, out, r=records[n], rule=rule, n=n:
                                        hook(mod, a, kw, out, r, rule, n), with_kwargs=True, prepend=True)
                for n, (m, rule) in layers.items()]
    try:
        with torch.enable_grad(), mode:   # grad on: the same code path as the scoring pass
            out = call_model(model, x)
    finally:
        for h in handles:
            h.remove()
    if mode.free_uses:
        mode.unseen = unseen_uses(out, mode.views, mode.consumers)
    reached = set(graph_nodes(out))
    for record in records.values():
        dead = tuple(i for i, t in enumerate(record.outputs) if t is not None
                     and (not t.requires_grad or (t.grad_fn is not None and t.grad_fn not in reached)))
        record.dead, record.outputs = (dead if len(dead) < len(record.outputs) else ()), []
    for name, record in records.items():   # outside the mode: a rule's check is no use of the layer
        module, rule = layers[name]
        if record.sample is not None:   # what the layer computes, whatever precision the batch ran in
            with torch.no_grad(), autocast_off(), torch_workarounds():   # its own backward: a GroupNorm's can crash
                record.problem = rule.verify(module, *record.sample)
            record.sample = None
    return records, mode


def _follows(one: tuple[int, ...], two: tuple[int, ...]) -> list[int]:
    if len(one) != len(two):
        return []
    return [i for i, (a, b) in enumerate(zip(one, two)) if a == 1 and b == 2]


def _doubles(one: tuple[int, ...], two: tuple[int, ...]) -> bool:
    """Whether dimension 0 is k > 1 in ``one`` and 2k in ``two``, the others the same."""
    return len(one) == len(two) >= 1 and one[0] > 1 and two[0] == 2 * one[0] and one[1:] == two[1:]


#: a layer's output with no batch rows: the same for one example as for two (its reasons; :func:`batchless`)
NO_BATCH = "has no batch dimension in its input or output"
ONE_ROW = "returns one row for the whole batch"


def batchless(reason: str) -> bool:
    """Whether a layer's reason for the fallback is that its output has no batch rows."""
    return reason == NO_BATCH or reason.startswith(ONE_ROW)


def _batch_dim(act1, out1, act2, out2) -> tuple[int | str | None, str | None]:
    """(batch dim, None), (MERGED, None) for rows merged with the batch, (None, None) for
    one row for the batch, or (None, reason)."""
    fa, fo = _follows(act1, act2), _follows(out1, out2)
    if len(fa) == 1 and fa == fo:
        return fa[0], None
    if not fa and not fo:
        if act1[:1] == (1,) and out1[:1] == (1,):
            return None, None
        if _doubles(act1, act2) and _doubles(out1, out2) and act1[0] == out1[0]:
            return MERGED, None
        return None, NO_BATCH
    return None, (f"has no single batch dimension (input {act1} -> {act2}, output {out1} -> {out2} "
                  f"for 1 and 2 examples)")


def _sums_with_batch_rows(uses1, uses2) -> str | None:
    """None if every use of a batch-broadcast output is a sum with batch rows, else why not."""
    if len(uses1) != len(uses2):
        return "is used differently for 1 and 2 examples"
    for (name, others1, res1), (_, others2, res2) in zip(uses1, uses2):
        ok = (name in _SUMS and len(others1) == 1 == len(others2) and res1 == others1[0]
              and res2 == others2[0] and len(res1) == len(res2) and _follows(res1, res2) == [0])
        if not ok:
            return f"{ONE_ROW}, used by {name} (only a sum with batch rows is exact)"
    return None


#: a ruled layer whose call returns no tensor for its rule to read (a subclass's forward returning a tuple)
NOT_ONE_OUTPUT = "returns a tuple or another non-tensor, not the one output its rule reads"

#: a ruled layer the first batch (or a later one) did not call
NOT_CALLED = "was not called; its parameters are used by another module"

#: a layer whose batch rows are not the examples' own rows, in order
REORDERED = ("its rows are not the batch's examples in order (the model reorders or mixes the batch before "
             "it): row 0 is not the first example's row alone, or row B − 1 the last's")
#: a free parameter whose uses' rows are not the batch's examples in order
REORDERED_USES = "is added to rows that are not the batch's examples in order"


#: per call: input rows, output rows (the batch in dimension 0), whether rows of another shape alone than in
#: the batch are another example's (merged rows: k rows per example is what the layout assumes)
_Rows = list[tuple[torch.Tensor, torch.Tensor, bool] | None]


class _FreeRows(TorchFunctionMode):
    """Records rows ``picks`` (dimension 0) of each result with a gradient of an op that uses
    a free parameter ({id: name}); a result without B rows records None. ``bumps``:
    {name: example}: that example's rows of each such result of the parameter's uses are
    changed (:func:`_leaky`; nothing is recorded then)."""

    def __init__(self, free: dict[int, str], B: int, picks: list[int], plan: dict[str, list[str]],
                 bumps: dict[str, int] | None = None) -> None:
        super().__init__()
        self.views, self.B, self.picks, self.plan, self.bumps = Views(free, B), B, picks, plan, bumps or {}
        # per use: (rows ``picks``, whether the result has k rows per example, viewed (B, k, ...)) or None
        self.rows: dict[str, list[tuple[torch.Tensor, bool] | None]] = {n: [] for n in free.values()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        hits = [t for t in self.views.hits(args, kwargs or {}) if t.requires_grad]
        if not hits or not isinstance(out, torch.Tensor) or not out.requires_grad:
            return out
        kind = self.views.planned_kind(func, args, hits, self.plan)
        if kind is not None:
            self.views.note(func, args, kwargs or {}, out, planned=kind)
            return out
        names = self.views.names(hits)
        merged = any(self.views.next_step(n, self.plan) == MERGED for n in names)
        whole = (out.dim() > 0 and not out.is_nested and out.is_floating_point() and self.B > 0
                 and (out.shape[0] % self.B == 0 if merged else out.shape[0] == self.B))
        self.views.used(hits)
        bumped = [self.bumps[n] for n in names if n in self.bumps]
        if bumped and whole:
            changed = out.detach().clone()
            with torch.no_grad():
                _bump(changed.view(self.B, -1, *out.shape[1:])[bumped[0]])   # k rows per example where merged
                if not in_place(func, kwargs):
                    return changed
                out.copy_(changed)   # an in-place use (h.add_(P)) returns h: change it where it is
        elif not self.bumps:
            for name in names:
                rows = out.detach().reshape(self.B, -1, *out.shape[1:]) if whole and merged else out.detach()
                self.rows[name].append((rows[self.picks], merged) if whole else None)
        return out


def _bump(rows: torch.Tensor) -> None:
    """Change ``rows`` (one example's, in place) by more than any rounding."""
    bump = torch.linspace(0.5, 1.5, rows.numel(), dtype=rows.dtype, device=rows.device)
    rows += bump.reshape(rows.shape) * (1 + float(rows.abs().mean()))


def _rows(model: nn.Module, layers: dict[str, tuple[nn.Module, Rule]], found: dict[str, Layout | str],
          x: Inputs, picks: list[int], free: dict[int, str], plan: dict[str, list[str]]
          ) -> tuple[dict[str, _Rows], torch.Tensor]:
    """Run the model on ``x`` (grad on: the scoring pass's code path, as torch's encoder
    layers take a fused path without it); {layer name: per call, (input rows, output rows,
    the batch dimension they are in) ``picks`` along the layer's batch dimension, or None
    for a call that does not see the whole batch there} for the layers laid out with one,
    and for each free parameter (``free``, {id: name}), per use, (result rows, result rows,
    0); and the model's output, all detached."""
    rows: dict[str, _Rows] = {}
    B = batch_len(x)

    def hook(module, args, kwargs, output, name, rule, layout):
        act, output = observed(rule, args, kwargs, output)
        both = [layout.rows(t.detach(), B) if isinstance(t, torch.Tensor) else None for t in (act, output)]
        whole = all(t is not None for t in both)
        index = torch.tensor(picks, device=output.device) if whole else None
        rows.setdefault(name, []).append((both[0].index_select(0, index), both[1].index_select(0, index),
                                          layout.merged) if whole else None)
    handles = [module.register_forward_hook(lambda mod, a, kw, o, n=name, r=rule, k=found[name]:
                                            hook(mod, a, kw, o, n, r, k), with_kwargs=True, prepend=True)
               for name, (module, rule) in layers.items()
               if isinstance(found.get(name), Layout) and found[name].batch_dim is not None]
    uses = _FreeRows(free, B, picks, plan)
    try:
        with torch.enable_grad(), uses:
            out = call_model(model, x).detach()
    finally:
        for h in handles:
            h.remove()
    for name, results in uses.rows.items():   # merged: rows of another shape alone are another example's
        rows[name] = [None if r is None else (r[0], r[0], r[1]) for r in results]
    return rows, out


def _reordered(batch: _Rows, first: _Rows, last: _Rows, model: nn.Module) -> bool:
    """Whether a layer's rows 0 and B − 1 in the batch (``batch``: per call, both rows)
    differ from its rows for the first and last examples alone, by more than the rounding
    of :func:`working_dtype` (under autocast a float32 row may come from half-precision
    matmuls: torch's CPU GRU's); calls that cannot be paired (another count or shape, or
    not seeing the whole batch) are not compared, except that rows merged with the batch
    of another shape alone than in the batch are not the example's own."""
    if not (len(batch) == len(first) == len(last)):
        return False
    for calls in zip(batch, first, last):
        if any(c is None for c in calls):
            continue
        (a, o, strict), (a0, o0, _), (a1, o1, _) = calls
        for both, one, other in ((a, a0, a1), (o, o0, o1)):
            if one.shape[1:] != other.shape[1:] or one.shape[1:] != both.shape[1:]:
                if strict:
                    return True
                continue
            if not close(torch.cat([one, other]), both, working_dtype(model, both.dtype)):
                return True
    return False


def establish(model: nn.Module, layers: dict[str, tuple[nn.Module, Rule]], x: Inputs,
              params: dict[str, tuple[torch.Tensor, tuple[str, ...]]] | None = None,
              free: dict[str, torch.Tensor] | None = None
              ) -> tuple[dict[str, Layout | str], bool, dict[str, str], dict[str, str | None],
                         dict[str, list[str]]]:
    """{layer name: its :class:`Layout`, or the reason it has none its rule accepts},
    whether an example's output depends on its batch (:func:`couples_examples`; False
    where the model did not run), {parameter name: the op that used it outside its
    layers' calls}, {free parameter name: None if the free-parameter rule takes it,
    else why not}, and for each one it takes, its ops in order ("use" or "made": the plan
    :class:`.free.FreeUses` follows).

    layers: {name: (module, its rule)}; params: {parameter name: (the tensor, the names of
    the layers whose rule covers it)}; free: {name: a parameter no rule covers}; x: a
    batch of B >= 1. A rule that takes the whole call (``Rule.call``) is laid out by its
    output alone.
    """
    first = take(x, 0)
    watched = {id(t): (name, owners) for name, (t, owners) in (params or {}).items()}
    free_ids = {id(t): name for name, t in (free or {}).items()}
    try:
        # 2 examples first: with one, any tensor of one row looks like the batch's (a (1, T, d) embedding)
        rec2, uses2 = _record(model, layers, concat([first, first]), watched, free_ids)
        rec1, uses1 = _record(model, layers, first, watched, free_ids, verify=True, plan=uses2.views.steps)
        # a repeat twice whatever the batch looks like one over the batch of two: not for one example
        untiled = frozenset(n for n in free or {} if _tiled_count(uses1, n) != _tiled_count(uses2, n))
        if untiled:
            rec2, uses2 = _record(model, layers, concat([first, first]), watched, free_ids, untiled=untiled)
            rec1, uses1 = _record(model, layers, first, watched, free_ids, verify=True, plan=uses2.views.steps,
                                  untiled=untiled)
    except GradscoreError:   # gradscore's own word on the model (an output it cannot read): as it is
        raise
    except Exception as e:   # the fallback meets the same model and says what fails
        why = f"the model did not run on 1 and 2 copies of an example ({type(e).__name__}: {e})".splitlines()[0][:300]
        return {name: why for name in layers}, False, {}, {name: f"was not checked: {why}" for name in free or {}}, {}
    out: dict[str, Layout | str] = {}
    for name, (module, rule) in layers.items():
        accepted = rule.dims(module)
        r1, r2 = rec1[name], rec2[name]
        if not r1.shapes:
            out[name] = NOT_CALLED
            continue
        if r1.problem:
            out[name] = r1.problem
            continue
        if len(r1.shapes) != len(r2.shapes) or any(s == ((), ()) for s in r1.shapes):
            out[name] = "was called with non-tensor or varying inputs"
            continue
        if r1.dead != r2.dead:
            out[name] = "gets a gradient in other calls for 1 example than for 2"
            continue
        found: set[int | str | None] = set()
        reason = None
        for i, ((a1, o1), (a2, o2), u1, u2) in enumerate(zip(r1.shapes, r2.shapes, r1.uses, r2.uses)):
            if i in r1.dead:   # no gradient reaches this call: no example's, nothing to lay out
                continue
            dim, reason = _batch_dim(a1, o1, a2, o2)
            if reason is None and dim is None:
                reason = _sums_with_batch_rows(u1, u2)
            if reason:
                break
            found.add(dim)
        if reason is None and rule.call and None in found and not rule.expands:
            reason = ONE_ROW
        if reason is None and len(found) > 1:
            reason = "was called in different layouts"
        if reason is None:
            dim = found.pop()
            if dim == MERGED and 1 not in accepted:   # only a rule on trailing features may view rows as (B, k, ...)
                reason = "has the batch merged with another dimension, which its rule does not take"
            elif dim == MERGED and batch_len(x) < 2:
                reason = ("has the batch merged with another dimension, whose order a first batch of one example "
                          "cannot show")
            elif dim is not None and dim != MERGED and dim not in accepted:
                reason = f"has its batch in dimension {dim}, which its rule does not take"
            else:
                out[name] = Layout(0, r1.dead, merged=True) if dim == MERGED else Layout(dim, r1.dead)
                continue
        out[name] = reason
    free_out = {name: uses1.unfit.get(name) or uses2.unfit.get(name) or _free_layout(
        uses1.free_uses[name], uses2.free_uses[name], uses1.unseen.get(name) or uses2.unseen.get(name),
        (uses1.views.made.get(name, []), uses2.views.made.get(name, [])),
        (uses1.views.steps.get(name, []), uses2.views.steps.get(name, []))) for name in free or {}}
    plan = {}
    for name, why in free_out.items():
        if why is None:
            free_out[name], plan[name] = _merged_uses(uses2.views.steps.get(name, []), uses1.use_rows.get(name, []),
                                                      uses2.use_rows.get(name, []), batch_len(x))
    plan = {name: steps for name, steps in plan.items() if free_out[name] is None}
    return out, _check_order(model, layers, out, x, free_ids, free_out, plan), uses1.strays, free_out, plan


def _tiled_count(uses: _Uses, name: str) -> int:
    """How many repeats over the batch (:data:`.free.TILED`) the run saw of free parameter ``name``."""
    return uses.views.steps.get(name, []).count(TILED)


def _merged_uses(steps: list[str], rows1: list[int], rows2: list[int], B: int) -> tuple[str | None, list[str]]:
    """(None, the plan) if each use's result has 1 row for one example and 2 for two, or
    k > 1 and 2k (k rows per example, in order: Swin's windows), marked :data:`.free.MERGED`
    in the plan; else (why not, []). Merged rows need a first batch of two examples or
    more: with one, the order check cannot see them."""
    plan, uses = list(steps), iter(zip(rows1, rows2))
    for i, step in enumerate(steps):
        if step != "use":
            continue
        one, two = next(uses, (-1, -1))
        if (one, two) == (1, 2):
            continue
        if not (one > 1 and two == 2 * one):
            return (f"is used in a result whose rows do not follow the batch's ({one} for one example, {two} for "
                    f"two)"), []
        if B < 2:
            return ("is used in a result with several rows per example, whose order a first batch of one example "
                    "cannot show"), []
        plan[i] = MERGED
    return None, plan


def _free_layout(uses1: list[tuple[str | None, bool]], uses2: list[tuple[str | None, bool]],
                 unseen: str | None, made: tuple[list, list] = ([], []), steps: tuple[list, list] = ([], [])
                 ) -> str | None:
    """None if a free parameter's uses broadcast it over the batch rows (1 row for one
    example, 2 for two: :func:`.free.misfit` found nothing in either run), what the forward
    makes of it before (``made``: (op, shape) in each run, :class:`.free.Views`) has the same
    shapes for both, its ops are the same kinds in the same order (``steps``: "use" or
    "made"), and the op watch saw every use (``unseen``: a graph node that uses it
    unseen), else why not; "" where no use has the form the rule takes (a layer's weight in
    its own op: nothing to say)."""
    if len(made[0]) != len(made[1]):   # before any use: what a use then did with it is beside the point
        return (f"is made into other tensors for one example than for two ({len(made[0])} and {len(made[1])} ops; a "
                f"tensor kept from an earlier call, such as a cache, is not followed)")
    if made[0] != made[1]:
        (op, one), (_, two) = next((a, b) for a, b in zip(*made) if a != b)
        return (f"is made by {op} into a tensor whose shape follows the batch's ({list(one)} for one example, "
                f"{list(two)} for two)")
    why = next((w for w, _ in (*uses1, *uses2) if w is not None), None)
    if why is not None and not any(form for _, form in (*uses1, *uses2)):
        return ""
    if why is not None:
        return (f"is used by {why} (the rule takes an elementwise op or an expand whose result has the batch "
                f"in dimension 0)")
    if unseen is not None:
        return (f"is used by {unseen}, which the op watch cannot see (a custom autograd.Function, or an op "
                f"inside another function)")
    if len(uses1) != len(uses2) or steps[0] != steps[1]:
        return "is used differently for 1 and 2 examples"
    return None


def _check_order(model: nn.Module, layers: dict[str, tuple[nn.Module, Rule]], found: dict[str, Layout | str],
                 x: Inputs, free: dict[int, str], free_found: dict[str, str | None], plan: dict[str, list[str]]
                 ) -> bool:
    """Give the layers whose batch rows are not the examples' own, in order, the reason
    :data:`REORDERED` (in ``found``; for the taken free parameters ({id: name}), the results
    of their uses, in ``free_found``); return whether the model's outputs for x's first and
    last examples alone differ from theirs in the batch (:func:`couples_examples`)."""
    B = batch_len(x)
    free = {i: n for i, n in free.items() if free_found[n] is None}
    batch_rows, batched = _rows(model, layers, found, x, sorted({0, B - 1}), free, plan)
    first_rows, first_out = _rows(model, layers, found, take(x, 0), [0], free, plan)
    working = working_dtype(model, batched.dtype)
    if B == 1:
        return couples_examples(first_out, batched, working)
    last_rows, last_out = _rows(model, layers, found, take(x, B - 1), [0], free, plan)
    for name, calls in batch_rows.items():
        if _reordered(calls, first_rows.get(name, []), last_rows.get(name, []), model):
            if name in free_found:
                free_found[name] = REORDERED_USES
            else:
                found[name] = REORDERED
    if couples_examples(torch.cat([first_out, last_out]), batched, working):
        return True   # every parameter takes the fallback: no layer's order matters
    pair = concat([take(x, 0), take(x, B - 1)])
    for name in _leaky(model, layers, found, pair, working, free, plan):   # after the above
        if name in free_found:
            free_found[name] = REORDERED_USES
        else:
            found[name] = REORDERED
    return False


def _leaky(model: nn.Module, layers: dict[str, tuple[nn.Module, Rule]], found: dict[str, Layout | str],
           pair: Inputs, working: torch.dtype, free: dict[int, str] | None = None,
           plan: dict[str, list[str]] | None = None) -> set[str]:
    """The laid-out layers (with a batch dimension, a tensor output) and the taken free
    parameters (``free``, {id: name}, following ``plan``) on ``pair`` (the first and last
    examples) whose first example's rows (of the layer's output, of each use's result),
    changed, change the model's output for the second, or the other way round: rows that
    are not each example's own, which rows of nearly equal values (a LayerNorm over 2
    features gives ±1 for every row; duplicate examples) hide from the comparison of
    values. All are changed at once; only where that reaches the other example, each alone."""
    free = free or {}
    names = [n for n, f in found.items() if isinstance(f, Layout) and f.batch_dim is not None] + list(free.values())
    if not names:
        return set()
    base = _output_changed(model, layers, found, pair, {}, free, plan or {})

    def leaks(subset: list[str]) -> bool:
        for block in (0, 1):
            out = _output_changed(model, layers, found, pair, dict.fromkeys(subset, block), free, plan or {})
            if not close(out[1 - block], base[1 - block], working):
                return True
        return False
    return {n for n in names if leaks([n])} if leaks(names) else set()


def _output_changed(model: nn.Module, layers: dict[str, tuple[nn.Module, Rule]], found: dict[str, Layout | str],
                    pair: Inputs, blocks: dict[str, int], free: dict[int, str], plan: dict[str, list[str]]
                    ) -> torch.Tensor:
    """The model's output (detached) on a ``pair`` of examples, each layer in ``blocks``
    given an output changed in that example's rows (along its layout's batch dimension),
    and each free parameter in ``blocks`` its uses' results changed there (:class:`_FreeRows`)."""
    def change(module, args, output, layout, block):
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return None
        changed = output.detach().clone()
        rows = layout.rows(changed, 2)   # a view of it
        if rows is None:
            return None
        _bump(rows[block])
        return changed
    handles = [layers[name][0].register_forward_hook(lambda m, a, o, k=found[name], b=block: change(m, a, o, k, b),
                                                     prepend=True)
               for name, block in blocks.items() if name in layers]
    uses = _FreeRows(free, 2, [], plan, {n: b for n, b in blocks.items() if n not in layers}) if free else None
    try:
        with torch.enable_grad(), uses or contextlib.nullcontext():   # the scoring pass's code path, as in _rows
            return call_model(model, pair).detach()
    finally:
        for h in handles:
            h.remove()


def working_dtype(model: nn.Module, output: torch.dtype) -> torch.dtype:
    """The least precise of the output's dtype, the model's floating parameters' and an
    active autocast region's: what an output's rounding is of (a float32 copy of bf16 logits,
    as Accelerate returns under mixed precision, carries bf16's)."""
    dtypes = {output, *autocast_dtypes()} | {p.dtype for p in model.parameters() if p.is_floating_point()}
    return max((d for d in dtypes if d.is_floating_point), key=lambda d: torch.finfo(d).eps, default=output)


def refuse_random_in_eval(model: nn.Module, x: Inputs, consequence: str, where: str = "") -> None:
    """An EngineError where two forwards of x's first examples (two at most, moved to the
    model's device and dtype) give outputs that differ by more than rounding (:func:`close`):
    a forward that draws random numbers in the mode it is in. The message is ``where`` (a
    prefix naming the model), the cause, ``consequence`` (what that makes of the results,
    from its leading punctuation) and the fix. Nothing where the model does not run on them
    (the engine then says why) or x has no examples. With gradients on, as the engines' own
    forwards run: a model that caches a tensor in eval mode (timm's LeViT) keeps what a
    scoring forward would have made."""
    if not batch_len(x):
        return
    few = move(take(x, 0, min(2, batch_len(x))), next(model.parameters()))
    try:
        with torch.enable_grad():
            first, second = call_model(model, few).detach(), call_model(model, few).detach()
    except Exception:  # noqa: BLE001 - a model that fails here fails where it is scored, with the cause
        return
    if not close(second, first, working_dtype(model, first.dtype)):
        raise EngineError(f"{where}the model's output differs between two forwards of the same examples in eval "
                          f"mode: its forward draws random numbers (F.dropout(x, p) without training=self.training, "
                          f"whose default is True; noise injection; sampling){consequence}; make the forward "
                          f"deterministic in eval mode: F.dropout(x, p, training=self.training), or nn.Dropout, which "
                          f"model.eval() turns off")


def couples_examples(alone: torch.Tensor, batched: torch.Tensor, working: torch.dtype | None = None) -> bool:
    """Whether the model's outputs for the first and last examples of a batch (``batched``,
    rows 0 and B − 1) differ from their outputs alone (``alone``, one or two rows) by more
    than the rounding of ``working`` (default their dtype): then the model couples the
    examples of a batch (through batch statistics, or by an example's place in it, which
    the first example alone cannot show), and only an engine that runs each example alone
    is per-example."""
    if alone.shape[1:] != batched.shape[1:]:
        return True
    return not close(alone, batched[[0, len(batched) - 1][:len(alone)]], working)   # a NaN input stays NaN
