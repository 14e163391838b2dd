"""Where a command may write: never onto one of its inputs, never over a file that is not
a gradscore output of the same kind, and over one that is only when asked.

Every command that writes calls :func:`claim` for each output before it computes
anything. The kinds are recognized by their content, not their name: a scores file
(HDF5 with a fingerprint and a config), a co-state file (HDF5 with its conventions),
a JSON report (a ``gradscore_version`` key), a Markdown report (its first line), a figure (PNG or SVG whose metadata names
gradscore), an export (csv whose header is ``id`` and then gradscore's score names in
order, td_metrics jsonl, parquet with gradscore's schema metadata) and JTT weights (npz
of ``ids`` and ``weights``, and ``written_by`` naming gradscore).
The write itself is atomic (:mod:`.atomic`): nothing half-written is ever left at
``out``.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import socket
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from ..config import as_path
from ..exceptions import OutputError

#: the text a figure's metadata carries, and what marks a JSON report or a parquet export
MARK = "gradscore"
#: the first line of a Markdown report
MARKDOWN_MARK = f"<!-- written by {MARK}"


def _hdf5_attrs(path: Path, read: bool = False) -> set[str]:
    """The root attribute names of the HDF5 file ``path``; none for a file that is not HDF5,
    or is damaged. ``read``: a file about to be read, whose damage (an HDF5 file whose
    attributes fail their checksums) is then one error naming it, not "no kind of ours"."""
    import h5py
    from .store import damage_named
    try:
        if read and h5py.is_hdf5(path):
            with damage_named(path), h5py.File(path, "r") as f:
                return set(f.attrs)
        with h5py.File(path, "r") as f:
            return set(f.attrs)
    except (OSError, ValueError, RuntimeError, KeyError):   # not HDF5, or damaged: no kind of ours
        return set()


def _damage(path: Path) -> str | None:
    """Why the HDF5 file ``path`` cannot be read (its metadata fails a checksum); None for a
    file that reads, or is not HDF5."""
    from ..exceptions import FileLockError, GradscoreError, cause
    try:
        _hdf5_attrs(path, read=True)   # (not HDF5, or not readable at all: no attributes, no error)
    except FileLockError:
        raise
    except GradscoreError as e:
        return cause(e.__cause__ or e)
    return None


def is_scores_file(path: Path, read: bool = False) -> bool:
    """True when ``path`` is a gradscore scores file (HDF5 with a fingerprint and a config);
    ``read`` as in :func:`_hdf5_attrs`."""
    attrs = _hdf5_attrs(path, read)
    return {"fingerprint", "config"} <= attrs and not attrs & {"conventions", "sketch", "attribution"}


def is_sketch_file(path: Path, read: bool = False) -> bool:
    """True when ``path`` is a gradscore sketch file (``gradscore sketch``); ``read`` as in
    :func:`_hdf5_attrs`."""
    return {"fingerprint", "config", "sketch"} <= _hdf5_attrs(path, read)


def _is_attribution(path: Path) -> bool:
    return {"config", "attribution"} <= _hdf5_attrs(path)


def _is_costate(path: Path) -> bool:
    return {"fingerprint", "config", "conventions"} <= _hdf5_attrs(path)


def _is_dataset(path: Path) -> bool:
    """A dataset file :func:`gradscore.save_dataset` wrote: HDF5 whose only root attribute
    is the seal of gradscore's writer (a checkpoint's and every output's hold more)."""
    return _hdf5_attrs(path) == {"text_crc32"}


def _is_json_report(path: Path) -> bool:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(obj, dict):
        return False
    # bench results written before reports were marked, by their keys
    legacy = ({"device_type", "rows"}, {"device", "threads", "rows"}, {"jsonl_bytes", "generate_s"})
    return "gradscore_version" in obj or any(keys <= set(obj) for keys in legacy)


def _is_figure(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return (head.startswith(b"\x89PNG") or b"<svg" in head) and MARK.encode() in head


def _is_export(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if path.suffix.lower() == ".parquet" or magic == b"PAR1":
            import pyarrow.parquet as pq
            return MARK.encode() in (pq.read_schema(path).metadata or {})
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except (OSError, ValueError, UnicodeDecodeError, ImportError):
        return False
    if first.startswith("{"):
        try:
            return {"guid", "index", "threshold_closeness"} <= set(json.loads(first))
        except ValueError:
            return False
    # a data set's own table may start with an id column too: the rest must be score names, sorted
    header = next(csv.reader([first]), [])
    return header[:1] == ["id"] and len(header) > 1 and header[1:] == sorted(header[1:]) \
        and set(header[1:]) <= score_names()


def score_names() -> frozenset[str]:
    """Every score a gradscore scores file can hold (a checkpoint run's, an in-run
    recording's, the dot scores' variants, a sketch file's): the columns of a csv export."""
    from ..config import AVAILABLE_SCORES, SELF_INFLUENCE
    from ..scores import inrun
    from ..scores.pds import DOT_SCORES, VARIANTS
    return (frozenset(AVAILABLE_SCORES) | frozenset(inrun.NEEDS) | {f"{d}_{v}" for d in DOT_SCORES for v in VARIANTS}
            | {SELF_INFLUENCE})


def _is_markdown(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(MARKDOWN_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def _is_weights(path: Path) -> bool:
    import numpy as np
    try:
        with np.load(path) as z:   # another tool's sample weights may hold ids and weights too: the mark
            return set(z.files) == {"ids", "weights", "written_by"} and str(z["written_by"]) == MARK
    except (OSError, ValueError):
        return False


KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "scores": ("a gradscore scores file", is_scores_file),
    "costate": ("a gradscore co-state file", _is_costate),
    "json": ("a gradscore JSON report", _is_json_report),
    "figure": ("a gradscore figure", _is_figure),
    "export": ("a gradscore export", _is_export),
    "weights": ("a gradscore JTT weights file", _is_weights),
    "markdown": ("a gradscore Markdown report", _is_markdown),
    "sketch": ("a gradscore sketch file", is_sketch_file),
    "attribution": ("a gradscore attribution file", _is_attribution),
    "dataset": ("a gradscore dataset", _is_dataset),
}


#: the outputs other than HDF5 files, by the suffixes their commands write
_BY_SUFFIX = {".json": "json", ".png": "figure", ".svg": "figure", ".jsonl": "export", ".csv": "export",
              ".parquet": "export", ".npz": "weights", ".md": "markdown"}


def written_kind(path: Path) -> str | None:
    """What ``path`` is where gradscore wrote it and it is no HDF5 file ("a gradscore JSON
    report", "… figure", "… export", "… JTT weights file", "… Markdown report"); else None."""
    kind = _BY_SUFFIX.get(path.suffix.lower())
    return KINDS[kind][0] if kind is not None and KINDS[kind][1](path) else None


#: the format a file's name says by its suffix, and the formats each kind of output is written in
#: (an export's by its --format: :func:`gradscore.io.dynamics.export_scores` checks its name)
SUFFIX_FORMATS = {".h5": "HDF5", ".hdf5": "HDF5", ".json": "JSON", ".jsonl": "JSON lines", ".csv": "CSV",
                  ".parquet": "Parquet", ".npz": "NumPy", ".npy": "NumPy", ".png": "PNG", ".svg": "SVG",
                  ".pdf": "PDF", ".md": "Markdown", ".pt": "torch.save", ".pth": "torch.save",
                  ".safetensors": "safetensors"}
_KIND_FORMATS = {"scores": ("HDF5",), "costate": ("HDF5",), "sketch": ("HDF5",), "attribution": ("HDF5",),
                 "dataset": ("HDF5",),
                 "json": ("JSON",), "figure": ("PNG", "SVG"), "weights": ("NumPy",), "markdown": ("Markdown",)}


def _misnamed(out: Path, kind: str) -> str | None:
    """Why ``out``'s name does not fit the ``kind`` of file it would hold (its suffix says
    another format: JSON written to ``keep.csv``), else None; a name without a known suffix
    is the user's choice."""
    says, formats = SUFFIX_FORMATS.get(out.suffix.lower()), _KIND_FORMATS.get(kind)
    if says is None or formats is None or says in formats:
        return None
    suffixes = [s for s, f in SUFFIX_FORMATS.items() if f == formats[0]]
    return (f"{out}: its name says {says}, but it would hold {formats[0]} ({KINDS[kind][0]}); name it "
            f"{out.stem}{suffixes[0]}, or give a name without another format's suffix")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def output_path(out: str | os.PathLike) -> Path:
    """``out``, a file's path, as a Path; :class:`OutputError` if it ends in a separator (a
    folder's path, which Path would silently turn into a file's: ``results/`` -> ``results``);
    :class:`ConfigError` if it is no path at all (None: a variable not set)."""
    out = as_path(out, "out") if not isinstance(out, str) else out
    if isinstance(out, str) and out.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        raise OutputError(f"{out}: ends in '{out[-1]}', a folder's path; give the path of a file (in that folder: "
                          f"{out}FILE)")
    return Path(out)


def _check_writable(out: Path) -> None:
    """The error writing ``out`` would raise, before any work rather than after it, where the
    folder it goes into (its nearest existing one) does not let this process create files: a
    PermissionError (EROFS on a read-only file system, else EACCES) naming that folder."""
    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY   # POSIX only
        code = errno.EROFS if read_only else errno.EACCES
        raise PermissionError(code, os.strerror(code), str(folder))


def claim(out: str | os.PathLike, kind: str, *, inputs: Mapping[str, Iterable[str | os.PathLike | None]] | None = None,
          overwrite: bool = False, resumable: bool = False) -> Path:
    """Check that ``out`` may be written by a command; return it as a Path.

    inputs: {role: paths} of everything the command reads ("the --data file": [...]);
    None and non-paths (a ``module:fn`` factory) are skipped. ``resumable``: an existing
    output of the right kind without ``overwrite`` is the caller's to judge (a finished
    or interrupted run with the same fingerprint). Raises :class:`OutputError` if ``out``
    is an input, a directory (or a path ending in a separator), or an existing file that
    is not ``kind`` (even with ``overwrite``), or exists without ``overwrite`` (unless
    ``resumable``), or is named as a checkpoint (``step_<n>.h5``) in a folder of
    checkpoints, which would then read it, or as a file of another format (:func:`_misnamed`:
    JSON in ``keep.csv``); the PermissionError of :func:`_check_writable` if it
    lies in a folder this process may not write (unless ``resumable`` and it exists).
    """
    out = output_path(out)
    what, is_kind = KINDS[kind]
    for role, paths in (inputs or {}).items():
        for p in paths:
            if p is not None and Path(p).exists() and _same(out, Path(p)):
                raise OutputError(f"{out}: is {role}, an input of this command; gradscore never writes over "
                                  f"its inputs: choose another output path")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file path")
    from .checkpoints import CHECKPOINT_NAME, checkpoint_files
    if CHECKPOINT_NAME.match(out.name) and checkpoint_files(out.parent):
        raise OutputError(f"{out}: would be read as a checkpoint of {out.parent}, which holds checkpoints "
                          f"named step_<n>.h5, by every later command on that folder; choose another name")
    wrong = _misnamed(out, kind)
    if wrong:
        raise OutputError(wrong)
    if not (resumable and out.exists()):   # a finished output may be only read (an archived run's)
        _check_writable(out)
    if out.exists():
        if not is_kind(out):
            found = _damage(out)
            if found:
                raise OutputError(f"{out}: exists and is damaged ({found}), so gradscore cannot tell that it is "
                                  f"{what}; it never replaces it, even with --overwrite: choose another output "
                                  f"path or move the file away")
            raise OutputError(f"{out}: exists and is not {what}; gradscore never replaces it, even with "
                              f"--overwrite: choose another output path or move the file away")
        if not overwrite and not resumable:
            raise OutputError(f"{out}: exists; pass --overwrite to replace it, or choose another output path")
    return out


def claim_folder(folder: str | os.PathLike, marker: str, what: str) -> Path:
    """Make ``folder`` (a command's own scratch or output folder, marked by the file
    ``marker`` in it) or check that an existing one is that; never a folder of the user's."""
    folder = Path(folder)
    if folder.exists() and not (folder / marker).exists():
        if not folder.is_dir():
            raise OutputError(f"{folder}: exists and is not a directory; choose another path")
        if any(folder.iterdir()):
            raise OutputError(f"{folder}: exists and is not {what}; gradscore never writes into it: "
                              f"choose another path or move it away")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / marker).touch()
    return folder


@contextlib.contextmanager
def lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive right to write ``out`` (and its journal) for the block.

    ``<out>.lock`` holds the holder's pid and host; a second writer fails at once with an
    :class:`OutputError` naming them. The lock is the kernel's (``flock``), so it dies with
    its process: a lock file left by a killed run is taken over. The folders it makes for
    ``out`` are removed again if the block raises and leaves them empty. No-op where
    ``fcntl`` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    out = Path(out)
    path = out.with_name(out.name + ".lock")
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]   # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _lock_file(path, out, fcntl):
            yield
    except BaseException:
        for folder in made:   # a refused or interrupted command leaves no empty folder of its own
            try:
                folder.rmdir()
            except OSError:   # not empty (or not ours to remove): kept
                break
        raise


@contextlib.contextmanager
def _lock_file(path: Path, out: Path, fcntl) -> Iterator[None]:
    """Hold the flock on ``path``, the lock file of ``out``, for the block; remove the file after."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            raise OutputError(f"{out}: another run ({holder}) is writing it; wait for it to finish, "
                              f"or choose another output path") from None
        with contextlib.suppress(OSError):   # the holder's name only informs; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)   # releases the flock
