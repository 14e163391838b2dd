"""Ghost reductions for a Linear layer: per-example gradient norm and dots, no (B, P) block.

For activations a (B, T, d_in) and output gradients δ (B, T, d_out), the per-example
weight gradient is g_b = Σ_t δ_bt a_btᵀ (d_out, d_in). Two ways to get what scores need:

- outer: materialize g_b (B, d_out, d_in) one sub-batch at a time, then reduce it with
  ``norm_dot``: ‖g_b‖² and ⟨g_b, V_k⟩. Cost ≈ (T + K)·d_in·d_out per example.
- gram: ‖g_b‖² = Σ_{t,s} (a_bt·a_bs)(δ_bt·δ_bs) in T²·(d_in + d_out), and
  ⟨g_b, V_k⟩ = Σ_t δ_btᵀ V_k a_bt by projecting a through V in T·K·d_in·d_out. Both Grams
  are symmetric: on CPU a long sequence's are formed as the upper triangle of k × k
  blocks (:func:`gram_blocks`), the blocks off the diagonal counted twice, for
  (k + 1)/(2k) of the flops.

``plan`` picks the cheaper by that flop count (gram wins for short sequences and wide
layers, outer for long sequences or many references). The outer form runs a Triton
kernel on CUDA (g_b stays in its tiles); the gram form is batched matrix products in
torch everywhere (cuBLAS on CUDA). ``ghost_linear_reference`` is the obviously-correct
einsum version.

Layers that read one input (a transformer's q, k and v projections of one hidden state)
share its Gram a aᵀ: an engine counts the readers of each input in the
forward (:class:`SharedGrams`) and, while its rules run (:func:`sharing`), the first
reader's Gram is kept for the others until the last is done, so the gram form then costs
T²·(d_in/readers + d_out).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch

from .dispatch import guarded
from .norm_dot import norm_dot
from .reference import acc_dtype

#: smallest workspace of one sub-batch: below it, per-call overhead would dominate
MIN_WORKSPACE_BYTES = 2 * 2**20


def workspace_bytes(*captured: torch.Tensor) -> int:
    """Memory budget of a layer's transient blocks (the outer form's (b, d_out, d_in)
    per-example gradients, the gram form's two (b, T, T) Grams, a conv's im2col patches):
    the bytes of what the layer captured (its input and output gradient, which a plain
    backward holds too), and at least ``MIN_WORKSPACE_BYTES``. Examples go through in
    sub-batches that fit it, so ghost's peak stays near one plain forward+backward."""
    return max(MIN_WORKSPACE_BYTES, sum(t.numel() * t.element_size() for t in captured))


#: shortest sequence whose Grams are formed in blocks, and the rows of a block it aims at:
#: below them, smaller matrix products cost more time than the halved flops save (on CPU;
#: ``python -m bench.gram``)
MIN_BLOCKED_T, BLOCK_ROWS = 48, 128


def gram_blocks(T: int, cuda: bool = False) -> list[slice]:
    """The k row blocks of a (T, T) Gram formed as its upper triangle of blocks: k = 1
    below :data:`MIN_BLOCKED_T`, else the power of two ≥ 2 nearest below T/BLOCK_ROWS.
    On CUDA k = 1: more, smaller products add kernel launches, and the GPU kit
    (``bench.gpu_check``'s ``gram`` step) has not yet measured where blocks win there."""
    k = 1 if T < MIN_BLOCKED_T or cuda else 2 ** max(1, (T // BLOCK_ROWS).bit_length() - 1)
    edges = [i * T // k for i in range(k + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(k)]


def gram_cost(T: int, width: float, cuda: bool = False) -> float:
    """Multiply-adds per example of Grams of (T, width) rows: the (k + 1)/(2k) of T²·width
    formed in :func:`gram_blocks`."""
    k = len(gram_blocks(T, cuda))
    return T * T * (k + 1) / (2 * k) * width


def plan(T: int, d_in: int, d_out: int, K: int, readers: int = 1, cuda: bool = False) -> str:
    """``"gram"`` or ``"outer"``: whichever costs fewer flops per example; the input's
    Gram counts once over its ``readers`` (layers sharing it, :class:`SharedGrams`)."""
    outer = (T + K) * d_in * d_out
    gram = gram_cost(T, d_in / max(1, readers) + d_out, cuda) + T * K * d_in * d_out
    return "gram" if gram < outer else "outer"


def _identity(t: torch.Tensor) -> tuple:
    """What makes two tensors the same data: storage, offset, shape, strides, dtype, version."""
    return (t.untyped_storage().data_ptr(), t.device, t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype, t._version)


class SharedGrams:
    """One batch's layer inputs (B, T, d_in), how many layers read each, and the Gram
    a aᵀ (B, T, T) of one read by several (its blocks, :func:`gram_blocks`), kept from its
    first reader's rule to its last's.
    An entry holds its input (as the engine's hooks do over the same span), so its storage
    cannot be freed and reused under the same key while kept; an in-place change of the
    input changes the key (its version)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, list] = {}   # identity -> [readers, readers to come, input, Gram or None]
        self._lock = threading.Lock()           # CUDA backwards run the rules in autograd's thread

    def note(self, a: torch.Tensor) -> None:
        """A layer of the forward reads ``a`` (as the (B, T, d_in) sequence its rule sees)."""
        with self._lock:
            entry = self._entries.setdefault(_identity(a), [0, 0, a, None])
            entry[0] += 1
            entry[1] += 1

    def readers(self, a: torch.Tensor) -> int:
        """How many layers read ``a`` in this batch (1 for an input not noted)."""
        entry = self._entries.get(_identity(a))
        return 1 if entry is None else entry[0]

    def gram(self, a: torch.Tensor, compute: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        """a aᵀ's blocks: ``compute()`` once per input read by several layers."""
        with self._lock:
            entry = self._entries.get(_identity(a))
            if entry is None or entry[0] < 2:
                return compute()
            if entry[3] is None:
                entry[3] = compute()
            return entry[3]

    def used(self, a: torch.Tensor) -> None:
        """A reader's rule is done with ``a`` (the engine says so after the rule ran): after
        the last reader, the entry and its Gram go."""
        key = _identity(a)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._entries[key]


_active: SharedGrams | None = None   # the batch whose rules are running (any thread)


@contextlib.contextmanager
def sharing(shared: SharedGrams) -> Iterator[None]:
    """Let the Linear rules that run inside reuse ``shared``'s input Grams."""
    global _active
    before, _active = _active, shared
    try:
        yield
    finally:
        _active = before


def ghost_linear_reference(a: torch.Tensor, d: torch.Tensor, V: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Einsum reference: a (B,T,d_in), δ (B,T,d_out), V (K,d_out,d_in) -> (B,), (B,K)."""
    acc = acc_dtype(a.dtype)
    g = torch.einsum("bto,bti->boi", d.to(acc), a.to(acc))
    sq = g.pow(2).sum((1, 2))
    if V is None:
        return sq, g.new_zeros((a.shape[0], 0))
    return sq, torch.einsum("boi,koi->bk", g, V.to(acc))


def _outer(a: torch.Tensor, d: torch.Tensor, V: torch.Tensor | None, budget: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, d_in = a.shape
    d_out = d.shape[2]
    acc = acc_dtype(a.dtype)
    step = max(1, budget // (d_in * d_out * torch.finfo(acc).bits // 8))
    Vf = None if V is None else V.reshape(V.shape[0], d_out * d_in)
    parts = []
    for i in range(0, B, step):
        g = torch.bmm(d[i:i + step].transpose(1, 2).to(acc), a[i:i + step].to(acc))
        parts.append(norm_dot(g.reshape(g.shape[0], -1), Vf))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


#: the error a Gram form's ‖g_b‖² may keep, relative to it: rows with more are made again
GRAM_RTOL = 1e-5


def cancelled_share(dtype: torch.dtype) -> float:
    """The share of its terms without cancellation (Σ_t ‖a_bt‖²‖δ_bt‖², the Grams' diagonals)
    below which a Gram form's ‖g_b‖² in ``dtype`` is made again: the Grams' entries round to
    u of ‖a_t‖‖a_s‖, which leaves about 16 u / share of the result (``python -m bench.gram
    --rounding``), :data:`GRAM_RTOL` at this share (float32: 0.095; float64: 1.8·10⁻¹⁰)."""
    return 16 * torch.finfo(dtype).eps / 2 / GRAM_RTOL


def cancellation_checked(sq: torch.Tensor, terms: torch.Tensor, again: Callable[[torch.Tensor], torch.Tensor]
                         ) -> torch.Tensor:
    """A Gram form's ‖g_b‖² ``sq`` (B,) with each row below :func:`cancelled_share` of its
    ``terms`` (B,) (Σ_t of the squared norms of its rank-one terms) replaced by
    ``again(rows)``: those examples' ‖g_b‖² made more precisely (float32 rows: the float64
    Gram form; float64 rows: the per-example gradients, whose rounding is u / √share)."""
    rows = (sq < cancelled_share(sq.dtype) * terms).nonzero()[:, 0]
    return sq.index_copy(0, rows, again(rows).to(sq.device, sq.dtype)) if len(rows) else sq


def _gram_sq(a: torch.Tensor, d: torch.Tensor, budget: int, blocks: list[slice] | None = None) -> torch.Tensor:
    """‖Σ_t δ_bt a_btᵀ‖² (B,) from the upper triangle of the Grams' ``blocks`` (default
    :func:`gram_blocks`), ``budget`` bytes of Grams at a time; rows whose terms cancel are
    made again (:func:`cancellation_checked`)."""
    B, T, _ = a.shape
    acc = acc_dtype(a.dtype)
    if T == 1:  # a 2-D input: the (1, 1) Grams are ‖a_b‖² and ‖δ_b‖²
        return norm_dot(a[:, 0])[0] * norm_dot(d[:, 0])[0]
    step = max(1, budget // (2 * T * T * torch.finfo(acc).bits // 8))
    shared = _active if step >= B else None   # one block: the input's Gram may be other layers' too
    blocks = gram_blocks(T, a.is_cuda) if blocks is None else blocks
    pairs = [(i, j) for i in range(len(blocks)) for j in range(i, len(blocks))]
    parts, terms = [], []
    for n in range(0, B, step):
        ai, di = a[n:n + step].to(acc), d[n:n + step].to(acc)

        def gram(x=ai) -> list[torch.Tensor]:   # the upper triangle's blocks of x xᵀ, in ``pairs`` order
            return [torch.bmm(x[:, blocks[i]], x[:, blocks[j]].transpose(1, 2)) for i, j in pairs]
        A = gram() if shared is None else shared.gram(a, gram)
        sq = torch.zeros(len(ai), dtype=acc, device=a.device)
        diagonal = torch.zeros_like(sq)
        for (i, j), A_ij in zip(pairs, A):
            terms_ij = A_ij * torch.bmm(di[:, blocks[i]], di[:, blocks[j]].transpose(1, 2))
            sq += terms_ij.sum((1, 2)) * (1 if i == j else 2)
            if i == j:   # the positions' own terms ‖a_t‖²‖δ_t‖²
                diagonal += terms_ij.diagonal(0, 1, 2).sum(1)
        parts.append(sq)
        terms.append(diagonal)

    def again(rows: torch.Tensor) -> torch.Tensor:
        if acc == torch.float64:
            return _outer(a[rows], d[rows], None, budget)[0]
        return _gram_sq(a[rows].double(), d[rows].double(), budget, blocks)
    return cancellation_checked(torch.cat(parts), torch.cat(terms), again)


def _project_dots(a: torch.Tensor, d: torch.Tensor, V: torch.Tensor, budget: int) -> torch.Tensor:
    """Σ_t δ_btᵀ V_k a_bt (B, K): the rows of one side go through all K references in one
    broadcast matmul, (B·T, n) @ (k, n, m) -> (k, B·T, m), onto the narrower side m, as
    many references k at a time as fit ``budget`` bytes; then a dot with the other side."""
    B, T, d_in = a.shape
    d_out = d.shape[2]
    acc = acc_dtype(a.dtype)
    a, d, V = a.to(acc), d.to(acc), V.to(acc)
    if d_in <= d_out:   # (B·T, d_out) @ (k, d_out, d_in), then · a
        rows, refs, other = d.reshape(B * T, d_out), V, a
    else:               # (B·T, d_in) @ (k, d_in, d_out), then · δ
        rows, refs, other = a.reshape(B * T, d_in), V.transpose(1, 2), d
    other = other.reshape(1, B, -1)
    step = max(1, budget // (other.numel() * torch.finfo(acc).bits // 8))
    out = [torch.linalg.vecdot(torch.matmul(rows, refs[k:k + step]).reshape(-1, B, other.shape[2]), other)
           for k in range(0, V.shape[0], step)]
    return torch.cat(out).T


def ghost_linear(a: torch.Tensor, d: torch.Tensor, V: torch.Tensor | None = None, *,
                 form: str | None = None, backend: str | None = None, workspace: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ‖Σ_t δ_bt a_btᵀ‖² (B,) and Σ_t δ_btᵀ V_k a_bt (B, K), fused.

    a: (B, T, d_in), δ: (B, T, d_out), V: (K, d_out, d_in) or None. ``form`` forces
    "gram" or "outer" (default: :func:`plan`); ``backend`` "torch" or "triton" for the
    outer form (default: Triton for CUDA tensors that are not float64; the gram form is
    torch's on either). ``workspace``: bytes of the torch path's sub-batch blocks and of
    the gram form's projections for the dots (default :func:`workspace_bytes` of a and
    δ); the Triton kernel keeps its blocks in tiles and needs none. Inside
    :func:`sharing`, ``a``'s Gram is shared with the other layers that read it.
    """
    if a.dim() != 3 or d.dim() != 3 or a.shape[:2] != d.shape[:2]:
        raise ValueError(f"ghost_linear: a {tuple(a.shape)} and δ {tuple(d.shape)} must be "
                         f"(B, T, d_in) and (B, T, d_out)")
    K = 0 if V is None else V.shape[0]
    if V is not None and tuple(V.shape[1:]) != (d.shape[2], a.shape[2]):
        raise ValueError(f"ghost_linear: V {tuple(V.shape)} must be (K, {d.shape[2]}, {a.shape[2]})")
    if a.shape[0] == 0:   # an empty batch: the sub-batch loops and kernel grids need rows
        acc = acc_dtype(a.dtype)
        return a.new_zeros(0, dtype=acc), a.new_zeros((0, K), dtype=acc)
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"ghost_linear: unknown backend '{backend}'")
    readers = _active.readers(a) if _active is not None else 1
    form = form or plan(a.shape[1], a.shape[2], d.shape[2], K, readers, a.is_cuda)
    if form not in ("gram", "outer"):
        raise ValueError(f"ghost_linear: unknown form '{form}'")
    budget = workspace if workspace is not None else workspace_bytes(a, d)
    if form == "outer":
        if backend == "triton" or (backend is None and a.is_cuda and a.dtype != torch.float64):
            from . import ghost_linear_triton as tk   # a run-time failure: the torch path, logged once
            return guarded("the Triton ghost_linear outer kernel", tk.outer_triton,
                           lambda a, d, V: _outer(a, d, V, budget), a, d, V)
        return _outer(a, d, V, budget)
    sq = _gram_sq(a, d, budget)
    if V is None:
        return sq, sq.new_zeros((a.shape[0], 0))
    return sq, ghost_linear_dots(a, d, V, workspace=budget)


def ghost_linear_dots(a: torch.Tensor, d: torch.Tensor, V: torch.Tensor, *, workspace: int | None = None
                      ) -> torch.Tensor:
    """Σ_t δ_btᵀ V_k a_bt (B, K) alone, in the accumulation dtype: a (B, T, d_in), δ (B, T, d_out),
    V (K, d_out, d_in); ``workspace`` as in :func:`ghost_linear`."""
    budget = workspace if workspace is not None else workspace_bytes(a, d)
    return _project_dots(a, d, V, budget).to(acc_dtype(a.dtype))
