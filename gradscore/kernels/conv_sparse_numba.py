"""numba CPU kernel: a convolution's per-example ‖g_b(W)‖² and ⟨g_b(W), V_k⟩, one
example at a time per thread, with no batch-wide im2col and no (B, P) block.

With the input zero-padded, x̃_b, the weight gradient of example b is, per output
channel o, kernel row i, column j and input channel c (of o's group),

    g_b[o, i, j, c] = Σ_l δ_b[o, l] · x̃_b[pos(l) + (i·r_h, j·r_w), c]

over the output positions l. Two ways, by the length R = kh·kw·C_in/G of a channel's row
of weights:

- long rows (R ≥ ``LONG_ROW``: 144 for the demo's second conv): sparse over δ. Only the
  l with δ_b[o, l] ≠ 0 contribute: behind a ReLU half of δ is zero, behind ReLU + 2×2
  max-pool three quarters or more (the demo CNN's second conv: 82%). The padded input,
  channels-last, goes to a thread-local buffer, the example's patches are copied out once,
  A (L, G, R) in cache, each output channel's non-zero δ are listed (branch-free), and
  g's row of the channel takes Σ δ·(patch row) four listed δ per pass, a loop LLVM
  vectorizes along the row (g's row is read and written once per four δ, not per δ);
- short rows (a first conv: 9 weights, a depthwise conv): dense. The example's patches
  are copied out transposed, Aᵀ (G·R, L), and each weight is one dot product
  ⟨δ_b[o, :], Aᵀ[r, :]⟩ over the L positions, contiguous on both sides (vectorized).
  Listing δ would leave sums of 9 values per listed entry, gathered one at a time.

Then g (P values) is reduced to its squared norm and K dots, and forgotten; with the
bias, its gradient Σ_l δ_b[o, l] (C_out values) joins them, summed while δ_b is in cache.
Multiply-adds per example: nnz(δ_b)·R (long rows) or L·R·C_out (short rows), against
L·R·C_out for the dense forms; the rule's planner (``engines/rules/conv.py``) picks this
form only where its cost, with δ's measured density, is the lowest.

Long rows sum in δ's list order with fused multiply-adds but no reassociation (with it,
LLVM vectorizes across the list, gathering A one value at a time, which is slower); the
short rows' dots, and the norm's and dots' sums within a tile of ``TILE`` values, run in
the input dtype (float32 or float64) with fastmath; tile sums are added in float64.
Each example's arithmetic is the same whichever thread runs it, so results do not depend
on the thread count.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numba
import numpy as np
import torch

from .numba_cache import njit_cached
from .reference import acc_dtype

from .norm_dot_numba import TILE, _dot, _sq, _total

#: an output channel's weights (kh·kw·C_in/G) from which on its gradient is summed over
#: δ's non-zeros only; shorter rows take dense dot products over all positions
LONG_ROW = 16
#: examples per parallel task (one buffer allocation each)
_CHUNK = 8


@njit_cached(parallel=True, fastmath={"contract"})
def _conv_sparse(x, d, V, Vb, bias, sq, dots, kh, kw, sh, sw, rh, rw, ph, pw, groups, zero):  # pragma: no cover - numba
    B, Cin, H, W = x.shape
    Cout, Ho, Wo = d.shape[1], d.shape[2], d.shape[3]
    cin, cout = Cin // groups, Cout // groups
    K = V.shape[0]
    Hp, Wp, L = H + 2 * ph, W + 2 * pw, Ho * Wo
    R = kh * kw * cin                        # one output channel's weights, in (i, j, c) order
    P = Cout * R
    long_rows = R >= LONG_ROW
    pos = np.empty(L if long_rows else 0, dtype=np.int64)   # offset in x̃ (channels-last) of l's first tap
    for l in range(pos.shape[0]):
        pos[l] = ((l // Wo) * sh * Wp + (l % Wo) * sw) * Cin
    whole = groups == 1 and rw == 1          # a kernel row's (j, c) values are contiguous in x̃
    run = kw * Cin if whole else cin         # values copied at a time into A
    for blk in numba.prange((B + _CHUNK - 1) // _CHUNK):
        buf = np.zeros(Hp * Wp * Cin, dtype=x.dtype)
        A = np.empty(L * groups * R if long_rows else 0, dtype=x.dtype)
        At = np.empty(0 if long_rows else groups * R * L, dtype=x.dtype)
        g = np.empty(P, dtype=x.dtype)
        idx = np.empty(L if long_rows else 0, dtype=np.int64)   # the list of non-zero δ
        val = np.empty(L if long_rows else 0, dtype=x.dtype)
        for b in range(blk * _CHUNK, min(B, blk * _CHUNK + _CHUNK)):
            xb = x[b]
            db = d[b].reshape(Cout, L)
            if long_rows:
                for h in range(H):           # x̃ channels-last
                    for w in range(W):
                        o = ((h + ph) * Wp + w + pw) * Cin
                        for c in range(Cin):
                            buf[o + c] = xb[c, h, w]
                for l in range(L):           # A[l, gr]: the patch of position l in group gr
                    for gr in range(groups):
                        a0 = (l * groups + gr) * R
                        for i in range(kh):
                            for j in range(1 if whole else kw):
                                s0 = np.uint64(pos[l] + (i * rh * Wp + j * rw) * Cin + gr * cin)  # unsigned:
                                d0 = np.uint64(a0 + (i * kw + j) * cin)               # no wraparound check
                                for c in range(run):
                                    A[d0 + np.uint64(c)] = buf[s0 + np.uint64(c)]
                g[:] = zero
                for co in range(Cout):
                    drow = db[co]
                    gofs = (co // cout) * R
                    n = 0
                    for l in range(L):       # branch-free list of the non-zero δ
                        v = drow[l]
                        idx[n] = l * groups * R + gofs
                        val[n] = v
                        n += v != 0
                    go = np.uint64(co * R)
                    t = 0
                    while t + 4 <= n:        # g's row += four δ·(patch row) per pass, in list order
                        v0, v1, v2, v3 = val[t], val[t + 1], val[t + 2], val[t + 3]
                        s0, s1 = np.uint64(idx[t]), np.uint64(idx[t + 1])
                        s2, s3 = np.uint64(idx[t + 2]), np.uint64(idx[t + 3])
                        for c in range(R):
                            u = np.uint64(c)
                            g[go + u] = (g[go + u] + v0 * A[s0 + u] + v1 * A[s1 + u]
                                         + v2 * A[s2 + u] + v3 * A[s3 + u])
                        t += 4
                    for t in range(t, n):
                        v, s0 = val[t], np.uint64(idx[t])
                        for c in range(R):
                            g[go + np.uint64(c)] += v * A[s0 + np.uint64(c)]
            else:
                for c in range(Cin):         # x̃ channel-first
                    for h in range(H):
                        o = (c * Hp + h + ph) * Wp + pw
                        for w in range(W):
                            buf[o + w] = xb[c, h, w]
                for gr in range(groups):     # Aᵀ[gr·R + r, l]: weight r's input at each position
                    for i in range(kh):
                        for j in range(kw):
                            for c in range(cin):
                                r = gr * R + (i * kw + j) * cin + c
                                s0 = ((gr * cin + c) * Hp + i * rh) * Wp + j * rw
                                for ho in range(Ho):
                                    s1 = np.uint64(s0 + ho * sh * Wp)   # unsigned: no wraparound check
                                    l0 = np.uint64(r * L + ho * Wo)
                                    if sw == 1:      # contiguous: LLVM vectorizes the copy
                                        for wo in range(Wo):
                                            At[l0 + np.uint64(wo)] = buf[s1 + np.uint64(wo)]
                                    else:
                                        for wo in range(Wo):
                                            At[l0 + np.uint64(wo)] = buf[s1 + np.uint64(wo * sw)]
                for co in range(Cout):
                    r0 = (co // cout) * R
                    for r in range(R):
                        g[co * R + r] = _dot(db[co], At[(r0 + r) * L:(r0 + r + 1) * L], zero)
            s = 0.0
            for k in range(K):
                dots[b, k] = 0.0
            for lo in range(0, P, TILE):
                gt = g[lo:min(P, lo + TILE)]
                s += _sq(gt, zero)
                for k in range(K):
                    vk = V[k]
                    dots[b, k] += _dot(gt, vk[lo:min(P, lo + TILE)], zero)
            if bias:                         # the bias's gradient: Σ_l δ_b[o, l]
                for co in range(Cout):
                    gb = _total(db[co], zero)
                    s += gb * gb
                    for k in range(K):
                        dots[b, k] += gb * Vb[k, co]
            sq[b] = s


#: open :func:`counting_flops` blocks, innermost last
_flop_counters: list[list[int]] = []


def flops(x: torch.Tensor, d: torch.Tensor, *, kernel: tuple[int, int], groups: int) -> int:
    """2 × the multiply-adds of one call's per-example weight gradients: one per δ (per
    non-zero δ for long rows) and kernel tap and input channel of its group (the norm,
    dots and bias sums are reductions, not counted, as ``norm_dot``'s are not)."""
    row = kernel[0] * kernel[1] * (x.shape[1] // groups)
    return 2 * (int(d.count_nonzero()) if row >= LONG_ROW else d.numel()) * row


@contextmanager
def counting_flops() -> Iterator[list[int]]:
    """``with counting_flops() as n:`` — ``n[0]`` is the flops (see :func:`flops`) of this
    kernel's calls in the block, which ``torch.utils.flop_counter`` cannot see."""
    box = [0]
    _flop_counters.append(box)
    try:
        yield box
    finally:
        _flop_counters.remove(box)


def conv_norm_dot_sparse(x: torch.Tensor, d: torch.Tensor, V: torch.Tensor | None, *,
                         kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                         padding: tuple[int, int], groups: int, bias: bool = False,
                         V_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A Conv2d call's weight share: x (B, C_in, H, W) input (unpadded), d (B, C_out, Ho, Wo)
    output gradient, V (K, C_out, C_in/groups, kh, kw) or None -> ‖g_b‖² (B,), dots (B, K).
    With ``bias``, the bias's share is included: its gradient Σ_l δ_b[:, l] (C_out,)
    against ``V_bias`` (K, C_out) (given when V is).

    CPU tensors; float64 is kept, anything else is computed in float32. A Conv1d is the
    same with H = kh = 1.
    """
    dtype = acc_dtype(x.dtype)
    for box in _flop_counters:
        box[0] += flops(x, d, kernel=kernel, groups=groups)

    def array(t: torch.Tensor):
        return t.detach().to(dtype).contiguous().numpy()
    xn, dn = array(x), array(d)
    K = 0 if V is None else V.shape[0]
    Vn = np.zeros((0, 1), dtype=xn.dtype) if V is None else array(V.permute(0, 1, 3, 4, 2).reshape(K, -1))
    Vb = array(V_bias.reshape(K, -1)) if bias and K else np.zeros((K, 0), dtype=xn.dtype)
    B = xn.shape[0]
    sq = np.empty(B, dtype=np.float64)
    dots = np.empty((B, K), dtype=np.float64)
    _conv_sparse(xn, dn, Vn, Vb, bias, sq, dots, *kernel, *stride, *dilation, *padding, groups, xn.dtype.type(0))
    return torch.from_numpy(sq).to(dtype), torch.from_numpy(dots).to(dtype)
