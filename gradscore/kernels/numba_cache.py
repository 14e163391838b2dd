"""Where numba keeps the compiled kernels: a per-user cache directory, never the package.

numba's ``cache=True`` writes beside the module by default, i.e. into the installed
package; pip's uninstall leaves those files, and the leftover ``__pycache__`` folder then
shadowed a later editable install. The kernels are compiled with :func:`njit_cached`,
which points numba at ``$GRADSCORE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/gradscore/numba``
or ``~/.cache/gradscore/numba``) for gradscore's own functions only: numba's
setting is restored afterwards, and ``NUMBA_CACHE_DIR``, when set, is left to rule.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numba


def cache_dir() -> Path:
    """The directory the kernels' compiled code is cached in (created on first use)."""
    env = os.environ.get("GRADSCORE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradscore" / "numba"


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        return os.access(path, os.W_OK)
    except OSError:
        return False


def njit_cached(**options) -> Callable:
    """``numba.njit(cache=True, **options)`` caching in :func:`cache_dir` (or, where that
    is not writable, a per-user folder in the temp directory)."""
    def decorate(fn: Callable) -> Callable:
        if os.environ.get("NUMBA_CACHE_DIR"):
            return numba.njit(cache=True, **options)(fn)
        where = cache_dir()
        if not _writable(where):
            where = Path(tempfile.gettempdir()) / f"gradscore-numba-{os.getuid()}"
        before = numba.config.CACHE_DIR
        numba.config.CACHE_DIR = str(where)   # read once, when the dispatcher sets up its cache
        try:
            return numba.njit(cache=True, **options)(fn)
        finally:
            numba.config.CACHE_DIR = before
    return decorate
