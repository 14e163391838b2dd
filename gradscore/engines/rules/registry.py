"""Registry of ghost rules, keyed by module class, filled by the ``register_rule`` decorator.

A rule turns what one ordinary batched forward/backward captured for a layer into that
layer's share of the per-example ‖g_b‖² and ⟨g_b, V_k⟩:

    fn(layer, acts, grads, refs, K) -> (sq (B,), dots (B, K))

- ``acts``: the layer's input, one tensor per call of the layer (batch dim first);
- ``grads``: ∂(Σ_b ℓ_b)/∂(layer output) per call, so row b is example b's output gradient;
- ``refs``: {local parameter name: V block (K, *param.shape) or None} for the layer's
  scored parameters only (a frozen weight is simply absent);
- sums are in float32 (float64 for float64 inputs), whatever the model dtype.

``supports(layer)`` returns None when the rule applies, else the reason it does not
(the engine then falls back for that layer's parameters and says why). ``batch_dims``
are the dimensions of the layer's input and output that may hold the batch: (0,) for
most rules; (0, 1) for rules that act on trailing features only (Linear, Embedding,
LayerNorm), which then also serve sequence-first layers (T, B, ...), the engine moving
the batch to dimension 0 before the rule sees the tensors.

A rule registered with ``call=True`` receives each call whole, as ``(args, kwargs)``
(detached), instead of its first input: EmbeddingBag's offsets and weights,
MultiheadAttention's key, value and masks; its batch dimension is then read from the
output alone. ``output_item`` picks the output tensor from a tuple output, and
``children`` names submodules whose parameters the rule covers (MultiheadAttention's
``out_proj``, which it uses functionally). ``batch_dims`` may also be a function of the
layer (MultiheadAttention: where its ``batch_first`` puts the batch). A whole-call rule
with ``expands`` also takes a call whose output is one row for the whole batch (BioGPT's
position embedding of (1, T) positions): the engine expands the output to B rows, the
rule expands what it reads of the call. ``output_item``
may be a function of the output (the recurrent layers: their final hidden state, which
has the batch in dimension 1 whatever the input's layout). A ``probe_all`` rule gets,
per call, the output's structure (named tuples as tuples) with each floating leaf's
output gradient, or None where none reached it: a recurrent layer's output and final
states, any of which the loss may use. It receives each call as ``((args, kwargs),
output)``: the output detached, in the same structure, with None for a leaf the model
changed in place after the call (its version moved), which no longer holds what the
layer computed.

A subclass of a registered class uses its parent's rule unless it overrides
``forward``; the registry is searched along the MRO, for class and qualified-name keys.
A layer whose ``forward`` was replaced on the instance has no rule (Accelerate's device
hook excepted: it moves tensors and calls the class's forward).

A rule whose weight gradient is a sum of outer products, g_b = Σ_t l_bt r_btᵀ, also
registers ``factors(layer, acts, grads) -> {local name: Factor}``, one per parameter it
gives (a bias as Σ_t δ_bt 1ᵀ, :func:`bias_factor`): the engine needs them for a parameter
shared by several modules (tied weights), whose per-example gradient is the sum of both
uses g₁ + g₂, so that ‖g‖² = ‖g₁‖² + ‖g₂‖² + 2⟨g₁, g₂⟩; the rules give the first two
terms and :func:`cross` the last one, and :func:`tied_sq` makes again the rows where
they cancel.

A rule may also register ``sketch(layer, acts, grads, p_out, p_in) -> (B, k_out, k_in)``:
the Kronecker-factored projection P_out g_b P_inᵀ of its weight's per-example gradient
viewed as (shape[0], rest), without forming it (a convolution: P_in applied to the patches
as a convolution); a rule with ``factors`` gets it from them (:mod:`gradscore.sketches`).

``params`` (default ``("weight", "bias")``, or a function of the layer) names the
parameters, as the layer's class defines them, whose gradients the rule gives. Any other
parameter of the layer takes the free-parameter rule, else the fallback:
``torch.nn.utils.weight_norm`` (legacy) and ``prune`` replace ``weight`` by parameters of
other names (weight_g and weight_v, weight_orig) and rebuild it in a forward pre-hook, so
the rule's gradient of ``weight`` is not theirs.

Classes from optional packages are registered by qualified name
(``"transformers.pytorch_utils.Conv1D"``), so the package is never imported here.

A family that libraries copy under many class names (Hugging Face's RMSNorm: Llama's,
Mistral's, Qwen's, Gemma's …) is registered by its structure instead
(:func:`register_structural`): a predicate on the module, tried only where no class
matches (or a subclass overrides its parent's forward: Gemma's scaled embedding). Such a
rule is not trusted on its name: its ``verify(layer, input, output)`` (a whole-call
rule's: ``verify(layer, (args, kwargs), output)``) runs once on the first batch and
checks that the layer computes what the rule assumes. One that does not is a layer
without a rule: its parameters take the free-parameter rule (``engines/free.py``) where
it takes their uses, else the fallback, with both reasons.

A rule whose weight's norm may take the Gram form of ``kernels.ghost_linear`` registers
``gram_input(input) -> (B, T, d_in) view or None``: the engine counts the layers reading
each such input in the forward, so that their rules form its Gram once
(``ghost_linear.SharedGrams``: a transformer's q, k and v projections of one hidden state).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ...kernels import acc_dtype, norm_dot
from ...kernels.ghost_linear import cancellation_checked

RuleFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Factor:
    """g_b = Σ_t left_bt right_btᵀ for a weight of shape (rows, cols).

    left: (B, T, rows), or (B, T) int64 row indices when ``left_ids`` (one-hot rows, as
    an embedding's); right: (B, T, cols).
    """

    left: torch.Tensor
    right: torch.Tensor
    left_ids: bool = False


@dataclass(frozen=True)
class FactoredRef:
    """One reference vector of a weight (rows, cols) in factored form, V = Σ_m left_m right_mᵀ
    (left: (M, rows), right: (M, cols)): a gradient summed over M rows of another batch, e.g.
    a small target batch's. Stands for a (1, rows, cols) reference block; a rule that knows
    it (``linear``) computes the dot in the Gram form, never forming V."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, self.left.shape[1], self.right.shape[1])

    def dot(self, f: Factor) -> torch.Tensor:
        """⟨g_b, V⟩ (B, 1) for g_b = Σ_t f.left_bt f.right_btᵀ: Σ_{t,m} (l_bt·left_m)(r_bt·right_m),
        in B·T·M·(rows + cols) flops."""
        B, T = f.left.shape[:2]
        acc = acc_dtype(f.right.dtype)
        lg = f.left.reshape(B * T, -1).to(acc) @ self.left.to(acc).T
        rg = f.right.reshape(B * T, -1).to(acc) @ self.right.to(acc).T
        return (lg * rg).sum(1).reshape(B, T).sum(1, keepdim=True)

    def scaled(self, c: float) -> "FactoredRef":
        """c·V, the same factors with the left ones scaled."""
        return self if c == 1.0 else FactoredRef(self.left * c, self.right)

    def sq_norm(self) -> float:
        """‖V‖² = Σ_{m,m'} (left_m·left_m')(right_m·right_m'), in M²·(rows + cols) flops; where
        the rows' terms cancel (a target batch whose examples pull apart) it is made again
        more precisely (``kernels.ghost_linear.cancellation_checked``): float32 in float64,
        float64 from V itself."""
        acc = acc_dtype(self.right.dtype)
        left, right = self.left.to(acc), self.right.to(acc)
        terms = (left @ left.T) * (right @ right.T)

        def again(rows: torch.Tensor) -> torch.Tensor:
            if acc == torch.float64:
                return (left.T @ right).pow(2).sum().reshape(1)
            return torch.tensor([FactoredRef(left.double(), right.double()).sq_norm()], dtype=torch.float64)
        return float(cancellation_checked(terms.sum().reshape(1), terms.diagonal().sum().reshape(1), again))

    def cheaper(self) -> bool:
        """Whether the Gram form costs fewer flops per position than the reference-vector
        form's rows·cols."""
        rows, cols, M = self.left.shape[1], self.right.shape[1], self.left.shape[0]
        return M * (rows + cols) < rows * cols


@dataclass(frozen=True)
class Rule:
    name: str
    fn: RuleFn
    supports: Callable[[nn.Module], Optional[str]]
    factors: Optional[Callable[..., dict[str, Factor]]] = None
    batch_dims: tuple[int, ...] | Callable[[nn.Module], tuple[int, ...]] = (0,)
    call: bool = False
    output_item: Optional[Union[int, Callable]] = None
    children: tuple[str, ...] = ()
    probe_all: bool = False
    sketch: Optional[Callable[..., torch.Tensor]] = None
    gram_input: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None
    params: tuple[str, ...] | Callable[[nn.Module], Sequence[str]] = ("weight", "bias")
    verify: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor], Optional[str]]] = None
    expands: bool = False   # a whole-call rule that also takes one row for the whole batch (see above)

    def dims(self, layer: nn.Module) -> tuple[int, ...]:
        """The dimensions that may hold the batch in this layer's input and output."""
        return self.batch_dims(layer) if callable(self.batch_dims) else self.batch_dims

    def knows(self, layer: nn.Module) -> Sequence[str]:
        """The local names of the parameters whose gradients the rule gives for ``layer``."""
        return self.params(layer) if callable(self.params) else self.params


TypeKey = Union[type[nn.Module], str]
_RULES: dict[TypeKey, Rule] = {}
_STRUCTURAL: list[tuple[Callable[[nn.Module], bool], Rule]] = []


def register_rule(*types: TypeKey, supports: Callable[[nn.Module], Optional[str]] = lambda m: None,
                  factors: Optional[Callable[..., dict[str, Factor]]] = None,
                  **options) -> Callable[[RuleFn], RuleFn]:
    """Decorator: use ``fn`` as the ghost rule for every class (or qualified class name)
    in ``types``; ``factors`` (optional) lets its weight be tied to another layer's;
    ``options``: the :class:`Rule` fields ``batch_dims``, ``call``, ``output_item``,
    ``children``, ``probe_all``, ``sketch``, ``gram_input``, ``params``, ``expands``."""
    def deco(fn: RuleFn) -> RuleFn:
        for t in types:
            _RULES[t] = Rule(fn.__name__, fn, supports, factors, **options)
        return fn
    return deco


def register_structural(match: Callable[[nn.Module], bool], *, verify: Callable[..., Optional[str]],
                        supports: Callable[[nn.Module], Optional[str]] = lambda m: None,
                        factors: Optional[Callable[..., dict[str, Factor]]] = None,
                        **options) -> Callable[[RuleFn], RuleFn]:
    """Decorator: use ``fn`` as the ghost rule for modules of no registered class that
    ``match`` accepts; ``verify(layer, input, output)`` (None, or why the layer does not
    compute what the rule assumes) checks each such layer on the first batch.
    ``factors`` and ``options`` as for :func:`register_rule`."""
    def deco(fn: RuleFn) -> RuleFn:
        _STRUCTURAL.append((match, Rule(fn.__name__, fn, supports, factors, verify=verify, **options)))
        return fn
    return deco


def _lookup(module: nn.Module) -> tuple[Rule | None, str | None]:
    """The rule of the nearest registered class along the MRO (class or qualified-name
    key), else of the first structural match, or (None, reason)."""
    kind = type(module)
    reason = f"no ghost rule for {kind.__name__}"
    for cls in kind.__mro__:
        rule = _RULES.get(cls) or _RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is None:
            continue
        if cls is not kind and getattr(kind, "forward", None) is not getattr(cls, "forward", None):
            reason = f"{kind.__name__} overrides the forward of {cls.__name__}, whose rule assumes it"
            break
        return rule, None
    for match, rule in _STRUCTURAL:   # checked on the first batch (Rule.verify)
        if match(module):
            return rule, None
    return None, reason


def has_rule(module: nn.Module) -> bool:
    """Whether a rule is registered for ``module``'s class or structure, applicable or not."""
    return _lookup(module)[0] is not None


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Equal up to the rounding of another blocking of the same computation (batched GEMMs,
    TF32 on CUDA), in ``dtype`` (default a's: the precision the values were computed in);
    another computation moves a value by O(1). NaNs in the same places are equal."""
    tol = {torch.float64: 1e-9, torch.float32: 1e-3}.get(dtype or a.dtype, 5e-2)
    a, b = a.double(), b.double()
    scale = float(torch.nan_to_num(b.abs(), nan=0.0, posinf=0.0).max()) if b.numel() else 0.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, scale), equal_nan=True)


#: the start of a structural rule's reason where its check found the layer computes something else
COMPUTES_OTHERWISE = "does not compute "


def computes_otherwise(reason: str) -> bool:
    """Whether a layer's reason for the fallback is that its check found it computes something
    other than its rule assumes (a look-alike: a layer without a rule)."""
    return reason.startswith(COMPUTES_OTHERWISE)


def computes(layer: nn.Module, x: torch.Tensor | tuple[tuple, dict],
             expected: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor], what: str) -> str | None:
    """None if ``layer`` on ``x`` (its input, or a whole call (args, kwargs)), with each of
    its own parameters p replaced by other values w_p, gives ``expected(x, w)``, in value and
    in every w_p's gradient (one product with a generic output gradient); else why not,
    naming ``what`` the rule assumes. The layer is called functionally and left as it is. A
    float64 output is compared in float32: Hugging Face's norms compute in float32 whatever
    the model's dtype. A floating input x is taken in the weights' dtype (an input that came
    from an autocast region in its half type)."""
    own = dict(layer.named_parameters(recurse=False))
    weights = [p for p in own.values() if p.is_floating_point()]
    if isinstance(x, torch.Tensor) and x.is_floating_point() and weights:   # autocast's half type: in the weights'
        x = x.to(weights[0].dtype)
    args, kwargs = x if isinstance(x, tuple) else ((x,), {})
    try:   # a weight that is not floating (a quantized layer's) fails here, with the reason
        w = {n: torch.linspace(-1.5, 2.0, p.numel(), dtype=p.dtype, device=p.device).reshape(p.shape).requires_grad_()
             for n, p in own.items()}
        with torch.enable_grad():
            out = torch.func.functional_call(layer, w, args, kwargs)
            want = expected(x, w)
            if not isinstance(out, torch.Tensor) or out.shape != want.shape or not out.requires_grad:
                return f"{COMPUTES_OTHERWISE}{what}, which its rule assumes"
            r = torch.linspace(-1.0, 1.3, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
            got_g = torch.autograd.grad((out * r).sum(), list(w.values()), allow_unused=True)
            want_g = torch.autograd.grad((want * r).sum(), list(w.values()), allow_unused=True)
    except Exception as e:  # noqa: BLE001 - the layer's own forward, on its first input alone
        return f"could not be checked against {what}, which its rule assumes ({type(e).__name__}: {e})"

    def same(a, b):
        if a is None or b is None:
            return a is None and b is None
        return close(a.float() if a.dtype == torch.float64 else a, b)
    if same(out, want) and all(same(a, b) for a, b in zip(got_g, want_g)):
        return None
    return f"{COMPUTES_OTHERWISE}{what}, which its rule assumes"


def kernel_dropout(module: nn.Module) -> str | None:
    """Why ``module`` draws dropout masks inside torch's kernel in its present (training)
    mode, which a rule that replays the layer cannot see (None if it does not): attention
    dropout, a multi-layer RNN's dropout between layers."""
    p = getattr(module, "dropout", 0.0)
    if not module.training or not isinstance(p, float) or p <= 0:
        return None
    if isinstance(module, nn.MultiheadAttention) or (isinstance(module, nn.RNNBase) and module.num_layers > 1):
        return (f"{type(module).__name__} with dropout={p:g} in training mode, whose masks its rule cannot replay; "
                f"set its dropout to 0")
    return None


def _instance_forward(module: nn.Module) -> bool:
    """Whether ``forward`` was replaced on this instance (``layer.forward = ...``) by anything
    but Accelerate's device hook, which moves tensors and calls the class's own forward."""
    if "forward" not in vars(module):
        return False
    old = getattr(module, "_old_forward", None)
    return not (hasattr(module, "_hf_hook") and getattr(old, "__func__", None) is type(module).forward)


def find_rule(module: nn.Module) -> tuple[Rule | None, str | None]:
    """(rule, None) if ``module`` has an applicable rule, else (None, reason)."""
    rule, reason = _lookup(module)
    if rule is None:
        return None, reason
    if _instance_forward(module):
        return None, f"{type(module).__name__} has its forward replaced on the instance, which its rule cannot see"
    reason = rule.supports(module)
    return (None, reason) if reason else (rule, None)


def registered_types() -> list[TypeKey]:
    return list(_RULES)


def _left_gram(f: Factor, g: Factor) -> torch.Tensor:
    """(B, T_f, T_g) of ⟨f.left_t, g.left_s⟩, with one-hot lefts gathered, never expanded."""
    if f.left_ids and g.left_ids:
        return (f.left.unsqueeze(2) == g.left.unsqueeze(1)).to(f.right.dtype)
    if f.left_ids:  # ⟨e_{id_t}, l_s⟩ = l_s[id_t]
        B, Tf = f.left.shape
        return g.left.gather(2, f.left.unsqueeze(1).expand(B, g.left.shape[1], Tf)).transpose(1, 2)
    if g.left_ids:
        return _left_gram(g, f).transpose(1, 2)
    return torch.bmm(f.left, g.left.transpose(1, 2))


def cross(f: Factor, g: Factor) -> torch.Tensor:
    """⟨g_f, g_g⟩ per example (B,) = Σ_{t,s} ⟨l_t, l'_s⟩⟨r_t, r'_s⟩ (Gram form), in the
    accumulation dtype (float32, or float64 for float64 factors)."""
    acc = acc_dtype(f.right.dtype)

    def cast(x: Factor) -> Factor:
        return Factor(x.left if x.left_ids else x.left.to(acc), x.right.to(acc), x.left_ids)
    f, g = cast(f), cast(g)
    return (_left_gram(f, g) * torch.bmm(f.right, g.right.transpose(1, 2))).sum((1, 2))


def bias_factor(d: torch.Tensor) -> Factor:
    """A bias's g_b = Σ_t δ_bt as a (d_out, 1) weight's factor, for δ (B, T, d_out)."""
    return Factor(d, d.new_ones((*d.shape[:2], 1)))


def _terms(f: Factor) -> torch.Tensor:
    """Σ_t ‖l_bt‖²‖r_bt‖² (B,): the squared norms of g_b's rank-one terms, in the accumulation dtype."""
    acc = acc_dtype(f.right.dtype)   # norms reduced in place: an LM head's δ (B, T, vocab) is never copied
    right = torch.linalg.vector_norm(f.right, dim=2, dtype=acc).pow(2)
    return (right if f.left_ids else torch.linalg.vector_norm(f.left, dim=2, dtype=acc).pow(2) * right).sum(1)


def _dense(f: Factor, rows: int) -> torch.Tensor:
    """g_b = Σ_t l_bt r_btᵀ (B, rows, cols), formed (one-hot lefts: their rows added)."""
    if not f.left_ids:
        return torch.bmm(f.left.to(f.right.dtype).transpose(1, 2), f.right)
    B, T, cols = f.right.shape
    at = (torch.arange(B, device=f.left.device)[:, None] * rows + f.left).reshape(-1)
    return f.right.new_zeros((B * rows, cols)).index_add_(0, at, f.right.reshape(B * T, cols)).reshape(B, rows, cols)


def tied_sq(fs: list[Factor], own: list[torch.Tensor]) -> torch.Tensor:
    """‖Σ_i g_i‖² (B,) of a parameter that several layers use, from each use's factors ``fs``
    and its own ‖g_i‖² ``own`` (B,): Σ_i own_i + 2 Σ_{i<j} ⟨g_i, g_j⟩ (:func:`cross`). Rows
    where the uses cancel are made again (``kernels.ghost_linear.cancellation_checked``):
    float32 by the float64 Gram form over all uses, float64 from the summed gradient."""
    sq = sum(own) + 2 * sum((cross(fs[i], fs[j]) for i in range(len(fs)) for j in range(i + 1, len(fs))),
                            torch.zeros_like(own[0]))

    def again(rows: torch.Tensor) -> torch.Tensor:
        sub = [Factor(f.left[rows], f.right[rows], f.left_ids) for f in fs]
        if sq.dtype != torch.float64:
            wide = [Factor(f.left if f.left_ids else f.left.double(), f.right.double(), f.left_ids) for f in sub]
            return sum(cross(f, g) for f in wide for g in wide)
        n = max(int(f.left.max()) + 1 if f.left_ids else f.left.shape[2] for f in sub if f.left.numel())
        one = [[Factor(f.left[r:r + 1], f.right[r:r + 1], f.left_ids) for f in sub] for r in range(len(rows))]
        return torch.stack([sum(_dense(f, n) for f in uses).pow(2).sum() for uses in one])   # a gradient at a time
    return cancellation_checked(sq.to(own[0].dtype), sum(_terms(f) for f in fs).to(own[0].dtype), again)


def reduce_per_example(grads: dict[str, torch.Tensor], refs: dict[str, torch.Tensor | None], K: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """sq (B,), dots (B, K) of small per-example gradients {name: (B, *shape)} (bias, norms).

    These are O(B·d) like one activation row, so they are formed explicitly.
    """
    names = list(grads)
    V = None if K == 0 else [refs[n] for n in names]
    return norm_dot([grads[n] for n in names], V)


def zeros_like_result(like: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    acc = acc_dtype(like.dtype)
    B = like.shape[0]
    return like.new_zeros(B, dtype=acc), like.new_zeros((B, K), dtype=acc)


def bias_term(per_example_bias: torch.Tensor, refs: dict[str, torch.Tensor | None], K: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """sq, dots of a bias whose per-example gradient is ``per_example_bias`` (B, d);
    zeros when the bias is not scored (frozen or absent)."""
    if "bias" not in refs:
        return zeros_like_result(per_example_bias, K)
    return reduce_per_example({"bias": per_example_bias}, refs, K)
