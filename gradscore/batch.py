"""Model inputs as one tensor or a dict of tensors, and model outputs as one tensor.

Images and tabular data give ``x`` as one tensor (B, ...). Text gives a dict of model
keyword arguments, e.g. ``{"input_ids": (B, T) int64, "attention_mask": (B, T)}``,
every value batch-first. These helpers let every engine slice, move and feed both
kinds the same way, and read a model's output as one tensor: a plain tensor, or the
``.logits`` of a Hugging Face output (or the ``"logits"`` entry of a dict). A dict may
also hold keywords that are not tensors (in-run, a step's ``task="b"`` or a flag): they
go with every slice unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import torch
from torch import nn

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def refuse_positional(x: Any, model: nn.Module | None = None) -> None:
    """One DataError where ``x`` is a tuple or list of tensors (a model with several
    positional inputs): inputs are one tensor, called as ``model(x)``, or a dict, called as
    ``model(**x)``; the fix names ``model``'s forward arguments where it is given."""
    if isinstance(x, (tuple, list)) and x and all(hasattr(v, "shape") for v in x):
        from .exceptions import DataError
        names = ", ".join(f"{n!r}: ..." for n in forward_names(model, len(x)))
        raise DataError(f"invalid inputs: a {type(x).__name__} of {len(x)} tensors; give a model's several inputs as "
                        f"a dict by the names of its forward's arguments, {{{names}}} (called as model(**x)), or one "
                        f"tensor")


def forward_names(model: nn.Module | None, n: int) -> list[str]:
    """The names of the first ``n`` arguments of ``model.forward`` that a keyword can give
    (placeholders where there are fewer, or no model): for a fix that passes them by name."""
    import inspect
    names = [] if model is None else [p.name for p in inspect.signature(model.forward).parameters.values()
                                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][:n]
    return names if len(names) == n else [f"<argument {i + 1}>" for i in range(n)]


def _map(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    if isinstance(x, Mapping):
        return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return fn(x)


def batch_len(x: Inputs) -> int:
    """B, the number of examples in ``x`` (a dict without tensors: 0)."""
    if isinstance(x, Mapping):
        return next((int(v.shape[0]) for v in x.values() if isinstance(v, torch.Tensor)), 0)
    return int(x.shape[0])


def take(x: Inputs, start: int, stop: int | None = None) -> Inputs:
    """Examples ``start:stop`` (``stop=None``: the single example ``start`` kept as a batch of 1)."""
    stop = start + 1 if stop is None else stop
    return _map(x, lambda v: v[start:stop])


def concat(parts: list[Inputs]) -> Inputs:
    """Concatenate batches along the batch dimension."""
    if isinstance(parts[0], Mapping):
        return {k: torch.cat([p[k] for p in parts]) if isinstance(v, torch.Tensor) else v for k, v in parts[0].items()}
    return torch.cat(parts)


def move(x: Inputs, like: torch.Tensor) -> Inputs:
    """``x`` on ``like``'s device; floating tensors cast to its dtype, integer ones kept."""
    def one(v: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(v).to(like.device)
        return v.to(like.dtype) if v.is_floating_point() else v
    return _map(x, one)


def unsqueeze(x: Inputs) -> Inputs:
    """One example without its batch dimension back to a batch of 1 (inside ``vmap``)."""
    return _map(x, lambda v: v.unsqueeze(0))


def check_batch(x: Inputs, y: torch.Tensor) -> None:
    """One :class:`DataError` unless every input holds the batch's examples in dimension 0,
    as many as the targets ``y`` (B, ...); a constant (a temperature, a flag) belongs to
    the model, not to the batch, which every engine slices by example."""
    from .exceptions import DataError
    refuse_positional(x)
    if y.dim() == 0:
        raise DataError("invalid targets: one number for the batch; give one target per example, shape (B, ...)")
    for name, v in (x.items() if isinstance(x, Mapping) else [("x", x)]):
        v = torch.as_tensor(v)
        if v.dim() == 0 or len(v) != len(y):
            raise DataError(f"invalid input '{name}': shape {tuple(v.shape)} in a batch of {len(y)} examples (the "
                            f"targets'); every input needs the examples in dimension 0: pass a constant to the "
                            f"model itself, not in the batch")


def hash_batch(h: Any, x: Inputs, y: torch.Tensor) -> None:
    """Feed a batch to the hashlib object ``h``: each input (a dict's values in order), then
    the targets, as dtype, shape and bytes."""
    for t in [*(x.values() if isinstance(x, Mapping) else [x]), y]:
        t = torch.as_tensor(t).detach().cpu().contiguous()
        h.update(f"{t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def describe(x: Inputs) -> str:
    """Per-example shapes and dtypes, for error messages."""
    if isinstance(x, Mapping):
        return "; ".join(f"{k} shape {tuple(v.shape[1:])}, {v.dtype}" for k, v in x.items())
    return f"shape {tuple(x.shape[1:])}, {x.dtype}"


def output_tensor(out: Any) -> torch.Tensor:
    """The model output as a tensor: itself, ``out.logits`` or ``out["logits"]``; else one
    EngineError with the fix."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    from .exceptions import EngineError
    what = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (tuple, list, Mapping)) else "")
    raise EngineError(f"the model returned {what}; gradscore reads its output as one tensor of logits, or the "
                      f"'logits' of a Hugging Face output or dict: give gradscore a model whose forward returns "
                      f"the logits (a small nn.Module that calls yours and returns that output)")


def call_model(model: nn.Module, x: Inputs) -> torch.Tensor:
    """``model(x)`` or ``model(**x)``, read as one tensor (see :func:`output_tensor`)."""
    return output_tensor(model(**x) if isinstance(x, Mapping) else model(x))


def by_slot(model: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``values`` (keyed by ``named_parameters``/``named_buffers`` names) keyed once per slot:
    each module's own attribute, each module once, a tensor tied across modules at each of
    its slots. torch's ``functional_call(tie_weights=True)`` swaps a module registered
    under two names twice and restores its stand-ins, not the model's own tensors
    (pytorch/pytorch#164759); with this dict and ``tie_weights=False`` every slot is
    swapped once and restored."""
    canonical = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        for attr, t in (*module.named_parameters(recurse=False, remove_duplicate=False),
                        *module.named_buffers(recurse=False, remove_duplicate=False)):
            name = canonical.get(id(t))
            if name in values:
                out[f"{path}.{attr}" if path else attr] = values[name]
    return out


def call_functional(model: nn.Module, params: dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], ...],
                    x: Inputs) -> torch.Tensor:
    """:func:`call_model` through ``torch.func.functional_call`` with ``params`` (a dict, or
    a tuple of dicts, by ``named_parameters``/``named_buffers`` name), each slot swapped once
    (:func:`by_slot`): the model holds its own tensors again afterwards."""
    from torch.func import functional_call
    values = {k: v for d in (params if isinstance(params, tuple) else (params,)) for k, v in d.items()}
    slots = by_slot(model, values)
    if isinstance(x, Mapping):
        return output_tensor(functional_call(model, slots, (), dict(x), tie_weights=False))
    return output_tensor(functional_call(model, slots, (x,), tie_weights=False))
