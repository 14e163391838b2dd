"""Resolve ``"package.module:attr"`` references (model factories, losses, datasets)."""
from __future__ import annotations

import importlib
from typing import Any, Callable

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
