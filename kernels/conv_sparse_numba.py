"""numba CPU kernel: a convolution's per-example ‖g_b(W)‖² and ⟨g_b(W), V_k⟩ from a
sparse output gradient, with no batch-wide im2col and no (B, P) block.

With the input zero-padded and laid out channels-last, x̃_b (Hp·Wp, C_in), the weight
gradient of example b is, per output channel o, kernel row i, column j and input channel c,

    g_b[o, i, j, c] = Σ_l δ_b[o, l] · x̃_b[pos(l) + (i·r_h, j·r_w), c]

over the output positions l. Only the l with δ_b[o, l] ≠ 0 contribute: behind a ReLU half
of δ is zero, behind ReLU + 2×2 max-pool three quarters or more (the demo CNN's second
conv: 82%). One example at a time per thread: its padded input goes to a thread-local
buffer and each output channel's non-zero δ are listed (position, value). Where an
output channel's weights number at least ``LONG_ROW`` (kh·kw·C_in/G: 144 for the demo's
second conv), the example's patches are copied out once, A (L, G, kh·kw·C_in/G) in
cache, and each listed δ adds its multiple of its patch to the channel's row of g, a
pass LLVM vectorizes; shorter rows (a depthwise or first conv: 9) keep one running sum
per weight over the list, reading the padded input in place. Then g (P values) is
reduced to its squared norm and K dots, and forgotten. Multiply-adds: nnz(δ_b)·k·C_in/G
per example against L·k·C_in·C_out/G for the dense forms; the rule's planner
(``engines/rules/conv.py``) picks this form only where δ's measured density makes it
cheaper.

Every weight's sum runs over δ's list in order, with fused multiply-adds but no
reassociation (with it, LLVM vectorizes the short-row sums across the list, gathering
the input one value at a time, which is slower). The norm's and dots' sums within a tile
of ``TILE`` values run in the input dtype (float32 or float64) with fastmath; tile sums
are added in float64. Each example's arithmetic is the same whichever thread runs it, so
results do not depend on the thread count.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from .norm_dot_numba import TILE, _dot, _sq

#: an output channel's weights (kh·kw·C_in/G) from which on each example's patches are
#: copied out (A) and each listed δ adds its patch to the channel's row in one pass;
#: shorter rows sum over the list per weight, reading the padded input in place
LONG_ROW = 16
#: examples per parallel task (one buffer allocation each)
_CHUNK = 8


@numba.njit(parallel=True, fastmath={"contract"}, cache=True)
def _conv_sparse(x, d, V, sq, dots, kh, kw, sh, sw, rh, rw, ph, pw, groups, zero):  # pragma: no cover - numba
    B, Cin, H, W = x.shape
    Cout, Ho, Wo = d.shape[1], d.shape[2], d.shape[3]
    cin, cout = Cin // groups, Cout // groups
    K = V.shape[0]
    Hp, Wp, L = H + 2 * ph, W + 2 * pw, Ho * Wo
    R = kh * kw * cin                        # one output channel's weights, in (i, j, c) order
    P = Cout * R
    long_rows = R >= LONG_ROW
    pos = np.empty(L, dtype=np.int64)        # offset in x̃ of output position l's first tap
    ofs = np.empty(L, dtype=np.int64)        # where a listed δ at l points: A's row, or x̃
    for l in range(L):
        pos[l] = ((l // Wo) * sh * Wp + (l % Wo) * sw) * Cin
        ofs[l] = l * groups * R if long_rows else pos[l]
    whole = groups == 1 and rw == 1          # a kernel row's (j, c) values are contiguous in x̃
    run = kw * Cin if whole else cin         # values copied at a time into A
    for blk in numba.prange((B + _CHUNK - 1) // _CHUNK):
        buf = np.zeros(Hp * Wp * Cin, dtype=x.dtype)
        A = np.empty(L * groups * R if long_rows else 0, dtype=x.dtype)
        g = np.empty(P, dtype=x.dtype)
        idx = np.empty(L, dtype=np.int64)
        val = np.empty(L, dtype=x.dtype)
        for b in range(blk * _CHUNK, min(B, blk * _CHUNK + _CHUNK)):
            xb = x[b]
            for h in range(H):
                for w in range(W):
                    o = ((h + ph) * Wp + w + pw) * Cin
                    for c in range(Cin):
                        buf[o + c] = xb[c, h, w]
            if long_rows:                    # A[l, gr]: the patch of position l in group gr
                for l in range(L):
                    for gr in range(groups):
                        a0 = (l * groups + gr) * R
                        for i in range(kh):
                            for j in range(1 if whole else kw):
                                s0 = np.uint64(pos[l] + (i * rh * Wp + j * rw) * Cin + gr * cin)  # unsigned:
                                d0 = np.uint64(a0 + (i * kw + j) * cin)               # no wraparound check
                                for c in range(run):
                                    A[d0 + np.uint64(c)] = buf[s0 + np.uint64(c)]
                g[:] = zero
            db = d[b].reshape(Cout, L)
            for co in range(Cout):
                drow = db[co]
                gofs = (co // cout) * (R if long_rows else cin)
                n = 0
                for l in range(L):               # branch-free list of the non-zero δ
                    v = drow[l]
                    idx[n] = ofs[l] + gofs
                    val[n] = v
                    n += v != 0
                go = co * R
                if long_rows:    # g's row of channel co += δ · A's row, one pass per listed δ
                    for t in range(n):
                        v = val[t]
                        src = np.uint64(idx[t])
                        for c in range(R):
                            g[np.uint64(go + c)] += v * A[src + np.uint64(c)]
                else:            # short rows (depthwise, a first conv): a running sum per weight
                    for i in range(kh):
                        for j in range(kw):
                            off = (i * rh * Wp + j * rw) * Cin
                            for c in range(cin):
                                a = zero
                                for t in range(n):
                                    a += val[t] * buf[np.uint64(idx[t] + off + c)]
                                g[np.uint64(go + (i * kw + j) * cin + c)] = a
            s = 0.0
            for k in range(K):
                dots[b, k] = 0.0
            for lo in range(0, P, TILE):
                gt = g[lo:min(P, lo + TILE)]
                s += _sq(gt, zero)
                for k in range(K):
                    vk = V[k]
                    dots[b, k] += _dot(gt, vk[lo:min(P, lo + TILE)], zero)
            sq[b] = s


def conv_norm_dot_sparse(x: torch.Tensor, d: torch.Tensor, V: torch.Tensor | None, *,
                         kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                         padding: tuple[int, int], groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Conv2d call's weight share: x (B, C_in, H, W) input (unpadded), d (B, C_out, Ho, Wo)
    output gradient, V (K, C_out, C_in/groups, kh, kw) or None -> ‖g_b‖² (B,), dots (B, K).

    CPU tensors; float64 is kept, anything else is computed in float32. A Conv1d is the
    same with H = kh = 1.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xn = x.detach().to(dtype).contiguous().numpy()
    dn = d.detach().to(dtype).contiguous().numpy()
    K = 0 if V is None else V.shape[0]
    Vn = (np.zeros((0, 1), dtype=xn.dtype) if V is None else
          V.detach().to(dtype).permute(0, 1, 3, 4, 2).reshape(K, -1).contiguous().numpy())
    B = xn.shape[0]
    sq = np.empty(B, dtype=np.float64)
    dots = np.empty((B, K), dtype=np.float64)
    _conv_sparse(xn, dn, Vn, sq, dots, *kernel, *stride, *dilation, *padding, groups, xn.dtype.type(0))
    return torch.from_numpy(sq).to(dtype), torch.from_numpy(dots).to(dtype)
