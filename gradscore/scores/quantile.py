"""The quantile of values read in blocks, exact, without holding them all.

``np.quantile`` needs every value in memory: the clip variant's quantile of all gradient
norms is T·N floats over checkpoints, one per record in an in-run file. Here the values are
read a few times instead (a radix selection on their bits, 16 bits a pass), holding at most
``hold`` of them, and the result equals ``np.quantile`` of all of them to the bit.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

#: bits of a value's order key looked at per pass
_BITS = 16
_SIGN = np.uint64(1 << 63)
#: how many values :func:`streamed_quantile` holds at most (32 MB)
HOLD = 1 << 22


def _keys(x: np.ndarray) -> np.ndarray:
    """(n,) uint64 keys that order as the float64 values ``x`` do (NaN-free)."""
    bits = np.ascontiguousarray(x, dtype=np.float64).ravel().view(np.uint64)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def _values(x: np.ndarray) -> np.ndarray:
    """The non-NaN values of ``x``, (n,) float64."""
    x = np.asarray(x, dtype=np.float64).ravel()
    return x[~np.isnan(x)]


def _select(blocks: Callable[[], Iterable[np.ndarray]], k: int, hist: np.ndarray, hold: int) -> float:
    """The k-th smallest (0-based) non-NaN value; ``hist``: the counts of the keys' top bits."""
    shift, prefix = 64 - _BITS, np.uint64(0)
    while True:
        below = np.cumsum(hist)
        b = int(np.searchsorted(below, k, side="right"))   # the bucket holding rank k
        k -= int(below[b - 1]) if b else 0
        prefix = (prefix << np.uint64(_BITS)) | np.uint64(b)
        if hist[b] <= hold or shift == 0:
            break
        shift -= _BITS   # the bucket is too full to hold: split it on the next bits
        hist = np.zeros(1 << _BITS, np.int64)
        for x in blocks():
            key = _keys(_values(x))
            key = key[(key >> np.uint64(shift + _BITS)) == prefix]
            hist += np.bincount(((key >> np.uint64(shift)) & np.uint64((1 << _BITS) - 1)).astype(np.intp),
                                minlength=1 << _BITS)
    held = []
    for x in blocks():   # the values in the bucket: at most ``hold`` (or all equal)
        x = _values(x)
        held.append(x[(_keys(x) >> np.uint64(shift)) == prefix])
    return float(np.partition(np.concatenate(held), k)[k])


def streamed_quantile(blocks: Callable[[], Iterable[np.ndarray]], q: float, *, hold: int | None = None,
                      empty: float | None = None) -> float:
    """``np.quantile(np.concatenate(list(blocks())), q)`` (method ``linear``, in float64), equal
    to the bit; NaN where a value is NaN; for no values ``empty``, or ValueError without it.

    ``blocks()`` gives the values (float arrays of any shape) anew at each call. Up to
    ``hold`` values (default :data:`HOLD`): one call and ``np.quantile``. More: about three
    calls, each value's 8-byte key taken a block at a time; memory is a block and at most
    ``hold`` values."""
    hold = HOLD if hold is None else hold
    if not 0 <= q <= 1:
        raise ValueError(f"a quantile is in [0, 1], got {q}")
    count, nan, kept = 0, False, []
    hist = np.zeros(1 << _BITS, np.int64)
    for x in blocks():   # pass 1: how many, any NaN, the top bits' counts; the values while few
        x = np.asarray(x, np.float64).ravel()
        count += len(x)
        if count <= hold:
            kept.append(x)
        else:
            kept.clear()
        isnan = np.isnan(x)
        nan |= bool(isnan.any())
        hist += np.bincount((_keys(x[~isnan]) >> np.uint64(64 - _BITS)).astype(np.intp), minlength=1 << _BITS)
    if count == 0:
        if empty is None:
            raise ValueError("the quantile of no values")
        return empty
    if count <= hold:   # they all fit: numpy's own
        return float(np.quantile(np.concatenate(kept), q))
    if nan:
        return float("nan")
    v = np.float64(count - 1) * np.float64(q)   # numpy's virtual index for 'linear'
    lo = min(max(int(np.floor(v)), 0), count - 1)
    x_lo = _select(blocks, lo, hist, hold)
    x_hi = x_lo
    if lo + 1 < count and v < count - 1:   # the next value in order: x_lo again, or the least above it
        at_most, above = 0, np.inf
        for x in blocks():
            x = np.asarray(x, np.float64).ravel()
            at_most += int((x <= x_lo).sum())
            above = min(above, float(x[x > x_lo].min(initial=np.inf)))
        x_hi = x_lo if at_most > lo + 1 else above
    gamma = float(v - np.floor(v)) if 0 <= v < count - 1 else 0.0
    return float(np.quantile(np.array([x_lo, x_hi]), gamma))   # numpy's own interpolation of the pair
