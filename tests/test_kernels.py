"""norm_dot: block-wise reduction equals the flat reference; accumulation dtype."""
from __future__ import annotations

import math

import pytest
import torch

from gradscore.kernels import NormDotBackend, available_backends, get_backend, norm_dot, norm_dot_reference


@pytest.mark.parametrize("K", [0, 1, 16])
@pytest.mark.parametrize("B", [1, 7])
def test_blocks_equal_flat_reference(K, B):
    g = torch.Generator().manual_seed(K * 10 + B)
    shapes = [(3, 5), (5,), (2, 2, 3)]
    G = [torch.randn(B, *s, dtype=torch.float64, generator=g) for s in shapes]
    V = [torch.randn(K, *s, dtype=torch.float64, generator=g) for s in shapes]
    flatG = torch.cat([x.reshape(B, -1) for x in G], 1)
    flatV = torch.cat([v.reshape(K, math.prod(s)) for v, s in zip(V, shapes)], 1)
    sq, dots = norm_dot(G, V)
    sq_ref = torch.stack([row @ row for row in flatG])
    dots_ref = torch.stack([flatV @ row for row in flatG])
    torch.testing.assert_close(sq, sq_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(dots, dots_ref.reshape(B, K), rtol=1e-12, atol=1e-12)
    assert dots.shape == (B, K)


def test_half_precision_accumulates_in_float32():
    G = torch.full((2, 4096), 100.0, dtype=torch.float16)  # sum of squares 4.1e7 > fp16 max
    sq, dots = norm_dot(G, torch.ones(1, 4096, dtype=torch.float16))
    assert sq.dtype == torch.float32 and torch.isfinite(sq).all()
    torch.testing.assert_close(sq, torch.full((2,), 4096 * 1e4), rtol=1e-6, atol=0)
    torch.testing.assert_close(dots[:, 0], torch.full((2,), 409600.0), rtol=1e-6, atol=0)


def test_non_contiguous_and_errors():
    G = torch.randn(8, 6, dtype=torch.float64).T  # (6, 8) non-contiguous
    sq, _ = norm_dot(G)
    torch.testing.assert_close(sq, norm_dot_reference(G.contiguous(), None)[0], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="blocks"):
        norm_dot([G], [torch.randn(1, 8), torch.randn(1, 8)])
    with pytest.raises(ValueError, match="unknown kernel backend"):
        norm_dot(G, backend="nope")


def test_backends_implement_abc():
    for name in available_backends():
        b = get_backend(torch.device("cpu"), name)
        assert isinstance(b, NormDotBackend) and b.name == name
