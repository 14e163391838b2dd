"""Ghost rule for Hugging Face's ``Conv1D`` (GPT-2): a Linear with a transposed weight.

``y = x @ W + b`` with W (d_in, d_out), so g_b(W) = Σ_t a_bt δ_btᵀ = (the Linear
gradient)ᵀ: the same ghost reduction as :mod:`.linear` with V transposed. Registered
by qualified name: ``transformers`` is never imported here.
"""
from __future__ import annotations

from .linear import as_sequence, sequence_view, weight_and_bias
from .registry import Factor, bias_factor, register_rule

CONV1D = "transformers.pytorch_utils.Conv1D"


def conv1d_factors(layer, acts, grads) -> dict[str, Factor]:
    """weight (d_in, d_out): g_b = Σ_t a_bt δ_btᵀ; bias: Σ_t δ_bt."""
    d = as_sequence(grads)
    return {"weight": Factor(as_sequence(acts), d), "bias": bias_factor(d)}


@register_rule(CONV1D, factors=conv1d_factors, batch_dims=(0, 1), gram_input=sequence_view)
def hf_conv1d(layer, acts, grads, refs, K):
    return weight_and_bias(acts, grads, refs, K, transposed=True)
