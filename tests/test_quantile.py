"""The streamed quantile against np.quantile of all the values, to the bit."""
from __future__ import annotations

import numpy as np
import pytest

from gradscore.scores.quantile import streamed_quantile


def _blocks(x: np.ndarray, rng: np.random.Generator):
    """x cut at random places (empty blocks included), the same cuts at every call."""
    cuts = np.sort(rng.integers(0, len(x) + 1, size=rng.integers(0, 6)))
    parts = np.split(x, cuts)
    calls = []

    def blocks():
        calls.append(1)
        return iter(parts)
    return blocks, calls


def _values(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(n)
    if kind == "norms":   # gradient norms: ≥ 0, several octaves, zeros
        x = np.abs(rng.standard_normal(n)) * np.exp(rng.normal(0, 3, n))
        x[rng.random(n) < 0.1] = 0.0
        return x
    if kind == "ties":   # few distinct values, -0.0 and 0.0 among them
        return rng.choice(np.array([-2.5, -0.0, 0.0, 1.0, 1.0 + 2 ** -52, 3e300]), n)
    if kind == "float32":
        return rng.standard_normal(n).astype(np.float32)
    return np.full(n, 7.25)


@pytest.mark.parametrize("kind", ["normal", "norms", "ties", "float32", "equal"])
@pytest.mark.parametrize("hold", [1, 3, 1 << 22])
def test_equals_np_quantile(kind, hold):
    """hold = 1 splits every bucket down to single bits' values: every pass is used."""
    rng = np.random.default_rng(hash((kind, hold)) % 2 ** 32)
    for n in (1, 2, 3, 10, 257, 3000):
        x = _values(rng, n, kind)
        blocks, _ = _blocks(x, rng)
        for q in (0.0, 1e-9, 0.1, 0.5, 0.9, 0.999, 1.0, float(rng.random())):
            expected = np.quantile(x.astype(np.float64), q)
            got = streamed_quantile(blocks, q, hold=hold)
            assert got == expected or (np.isnan(got) and np.isnan(expected)), (n, q, got, expected)
            assert np.signbit(got) == np.signbit(expected) or got == 0.0


def test_nan_inf_and_empty():
    x = np.array([1.0, np.nan, 3.0])
    assert np.isnan(streamed_quantile(lambda: iter([x]), 0.5)) and np.isnan(np.quantile(x, 0.5))
    for x in (np.array([1.0, np.inf]), np.array([-np.inf, 0.0, np.inf]), np.array([np.inf, np.inf])):
        for q in (0.0, 0.5, 0.9, 1.0):
            expected, got = np.quantile(x, q), streamed_quantile(lambda: iter([x[:1], x[1:]]), q)
            assert got == expected or (np.isnan(got) and np.isnan(expected)), (x, q, got, expected)
    with pytest.raises(ValueError, match="no values"):
        streamed_quantile(lambda: iter([np.zeros(0)]), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        streamed_quantile(lambda: iter([np.ones(3)]), 1.5)


def test_reads_a_few_times_and_holds_a_bucket():
    """10⁶ spread values: three reads (counts, the bucket, the next value), and the bucket
    held is a small part of them."""
    rng = np.random.default_rng(1)
    x = np.exp(rng.normal(0, 2, 10 ** 6))
    blocks, calls = _blocks(x, rng)
    assert streamed_quantile(blocks, 0.9, hold=50_000) == np.quantile(x, 0.9)
    assert len(calls) == 3
