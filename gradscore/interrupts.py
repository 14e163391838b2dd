"""Ctrl-C held over code it must not cut short."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


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
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if held:
        raise KeyboardInterrupt
