"""Write files atomically: to a temp file beside the target, flushed to the disk, then
``os.replace`` (and the folder's entry flushed): after a process kill or a power loss the
target is the old file or the whole new one, never a part."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import h5py


def _fsync(path: Path) -> None:
    """Flush the file ``path`` to the disk (an OSError: a full disk's delayed allocation)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename) to the disk where the OS allows it (not Windows,
    nor some network file systems): the file is in place whether or not this succeeds."""
    try:
        _fsync(folder)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in ``target``'s directory; on success it is flushed to the disk
    and replaces ``target`` (then the folder's entry is flushed).

    On any exception (or a kill) the target is untouched and the temp file is removed
    (after a SIGKILL a ``.tmp`` file may remain; readers ignore ``*.tmp``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:   # name the file the user asked for, not the temp file
        raise OSError(e.errno, e.strerror, str(target)) from e
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, target)
        _fsync_folder(target.parent)
    except OSError as e:
        # a write's error without a file name (a full disk under np.savez) or with the temp
        # file's is the user's file's; one without an errno (h5py reading a damaged input) is not
        if e.filename not in (None, str(tmp_path)) or (e.filename is None and e.errno is None):
            raise
        raise OSError(e.errno, e.strerror or str(e), str(target)) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def json_text(obj: Any, indent: int | None = None, default: Callable[[Any], Any] | None = None) -> str:
    """``obj`` as standard JSON: numpy numbers and arrays as Python's, NaN and ±Inf as null
    (JSON has neither: jq and JavaScript refuse Python's NaN token)."""
    return json.dumps(_plain(obj), indent=indent, default=default, allow_nan=False)


def _plain(o: Any) -> Any:
    """``o`` with numpy's numbers and arrays as Python's and non-finite floats as None."""
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if hasattr(o, "tolist") and hasattr(o, "dtype"):   # a numpy array or number
        return _plain(o.tolist())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def atomic_json(target: str | os.PathLike, obj: Any, indent: int | None = None,
                default: Callable[[Any], Any] | None = None) -> None:
    """Write ``obj`` to ``target`` as standard JSON (:func:`json_text`), atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json_text(obj, indent, default))


@contextlib.contextmanager
def atomic_h5(target: str | os.PathLike) -> Iterator["h5py.File"]:
    """A new HDF5 file that replaces ``target`` atomically when the block ends without error.

    A write that fails (a full disk, a file-size limit) raises an :class:`OSError` naming
    ``target`` once HDF5 has closed the file: HDF5 cannot close a file after a failed write
    (h5py#914: it crashes the process), so its writes never fail here (:class:`_HeldErrors`).
    For the same reason Ctrl-C is held until the file is closed (then removed). The root's
    text attributes are sealed (``io.attrs.seal``) as the block ends. The 1.10 file format:
    its chunk indexes have checksums, the 1.8 format's v1 B-trees do not (a damaged one read
    a chunk as unwritten, so as zeros).
    """
    import h5py
    from ..interrupts import interrupt_after
    from .attrs import seal
    with atomic_path(target) as tmp, _HeldErrors(tmp) as fh:
        try:
            with interrupt_after(), h5py.File(fh, "w", libver="v110") as f:   # Ctrl-C once HDF5 has closed it
                yield f
                seal(f)   # the text attributes' checksums, which HDF5 has none of
        finally:
            fh.raise_held()


class _HeldErrors:
    """A file object for h5py's ``fileobj`` driver whose writes never fail. The first write
    error is held; from then on writes go to memory (at most the rest of the file), in pages
    read from the file first, so that HDF5 reads back what it wrote. :meth:`raise_held`
    raises that error afterwards."""

    PAGE = 1 << 16

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR)
        self._pos = self._size = 0
        self._pages: dict[int, bytearray] = {}   # page index -> its bytes, after a write failed
        self._disk_end = float("inf")            # the file's bytes from here on read as zeros
        self.error: OSError | None = None

    def __enter__(self) -> "_HeldErrors":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)

    def raise_held(self) -> None:
        if self.error is not None:
            raise OSError(self.error.errno, self.error.strerror, str(self.path)) from self.error

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos + (0, self._pos, self._size)[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as e:
                self.error = e
        if self.error is not None:   # the file's bytes from `size` on are gone, held or not
            self._disk_end = min(self._disk_end, size)
            self._pages = {p: page for p, page in self._pages.items() if p * self.PAGE < size}
            page, start = divmod(size, self.PAGE)
            if page in self._pages:
                self._pages[page][start:] = bytes(self.PAGE - start)
        self._size = size
        return size

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(data):
                    done += os.pwrite(self._fd, data[done:], self._pos + done)
            except OSError as e:
                self.error = e
        if self.error is not None:
            self._to_pages(data, self._pos)
        self._pos += len(data)
        self._size = max(self._size, self._pos)
        return len(data)

    def readinto(self, buf) -> int:
        buf = memoryview(buf).cast("B")
        n = max(0, min(len(buf), self._size - self._pos))
        self._read(buf[:n], self._pos)
        buf[n:] = bytes(len(buf) - n)   # past the end: zeros, as HDF5 expects of a short read
        self._pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        buf = bytearray(max(0, self._size - self._pos) if n is None or n < 0 else n)
        return bytes(buf[:self.readinto(buf)])

    def _read(self, buf: memoryview, pos: int) -> None:
        """Fill ``buf`` with the bytes at ``pos``: from memory where a page is held, else the file."""
        while len(buf):
            page, start = divmod(pos, self.PAGE)
            n = min(len(buf), self.PAGE - start) if self._pages else len(buf)
            if page in self._pages:
                buf[:n] = self._pages[page][start:start + n]
            else:   # from the file: zeros past its end, or past a truncation made while held
                got = os.preadv(self._fd, [buf[:max(0, min(n, self._disk_end - pos))]], pos)
                buf[got:n] = bytes(n - got)
            buf, pos = buf[n:], pos + n

    def _to_pages(self, data: memoryview, pos: int) -> None:
        while len(data):
            page, start = divmod(pos, self.PAGE)
            if page not in self._pages:
                held = bytearray(self.PAGE)
                self._read(memoryview(held), page * self.PAGE)
                self._pages[page] = held
            n = min(len(data), self.PAGE - start)
            self._pages[page][start:start + n] = data[:n]
            data, pos = data[n:], pos + n
