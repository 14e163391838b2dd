"""A 'module:fn' dataset factory used by the tests (importable from tests/)."""
import torch


def make():
    return [(torch.full((4,), float(i)), i) for i in range(5)]
