"""Resolve ``"package.module:attr"`` references (model factories, losses, datasets)."""
from __future__ import annotations

import importlib
from typing import Any, Callable

from .exceptions import GradscoreError


def import_ref(ref: str, what: str, error: type[GradscoreError] = GradscoreError) -> Callable[..., Any]:
    """Import ``"package.module:attr"``; raise ``error`` naming ``what`` on failure."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise error(f"{what} '{ref}' is not of the form 'package.module:name'")
    module_name, attr = ref.split(":")
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
