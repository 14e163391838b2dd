"""Ctrl-C held over code it must not cut short."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

#: the Ctrl-Cs held by the :func:`interrupt_after` blocks open now (on the main thread)
_open: list[list[int]] = []


@contextlib.contextmanager
def interrupt_after() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it (KeyboardInterrupt): for an
    import (cut short, it leaves a library half-loaded that fails later with other errors)
    and for HDF5 writes (a KeyboardInterrupt inside HDF5's write callback crashes the
    process). A no-op off the main thread, and where Ctrl-C is ignored (a background job)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    _open.append(held)
    try:
        yield
    finally:
        _open.remove(held)
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if held:
        raise KeyboardInterrupt


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt if an open :func:`interrupt_after` block holds a Ctrl-C: a
    long write calls it between its HDF5 calls, where stopping is safe, so that Ctrl-C
    stops it there (its atomic file is then dropped) instead of when it ends."""
    if any(_open):
        raise KeyboardInterrupt
