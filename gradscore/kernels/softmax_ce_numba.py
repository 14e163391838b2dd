"""numba CPU kernel: a softmax cross-entropy's terms per output row, in one pass over z and δ.

For logits z (R, V), an output gradient δ (R, V) and labels (R,) (−1: the row has no
loss), with p = softmax(z_r) and d_r = p − onehot(y_r) (0 for a row without a loss),
it gives per row, in float64: the loss log Σ_v e^{z_v} − z_y, ‖d_r‖², ⟨δ_r, d_r⟩ and
‖δ_r‖². What the in-run recorder reads from a language model's (B, T, V) logits and
their gradient, without the float64 copies and the autograd pass of the generic path.

Rows go in chunks of at most 2²⁰ elements: e^{z − max} into one reused buffer (torch's
vectorized exp), then one numba pass sums it against δ. The label's own entry is set to
0 in the buffer first, so the sums are over the other classes only: 1 − p_y = Σ_{v≠y} p_v
and the terms are sums of like-signed parts, with no cancellation when p_y is near 1.

A classifier's (B, C) logits, small enough that a step's fixed costs dominate, take
:func:`classifier_rows_numba`: the same four terms and the metrics a record keeps (the
margin, p_y, whether the argmax is y), all in one serial pass per row, instead of some
thirty small torch operations.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from .numba_cache import njit_cached

#: rows per chunk, at most: the exp buffer holds at most ``CHUNK`` × V and :data:`ELEMENTS` elements
CHUNK = 128
ELEMENTS = 2**20


@njit_cached(parallel=True, fastmath=True)
def _sums(e, delta, out):  # pragma: no cover - numba
    """Per row r: Σ_v e_rv, Σ_v e_rv², Σ_v e_rv δ_rv and Σ_v δ_rv², accumulated in float64."""
    R, V = e.shape
    for r in numba.prange(R):
        er, dr = e[r], delta[r]
        s, s2, sd, dd = 0.0, 0.0, 0.0, 0.0
        for v in range(V):
            x, g = np.float64(er[v]), np.float64(dr[v])
            s += x
            s2 += x * x
            sd += x * g
            dd += g * g
        out[r, 0], out[r, 1], out[r, 2], out[r, 3] = s, s2, sd, dd


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels read a tensor of ``dtype`` as: float32 and float64 as they are, the
    half types upcast to float32 (numpy has no bfloat16)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def softmax_ce_rows_numba(z: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor, *,
                          chunk: int = CHUNK) -> torch.Tensor:
    """z, δ: (R, V) float32 or float64 CPU tensors (other float dtypes are upcast a chunk
    at a time), labels (R,) int (−1: no loss) -> (R, 4) float64: loss, ‖d‖², ⟨δ, d⟩, ‖δ‖²."""
    R, V = z.shape
    chunk = max(1, min(chunk, ELEMENTS // max(V, 1)))
    work = _work_dtype(z.dtype)
    labels = labels.to(torch.int64)
    has = labels >= 0
    label = labels.clamp(min=0)
    sums = np.empty((R, 4), dtype=np.float64)
    top = torch.empty(R, dtype=torch.float64)
    e_label = torch.empty(R, dtype=torch.float64)
    buf = torch.empty((min(chunk, R), V), dtype=work)
    for i in range(0, R, chunk):
        zc = z[i:i + chunk].to(work)
        n, at = len(zc), label[i:i + chunk, None]
        e = buf[:n]
        m = zc.amax(1, keepdim=True)
        torch.exp(torch.sub(zc, m, out=e), out=e)
        e_label[i:i + n] = e.gather(1, at)[:, 0].double()
        e.scatter_(1, at, 0)   # the sums below are over the other classes
        top[i:i + n] = m[:, 0].double()
        _sums(e.numpy(), delta[i:i + chunk].to(work).contiguous().numpy(), sums[i:i + n])
    other, other_sq, other_dot, delta_sq = torch.from_numpy(sums).unbind(1)
    total = other + e_label                            # Σ_v e^{z_v − max}
    gap = other / total                                # 1 − p_y
    z_label = z.gather(1, label[:, None])[:, 0].double()
    d_label = delta.gather(1, label[:, None])[:, 0].double()
    zero = torch.zeros((), dtype=torch.float64)
    return torch.stack([
        torch.where(has, top + total.log() - z_label, zero),
        torch.where(has, other_sq / total ** 2 + gap ** 2, zero),           # Σ_{v≠y} p_v² + (1 − p_y)²
        torch.where(has, other_dot / total - d_label * gap, zero),          # Σ_{v≠y} p_v δ_v − δ_y (1 − p_y)
        delta_sq], 1)


#: a classifier's logits take :func:`classifier_rows_numba` up to this many elements; above
#: it, torch's vectorized softmax over the batch is faster than a serial pass per row
CLASSIFIER_ELEMENTS = 2**13


@njit_cached()   # no fastmath: NaN logits must compare as they do in torch
def _classifier_rows(z, delta, labels, out):  # pragma: no cover - numba
    """Row r of ``out``: loss, ‖d‖², ⟨δ, d⟩, ‖δ‖², margin, p_y, correct; False (and ``out``
    unfinished) at the first label outside [0, C)."""
    R, C = z.shape
    for r in range(R):
        y = labels[r]
        if y < 0 or y >= C:
            return False
        zr, dr = z[r], delta[r]
        top, arg, other, nan = -np.inf, 0, -np.inf, False
        for c in range(C):
            v = np.float64(zr[c])
            if v != v:   # torch's argmax takes the first NaN as the largest value
                if not nan:
                    arg = c
                nan = True
            elif not nan and v > top:
                top, arg = v, c
            if c != y and v > other:
                other = v
        if nan:   # the terms of z (the margin too) are NaN; ‖δ‖² is δ's own
            out[r, :] = np.nan
            out[r, 3] = np.sum(dr.astype(np.float64) ** 2)
            out[r, 6] = 1.0 if arg == y else 0.0
            continue
        total = 0.0
        for c in range(C):
            total += np.exp(np.float64(zr[c]) - top)
        lse = top + np.log(total)
        gap, p_sq, p_dot, d_sq = 0.0, 0.0, 0.0, 0.0
        for c in range(C):
            g = np.float64(dr[c])
            d_sq += g * g
            if c != y:   # 1 − p_y as the sum of the other classes: no cancellation near p_y = 1
                p = np.exp(np.float64(zr[c]) - lse)
                gap += p
                p_sq += p * p
                p_dot += p * g
        z_y = np.float64(zr[y])
        out[r, 0] = lse - z_y
        out[r, 1] = p_sq + gap * gap
        out[r, 2] = p_dot - np.float64(dr[y]) * gap
        out[r, 3] = d_sq
        out[r, 4] = z_y - other
        out[r, 5] = np.exp(z_y - lse)
        out[r, 6] = 1.0 if arg == y else 0.0
    return True


def classifier_rows_numba(z: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """z, δ: (B, C) CPU tensors (float32 or float64 are read in place; half types upcast),
    labels (B,) int -> (B, 7) float64: loss, ‖d‖², ⟨δ, d⟩, ‖δ‖² with d = softmax(z) − onehot(y),
    the margin z_y − max_{c≠y} z_c, p_y and 1.0 where argmax z = y (torch's argmax: the first
    largest, a NaN first); None where a label is outside [0, C) (the caller's loss says why).
    A row with a NaN logit has NaN terms (but ‖δ‖²)."""
    z, delta = (t.detach().to(_work_dtype(t.dtype)).numpy() for t in (z, delta))
    out = np.empty((z.shape[0], 7), dtype=np.float64)
    if not _classifier_rows(z, delta, labels.detach().to(torch.int64).numpy(), out):
        return None
    return torch.from_numpy(out)
