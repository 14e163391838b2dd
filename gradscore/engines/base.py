"""The engine ABC, the engine registry and the per-batch result type."""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..batch import Inputs, batch_len, call_model
from ..exceptions import EngineError
from ..kernels import acc_dtype
from ..losses import BatchLosses, Loss
from .rules.registry import kernel_dropout

#: Per-parameter reference blocks: refs[i] has shape (K, *param_i.shape).
RefBlocks = Sequence[torch.Tensor]


@dataclass
class ScoreBatch:
    """Per-example results for one batch of B examples at one checkpoint.

    loss: (B,) per-example loss ℓ(x_b, y_b; θ).
    sq_norm: (B,) ‖∇_θ ℓ_b‖² over the scored parameters, or None (forward only).
    dots: (B, K) ⟨∇_θ ℓ_b, v_k⟩, or None when no references were given.
    logits: (B, ...) the model output.
    """

    loss: torch.Tensor
    sq_norm: torch.Tensor | None
    dots: torch.Tensor | None
    logits: torch.Tensor


_ENGINES: dict[str, type["Engine"]] = {}


def register_engine(name: str) -> Callable[[type["Engine"]], type["Engine"]]:
    """Class decorator: make an :class:`Engine` available as ``engine=name``."""
    def deco(cls: type[Engine]) -> type[Engine]:
        _ENGINES[name] = cls
        cls.name = name
        return cls
    return deco


def engine_class(name: str) -> type["Engine"]:
    if name not in _ENGINES:
        raise EngineError(f"unknown engine '{name}'; choose from {', '.join(sorted(_ENGINES))}")
    return _ENGINES[name]


class _DenseEmbeddings(TorchFunctionMode):
    """F.embedding / F.embedding_bag with ``sparse=False``: the same values and gradient, dense."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding or func is F.embedding_bag:
            kwargs = {**kwargs, "sparse": False}
        return func(*args, **kwargs)


def dense_embeddings(model: nn.Module) -> contextlib.AbstractContextManager:
    """While it runs, the model's nn.Embedding / EmbeddingBag(sparse=True) ask for a dense
    gradient: torch.func's vmap and forward mode cannot trace a sparse one. A no-op (no
    per-op cost) for a model without one."""
    sparse = any(getattr(m, "sparse", False) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)))
    return _DenseEmbeddings() if sparse else contextlib.nullcontext()


def param_grads(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """∂loss/∂params, None where unused; ``.grad`` left alone. Dense: nn.Embedding /
    EmbeddingBag(sparse=True) give their weight a sparse gradient, which reshape, norms and
    dots refuse."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [g if g is None or g.layout == torch.strided else g.to_dense() for g in grads]


def check_eval_mode(model: nn.Module) -> None:
    """Refuse layers whose training mode couples examples or randomizes them.

    Train-mode BatchNorm normalizes with batch statistics, so one example's gradient
    depends on the others in its batch; train-mode Dropout (a module's, or attention's and a
    multi-layer RNN's inside their kernels) makes scores random.
    """
    for name, m in model.named_modules():
        if m.training and (isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
                           or kernel_dropout(m)):
            raise EngineError(f"layer '{name or type(m).__name__}' ({type(m).__name__}) is in "
                              f"training mode, which couples or randomizes examples; call "
                              f"model.eval() before scoring")


class Engine(ABC):
    """Computes per-example loss, ‖g_b‖² and ⟨g_b, v_k⟩ for a batch.

    Engines never modify the model: parameters are read, hooks (if any) are removed
    before returning.
    """

    name: str = ""

    def __init__(self, model: nn.Module, loss: Loss, param_names: Sequence[str],
                 chunk_bytes: int = 256 * 2**20) -> None:
        self.model = model
        self.loss = loss
        self.param_names = list(param_names)
        self.chunk_bytes = int(chunk_bytes)
        #: (B,) losses from a batch's output: row by row where a user's loss reads the batch
        self.losses = BatchLosses(loss)

    def score_batch(self, x: Inputs, y: torch.Tensor, refs: RefBlocks | None) -> ScoreBatch:
        """Per-example loss (B,), sq_norm (B,), dots (B, K) or None, logits.

        x: (B, ...) inputs (or a dict of (B, ...) keyword inputs) and y: (B, ...)
        targets on the model's device; refs:
        per-parameter blocks (K, *shape) in ``param_names`` order, or None.
        An empty batch (B = 0) gives empty results.
        """
        if batch_len(x) == 0:
            return self._empty(x, y, refs)
        return self._score(x, y, refs)

    @abstractmethod
    def _score(self, x: Inputs, y: torch.Tensor, refs: RefBlocks | None) -> ScoreBatch:
        """:meth:`score_batch` for B >= 1."""

    def _empty(self, x: Inputs, y: torch.Tensor, refs: RefBlocks | None) -> ScoreBatch:
        """Results of shape (0,), (0, K); the logits and loss of the empty batch where the
        model runs on it, else empty (0,) tensors."""
        like = dict(self.model.named_parameters())[self.param_names[0]]
        acc = acc_dtype(like.dtype)
        try:
            out = self.forward(x, y)
            logits, loss = out.logits, out.loss
        except Exception:   # many layers refuse an empty batch; nothing is lost
            logits = loss = like.new_zeros(0)
        K = 0 if refs is None else refs[0].shape[0]
        return ScoreBatch(loss=loss, sq_norm=like.new_zeros(0, dtype=acc),
                          dots=None if refs is None else like.new_zeros((0, K), dtype=acc), logits=logits)

    def forward(self, x: Inputs, y: torch.Tensor) -> ScoreBatch:
        """Forward pass only: per-example loss and logits, no gradients."""
        with torch.no_grad():
            out = call_model(self.model, x)
            return ScoreBatch(loss=self.losses(out, y), sq_norm=None, dots=None, logits=out)
