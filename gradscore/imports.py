"""Resolve ``"package.module:attr"`` references (model factories, losses, datasets)."""
from __future__ import annotations

import hashlib
import importlib
import inspect
from typing import Any, Callable, Iterable

from ._version import __version__
from .exceptions import GradscoreError

#: modules that moved, so that references stored in files written before (a checkpoint's
#: model factory "gradscore.models:mlp") still resolve
MOVED = {"gradscore.models": "gradscore.demos.models", "gradscore.demo_lm": "gradscore.demos.lm",
         "gradscore.demo": "gradscore.demos.digits"}


def import_ref(ref: str, what: str, error: type[GradscoreError] = GradscoreError) -> Callable[..., Any]:
    """Import ``"package.module:attr"``; raise ``error`` naming ``what`` on failure."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise error(f"{what} '{ref}' is not of the form 'package.module:name'")
    module_name, attr = ref.split(":")
    module_name = MOVED.get(module_name, module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise error(f"{what} '{ref}': cannot import module '{module_name}' ({e}); "
                    f"install it or put it on PYTHONPATH") from e
    try:
        obj = getattr(module, attr)
    except AttributeError as e:
        raise error(f"{what} '{ref}': module '{module_name}' has no attribute '{attr}'") from e
    if not callable(obj):
        raise error(f"{what} '{ref}' is not callable")
    return obj


def source_sha256(objects: Iterable[Any]) -> str:
    """SHA-256 of the source code of ``objects`` (classes, functions) in order; one whose
    source cannot be read (compiled, defined in a notebook cell) counts by its name."""
    h = hashlib.sha256()
    for obj in objects:
        try:
            text = inspect.getsource(obj)
        except (OSError, TypeError):
            text = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
        h.update(text.encode())
    return h.hexdigest()


def code_fingerprint(model: Any, factory: Callable, loss_fn: Callable) -> dict[str, str]:
    """What made the numbers besides the options, checkpoints and data: gradscore's version;
    the model's factory, structure (its modules' repr: an ``nn.Sequential`` of torch layers
    has no class of its own) and the source of its own module classes (those not from
    torch: an edited forward counts); and the loss function's source. A resumed or reused
    output needs the same."""
    classes = {type(m) for m in model.modules() if not type(m).__module__.startswith("torch.")}
    ordered = sorted(classes, key=lambda c: (c.__module__, c.__qualname__))
    structure = hashlib.sha256(repr(model).encode()).hexdigest()
    return {"gradscore": __version__, "model": source_sha256([factory, *ordered]) + structure[:16],
            "loss": source_sha256([loss_fn])}
