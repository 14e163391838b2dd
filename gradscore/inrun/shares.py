"""What a training step's record reads from the model's output z and its gradient δ =
∂L/∂z: each example's loss terms and metrics (:class:`LossTerms`), and its share s_b of the
step's loss L = Σ_b s_b ℓ_b (:func:`read_shares`), checked to be one."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..exceptions import ConfigError
from ..kernels.dispatch import numba_on_cpu
from ..kernels.reference import acc_dtype
from ..losses import CLASS_INDEX_DTYPES, IGNORE_INDEX, Loss
from ..scores.datadiet import classification_metrics

#: relative residual of δ_b − s_b ∂ℓ_b/∂z_b allowed, by the output gradient's dtype (others, under
#: autocast: 3e-2). 1e-3 also for float64: a loss may compute in float32 (Hugging Face's upcasts
#: its logits with .float()); a loss that is not a weighted sum is off by far more.
_SHARE_TOL = {torch.float64: 1e-3, torch.float32: 1e-3}
#: a softmax loss's ∂ℓ_b/∂z is off by up to ~2 eps per output row, in units of the row's weight in
#: ℓ_b (p − 1 at the label, and the other classes' relative rounding together): a share is read
#: where that stays below the tolerance
_ROW_ROUNDING = 2

#: elements of the model output whose loss gradient :class:`LossTerms` forms at a time
_TERM_ELEMENTS = 2**20


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) Σ_j a_ij b_ij as a batched matrix product (BLAS dots; ``vecdot`` is several
    times slower on CPU for long rows)."""
    return torch.bmm(a[:, None, :], b[:, :, None]).reshape(len(a))


@dataclass
class LossTerms:
    """What a step's record reads from its output z and output gradient δ, per example:
    ℓ_b (B,), the classification metrics, and, in float64, ‖d_b‖², ⟨δ_b, d_b⟩ and ‖δ_b‖²
    (B,) with d_b = ∂ℓ_b/∂z_b; ``dtype``: δ's; ``width``: output elements per example."""

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor]
    d_sq: torch.Tensor
    dot: torch.Tensor
    delta_sq: torch.Tensor
    dtype: torch.dtype
    width: int

    @classmethod
    def of(cls, loss: Loss, z: torch.Tensor, delta: torch.Tensor, y: torch.Tensor) -> "LossTerms":
        """From z and δ (B, ...) and the targets y (B, ...), a block of examples at a time:
        the float64 copies stay at :data:`_TERM_ELEMENTS` elements, whatever the vocabulary."""
        width = math.prod(z.shape[1:])
        fused = None
        if numba_on_cpu():   # the one-pass numba paths (a small classifier's on a GPU's outputs too)
            fused = cls._softmax_rows(loss, z, delta, y) if z.device.type == "cpu" else None
            if fused is None:
                fused = cls._classifier_rows(loss, z, delta, y)
        if fused is not None:
            return cls(*fused, delta.dtype, width)
        blocks = -(-len(z) * width // _TERM_ELEMENTS)   # as few as fit, of equal size
        rows = -(-len(z) // max(1, blocks))
        if rows >= len(z):   # one block (a classifier's batch): no copies into a whole
            return cls(*cls._block(loss, z, delta, y), delta.dtype, width)
        parts = [cls._block(loss, z[i:i + rows], delta[i:i + rows], y[i:i + rows]) for i in range(0, len(z), rows)]
        losses, metrics, d_sq, dot, delta_sq = zip(*parts)
        return cls(torch.cat(losses), {k: torch.cat([m[k] for m in metrics]) for k in metrics[0]},
                   torch.cat(d_sq), torch.cat(dot), torch.cat(delta_sq), delta.dtype, width)

    @staticmethod
    def _softmax_rows(loss: Loss, z: torch.Tensor, delta: torch.Tensor, y: torch.Tensor):
        """A language model's terms in one pass over z and δ (``kernels.softmax_ce_numba``; CPU
        tensors, numba on), where ℓ_b is a weighted sum of its rows' cross-entropies; None elsewhere."""
        if loss.softmax_rows is None or z.dim() != 3 or y.shape != z.shape[:2]:
            return None
        rows = loss.softmax_rows(y, z.shape[2])
        if rows is None:   # targets the loss refuses: the generic path says why
            return None
        from ..kernels.softmax_ce_numba import softmax_ce_rows_numba
        labels, w = rows
        B, T, V = z.shape
        losses, d_sq, dot, delta_sq = softmax_ce_rows_numba(z.reshape(B * T, V), delta.reshape(B * T, V),
                                                            labels.reshape(-1)).reshape(B, T, 4).sum(1).unbind(1)
        # float32 at least: a bfloat16 output's losses keep their digits (autocast's loss is float32 too)
        return ((losses * w).to(acc_dtype(z.dtype)), classification_metrics(loss, z, y), d_sq * w ** 2, dot * w,
                delta_sq)

    @staticmethod
    def _classifier_rows(loss: Loss, z: torch.Tensor, delta: torch.Tensor, y: torch.Tensor):
        """A small classifier's terms and metrics in one numba call
        (``kernels.softmax_ce_numba.classifier_rows_numba``; numba on), where a step's fixed costs
        dominate; None elsewhere, and for one logit per example, labels outside [0, C) or of a
        dtype the loss refuses (the generic path says why). On a GPU, z, δ and y come to the
        host and the terms go back in one copy each: the generic path's ~30 small ops are each
        a kernel launch there, and it waits for δ too (its label check)."""
        from ..kernels.softmax_ce_numba import CLASSIFIER_ELEMENTS, classifier_rows_numba
        if (not loss.is_cross_entropy or z.dim() != 2 or z.shape[1] < 2 or y.shape != z.shape[:1]
                or y.dtype not in CLASS_INDEX_DTYPES or z.numel() > CLASSIFIER_ELEMENTS):
            return None
        device = z.device
        rows = classifier_rows_numba(z.cpu(), delta.cpu(), y.cpu())
        if rows is None:
            return None
        losses, d_sq, dot, delta_sq, margin, p_gold, correct = rows.to(device).unbind(1)
        # the keys and meaning of classification_metrics (a test holds the two paths equal)
        metrics = {"el2n": d_sq.sqrt(), "p_gold": p_gold, "correct": correct.to(torch.int8), "margin": margin}
        return losses, metrics, d_sq, dot, delta_sq

    @staticmethod
    def _block(loss: Loss, z: torch.Tensor, delta: torch.Tensor, y: torch.Tensor):
        probs = None
        z = z.to(acc_dtype(z.dtype))   # float32 at least: a bfloat16 output's losses keep their digits
        if loss.indexes_classes and z.dim() == 2 and not y.dtype.is_floating_point:
            unlabeled = int((y == IGNORE_INDEX).sum())
            if unlabeled:   # the loss leaves them out, but they have no loss or margin of their own to record
                raise ConfigError(f"invalid value for 'y': {unlabeled} of {len(y)} labels are {IGNORE_INDEX}, the "
                                  f"loss's ignore_index (unlabeled examples), which have no loss, margin or gradient "
                                  f"of their own; in-run scoring records labeled examples: record the steps over "
                                  f"them, or give every example of a recorded step its label")
        if loss.is_cross_entropy and z.dim() == 2 and not y.dtype.is_floating_point:
            losses = loss.fn(z, y)    # ∂ℓ_b/∂z_b = softmax(z_b) − onehot(y_b), without a backward
            probs = torch.softmax(z.double(), 1)
            column = y[:, None].long()   # an index: uint8 labels, which the loss takes, too
            d = probs.scatter(1, column, (probs.gather(1, column) - 1))
        else:
            with torch.enable_grad():
                leaf = z.detach().requires_grad_(True)
                losses = loss.fn(leaf, y)
                if losses.shape != (len(z),):   # a per-pixel loss (segmentation), say
                    raise ConfigError(f"the '{loss.name}' loss gives shape {tuple(losses.shape)} for an output of "
                                      f"{tuple(z.shape)}; in-run scoring needs one loss per example, ({len(z)},): "
                                      f"pass loss= a function of (output, y) that reduces each example's terms")
                (d,) = torch.autograd.grad(losses.sum(), leaf)
            losses = losses.detach()
        width = math.prod(z.shape[1:])
        d, delta = d.reshape(len(z), width).double(), delta.reshape(len(z), width).double()
        return (losses, classification_metrics(loss, z, y, probs), _row_dot(d, d), _row_dot(delta, d),
                _row_dot(delta, delta))


def read_shares(t: LossTerms, loss: Loss, y: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    """(B,) s_b with δ_b = s_b d_b (δ: the output gradient of the step's loss, d: of ℓ_b),
    refused where δ_b is not such a multiple. δ carries its dtype's rounding (a float32
    softmax near 1 keeps ~7 digits of 1 − p), so s_b is read only where ‖d_b‖ makes that
    rounding below the tolerance: a few eps per output row in units of the row's weight
    (``Loss.weights_sq``; one eps per output element for a loss that does not say); an example
    the loss no longer moves takes the median share of its batch's readable examples of the
    same target (of all, else NaN); a language model's, whose share follows its token
    count, NaN."""
    tol = _SHARE_TOL.get(t.dtype, 3e-2)
    eps = torch.finfo(t.dtype).eps
    d_sq, dot, delta_sq = t.d_sq, t.dot, t.delta_sq
    weights_sq = loss.weights_sq      # the rounding grows with the rows ℓ_b sums, not their width
    weights = None if weights_sq is None else weights_sq(y)
    units = (t.width if weights is None else _ROW_ROUNDING ** 2 *
             (weights.to(d_sq) if isinstance(weights, torch.Tensor) else weights))
    readable = d_sq > (eps / tol) ** 2 * units
    s = dot / d_sq.clamp(min=torch.finfo(torch.float64).tiny)
    resid_sq = delta_sq - s * dot               # ‖δ − s d‖² (float64: no cancellation at tol² ≥ 1e-6)
    bad = readable & (resid_sq > tol ** 2 * delta_sq)
    if bad.any():
        b = int(bad.nonzero()[0])
        raise ConfigError(f"the step's loss is not a weighted sum of the per-example '{loss.name}' "
                          f"losses of the model's output (example {ids[b].item()!r}: its output gradient is "
                          f"not a multiple of ∂ℓ/∂z at its y: label smoothing, another loss, or a y that is not "
                          f"the loss's targets); pass loss= the per-example loss the step uses, and y= its targets")
    if not readable.all():   # a language model's share follows its token count: no other example's
        fill = (torch.full_like(s, float("nan")) if loss.output == "tokens" else
                median_fill(s, readable, y if y.dim() == 1 else None))
        s = torch.where(readable, s, fill)
    return s


#: elements of the (rows, B) same-target block :func:`median_fill` forms at a time
_FILL_ELEMENTS = 2**22


def median_fill(s: torch.Tensor, readable: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """(B,) for each example: the median (the lower one, as ``torch.median``) of ``s`` over the
    ``readable`` examples with its target ``y``, else over all readable ones, else NaN; in
    batched ops, without a pass per example (late in training most of a batch may be fit)."""
    nan = s.new_tensor(float("nan"))
    pool = torch.where(readable, s, nan)
    fill = torch.nanmedian(pool).expand_as(s)
    if y is None:
        return fill
    rows = max(1, _FILL_ELEMENTS // len(s))
    parts = [torch.nanmedian(torch.where(y[i:i + rows, None] == y[None, :], pool[None, :], nan), dim=1).values
             for i in range(0, len(s), rows)]
    by_target = torch.cat(parts)
    return torch.where(torch.isnan(by_target), fill, by_target)
