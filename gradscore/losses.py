"""Per-example losses and how to read a model's output as class probabilities.

A loss maps ``(output (B, ...), target (B, ...)) -> (B,)`` per-example losses. Built-ins:

- ``cross_entropy``: output = logits (B, C), target = class index (B,) int.
- ``nll``: output = log-probabilities (B, C), target = class index (B,) int.
- ``mse``: ``sum((output - target)**2)`` over non-batch dims (regression; no class metrics);
  the target in the output's shape up to single dimensions ((B,) for an output (B, 1)),
  never broadcast against other examples' outputs.
- ``causal_lm``: output = logits (B, T, V), target = labels (B, T) aligned with the
  inputs (labels[:, t] is the token at position t; the loss shifts them by one, as
  Hugging Face does); label −100 is ignored. Per example: the mean over its
  non-ignored predicted tokens (``lm_reduction="sum"``: their sum). An example with no
  token to predict has loss 0 and gradient 0.
- ``masked_lm``: as ``causal_lm`` without the shift: labels[:, t] is position t's own
  target (a ``…ForMaskedLM`` head), −100 where the position is not masked
  (``lm_reduction="sum"``: the sum over its masked tokens).
- ``"module:fn"``: any callable with the signature above, taking its targets as it reads
  them; classification metrics are computed from ``softmax(output)`` when the output is
  (B, C) with C ≥ 2 and targets are integers. It is the user's function whatever its name
  (one called ``cross_entropy`` is not the built-in).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import LM_REDUCTIONS
from .exceptions import ConfigError, EngineError, warn
from .imports import import_ref

PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Loss:
    """A per-example loss with the knowledge of what its model output means.

    ``fn(output, target) -> (B,)``; ``probs(output) -> (B, C)`` or None for regression.
    ``weights_sq(target) -> (B,)``: Σ_t w_bt² over the output rows t (positions) whose
    per-row loss ℓ_b weighs by w_bt (a classifier's one row: 1; a mean over n_b tokens:
    1/n_b), which bounds the rounding of ∂ℓ_b/∂output, or one float for every example;
    None where unknown. ``per_example``: an example's loss is a function of its own output
    row alone (the built-ins); a user's loss is checked for that (:func:`reads_the_batch`).
    """

    name: str
    fn: PerExampleLoss
    output: str  # "logits", "log_probs", "regression" or "tokens" (language modelling)
    weights_sq: Callable[[torch.Tensor], torch.Tensor | float] | None = None
    softmax_rows: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor] | None] | None = None
    per_example: bool = False

    @property
    def is_classification(self) -> bool:
        return self.output in ("logits", "log_probs")

    @property
    def is_cross_entropy(self) -> bool:
        """The built-in ``cross_entropy``, not a user's function of that name: what the fused
        paths and the soft-label metrics compute."""
        return self.fn is _cross_entropy

    @property
    def indexes_classes(self) -> bool:
        """A built-in loss whose integer targets index the output's classes (cross_entropy,
        nll); a user's function may read its targets otherwise (one logit and 0/1 labels)."""
        return self.fn is _cross_entropy or self.fn is _nll

    def class_indices(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` as int64 where a built-in loss reads it as class indices (cross_entropy, nll,
        the token losses) and it holds them in another integer dtype or as bools, which torch
        refuses (int32: "expected target dtype to be Long"; uint8 in a gather); else ``y``."""
        if y.dtype == torch.int64 or y.is_floating_point() or y.is_complex():
            return y
        return y.long() if self.indexes_classes or token_family(self) is not None else y

    def probs(self, output: torch.Tensor) -> torch.Tensor | None:
        """Class probabilities (B, C) from the model output, None for regression losses."""
        if self.output == "logits":
            return torch.softmax(output, dim=-1)
        if self.output == "log_probs":
            return output.exp()
        return None


def one_logit(shape: tuple[int, ...]) -> EngineError:
    """The error for the ``cross_entropy`` loss on an output of ``shape`` (B, 1)."""
    return EngineError(f"the 'cross_entropy' loss of one logit per example (output {shape}) is 0 for every "
                       f"example, a softmax over one class: a binary classifier with one logit needs a binary loss, "
                       f"a 'module:fn' returning F.binary_cross_entropy_with_logits(out[:, 0], y.float(), "
                       f"reduction='none'); a regression head, 'mse'")


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() >= 2 and out.shape[1] == 1:   # a softmax over one class: every loss and gradient 0
        raise one_logit(tuple(out.shape))
    return F.cross_entropy(out, y, reduction="none")


def _nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(out, y, reduction="none")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target = target_like(out, y)
    if target is None:   # broadcasting would pair an output with other examples' targets
        raise EngineError(f"the 'mse' loss: targets of shape {tuple(y.shape)} for outputs of shape "
                          f"{tuple(out.shape)}; give one target per output value, in the output's shape")
    return (out - target.to(out.dtype)).pow(2).reshape(out.shape[0], -1).sum(1)


#: how far a row may be from a probability row (sum 1) or a log-probability row (logsumexp 0) and
#: still read as one, by the output's dtype (others: bfloat16, float16)
_KIND_TOL = {torch.float64: 1e-3, torch.float32: 1e-3}


def misread_output(loss: Loss, out: object) -> str | None:
    """Why the built-in classification loss reads a model output (B, C) as what it is not,
    with the fix: probabilities (every row >= 0 and summing to 1: a softmax at the model's
    end) given to 'cross_entropy', which applies its own softmax; or rows that are not
    log-probabilities (logsumexp not 0) given to 'nll'. None otherwise, and for a user's loss."""
    if (not loss.indexes_classes or not isinstance(out, torch.Tensor) or not out.is_floating_point()
            or out.dim() != 2 or out.shape[1] < 2 or not len(out)):
        return None
    tol, o = _KIND_TOL.get(out.dtype, 3e-2), out.detach().double()
    if loss.fn is _cross_entropy and bool((o >= 0).all()) and float((o.sum(1) - 1).abs().max()) <= tol:
        return ("the model's outputs are probabilities (each row >= 0, summing to 1: a softmax at its end), and "
                "'cross_entropy' takes logits: it applies its own softmax, so every loss, EL2N and gradient is of "
                "the softmax of probabilities; score the logits (the model without its last softmax), or their log "
                "with loss='nll'")
    lse = float(torch.logsumexp(o, 1).abs().max()) if loss.fn is _nll else 0.0
    if lse > tol:
        return (f"'nll' takes log-probabilities (a log_softmax at the model's end), and the model's output rows are "
                f"not: their logsumexp reaches {lse:.3g} (0 for log-probabilities), so a loss -output[y] is no "
                f"log-likelihood, nor p_gold exp(output[y]) a probability; score logits with loss='cross_entropy'")
    return None


def target_like(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """``y`` in the shape of ``out`` where it holds one value per output value, up to single
    dimensions ((B,) for an output (B, 1)); None for any other layout."""
    if y.shape == out.shape:
        return y
    if y.shape[:1] != out.shape[:1] or [d for d in y.shape[1:] if d != 1] != [d for d in out.shape[1:] if d != 1]:
        return None
    return y.reshape(out.shape)


#: label value of a token that has no loss (Hugging Face's convention)
IGNORE_INDEX = -100
#: the dtypes F.cross_entropy takes as class indices (it refuses int32, bool, …): a fused
#: path takes only these, so that the loss says why where it refuses a target
CLASS_INDEX_DTYPES = (torch.int64, torch.uint8)


def causal_lm(reduction: str = "mean") -> Loss:
    """Next-token cross-entropy per example: logits (B, T, V), labels (B, T) -> (B,).

    Position t predicts labels[:, t + 1]; labels equal to −100 are ignored.
    ``reduction``: "mean" over the example's predicted tokens, or their "sum".
    """
    return _token_loss("causal_lm", reduction, shift=1)


def masked_lm(reduction: str = "mean") -> Loss:
    """Masked-token cross-entropy per example: logits (B, T, V), labels (B, T) -> (B,).

    Position t predicts labels[:, t] (no shift, as a ``…ForMaskedLM`` head); labels equal
    to −100 (the positions not masked) are ignored. ``reduction``: "mean" over the
    example's predicted tokens, or their "sum".
    """
    return _token_loss("masked_lm", reduction, shift=0)


def _token_loss(name: str, reduction: str, shift: int) -> Loss:
    """Token cross-entropy per example where position t predicts labels[:, t + shift]."""
    if reduction not in LM_REDUCTIONS:
        raise EngineError(f"invalid value for 'lm_reduction': '{reduction}' is not one of {LM_REDUCTIONS}")

    def fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, labels = out[:, :out.shape[1] - shift], y[:, shift:]
        tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="none").reshape(labels.shape)
        total = tok.sum(1)
        if reduction == "sum":
            return total
        return total / (labels != IGNORE_INDEX).sum(1).clamp(min=1).to(total.dtype)

    def weights_sq(y: torch.Tensor) -> torch.Tensor:   # each predicted token weighs 1/n_b (mean) or 1
        n = (y[:, shift:] != IGNORE_INDEX).sum(1).clamp(min=1).double()
        return n if reduction == "sum" else 1 / n

    def softmax_rows(y: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Position t's label is y[:, t + shift]; the last ``shift`` positions and ignored
        labels: −1. None where y is not (B, T) class indices in [0, classes) or −100, of a
        dtype F.cross_entropy takes (``fn`` says why)."""
        if y.dtype not in CLASS_INDEX_DTYPES or y.dim() != 2:
            return None
        predicted = y[:, shift:]
        if ((predicted != IGNORE_INDEX) & ((predicted < 0) | (predicted >= classes))).any():
            return None
        labels = torch.full(y.shape, -1, dtype=torch.int64, device=y.device)
        labels[:, :y.shape[1] - shift] = predicted.masked_fill(predicted == IGNORE_INDEX, -1)
        n = (labels >= 0).sum(1).clamp(min=1).double()
        return labels, (torch.ones_like(n) if reduction == "sum" else 1 / n)
    return Loss(name if reduction == "mean" else f"{name}_sum", fn, "tokens", weights_sq, softmax_rows,
                per_example=True)


def _one_row(y: torch.Tensor) -> float:
    """A classifier's loss: one output row of weight 1 per example."""
    return 1.0


_BUILTIN = {
    "cross_entropy": Loss("cross_entropy", _cross_entropy, "logits", _one_row, per_example=True),
    "nll": Loss("nll", _nll, "log_probs", _one_row, per_example=True),
    "mse": Loss("mse", _mse, "regression", per_example=True),
    "causal_lm": causal_lm("mean"),
    "causal_lm_sum": causal_lm("sum"),
    "masked_lm": masked_lm("mean"),
    "masked_lm_sum": masked_lm("sum"),
}
#: the token losses by name, each a function of the reduction
TOKEN_LOSSES = {"causal_lm": causal_lm, "masked_lm": masked_lm}


#: Hugging Face heads that predict tokens, by the end of their class name, and the token
#: loss that scores what each predicts; then the causal heads named otherwise (XLNet's and
#: XLM's ``…LMHeadModel`` do not shift their labels, so the name's end does not say)
TOKEN_HEADS = {"ForCausalLM": "causal_lm", "ForMaskedLM": "masked_lm", "GPT2LMHeadModel": "causal_lm",
               "OpenAIGPTLMHeadModel": "causal_lm", "CTRLLMHeadModel": "causal_lm", "BertLMHeadModel": "causal_lm"}


def token_family(loss: Loss) -> str | None:
    """"causal_lm" or "masked_lm" for those built-in token losses (either reduction), else None."""
    return next((f for f in TOKEN_LOSSES if loss.name in (f, f"{f}_sum")), None)


def check_head(model: torch.nn.Module, loss: Loss) -> None:
    """ConfigError where a Hugging Face model's head predicts other tokens than the token
    loss scores: a ``…ForMaskedLM`` by ``causal_lm`` (which shifts the labels by one) or a
    ``…ForCausalLM`` by ``masked_lm`` (:data:`TOKEN_HEADS`); an encoder-decoder's
    ``…ForConditionalGeneration`` (T5, BART: it shifts its labels right into its decoder's
    inputs, so its logits are aligned with them) by ``causal_lm``; any of those by a
    built-in loss of one target per example (``cross_entropy``, the default). Each runs, or
    fails later on the data, and every number would be of a task the model was not trained for."""
    family = token_family(loss)
    cls = type(model).__name__
    seq2seq = cls.endswith("ForConditionalGeneration") and getattr(getattr(model, "config", None),
                                                                  "is_encoder_decoder", False) is True
    wants = "masked_lm" if seq2seq else next((w for end, w in TOKEN_HEADS.items() if cls.endswith(end)), family)
    per_example = family is None and wants is not None and builtin_output(loss.name) not in (None, "tokens")
    if per_example:   # a built-in loss of one target per example (the default cross_entropy) on a token head
        raise ConfigError(f"invalid value for 'loss': '{loss.name}' does not score what {cls} predicts (a token at "
                          f"each position; '{loss.name}' scores one target per example); use loss '{wants}'")
    if family is not None and wants != family:
        shift = "the token after its position" if wants == "causal_lm" else "its own position's token"
        how = (", its labels shifted right into its decoder's inputs: give the labels in the inputs "
               "(model(input_ids=…, labels=…)) and" if seq2seq else ";")
        raise ConfigError(f"invalid value for 'loss': '{loss.name}' does not score what {cls} predicts (at each "
                          f"position, {shift}){how} use loss '{wants}{loss.name[len(family):]}'")


#: rows of a batch on which a user's loss is compared with the same rows alone
CHECKED_ROWS = 8
#: relative tolerance of that comparison, by dtype: a loss per example differs by rounding alone
_ROWS_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
#: largest output whose gradient the comparison forms (a language model's (B, T, V) logits: values only)
_ROWS_GRAD_ELEMENTS = 2**22


def reads_the_batch(loss: Loss, out: object, y: object) -> str | None:
    """Why, where a user's loss gives one of the first :data:`CHECKED_ROWS` examples
    of a batch another value, or another gradient by its output row, than it gives the
    example alone (a softmax, mean or normalization over the batch's dimension); None where
    they agree, and for a built-in loss, a batch of one row, an output or target that is
    not a tensor, a loss that does not return (B,), or one that fails on a row alone (the
    per-example loop then fails too, and says why). Gradients are compared for outputs of up
    to :data:`_ROWS_GRAD_ELEMENTS` elements."""
    if (loss.per_example or not isinstance(out, torch.Tensor) or not isinstance(y, torch.Tensor)
            or not out.is_floating_point() or out.dim() == 0 or len(out) < 2 or len(y) != len(out)):
        return None
    n, rtol = min(len(out), CHECKED_ROWS), _ROWS_RTOL.get(out.dtype, 1e-2)
    grads = out.numel() <= _ROWS_GRAD_ELEMENTS
    try:
        with torch.enable_grad():
            z = out.detach().requires_grad_(grads)
            batch = loss.fn(z, y)
            if not isinstance(batch, torch.Tensor) or batch.shape != (len(out),):
                return None
            g_batch = torch.autograd.grad(batch.sum(), z, allow_unused=True)[0] if grads else None
            alone, g_alone = [], []
            for b in range(n):
                zb = out[b:b + 1].detach().requires_grad_(grads)
                lb = loss.fn(zb, y[b:b + 1]).reshape(1)
                alone.append(lb.detach())
                g_alone.append(torch.autograd.grad(lb.sum(), zb, allow_unused=True)[0] if grads else None)
    except Exception:  # noqa: BLE001 - not this check's to report
        return None
    values, alone = batch.detach()[:n].double(), torch.cat(alone).double()
    tol = rtol * float(values.abs().max() + alone.abs().max()) + 1e-30
    if (values - alone).abs().max() > tol:
        return _reads_the_batch(loss, "the loss of a row in its batch is not its loss alone")
    if not grads:
        return None
    zero = torch.zeros_like(z[:1])
    g_batch = (torch.zeros_like(z) if g_batch is None else g_batch)[:n].double()
    g_alone = torch.cat([zero if g is None else g for g in g_alone]).double()
    tol = rtol * float(g_batch.abs().max() + g_alone.abs().max()) + 1e-30
    if (g_batch - g_alone).abs().max() > tol:
        return _reads_the_batch(loss, "the gradient of a row's loss in its batch is not its gradient alone")
    return None


def _reads_the_batch(loss: Loss, what: str) -> str:
    """The cause, for a warning or a refusal: ``what`` differs, and the likely slip."""
    return (f"the '{loss.name}' loss for an example depends on the other examples of its batch ({what}; a softmax, "
            f"mean or normalization over dimension 0?)")


class BatchLosses:
    """A loss's (B,) values from a batch's output (B, ...): on the whole batch, or row by
    row where a user's loss reads the other rows of its batch (:func:`reads_the_batch`,
    checked on the first batch of two or more rows, with a warning), as the per-example
    loop takes it."""

    def __init__(self, loss: Loss) -> None:
        self.loss = loss
        self.alone: bool | None = None   # taken row by row; None: not checked yet

    def check(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Decide on this batch (if not yet, and it has two or more rows)."""
        if self.alone is None and isinstance(out, torch.Tensor) and out.dim() and len(out) > 1:
            why = reads_the_batch(self.loss, out, y)
            self.alone = why is not None
            if why is not None:
                warn(f"{why}; every example's loss is taken alone, as the per-example loop takes it: fix "
                     f"the loss if the batch was not meant")

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.check(out, y)
        if self.alone:
            return torch.cat([self.loss.fn(out[b:b + 1], y[b:b + 1]).reshape(1) for b in range(len(out))])
        return self.loss.fn(out, y)


def builtin_output(name: str) -> str | None:
    """The output kind of the built-in loss ``name`` ("logits", "log_probs", "regression" or
    "tokens"); None for any other (a user's loss is not imported to find out)."""
    loss = _BUILTIN.get(name)
    return None if loss is None else loss.output


def resolve_loss(loss: str | Loss | PerExampleLoss, lm_reduction: str | None = None) -> Loss:
    """Turn a loss name, ``"module:fn"`` reference, callable or :class:`Loss` into a Loss.

    ``lm_reduction`` ("mean"/"sum") overrides the token reduction of ``causal_lm`` or
    ``masked_lm`` (a checkpoint folder's loss name); ConfigError for a loss named otherwise.
    """
    if lm_reduction is not None:
        family = loss.removesuffix("_sum") if isinstance(loss, str) else None
        if family not in TOKEN_LOSSES:
            name = loss if isinstance(loss, str) else getattr(loss, "name", type(loss).__name__)
            raise ConfigError(f"--lm-reduction applies to causal_lm and masked_lm checkpoints; these are of the "
                              f"'{name}' loss: leave it out")
        return TOKEN_LOSSES[family](lm_reduction)
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss in _BUILTIN:
            return _BUILTIN[loss]
        if ":" in loss:
            return Loss(loss, import_ref(loss, "loss", EngineError), "logits")
        raise EngineError(f"unknown loss '{loss}'; use one of {', '.join(_BUILTIN)} "
                          f"or a 'module:fn' reference to a per-example loss")
    if callable(loss):
        return Loss(getattr(loss, "__name__", "custom"), loss, "logits")
    raise EngineError(f"loss must be a name, 'module:fn' or a callable, got {type(loss).__name__}")
