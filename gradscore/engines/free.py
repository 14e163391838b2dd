"""The free-parameter rule: a parameter that a forward uses directly, broadcast over the batch.

A ViT's class token and position embedding (``cls_token.expand(B, -1, -1)``,
``x + pos_embed``), CaiT's ``gamma_1 * x`` and ConvNeXt's ``x.mul(gamma.reshape(1, -1,
1, 1))`` belong to no layer: their module's forward reads them itself, so no layer rule
sees them. For one call of the model, a ``TorchFunctionMode`` gives each op that uses such
a parameter P (or a view, cast or copy of it), instead of P, P expanded to the op's whole
result shape, through a probe (:func:`.probe.probe`): the same values (a broadcast is an
expand), and P's gradient is the same ``sum_to_size`` of the same tensor, bit for bit (an
expand's backward is the broadcast's reduction). The probe's δ, summed over every
dimension P was broadcast over except the batch's, is each example's gradient of P
through that use; the uses of a call add up.

Four kinds of use are taken, where row b of the result reads no other row of P's
expansion: an elementwise op of P with tensors whose broadcast shape has the batch in
dimension 0 (B rows, or k·B: k per example, in order, Swin's windows, :data:`MERGED`),
which P has not (it is 1 there, or P has fewer dimensions), an
``expand``/``expand_as`` to such a shape, ``F.scaled_dot_product_attention`` with P
as its ``attn_mask`` (a sum with the scores, BEiT's relative position bias), and a
product of the batch's rows h by P (``F.linear(h, P, b)``, ``h @ P``, ``P @ X`` as
``F.linear(Xᵀ, P)`` transposed, such an einsum, :data:`PRODUCTS`; a convolution ``F.conv1d(x,
P, b)``, :data:`CONVS`): the op runs as it is, its output probed, and each example's gradient
is Σ_r δ_r h_rᵀ (kept as h and δ for the Linear rule's forms where the product is P's one
op), or the convolution's weight gradient per example. What the
forward makes of P before such a use passes P on (:class:`Views`), with a map from its
elements to P's:

- views, casts and copies that keep P's elements in their order (``reshape``, ``view``,
  ``unsqueeze``, ``flatten``, ``to``, ``float``, ``clone``): the identity;
- selections (:data:`SELECTION`: ``P[:, 1:]``, ``P[idx]``, ``permute``, ``gather``,
  ``repeat``, an expand without the batch), whose result holds one of P's elements in
  each place: the same op on P's element numbers says which (a relative position table
  ``table[index]`` repeats elements; their shares add up);
- elementwise functions of P alone, or of P and tensors without a gradient (``P.exp()``,
  ``P.sigmoid()``, ``P / c``): their derivative in each place, from autograd on a copy.

- any other op of free parameters alone (every operand with a gradient is one of them
  or made of them: ``F.embedding(ids, P)``, T5's relative attention bias;
  ``F.interpolate``, ``torch.cat`` of P's slices, ``P.sum()``; BEiT's ``torch.cat((q_bias,
  k_bias, v_bias))``, Swin-v2's position MLP; and an in-place op on such a tensor, or on
  a copy of P, before any use read its storage: ``q = P.clone(); q[k:2 * k].zero_()``,
  torchvision's Swin-v2): no map; at each use, the backward of the ops from the used
  tensor back to each parameter, batched over the examples (:func:`_backward_per_example`).

- a repeat of such a tensor S (k, ...) over the batch (``S.repeat(B, 1, 1)``: DeBERTa-v2's
  position keys; :data:`TILED`, :meth:`Views._note_tiled`), k rows per example, then
  transposed, permuted or reshaped with each row in its place: its uses (a ``torch.bmm``
  with the batch's stacked matrices, an elementwise op) are probed as they are, and each
  example's k rows of δ are its gradient of S.

So each example's gradient of P through a use is its δ summed to the used tensor's
shape, times the derivatives, added into P's elements by the map (or through those ops'
backward). That the batch is in
dimension 0 is established on the first batch from evidence (:mod:`.layout`: every use
has 1 row for one example and 2 for two, and what is made of P the same shape for both;
a sequence-first (T, B, d) never does), and that those rows are the examples' own, in
order, from the batch's first and last examples run alone. Any other use of P with a
gradient (another ``torch.einsum``, ``torch.cat([P, h])`` with h
the batch's) sends P to the fallback, as does a copy changed in place after a use read
it, or a view of it made before the change and used after, or a use whose shape is not
the evidence's at scoring time.

A layer whose rule finds no batch rows in its output (:func:`.layout.batchless`: an
``nn.Embedding`` of the (T, T) offsets, T5's and MPNet's) has its weights tried by this
rule too (:meth:`.ghost.GhostEngine._to_free`).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..kernels import acc_dtype
from .probe import probe
from .rules.linear import weight_and_bias

#: the batch merged with the next dimension in dimension 0, k rows per example in order: a
#: layer's (:attr:`.layout.Layout.merged`), or a use's result, a step of :class:`FreeUses`'s
#: plan; established by :mod:`.layout` from k rows for one example and 2k for two
MERGED = "merged"
#: the end of a free parameter's problem where the first batch did not use it at all, so that
#: no use of it has a layout (the in-run recorder's first step lays the model out in eval mode)
UNPLANNED = "on a later batch, not on the first"
#: elementwise ops that broadcast an operand over the batch rows of another
ELEMENTWISE = frozenset({
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "addcmul", "addcdiv", "where",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "add_", "sub_", "mul_", "div_", "addcmul_", "addcdiv_", "__iadd__", "__isub__", "__imul__", "__itruediv__"})
#: ops that repeat a tensor over the batch rows
EXPAND = frozenset({"expand", "expand_as"})
#: products of the batch's rows by a (d_in, d_out) matrix, or F.linear's by a (d_out, d_in) weight and its bias,
#: or an einsum that is one of those (``"btd,ed->bte"``, :func:`_einsum_product`)
PRODUCTS = frozenset({"linear", "matmul", "__matmul__", "mm", "einsum"})
#: convolutions of the batch's inputs (B, C_in, *S) by a weight (C_out, C_in / groups, *k) and its bias:
#: products too (Mamba's depthwise ``F.conv1d(x, conv1d.weight, …)``), each example's weight gradient a
#: convolution's (:func:`_conv_weight_grads`)
CONVS = frozenset({"conv1d", "conv2d", "conv3d"})
#: ops whose result holds a tensor's elements in their order (views, casts, copies): it stands for the parameter
SAME_ELEMENTS = frozenset({"reshape", "view", "view_as", "unsqueeze", "squeeze", "flatten", "to", "type_as",
                           "float", "double", "half", "bfloat16", "contiguous", "clone"})
#: of those, the casts: their result's elements are the tensor's in any layout
CASTS = frozenset({"to", "type_as", "float", "double", "half", "bfloat16"})
#: ops whose result holds one of a tensor's elements in each place (slices, gathers, permutations, repeats):
#: which one, the same op on the tensor's element numbers says
SELECTION = frozenset({
    "__getitem__", "select", "narrow", "permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims",
    "index_select", "gather", "take", "take_along_dim", "flip", "fliplr", "flipud", "roll", "repeat", "tile",
    "diagonal", "unfold", "expand", "expand_as", "broadcast_to", "repeat_interleave", "unflatten", "reshape_as"})
#: repeats of a tensor (k, ...) over the batch, (B, 1, …, 1) times: k rows per example, the same for each
#: (DeBERTa-v2's position keys, XCiT's position encoding), :data:`TILED`
REPEATS = frozenset({"repeat", "tile"})
#: the step of a repeat over the batch in :class:`Views`'s plan (its op kinds: "use", :data:`MERGED`, "made", this)
TILED = "tiled"
#: ops that may follow such a repeat, each example's k rows staying its own (:meth:`Views._tiled_op`)
TILED_OPS = frozenset({"transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "contiguous", "clone",
                       "to", "type_as", "float", "double", "half", "bfloat16", "reshape", "view"})
#: products of matrices stacked in dimension 0 with another stack of as many: a use of a repeat over the batch
STACKED_PRODUCTS = frozenset({"bmm", "matmul", "__matmul__"})
#: elementwise functions of one tensor (and numbers): with ELEMENTWISE, what the forward may make of a parameter
UNARY = frozenset({
    "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sigmoid", "tanh", "sin", "cos", "tan", "sinh", "cosh",
    "atan", "asin", "acos", "erf", "neg", "negative", "__neg__", "sqrt", "rsqrt", "reciprocal", "square", "abs",
    "__abs__", "relu", "gelu", "silu", "softplus", "elu", "leaky_relu", "hardtanh", "sign", "logit", "pow", "__pow__",
    "__rpow__", "float_power", "clamp", "clip", "clamp_min", "clamp_max"})


def candidates(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """{name: parameter} of ``names`` that the rule may take: the floating ones."""
    named = dict(model.named_parameters())
    return {n: named[n] for n in names if named[n].is_floating_point()}


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def in_place(func, kwargs: dict | None = None) -> bool:
    """Whether an op writes into its first argument (``x[i] = v``, ``x.add_(v)``, ``x += v``,
    ``F.relu(x, inplace=True)``)."""
    name = _name(func)
    return (name == "__setitem__" or (name.endswith("_") and not name.startswith("__")) or name.startswith("__i")
            or (kwargs or {}).get("inplace") is True)


def result(func, args: tuple, kwargs: dict | None, out):
    """An op's result: the tensor an in-place op wrote into where it returns None (``x[i] = v``)."""
    return args[0] if out is None and args and in_place(func, kwargs) else out


def _storage(t: torch.Tensor) -> int:
    """Which storage t is a view of (its address)."""
    return t.untyped_storage().data_ptr()


def _operands(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among an op's arguments (not inside lists)."""
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def leaves(obj) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj``, through tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from leaves(o)


def map_leaves(out, fn, plain: bool = False):
    """``out`` with every tensor leaf t replaced by fn(t), through tuples, lists, dicts and
    named tuples (PackedSequence); ``plain``: named tuples become plain tuples."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, dict):
        return {k: map_leaves(v, fn, plain) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        items = [map_leaves(o, fn, plain) for o in out]
        if isinstance(out, list):
            return items
        return type(out)(*items) if hasattr(out, "_fields") and not plain else tuple(items)
    return out


def needs_grad(out) -> bool:
    """Whether any tensor of an op's result (a tuple's too) needs a gradient."""
    return any(t.requires_grad for t in leaves(out))


def _sizes(rest: tuple) -> tuple:
    """The sizes of ``t.op(*sizes)`` or ``t.op(sizes)`` (expand, repeat, view, reshape) from its
    arguments after t."""
    return tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else tuple(rest)


def _expand_shape(args: tuple, kwargs: dict) -> tuple[int, ...]:
    """The shape ``t.expand(*sizes)`` (or ``t.expand(sizes)``) gives, −1 resolved."""
    t = args[0]
    sizes = tuple(kwargs["size"]) if "size" in kwargs else _sizes(args[1:])
    lead = len(sizes) - t.dim()
    return tuple(t.shape[i - lead] if s == -1 and i >= lead else s for i, s in enumerate(sizes))


def _saving_hooks() -> bool:
    """Whether saved-tensor hooks are active (a ``torch.utils.checkpoint`` region)."""
    top = torch._C._autograd._top_saved_tensors_default_hooks
    try:
        return top(False) is not None
    except TypeError:   # torch before its ignore_is_tracing argument
        return top() is not None


def _einsum_product(args: tuple, kwargs: dict) -> tuple:
    """(the rows h, the matrix w, whether w is (d_out, d_in) as F.linear's) of ``torch.einsum(eq,
    h, w)`` (or ``(eq, w, h)``) that is a product of h's rows by the 2-D w: h's last index
    contracted with one of w's, the output h's other indices in their order and then w's
    other (``"btd,ed->bte"``, ``"...d,de->...e"``); (None, None, False) for any other einsum."""
    eq = args[0].replace(" ", "") if len(args) == 3 and not kwargs and isinstance(args[0], str) else ""
    ins, _, out = eq.partition("->")
    parts = ins.split(",")
    if not out or len(parts) != 2:
        return None, None, False
    for i in (0, 1):
        rows, mat = parts[i], parts[1 - i]
        letters = rows.removeprefix("...")
        if (len(mat) != 2 or not letters.isalpha() or len(set(letters)) != len(letters) or rows[-1] not in mat
                or mat[0] == mat[1]):
            continue
        other = mat.replace(rows[-1], "")
        if other not in rows and out == rows[:-1] + other:
            return args[1 + i], args[2 - i], mat == other + rows[-1]
    return None, None, False


def _product_operands(name: str, args: tuple, kwargs: dict) -> tuple:
    """(the rows h, the matrix w, F.linear's bias or None, whether w is (d_out, d_in) as
    F.linear's, whether w is on the left) of a :data:`PRODUCTS` call. A 2-D matrix on the
    left of a matmul of batched matrices X (…, d_in, T), ``W @ X`` (Mamba's time-step
    projection), is F.linear of the rows h = Xᵀ by W, transposed: ``left``."""
    if name == "einsum":
        h, w, linear = _einsum_product(args, kwargs)
        return h, w, None, linear, False
    keys = ("input", "weight", "bias") if name == "linear" else ("input", "mat2" if name == "mm" else "other")
    given = {**dict(zip(keys, args)), **kwargs}
    h, w = given.get("input", given.get("self")), given.get(keys[1])
    if (name in ("matmul", "__matmul__") and isinstance(h, torch.Tensor) and isinstance(w, torch.Tensor)
            and h.dim() == 2 and w.dim() >= 3):
        return w.transpose(-1, -2), h, None, True, True
    return h, w, given.get("bias"), name == "linear", False


def _product_shape(h, w, linear: bool) -> tuple[int, ...] | None:
    """The shape of the product of rows ``h`` (…, d_in) by a 2-D ``w`` ((d_out, d_in) if
    ``linear``, else (d_in, d_out)), or by a stack of matrices ``w`` (…, d_in, d_out) that
    matmul broadcasts over h's leading dimensions, the first of them at least (it has none
    there, or 1: DeBERTa's (1, heads, d, 2k) position keys); None for another form."""
    if not (isinstance(h, torch.Tensor) and isinstance(w, torch.Tensor)) or h.dim() < 2 or w.dim() < 2:
        return None
    if w.dim() == 2:
        d_in, d_out = (w.shape[1], w.shape[0]) if linear else tuple(w.shape)
        return (*h.shape[:-1], d_out) if h.shape[-1] == d_in else None
    if linear or w.dim() > h.dim() or (w.dim() == h.dim() and w.shape[0] != 1) or h.shape[-1] != w.shape[-2]:
        return None
    try:
        lead = torch.broadcast_shapes(h.shape[:-2], w.shape[:-2])
    except RuntimeError:
        return None
    return (*h.shape[:-1], w.shape[-1]) if lead == h.shape[:-2] else None


def _conv_operands(args: tuple, kwargs: dict) -> tuple:
    """(input, weight, bias, stride, padding, dilation, groups) of an ``F.convNd`` call, the
    sizes as tuples of the convolution's dimensions; padding None where it is not one
    number per side for both sides (an even kernel's ``padding="same"``)."""
    given = {**dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args)), **kwargs}
    x, w = given.get("input"), given.get("weight")
    n = w.dim() - 2 if isinstance(w, torch.Tensor) else 0

    def sizes(v, default):
        v = default if v is None else v
        return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n
    stride, dilation = sizes(given.get("stride"), 1), sizes(given.get("dilation"), 1)
    padding = given.get("padding", 0)
    if padding == "valid":
        padding = 0
    if padding == "same":   # torch pads (d·(k − 1)) in all, the odd one after: taken where it is even
        total = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])] if n else []
        padding = tuple(p // 2 for p in total) if all(p % 2 == 0 for p in total) else None
    elif padding is not None:   # a string torch does not know: its own error, when the op runs
        padding = None if isinstance(padding, str) else sizes(padding, 0)
    return x, w, given.get("bias"), stride, padding, dilation, int(given.get("groups", 1) or 1)


def _conv_shape(x, w, stride, padding, dilation) -> tuple[int, ...] | None:
    """The output shape of a convolution of a batched input x (B, C_in, *S) by w, or None."""
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or padding is None or x.dim() != w.dim():
        return None
    out = [(size + 2 * p - d * (k - 1) - 1) // s + 1
           for size, k, s, p, d in zip(x.shape[2:], w.shape[2:], stride, padding, dilation)]
    return (x.shape[0], w.shape[0], *out)


def _conv_weight_grads(x: torch.Tensor, shape: tuple[int, ...], options: tuple, B: int, delta: torch.Tensor
                       ) -> torch.Tensor:
    """(B, *shape) each example's gradient of the weight of a convolution of x (B, C_in, *S)
    with ``options`` (stride, padding, dilation, groups), δ its output's (B, C_out, *S'): the
    batch as groups of one convolution, its weight's gradient by torch. In float32 (float64 for float64)."""
    stride, padding, dilation, groups = options
    acc = acc_dtype(delta.dtype)
    weight_grad = {3: torch.nn.grad.conv1d_weight, 4: torch.nn.grad.conv2d_weight,
                   5: torch.nn.grad.conv3d_weight}[len(shape)]
    g = weight_grad(x.to(acc).reshape(1, -1, *x.shape[2:]), (B * shape[0], *shape[1:]),
                    delta.to(acc).reshape(1, -1, *delta.shape[2:]), stride, padding, dilation, groups * B)
    return g.reshape(B, *shape)


def target_shape(func, args: tuple, kwargs: dict, t: torch.Tensor, B: int,
                 hooks: bool = True, merged: bool = False) -> tuple[tuple[int, ...] | None, str]:
    """(the shape t is expanded to by the op ``func(*args, **kwargs)``, one of whose operands
    is t (a free parameter, or a view of one), None if the rule does not take the op; what
    the op is): an elementwise op or expand whose result has B rows in dimension 0 (with
    ``merged``, k·B rows: k per example, Swin's windows) and t neither more dimensions nor
    rows of its own there, and (``hooks``) no saved-tensor hooks active: a checkpoint
    would recompute the op with t itself and find other shapes."""
    name = _name(func)
    if not any(o is t for o in _operands(args, kwargs)):   # inside a list: torch.cat([P, x])
        return None, name
    if hooks and _saving_hooks():
        return None, f"{name} under saved-tensor hooks (torch.utils.checkpoint, save_on_cpu)"
    if name in EXPAND:
        if args[0] is not t:
            return None, f"{name} of another tensor to its shape"
        shape = tuple(args[1].shape) if name == "expand_as" else _expand_shape(args, kwargs)
        what = f"{name} to {list(shape)}"
    elif name == "scaled_dot_product_attention":   # softmax(q kᵀ / √d + attn_mask) v: a sum with the scores
        query, key, *_, mask = _sdpa_options(args, kwargs)
        if mask is not t or key is None:
            return None, f"{name} of it as query, key or value"
        try:
            shape = tuple(torch.broadcast_shapes(t.shape, (*query.shape[:-1], key.shape[-2])))
        except RuntimeError:
            return None, name
        what = f"{name} as its attn_mask, into scores of shape {list(shape)}"
    elif name in PRODUCTS:   # the batch's rows h times t (or plus t, F.linear's bias): t has no rows of the batch
        h, w, bias, linear, left = _product_operands(name, args, kwargs)
        shape = _product_shape(h, w, linear)
        if h is t or shape is None or not (t is w or t is bias):
            return None, f"{name} of it by the batch's rows" if h is t else name
        shape = (*shape[:-2], shape[-1], shape[-2]) if left else shape
        what = f"{name} of rows of shape {list(h.shape)} by it, into shape {list(shape)}"
        fits = len(shape) > 0 and (shape[0] == B or (merged and B > 0 and shape[0] % B == 0))
        return (shape if fits else None), what
    elif name in CONVS:   # the batch's inputs convolved by t (or plus t, the bias): t has no rows of the batch
        x, w, bias, stride, padding, dilation, _ = _conv_operands(args, kwargs)
        shape = _conv_shape(x, w, stride, padding, dilation)
        if x is t or shape is None or not (t is w or t is bias):
            return None, (f"{name} of it by a weight" if x is t else f"{name} with an even kernel's padding='same'"
                          if isinstance(w, torch.Tensor) and padding is None else name)
        what = f"{name} of inputs of shape {list(x.shape)} by it, into shape {list(shape)}"
        return (shape if len(shape) > 0 and shape[0] == B else None), what
    elif name in ELEMENTWISE:
        if (name.endswith("_") or name.startswith("__i")) and args[0] is t:
            return None, f"{name} on itself"
        try:
            shape = tuple(torch.broadcast_shapes(*(o.shape for o in _operands(args, kwargs))))
        except RuntimeError:
            return None, name
        what = f"{name} into shape {list(shape)}"
    else:
        return None, name
    own_rows = len(shape) == t.dim() and t.dim() > 0 and t.shape[0] != 1
    if len(shape) < max(t.dim(), 1) or own_rows or not (
            shape[0] == B or (merged and B > 0 and shape[0] % B == 0)):
        return None, what
    return shape, what


def misfit(func, args: tuple, kwargs: dict, t: torch.Tensor, B: int) -> tuple[str | None, bool]:
    """(None if the rule takes this use of t in a batch of B (:func:`target_shape`, k·B rows
    too: whether they are k per example, the runs of 1 and 2 examples tell), else what it
    is; whether the use has the form the rule takes, saved-tensor hooks aside)."""
    shape, what = target_shape(func, args, kwargs, t, B, merged=True)
    return (None, True) if shape is not None else (
        what, target_shape(func, args, kwargs, t, B, hooks=False, merged=True)[0] is not None)


class Views:
    """The free parameters ({id: name}) and what the forward makes of them (:data:`SAME_ELEMENTS`,
    :data:`SELECTION`, elementwise functions) in one forward of a batch of B, each with the
    map of its elements to its parameter's (:attr:`maps`), or made by other ops of one or
    more of them (:attr:`graph`)."""

    def __init__(self, free: dict[int, str], B: int, untiled: frozenset[str] = frozenset(),
                 constants: frozenset[int] = frozenset()) -> None:
        self.of: dict[int, tuple[str, ...]] = {i: (n,) for i, n in free.items()}   # id -> the parameters it is made of
        self.B = B
        self.untiled = untiled   # the parameters whose repeats B times are not over the batch (the evidence's)
        self.alive: list[torch.Tensor] = []   # keeps the views' ids from being reused
        self.version: dict[int, int] = {}     # a view or copy -> its version counter when it was made
        # id -> (each element's number in the parameter, the derivative of the element by it or None,
        # the parameter's numel); none: the parameter's elements in their order
        self.maps: dict[int, tuple[torch.Tensor, torch.Tensor | None, int]] = {}
        self.made: dict[str, list[tuple[str, tuple[int, ...]]]] = {}   # name -> (op, shape) of what was made
        self.roots = set(free)                  # the parameters' own ids
        # ids of the parameters, of ``constants`` (the model's buffers) and of what ops of these alone made:
        # no rows of the batch
        self.pure = set(free) | constants
        self.param: dict[str, torch.Tensor] = {}   # name -> the parameter, once an op has used it
        # id -> the parameters, for a tensor made of them by other ops (:meth:`_through_graph`): their
        # gradients per example are the backward of those ops, run per example at each use
        self.graph: dict[int, tuple[torch.Tensor, ...]] = {}
        self.steps: dict[str, list[str]] = {}   # name -> each op on it or on what was made of it: "use", "made", …
        # id -> (one example's block S (k, ...), k) of a tensor the same k rows for every example, S repeated
        # over the batch (or made of such a repeat by TILED_OPS): its uses' δ, per example, is S's
        self.tiled: dict[int, tuple[torch.Tensor, int]] = {}
        # the storages of the tracked tensors a use has read: changed in place after, the use's backward
        # through the ops that made them would run through the change too
        self.used_storage: set[int] = set()

    def hits(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The tensors among the arguments (lists too) that are a free parameter or a view of one."""
        return [t for t in leaves((args, kwargs)) if id(t) in self.of]

    def names(self, tracked: list[torch.Tensor]) -> list[str]:
        """The parameters the tracked tensors are made of, each once, in order."""
        return list(dict.fromkeys(n for t in tracked for n in self.of[id(t)]))

    def note(self, func, args: tuple, kwargs: dict, out, planned: str | None = None) -> bool:
        """If ``func`` makes ``out`` from a tracked tensor in a way the rule follows (and is
        not a use, :func:`target_shape`, unless ``planned``, the first batch's kind of this
        op: "made", or :data:`TILED` for a repeat over the batch), track ``out`` with its
        map; whether it did."""
        name = _name(func)
        tracked = self.hits(args, kwargs)
        if not isinstance(out, torch.Tensor) or not tracked or kwargs.get("out") is not None or (
                name == "view" and any(isinstance(a, torch.dtype) for a in args[1:])):   # reinterprets bits
            return False
        t, inplace = tracked[0], in_place(func, kwargs)
        if inplace:
            if not (args and out is args[0] and self._rewritable(out)):
                return False
        elif any(self.changed(o) for o in tracked) or (not planned and not self._of_parameters(func, args, kwargs)
                                                        and any(target_shape(func, args, kwargs, o, self.B,
                                                                             hooks=False)[0] is not None
                                                                for o in tracked)):
            return False
        for o in tracked:
            if id(o) in self.roots:
                self.param.setdefault(self.of[id(o)][0], o)
        names = tuple(self.names(tracked))
        if any(id(o) in self.tiled for o in tracked) or planned == TILED or (
                planned is None and self._over_batch(func, args, kwargs, t, out)):
            return self._note_tiled(func, args, kwargs, t, out, planned, names, inplace or len(tracked) > 1)
        mapped = not inplace and all(o is t for o in tracked) and id(t) not in self.graph
        made = False
        if mapped and (name in SAME_ELEMENTS or name in SELECTION) and args[0] is t:
            made = self._picked(func, args, kwargs, t, out)
        elif mapped and (name in ELEMENTWISE or name in UNARY):
            made = self._derived(func, args, kwargs, t, out)
        changed = [out]
        pure = self._stays_pure(args, kwargs, out)
        if made is False:
            if not self._through_graph(args, kwargs, tracked, out):
                return False
            if inplace and id(out._base) in self.of:   # a view's base changes with it (``q[1:3].zero_()``)
                changed.append(out._base)
                names = tuple(dict.fromkeys(names + self.of[id(out._base)]))
            made = None
        for o in changed:   # what was changed in place is made by the ops in its autograd graph now
            (self.pure.add if pure else self.pure.discard)(id(o))
            self.of[id(o)] = names
            self.version[id(o)] = o._version
            self.maps.pop(id(o), None)
            if made is None:
                self.graph[id(o)] = tuple(self.param[n] for n in names)
        self.alive.append(out)
        if made is not None:
            self.maps[id(out)] = made
        for n in names:
            if name not in SAME_ELEMENTS:
                self.made.setdefault(n, []).append((name, tuple(out.shape)))
            if name not in CASTS:   # a cast is no step: training may cast where eval does not (Mamba's D.float())
                self.step(n, "made")
        return True

    def follow_constants(self, args: tuple, kwargs: dict, out) -> None:
        """An op on no free parameter: its result is :attr:`pure` if its operands are (a
        buffer's clone, spectral norm's ``self._u.clone()``)."""
        if not isinstance(out, torch.Tensor):
            return
        if self._stays_pure(args, kwargs, out):
            self.pure.add(id(out))
            self.alive.append(out)
        else:   # changed in place by another tensor (``u.add_(x)``), or a new tensor
            self.pure.discard(id(out))

    def _pure_operands(self, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
        """An op's tensor operands where it has some and every one is :attr:`pure`, else None."""
        operands = list(leaves((args, kwargs)))
        return operands if operands and all(id(o) in self.pure for o in operands) else None

    def _stays_pure(self, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
        """Whether ``out`` is :attr:`pure`: its op's operands are (in place: out itself too), and
        it is no larger than the largest of them (``buf.new_zeros(B, d)`` or an expand may
        take the batch's size)."""
        operands = self._pure_operands(args, kwargs)
        return operands is not None and out.numel() <= max(o.numel() for o in operands)

    def _of_parameters(self, func, args: tuple, kwargs: dict) -> bool:
        """Whether every tensor operand of ``func`` is a free parameter, a buffer of the model, or
        made by ops of these alone (:attr:`pure`), and the op is no expand: its result has no
        rows of the batch, whatever its shape (spectral norm's W / σ(W), 2 rows of W where the
        batch has 2 examples)."""
        return _name(func) not in EXPAND and self._pure_operands(args, kwargs) is not None

    def _over_batch(self, func, args: tuple, kwargs: dict, t: torch.Tensor, out) -> bool:
        """Whether ``func`` repeats t (k, ...) over the batch: ``t.repeat(B, 1, …, 1)`` or
        ``t.tile((B, 1, …, 1))``, k rows per example (:data:`REPEATS`)."""
        if _name(func) not in REPEATS or not args or args[0] is not t or kwargs or t.dim() == 0 or (
                set(self.of[id(t)]) & self.untiled):
            return False
        sizes = _sizes(args[1:])
        return (len(sizes) == t.dim() and all(isinstance(n, int) for n in sizes) and sizes[0] == self.B
                and all(n == 1 for n in sizes[1:]) and tuple(out.shape) == (self.B * t.shape[0], *t.shape[1:]))

    def _note_tiled(self, func, args: tuple, kwargs: dict, t: torch.Tensor, out: torch.Tensor, planned: str | None,
                    names: tuple[str, ...], mixed: bool) -> bool:
        """Track ``out``, a repeat of t over the batch (:meth:`_over_batch`), or an op of
        :data:`TILED_OPS` on such a repeat t that keeps each example's rows its own, with one
        example's block (:attr:`tiled`); whether it did (``mixed``: in place, or of another
        tracked tensor too: never)."""
        if mixed:
            return False
        if id(t) in self.tiled:
            if planned == TILED:
                return False
            block = self._tiled_op(func, args, kwargs, t, out)
            kind = "made"
        else:
            if not self._over_batch(func, args, kwargs, t, out):   # planned TILED, or found so by note
                return False
            block, kind = (t, t.shape[0]), TILED
        if block is None:
            return False
        # the uses of out run their backward from the block: a change in place to it after would be in it
        self.used_storage.add(_storage(block[0]))
        self.of[id(out)] = names
        self.version[id(out)] = out._version
        self.alive.append(out)
        self.tiled[id(out)] = block
        for n in names:
            self.made.setdefault(n, []).append((f"{_name(func)} per example", tuple(block[0].shape)))
            self.step(n, kind)
        return True

    def _tiled_op(self, func, args: tuple, kwargs: dict, t: torch.Tensor, out: torch.Tensor
                  ) -> tuple[torch.Tensor, int] | None:
        """One example's block of ``out``, an op of :data:`TILED_OPS` on t, a repeat over the
        batch of its block S: the same op on S (a view's or reshape's first size, t's k·B
        rows, read as k: each row's elements stay in it), tracked as made of S; None where
        the op is another, or moves dimension 0 (the same op on a tensor of distinct sizes says)."""
        name = _name(func)
        S, k = self.tiled[id(t)]
        if name not in TILED_OPS or args[0] is not t or not isinstance(out, torch.Tensor) or out.dim() == 0:
            return None
        rest = args[1:]
        if name in ("reshape", "view"):
            sizes = _sizes(rest)
            if kwargs or not sizes or sizes[0] != t.shape[0]:
                return None
            rest = (k, *sizes[1:])
        elif name not in SAME_ELEMENTS:   # a permutation of the dimensions: dimension 0 stays where it is
            try:   # on a tensor of distinct sizes, which say where each dimension went
                moved = func(torch.empty(tuple(range(2, 2 + t.dim())), device="meta"), *args[1:], **kwargs)
            except (RuntimeError, TypeError, IndexError, ValueError):
                return None
            if not isinstance(moved, torch.Tensor) or moved.shape[0] != 2:
                return None
        try:
            block = func(S, *rest, **kwargs)
        except (RuntimeError, TypeError, IndexError, ValueError):
            return None
        if not isinstance(block, torch.Tensor) or tuple(block.shape) != (k, *out.shape[1:]):
            return None
        self.of[id(block)] = self.of[id(S)]
        self.version[id(block)] = block._version
        self.alive.append(block)
        if id(S) in self.graph:
            self.graph[id(block)] = self.graph[id(S)]
        else:
            made = self._picked(func, (S, *rest), kwargs, S, block)
            if made is False:
                return None
            if made is not None:
                self.maps[id(block)] = made
        return block, k

    def tiled_fit(self, func, args: tuple, kwargs: dict, t: torch.Tensor) -> tuple[str | None, bool]:
        """(None if the rule takes this use of t, a repeat over the batch (:attr:`tiled`), else
        what it is; whether it has a form the rule takes): a product with a stack of as many
        matrices (:data:`STACKED_PRODUCTS`: ``torch.bmm(q, t)``), or an elementwise op whose
        result has t's dimensions: each of t's rows meets the result's row of the same number."""
        name = _name(func)
        others = [o for o in _operands(args, kwargs) if o is not t]
        if not any(o is t for o in _operands(args, kwargs)):
            return f"{name} of a tensor repeated over the batch, inside a list", False
        if name in STACKED_PRODUCTS:
            fits = len(others) == 1 and others[0].dim() == t.dim() >= 3 and others[0].shape[0] == t.shape[0]
        elif name in ELEMENTWISE and not ((name.endswith("_") or name.startswith("__i")) and args[0] is t):
            try:
                shape = torch.broadcast_shapes(*(o.shape for o in _operands(args, kwargs)))
            except RuntimeError:
                return name, False
            fits = len(shape) == t.dim() and shape[0] == t.shape[0]
        else:
            return f"{name} of a tensor repeated over the batch", False
        what = f"{name} of a tensor repeated over the batch"
        if fits and _saving_hooks():
            return f"{what}, under saved-tensor hooks (torch.utils.checkpoint, save_on_cpu)", True
        return (None, True) if fits else (what, False)

    def _rewritable(self, t: torch.Tensor) -> bool:
        """Whether an in-place op may change tracked t (Swin-v2's in-place ReLU, torchvision's
        ``qkv_bias[k:2k].zero_()`` on a copy): made of free parameters, neither a parameter nor
        a view of one, and no use has read its storage (the use's backward through the ops
        that made it would run through the change)."""
        base = t if t._base is None else t._base
        return id(t) in self.of and not {id(t), id(base)} & self.roots and _storage(t) not in self.used_storage

    def _through_graph(self, args: tuple, kwargs: dict, tracked: list[torch.Tensor], out: torch.Tensor) -> bool:
        """Whether any other op makes a tensor of free parameters (``F.embedding(ids, P)``,
        ``F.interpolate``, ``torch.cat`` of two of its slices, BEiT's ``torch.cat((q_bias,
        zeros, v_bias))``, Swin-v2's position MLP; in place too, :meth:`_rewritable`):
        every operand with a gradient is one of them or made of them, and the result is
        floating with a gradient. That its shape does not follow the batch (it reads no
        example) is the first batch's evidence (:mod:`.layout`); each use then runs the op's
        backward per example."""
        if not out.is_floating_point() or not out.requires_grad:
            return False
        return all(id(o) in self.of for o in leaves((args, kwargs)) if o.requires_grad)

    def step(self, name: str, kind: str) -> None:
        """Note an op on parameter ``name`` (or on what was made of it): "use" or "made"."""
        self.steps.setdefault(name, []).append(kind)

    def used(self, hits: list[torch.Tensor]) -> None:
        """Note a use of the tracked tensors ``hits``: once per parameter (``P * P`` is one)."""
        self.used_storage.update(_storage(t) for t in hits)
        for name in self.names(hits):
            self.step(name, "use")

    def next_step(self, name: str, plan: dict[str, list[str]]) -> str | None:
        """What the first batch's op at this place was ("use", :data:`MERGED`, "made"; None past its ops)."""
        done, planned = len(self.steps.get(name, [])), plan.get(name, [])
        return planned[done] if done < len(planned) else None

    def planned_kind(self, func, args: tuple, hits: list[torch.Tensor], plan: dict[str, list[str]] | None
                     ) -> str | None:
        """What the op ``func`` on ``hits`` makes of them: "made" for a cast of one (:data:`CASTS`:
        never a use, and no step of the plan: training may cast where eval does not, Mamba's
        ``D.float()``); else what ``plan`` says ("made", or :data:`TILED`: a repeat over the
        batch), or None for a use: its shapes do not decide (a size that equals B by chance is
        not the batch's)."""
        if _name(func) in CASTS and args and all(t is args[0] for t in hits):
            return "made"
        kinds = {self.next_step(n, plan) for n in self.names(hits)} if plan is not None else set()
        return kinds.pop() if len(kinds) == 1 and kinds <= {"made", TILED} else None

    def _numbers(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """t's map; for a tensor that holds its parameter's elements in order, their numbers."""
        made = self.maps.get(id(t))
        if made is None:
            return torch.arange(t.numel(), device=t.device).view(t.shape), None, t.numel()
        return made

    def _picked(self, func, args: tuple, kwargs: dict, t: torch.Tensor, out: torch.Tensor):
        """The map of a selection (or view, cast, copy) of t: the same op on t's map; None where
        out still holds the parameter's elements in order; False where the op cannot be replayed."""
        name = _name(func)
        if id(t) not in self.maps and name in SAME_ELEMENTS:
            return None
        if name in CASTS:
            return self.maps[id(t)]
        numbers, scale, numel = self._numbers(t)
        try:
            picked = func(numbers, *args[1:], **kwargs)
            scale = None if scale is None else func(scale, *args[1:], **kwargs)
        except (RuntimeError, TypeError, IndexError, ValueError):
            return False
        if not isinstance(picked, torch.Tensor) or picked.shape != out.shape:
            return False
        return picked, scale, numel

    def _derived(self, func, args: tuple, kwargs: dict, t: torch.Tensor, out: torch.Tensor):
        """The map of an elementwise function of t (every other tensor operand without a
        gradient): t's, broadcast to out's shape, with the derivative in each place, from
        autograd on a copy of t expanded to that shape; False where it does not apply."""
        if any(o is not t and o.requires_grad for o in leaves((args, kwargs)) if isinstance(o, torch.Tensor)):
            return False
        shape = tuple(out.shape)
        if len(shape) < t.dim() or not out.is_floating_point():
            return False
        with torch.enable_grad():
            copy = t.detach().expand(shape).clone().requires_grad_(True)
            swap = (lambda a: copy if a is t else a)
            again = func(*(swap(a) for a in args), **{k: swap(v) for k, v in kwargs.items()})
            if not isinstance(again, torch.Tensor) or tuple(again.shape) != shape or not again.requires_grad:
                return False
            (slope,) = torch.autograd.grad(again, copy, torch.ones_like(again))
        numbers, scale, numel = self._numbers(t)
        slope = slope.detach()
        # contiguous: a later view of what is made (``.view(1, -1)``) replays on these as on it
        return numbers.expand(shape).contiguous(), slope if scale is None else scale.expand(shape) * slope, numel

    def changed(self, t: torch.Tensor) -> bool:
        """Whether a tracked view or copy was changed in place since it was made (through
        itself or another view of its storage): its elements are no longer the parameter's."""
        made = self.version.get(id(t))
        return made is not None and t._version != made

    def unfit(self, func, args: tuple, kwargs: dict, hits: list[torch.Tensor]) -> str | None:
        """Why the tracked tensors ``hits`` of an op are no longer the parameter's elements
        for what follows, or None: a view or copy changed in place before this op, or the
        parameter written into another tensor (``out[...] = P``, ``out.copy_(P)``; ``h.add_(P)``
        is an elementwise use)."""
        name = _name(func)
        stale = next((t for t in hits if self.changed(t)), None)
        if stale is not None:
            return f"is changed in place (its copy or view) before its use by {name}"
        first = args[0] if args else None
        if in_place(func, kwargs) and name not in ELEMENTWISE and any(t is not first for t in hits):
            return f"is written into another tensor by {name}"
        return None


def last_node(inputs) -> int:
    """The highest sequence number among the autograd nodes of an op's ``inputs`` (through
    tuples, lists and dicts), read before the op runs (an in-place op gives its input a new
    node), or -1: every node the op makes has a higher one (:func:`op_nodes`)."""
    return max((t.grad_fn._sequence_nr() for t in leaves(inputs) if t.grad_fn is not None), default=-1)


def cast_of_leaf(node) -> bool:
    """Whether an autograd node is a cast of a leaf: autocast's of a parameter, which it makes
    once per autocast region and keeps for the ops after (a matmul's weight in bf16)."""
    return node.name() == "ToCopyBackward0" and all(
        nxt is None or hasattr(nxt, "variable") for nxt, _ in node.next_functions)


def op_nodes(out, before: int) -> set:
    """The autograd nodes one op made for its result ``out``: from each result tensor's node
    back to, not into, the nodes that existed before it (sequence numbers up to
    ``before``, :func:`last_node`; all nodes below an input's are older still), and
    autocast's cast of a parameter it used (:func:`cast_of_leaf`), made by an earlier op.
    One indexing, ``P[None, :, None, None]``, makes several."""
    found: set = set()
    stack = [t.grad_fn for t in leaves(out) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in found or hasattr(node, "variable") or (node._sequence_nr() <= before and not cast_of_leaf(node)):
            continue   # a leaf's AccumulateGrad, or older
        found.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return found


def graph_nodes(out) -> Iterator:
    """Every node of the autograd graph of ``out`` (the tensors in it, through tuples), once."""
    stack = [t.grad_fn for t in leaves(out) if t.grad_fn is not None]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)


def unseen_uses(out, views: Views, consumers: set) -> dict[str, str]:
    """{name: the node} for each free parameter (or tracked view) that a node of the
    autograd graph of ``out`` takes as input without being among ``consumers``, the
    nodes of the uses the op watch saw: a use inside a custom ``autograd.Function`` (whose
    forward runs without gradients) or inside another function's ``__torch_function__``
    handler, which the rule would miss."""
    tracked = {t.grad_fn: views.of[id(t)] for t in views.alive if t.grad_fn is not None}   # node -> its names
    # autocast's casts of a parameter are tracked as copies of it: every op that takes one is a use
    tracked.update({node: views.of[id(nxt.variable)] for node in consumers if cast_of_leaf(node)
                    for nxt, _ in node.next_functions if nxt is not None and id(nxt.variable) in views.of})
    found: dict[str, str] = {}
    for node in graph_nodes(out):
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            names = views.of.get(id(var)) if var is not None else tracked.get(nxt)
            if names is not None and node not in consumers:
                for name in names:
                    found.setdefault(name, node.name())
    return found


def _backward_per_example(made: torch.Tensor, params: tuple[torch.Tensor, ...], g: torch.Tensor
                          ) -> list[torch.Tensor]:
    """Each example's gradient of each of ``params`` [(B, numel)] from its gradient ``g`` (B,
    made.numel()) of a tensor the forward made of them (:meth:`Views._through_graph`): the
    backward of the ops between them, batched over the examples (one at a time where an op
    has no batched backward). Run from a use's probe, before autograd reaches those ops:
    their saved tensors are still there, and ``retain_graph`` leaves them for the backward
    under way."""
    B = len(g)
    if B == 0:
        return [g.new_zeros((0, p.numel())) for p in params]
    G = g.reshape(B, *made.shape).to(made.dtype)
    try:
        got = torch.autograd.grad(made, params, G, retain_graph=True, is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        each = [torch.autograd.grad(made, params, Gb, retain_graph=True, materialize_grads=True) for Gb in G]
        got = [torch.stack(gs) for gs in zip(*each)]
    return [g.new_zeros((B, p.numel())) if gp is None else gp.detach().to(g.dtype).reshape(B, -1)
            for gp, p in zip(got, params)]


def _call_swapped(func, args: tuple, kwargs: dict, swap: dict[int, torch.Tensor]):
    """``func`` on its arguments with each tensor whose id is in ``swap`` replaced by its swap (its probe)."""
    args = tuple(swap.get(id(a), a) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: swap.get(id(v), v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return func(*args, **kwargs)


def _sdpa_options(args: tuple, kwargs: dict) -> tuple:
    """(query, key, value, dropout_p, is_causal, scale, enable_gqa, attn_mask) of an
    ``F.scaled_dot_product_attention`` call."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    given = {**dict(zip(names, args)), **kwargs}
    return (given.get("query"), given.get("key"), given.get("value"), given.get("dropout_p", 0.0),
            given.get("is_causal", False), given.get("scale"), given.get("enable_gqa", False), given.get("attn_mask"))


def _scores_gradient(args: tuple, kwargs: dict, delta: torch.Tensor) -> torch.Tensor:
    """∂L/∂S of SDPA's scores S = q kᵀ · scale + attn_mask, from the call's
    (detached) arguments and δ = ∂L/∂output, recomputed in float32 (float64 for float64):
    softmax's backward, P ⊙ (dP − rowsum(dP ⊙ P)) with dP = δ vᵀ; the broadcast shape of
    the scores, which is the gradient of an attn_mask expanded to it."""
    q, k, v, _, _, scale, gqa, mask = _sdpa_options(args, kwargs)   # is_causal: torch refuses it with a mask
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, delta = q.to(acc), k.to(acc), v.to(acc), delta.to(acc)
    if gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    S = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5) + mask.to(acc)
    P = torch.where(S.amax(-1, keepdim=True) == float("-inf"), 0.0, S.softmax(-1))   # a row masked whole: SDPA's 0
    dP = delta @ v.transpose(-2, -1)
    return P * (dP - (dP * P).sum(-1, keepdim=True))


def _weight_grads(h: torch.Tensor, B: int, linear: bool, delta: torch.Tensor, stacked: bool = False
                  ) -> torch.Tensor:
    """(B, *w.shape) each example's gradient of w in the product of the rows h (…, d_in), k per
    example in order, by w: F.linear's (d_out, d_in) weight (``linear``), Σ_r δ_r h_rᵀ, or
    matmul's (d_in, d_out), Σ_r h_r δ_rᵀ; δ = ∂L/∂output (…, d_out). ``stacked``: w is a stack
    of matrices that matmul broadcasts over h's leading dimensions (:func:`_product_shape`):
    hᵀ δ per matrix, (*h.shape[:-2], d_in, d_out), its rows per example still to be summed.
    In float32 (float64 for float64)."""
    acc = acc_dtype(delta.dtype)
    if stacked:
        return h.to(acc).transpose(-1, -2) @ delta.to(acc)
    k = h.shape[:-1].numel() // B if B else 0
    a, d = h.to(acc).reshape(B, k, h.shape[-1]), delta.to(acc).reshape(B, k, delta.shape[-1])
    return d.transpose(1, 2) @ a if linear else a.transpose(1, 2) @ d


class FreeUses(TorchFunctionMode):
    """While active (one forward of a batch of B: entered, then :meth:`leave`), each op that
    uses a parameter of ``free`` ({id: name}), or a view of one, gets it expanded to the
    op's result shape through a probe on the zero leaf of ``leaf`` (made here if the list
    is empty), whose δ, per example, is added to :attr:`grads`. A use the rule does not
    take, whose result needs a gradient, is noted in ``problems`` ({name: what}; the
    parameter then goes to the fallback). ``see(name, use, δ)`` (the ghost engine's
    output-path check) may claim a δ first; a δ that comes twice for one use sets
    :attr:`again` (a second backward). ``plan``: for each parameter, what its ops were on the
    first batch, in order ("use", :data:`MERGED` or "made", :attr:`Views.steps`): an op is
    taken as the same (a size that equals B by chance is not the batch's), any other is a
    problem. ``contiguous``: the engine's own backward; False: the in-run recorder's
    training step, which must stay bit for bit what it is (δ passed on as it came, and
    SDPA's attn_mask is no use under autocast or on an accelerator)."""

    def __init__(self, free: dict[int, str], B: int, leaf: list[torch.Tensor], contiguous: bool,
                 problems: dict[str, str], plan: dict[str, list[str]],
                 see: Callable[[str, object, torch.Tensor], bool] | None = None) -> None:
        super().__init__()
        self.views, self.B, self.leaf, self.contiguous, self.see = Views(free, B), B, leaf, contiguous, see
        self.plan = plan
        self.grads: dict[str, torch.Tensor] = {}   # name -> Σ over its uses of each example's gradient (B, numel)
        # name -> (h (B, k, d_in), δ (B, k, d_out), F.linear's or not) of a parameter whose one op is a product
        self.products: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        self.problems = problems
        self.uses = 0
        self.came: set[int] = set()
        self.again = False
        self.active = False
        self.paused = False   # the engine's own forwards inside this one (a late layout): no substitution

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def leave(self) -> None:
        """End the forward's substitutions (once; the innermost mode is this one)."""
        if self.active:
            self.active = False
            self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        hits = [t for t in self.views.hits(args, kwargs) if t.requires_grad]
        if not hits or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        unfit = self.views.unfit(func, args, kwargs, hits)
        unplanned = [n for n in self.views.names(hits) if not self.plan.get(n)]
        if unplanned and self.views.planned_kind(func, args, hits, self.plan) != "made":   # (a cast is no use)
            unfit = f"is used by {_name(func)} {UNPLANNED}"
        if unfit is not None:
            out = func(*args, **kwargs)
            if needs_grad(out) or in_place(func, kwargs):   # a changed copy's .shape is no use; out[...] = P: None
                for name in self.views.names(hits):
                    self.problems.setdefault(name, unfit)
            return out
        names = self.views.names(hits)
        planned = {name: self.views.next_step(name, self.plan) for name in names}
        kind = self.views.planned_kind(func, args, hits, self.plan)
        if kind is not None:   # what the first batch made of it
            out = func(*args, **kwargs)
            made = result(func, args, kwargs, out)
            if not self.views.note(func, args, kwargs, made, planned=kind) and needs_grad(made):
                for name in names:
                    self.problems.setdefault(name, f"is used by {_name(func)}, which made another tensor of it on "
                                                   f"the first batch")
            return out
        if any(id(t) in self.views.tiled for t in hits):
            return self._tiled_use(func, args, kwargs, hits, planned)
        shapes = {id(t): target_shape(func, args, kwargs, t, self.B,
                                      merged=any(planned[n] == MERGED for n in self.views.of[id(t)])) for t in hits}
        bad = {n: what for i, (shape, what) in shapes.items() if shape is None for n in self.views.of[i]}
        bad.update({name: f"{_name(func)}, unlike on the first batch" for name in names
                    if planned[name] not in ("use", MERGED)})
        if _name(func) == "scaled_dot_product_attention" and _sdpa_options(args, kwargs)[3]:
            bad.update({name: f"{_name(func)} with dropout (its mask's gradient per example cannot be recomputed)"
                        for name in names})
        if bad:   # run as it is; any use with a gradient the rule does not take is a problem
            out = func(*args, **kwargs)
            if needs_grad(out):
                for name, what in bad.items():
                    self.problems.setdefault(name, f"is used by {what}")
            return out
        self.views.used(hits)
        if _name(func) == "scaled_dot_product_attention":   # the mask as it is: SDPA reduces its gradient itself
            return self._attention(func, args, kwargs, hits[0], shapes[id(hits[0])][0])
        if _name(func) in PRODUCTS:
            return self._product(func, args, kwargs, hits)
        if _name(func) in CONVS:
            return self._conv(func, args, kwargs, hits)
        swap = {}
        for t in hits:   # P * P: one expansion
            if id(t) not in swap:
                swap[id(t)] = self._expanded(t, shapes[id(t)][0])
        return _call_swapped(func, args, kwargs, swap)

    def _tiled_use(self, func, args: tuple, kwargs: dict, hits: list[torch.Tensor],
                   planned: dict[str, str | None]) -> torch.Tensor:
        """A use of tensors repeated over the batch (:attr:`Views.tiled`), every tracked operand
        one, in a form :meth:`Views.tiled_fit` takes: each probed as it is, whose δ's k rows per
        example are that example's gradient of the repeated block; else run as it is, a problem."""
        fits = [self.views.tiled_fit(func, args, kwargs, t)[0] if id(t) in self.views.tiled
                else f"{_name(func)} of a tensor repeated over the batch and another made of a free parameter"
                for t in hits]
        why = next((w for w in fits if w is not None), None)
        if why is None and any(kind not in ("use", MERGED) for kind in planned.values()):
            why = f"{_name(func)}, unlike on the first batch"
        if why is not None:
            out = func(*args, **kwargs)
            if needs_grad(out):
                for name in self.views.names(hits):
                    self.problems.setdefault(name, f"is used by {why}")
            return out
        self.views.used(hits)
        self._make_leaf(hits[0].device)
        swap = {}
        for t in hits:
            if id(t) not in swap:
                swap[id(t)] = probe(t, self.leaf[0], self._on_tiled(t), self.contiguous)
        return _call_swapped(func, args, kwargs, swap)

    def _on_tiled(self, t: torch.Tensor) -> Callable[[torch.Tensor], None]:
        """The callback of a new use of t, a repeat over the batch of the block S (k, ...):
        its δ (k·B, ...), k rows per example, is each example's gradient of S."""
        S, k = self.views.tiled[id(t)]
        names, use = self.views.of[id(t)], self.uses
        made, roots = self.views.maps.get(id(S)), self.views.graph.get(id(S))
        self.uses += 1
        rows = (self.B, *S.shape)

        def on_grad(delta: torch.Tensor) -> None:
            self._add(names, use, delta.reshape(rows), rows, made, None if roots is None else (S, roots))
        return on_grad

    def _on_use(self, t: torch.Tensor, shape: tuple[int, ...],
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[torch.Tensor], None]:
        """The callback of a new use of t, expanded to ``shape``: its δ to :meth:`_add`; with
        ``transform``, the gradient of t expanded to ``shape`` that it makes of the probed
        output's δ (SDPA's scores, :func:`_scores_gradient`; a product's weight, :func:`_weight_grads`)."""
        self._make_leaf(t.device)
        names, use, made = self.views.of[id(t)], self.uses, self.views.maps.get(id(t))
        roots = self.views.graph.get(id(t))
        through = None if roots is None else (t, roots)
        self.uses += 1
        rows = (self.B, *((1,) * (len(shape) - t.dim()) + tuple(t.shape))[1:])   # t's elements, per example

        def on_grad(delta: torch.Tensor) -> None:
            self._add(names, use, delta if transform is None else transform(delta), rows, made, through)
        return on_grad

    def _make_leaf(self, device: torch.device) -> None:
        """The zero leaf the probes hang on, made on the first use."""
        if not self.leaf:
            self.leaf.append(torch.zeros((), device=device, requires_grad=True))

    def _expanded(self, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        on_grad = self._on_use(t, shape)
        return probe(t.expand(shape), self.leaf[0], on_grad, self.contiguous)

    def _attention(self, func, args: tuple, kwargs: dict, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """SDPA with t, its attn_mask, as it is (an expanded mask would change how the kernel
        reduces its gradient: in bf16 under autocast, the expand's in float32), the output
        probed: from its δ, each example's gradient of the scores, which is the mask's
        (:func:`_scores_gradient`), goes to :meth:`_add` as an expanded mask's δ would."""
        out = func(*args, **kwargs)
        on_grad = self._on_use(t, shape, partial(_scores_gradient, *map_leaves((args, kwargs), torch.Tensor.detach)))
        return probe(out, self.leaf[0], on_grad, self.contiguous)

    def _product(self, func, args: tuple, kwargs: dict, hits: list[torch.Tensor]) -> torch.Tensor:
        """A product of the batch's rows h by t (``F.linear``'s weight or bias, ``h @ t``, such an
        einsum) as it is, its output probed: from the output's δ, each example's gradient of the weight,
        Σ_r δ_r h_rᵀ over its rows (:func:`_weight_grads`), and of the bias, δ summed over them.
        A parameter whose one op this is keeps h and δ instead (:attr:`products`): its norms
        and dots then take the Linear rule's forms, without its (B, d_out · d_in) gradients."""
        out = func(*args, **kwargs)
        name = _name(func)
        h, w, _, linear, left = _product_operands(name, args, kwargs)
        calls = []
        for t in {id(t): t for t in hits}.values():
            stacked = t.dim() > 2
            if t is not w:
                calls.append(self._on_use(t, tuple(out.shape)))
            elif (not stacked and id(t) in self.views.roots
                  and self.plan.get(self.views.of[id(t)][0]) in (["use"], [MERGED])):
                calls.append(self._on_product(t, h.detach(), linear))
            else:   # a stack of matrices: its gradient as matmul broadcasts it over h's leading dimensions
                shape = (*h.shape[:-2], *t.shape[-2:]) if stacked else (self.B, *t.shape)
                calls.append(self._on_use(t, shape, partial(_weight_grads, h.detach(), self.B, linear,
                                                            stacked=stacked)))
            if left and t is w:   # W @ X is (Xᵀ Wᵀ)ᵀ: the rows' δ is the output's, transposed
                calls[-1] = partial(lambda call, delta: call(delta.transpose(-1, -2)), calls[-1])
        return probe(out, self.leaf[0], lambda delta: [call(delta) for call in calls], self.contiguous)

    def _conv(self, func, args: tuple, kwargs: dict, hits: list[torch.Tensor]) -> torch.Tensor:
        """A convolution of the batch's inputs by t (its weight or bias) as it is, its output
        probed: from the output's δ, each example's gradient of the weight (:func:`_conv_weight_grads`)
        and of the bias, δ summed over the positions."""
        out = func(*args, **kwargs)
        x, w, _, stride, padding, dilation, groups = _conv_operands(args, kwargs)
        calls = []
        for t in {id(t): t for t in hits}.values():
            grads = (partial(_conv_weight_grads, x.detach(), tuple(w.shape), (stride, padding, dilation, groups),
                             self.B) if t is w else lambda delta: delta.sum(tuple(range(2, delta.dim()))))
            calls.append(self._on_use(t, (self.B, *t.shape), grads))
        return probe(out, self.leaf[0], lambda delta: [call(delta) for call in calls], self.contiguous)

    def _on_product(self, t: torch.Tensor, h: torch.Tensor, linear: bool) -> Callable[[torch.Tensor], None]:
        """The callback of the one use of parameter t, a product of the rows h: keeps them and δ, per example."""
        self._make_leaf(t.device)
        (name,), use = self.views.of[id(t)], self.uses
        self.uses += 1

        def on_grad(delta: torch.Tensor) -> None:
            if self._first(name, use, delta):
                acc = acc_dtype(delta.dtype)
                k = h.shape[:-1].numel() // self.B if self.B else 0
                self.products[name] = (h.to(acc).reshape(self.B, k, h.shape[-1]),
                                       delta.detach().to(acc).reshape(self.B, k, delta.shape[-1]), linear)
        return on_grad

    def _first(self, name: str, use: int, delta: torch.Tensor) -> bool:
        """Whether a use's δ is to be added: not claimed by the output-path check, and the
        first of its use (a second sets :attr:`again`)."""
        if self.see is not None and self.see(name, use, delta):
            return False
        if use in self.came:
            self.again = True
            return False
        self.came.add(use)
        return True

    def _per_example(self, delta: torch.Tensor) -> torch.Tensor:
        """δ with its k·B rows (a merged use: k per example, in order) summed to B."""
        return delta if len(delta) == self.B else delta.reshape(self.B, -1, *delta.shape[1:]).sum(1)

    def _add(self, names: tuple[str, ...], use: int, delta: torch.Tensor, rows: tuple[int, ...],
             made: tuple[torch.Tensor, torch.Tensor | None, int] | None,
             through: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None) -> None:
        """Add each example's gradient through one use (δ of the used tensor, ``rows`` its
        elements per example) to the parameters ``names`` it is made of: by the map ``made``,
        or through the ops between (``through``: the used tensor and the parameters)."""
        if not self._first(names[0], use, delta):
            return
        g = self._per_example(delta.detach().to(acc_dtype(delta.dtype))).sum_to_size(rows).reshape(self.B, -1)
        if made is not None:   # t's elements are some of the parameter's (Views.maps): each share added to its own
            numbers, slope, numel = made
            if slope is not None:
                g = g * slope.reshape(1, -1).to(g)
            # index_put_ with accumulate: the same sums in the same order on every run (CUDA too)
            g = g.new_zeros((numel, self.B)).index_put_((numbers.reshape(-1).to(g.device),), g.T, accumulate=True).T
        for name, gp in zip(names, [g] if through is None else _backward_per_example(*through, g)):
            self.grads[name] = gp if name not in self.grads else self.grads[name] + gp

    def terms(self, name: str, V: torch.Tensor | None, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖g_b‖² (B,), ⟨g_b, V_k⟩ (B, K)) of parameter ``name`` (one in :meth:`names`); V: its
        (K, *shape) reference block or None."""
        if name in self.products:   # the Linear rule's forms on h and δ (matmul's weight: W a for y = a W)
            a, d, linear = self.products[name]
            return weight_and_bias([a], [d], {"weight": V}, K, transposed=not linear)
        G = self.grads[name]
        return (G * G).sum(1), (G.new_zeros((len(G), K)) if V is None else G @ V.reshape(K, -1).to(G.dtype).T)

    def names(self) -> list[str]:
        """The parameters whose δ came in this batch's backward."""
        return [*self.grads, *self.products]

    def clear(self) -> None:
        """Drop the batch's gradients and products."""
        self.grads, self.products = {}, {}

    def sums(self, refs: dict[str, torch.Tensor | None], K: int
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(‖g_b‖² (B,), ⟨g_b, V_k⟩ (B, K)) over the parameters whose δ came; ``refs``: name ->
        its (K, *shape) reference block or None. None if no δ came."""
        sq = dots = None
        for name in self.names():
            s, d = self.terms(name, refs.get(name), K)
            sq, dots = (s, d) if sq is None else (sq + s, dots + d.to(dots.dtype))
        return None if sq is None else (sq, dots)
