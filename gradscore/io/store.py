"""The scores file: one HDF5 per run, written resumably.

Final layout (``scores.h5``):
- ``/per_checkpoint/<metric>`` (T, N): loss, el2n, p_gold, correct, margin, sq_grad_norm, …;
- ``/logits`` (T, N, C) float16 when the run keeps them (``store_logits``);
- ``/scores/<name>`` (N,) float64: the aggregated scores asked for;
- ``/ids`` (N,), ``/noisy`` (N,) when the data has it, ``/checkpoints/{step,epoch,lr}`` (T,);
- ``/done`` (T, n_chunks) uint8 done-bitmap (all ones in a finished file);
- attrs ``config`` and ``fingerprint`` (JSON), ``gradscore_version``.

While a run is in progress its work lives in ``<out>.partial/``: ``meta.json`` (the
fingerprint) and one atomically written ``t<t>_c<c>.npz`` per finished (checkpoint,
chunk). The existence of those files *is* the done-bitmap. An HDF5 file being written
is not crash-safe under SIGKILL, a directory of atomically renamed files is: a killed
run resumes where it stopped and, as every chunk is computed the same way, the final
file holds bit-identical numbers. The final file is itself written to a temp file and
renamed, so ``scores.h5`` either does not exist or is complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import zipfile
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import h5py
import numpy as np

from ..interrupts import stop_if_interrupted
from .atomic import atomic_h5, atomic_path
from .attrs import VALUES_CRC, as_text, fixed_utf8, json_attr, mismatched, values_crc, verify, write_attrs
from ..config import as_path
from ..exceptions import RESTORE, GradscoreError, damaged, warn
from .journal import Journal


def checked(shape: tuple[int, ...], dtype: Any) -> dict[str, Any]:
    """``create_dataset`` options that checksum every chunk (fletcher32): a damaged file then
    fails to read instead of giving other numbers. None where HDF5 cannot: a scalar, no
    elements, variable-length strings."""
    if not shape or 0 in shape or np.dtype(dtype).kind not in "biufcS":
        return {}
    return {"fletcher32": True}


def put(group: h5py.Group, name: str, data: Any = None, *, shape: tuple[int, ...] | None = None,
        dtype: Any = None, **options: Any) -> h5py.Dataset:
    """``group.create_dataset`` with :func:`checked`'s checksums; a numeric scalar (which
    cannot be chunked, so has no fletcher32) is stored compact, in its object header, which
    HDF5's metadata checksum covers."""
    if data is not None:   # h5py picks the type of data (strings from objects) unless dtype is given
        data = np.asarray(data) if dtype is None else np.asarray(data, dtype=dtype)
        if data.shape == () and data.dtype.kind in "biufc" and not options:
            return _compact_scalar(group, name, data)
        return group.create_dataset(name, data=data, dtype=dtype,
                                    **checked(data.shape, data.dtype if dtype is None else dtype),
                                    **options)
    return group.create_dataset(name, shape, dtype=dtype, **checked(shape, dtype), **options)


def _compact_scalar(group: h5py.Group, name: str, value: np.ndarray) -> h5py.Dataset:
    """A 0-d dataset in the compact layout (h5py's ``create_dataset`` takes no layout for a
    scalar): its bytes live in the checksummed object header."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.COMPACT)
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    dataset = h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(value.dtype, logical=True), space,
                              dcpl=dcpl)
    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(value))
    return group[name]


def write_ids(group: h5py.Group, name: str, ids: np.ndarray, **options: Any) -> None:
    """Example ids (any shape) as a dataset, checksummed: integers as they are, strings
    (imported guids) as fixed-length UTF-8 (``attrs.fixed_utf8``: h5py's variable-length
    strings live in the global heap, which no checksum covers) with the CRC-32 of their
    values (``attrs.VALUES_CRC``), compressed (gzip level 1: the padding of short ids to the
    longest costs no disk, and no time). An id ending in NUL cannot be stored fixed-length:
    a ValueError naming it."""
    if ids.dtype.kind in "OUS":
        fixed = fixed_utf8(ids)
        d = put(group, name, fixed, **({"compression": "gzip", "compression_opts": 1} if fixed.size else {}),
                **options)
        d.attrs[VALUES_CRC] = np.uint32(values_crc(ids))
    else:
        put(group, name, ids, **options)


def read_ids(dataset: h5py.Dataset) -> np.ndarray:
    """Ids written by :func:`write_ids`: strings come back as str, not bytes, checked against
    their CRC-32 (a RuntimeError where they differ: the file is damaged)."""
    if not h5py.check_string_dtype(dataset.dtype):
        return dataset[()]
    ids = dataset.asstr(errors="surrogatepass")[()]
    if VALUES_CRC in dataset.attrs and values_crc(ids) != int(dataset.attrs[VALUES_CRC]):
        raise RuntimeError(f"{dataset.name}: its strings do not match their CRC-32")
    return ids


class ScoresWriter(ABC):
    """Where per-(checkpoint, chunk) results go, and how they become one scores file."""

    @property
    @abstractmethod
    def complete(self) -> bool:
        """True when a finished output with the same fingerprint already exists."""

    @abstractmethod
    def is_done(self, t: int, c: int) -> bool: ...

    @abstractmethod
    def write_chunk(self, t: int, c: int, metrics: dict[str, np.ndarray]) -> None:
        """Persist the (chunk_len,) arrays of checkpoint t, chunk c atomically."""

    @abstractmethod
    def finalize(self, *, ids: np.ndarray, extras: dict[str, np.ndarray],
                 aggregate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                 attrs: dict[str, Any]) -> Path:
        """Assemble the output file; ``aggregate`` maps (T, n) metrics to (n,) scores."""


class HDF5ScoresWriter(ScoresWriter):
    """Journal of chunk files in ``<out>.partial/``, assembled into ``out`` (HDF5)."""

    def __init__(self, out: str | Path, fingerprint: dict, *, n: int, T: int, chunk_size: int,
                 overwrite: bool = False, replace: bool = False) -> None:
        self.journal = Journal(out, fingerprint, overwrite=overwrite, replace=replace)
        self.out, self.partial, self.fingerprint = self.journal.out, self.journal.partial, fingerprint
        self.n, self.T, self.chunk_size = n, T, chunk_size
        self.n_chunks = (n + chunk_size - 1) // chunk_size
        self._complete = self.journal.complete

    @property
    def complete(self) -> bool:
        return self._complete

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_size, min(self.n, (c + 1) * self.chunk_size)

    def _chunk_path(self, t: int, c: int) -> Path:
        return self.journal.unit(f"t{t:05d}_c{c:07d}.npz")

    def is_done(self, t: int, c: int) -> bool:
        return self.journal.done(f"t{t:05d}_c{c:07d}.npz")

    def write_chunk(self, t: int, c: int, metrics: dict[str, np.ndarray]) -> None:
        self.journal.open()
        with atomic_path(self._chunk_path(t, c)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **metrics)

    def note(self, t: int, c: int, lines: list[str]) -> None:
        """Keep the warnings given while checkpoint t, chunk c was scored, in the journal
        (a rerun that finds the chunk done does not give them again); :meth:`notes` reads them.
        None given: nothing written."""
        self.journal.keep_warnings(f"t{t:05d}_c{c:07d}", lines)

    def notes(self) -> list[str]:
        """The warnings kept by :meth:`note` (every rank's), by checkpoint and chunk, each once."""
        return self.journal.kept_warnings("warnings of a chunk",
                                          "delete the chunk's files ({name}.*) and rerun to recompute it")

    def _read_chunk(self, t: int, c: int) -> dict[str, np.ndarray]:
        path = self._chunk_path(t, c)
        try:
            return read_numpy(path)
        except (OSError, ValueError) as e:
            raise GradscoreError(f"{path}: unreadable chunk file ({e}); delete it and rerun "
                                 f"to recompute it") from e

    def finalize(self, *, ids: np.ndarray, extras: dict[str, np.ndarray],
                 aggregate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                 attrs: dict[str, Any], whole: Callable[[h5py.File], dict[str, np.ndarray]] | None = None) -> Path:
        """As :meth:`ScoresWriter.finalize`; ``whole(file)`` adds (N,) scores that need every
        example at once (ranks, quantiles), reading the assembled file before it is renamed."""
        if self._complete:
            return self.out
        first = self._read_chunk(0, 0)
        with atomic_h5(self.out) as f:
            write_attrs(f, {**attrs, "fingerprint": self.fingerprint})
            pc = f.create_group("per_checkpoint")
            chunks = (1, min(self.n, self.chunk_size))
            # (n,) metrics go to /per_checkpoint (T, N); a wider one (logits (n, C)) to /<name> (T, N, C)
            dsets = {k: put(pc if v.ndim == 1 else f, k, shape=(self.T, self.n, *v.shape[1:]), dtype=v.dtype,
                            chunks=chunks + v.shape[1:])
                     for k, v in first.items()}
            for t in range(self.T):
                for c in range(self.n_chunks):
                    stop_if_interrupted()   # Ctrl-C stops the assembly here; the journal stays
                    a, b = self.chunk_range(c)
                    for k, v in self._read_chunk(t, c).items():
                        dsets[k][t, a:b] = v
            put(f, "done", np.ones((self.T, self.n_chunks), dtype=np.uint8))
            write_ids(f, "ids", ids)
            for k, v in extras.items():
                if isinstance(v, dict):
                    g = f.create_group(k)
                    for kk, vv in v.items():
                        put(g, kk, vv)
                else:
                    put(f, k, v)
            sg = f.create_group("scores")
            for c in range(self.n_chunks):
                a, b = self.chunk_range(c)
                agg = aggregate({k: d[:, a:b] for k, d in dsets.items() if d.ndim == 2})
                for k, v in agg.items():
                    if k not in sg:
                        put(sg, k, shape=(self.n,), dtype=np.float64)
                    sg[k][a:b] = v
            if whole is not None:
                for k, v in whole(f).items():
                    put(sg, k, v)
        self.journal.finish()
        return self.out


class ReusableRows:
    """The per-checkpoint rows of a finished scores file that a new run may take instead of
    computing them: those of the checkpoints (by SHA-256) it scored with the same ``key``
    (the data and every setting that changes the numbers, see ``gradscore.pipeline``). The
    file's attribute ``rows`` holds its key and the checksums of its rows' checkpoints;
    a file without it (or with another key) offers nothing."""

    def __init__(self, path: str | Path, key: dict) -> None:
        self._file: h5py.File | None = None
        self._row: dict[str, int] = {}
        self.warnings: list[str] = []
        try:
            f = h5py.File(path, "r")
        except (OSError, ValueError):
            return
        try:
            rows = None if mismatched(f) else json.loads(as_text(f.attrs.get("rows", "null")))
        except ValueError:
            rows = None
        if not isinstance(rows, dict) or rows.get("key") != key:
            f.close()
            return
        self._file = f
        self._row = {sha: t for t, sha in enumerate(rows["checkpoints_sha256"])}
        self.warnings = json_attr(f, Path(path), "warnings", "[]")   # what making them warned of

    def has(self, sha256: str) -> bool:
        """True when the rows of the checkpoint with this checksum can be taken."""
        return sha256 in self._row

    def read(self, sha256: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """Every metric of that checkpoint for examples ``start:stop``: {name: (stop-start,)}."""
        assert self._file is not None
        with damage_named(self._file.filename):
            pc, t = self._file["per_checkpoint"], self._row[sha256]
            rows = {k: pc[k][t, start:stop] for k in pc}
            if "logits" in self._file:
                rows["logits"] = self._file["logits"][t, start:stop]
        return rows

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@contextlib.contextmanager
def _scores_file(path: Path) -> Iterator[h5py.File]:
    """``path`` open for reading, checked to be a gradscore scores file (GradscoreError naming
    what it is instead)."""
    if not path.exists():
        raise GradscoreError(f"{path}: no such file or directory")
    if path.is_dir():
        raise GradscoreError(f"{path}: is a directory; give a scores file (written by gradscore run or gs.InRun)")
    if not h5py.is_hdf5(path):
        raise GradscoreError(f"{path}: is not a gradscore scores file (not an HDF5 file)")
    with h5py.File(path, "r") as f:
        missing = [f"/{k}" for k in ("scores", "per_checkpoint", "ids") if k not in f] + \
            [f"attribute {k}" for k in ("config",) if k not in f.attrs]
        if missing:   # a data set, a checkpoint, a sketch file ...
            raise GradscoreError(f"{path}: is not a gradscore scores file (it has no {missing[0]}); give one "
                                 f"written by gradscore run or gs.InRun")
        yield f


@contextlib.contextmanager
def damage_named(path: str | os.PathLike, fix: str = RESTORE) -> Iterator[None]:
    """Read errors of the HDF5 file ``path`` inside the block as one GradscoreError naming it
    and ``fix``: a dataset or HDF5's metadata failing its checksum (h5py's OSError without a
    file name, RuntimeError, KeyError "Unable to ..."), an attribute that is not JSON."""
    try:
        yield
    except (OSError, RuntimeError, KeyError, json.JSONDecodeError) as e:
        if (isinstance(e, OSError) and e.filename) or (isinstance(e, KeyError) and "Unable to" not in str(e)):
            raise
        raise damaged(Path(path), e, fix=fix) from e


class DamagedFile(ValueError):
    """A .npy/.npz file whose bytes fail numpy's or zip's checks (:func:`read_numpy`)."""


def read_numpy(path: str | os.PathLike, keys: Collection[str] | None = None) -> np.ndarray | dict[str, np.ndarray]:
    """The array of a .npy file, or the arrays of a .npz (all, or those in ``keys``), without
    pickles. A damaged file (zip's CRC-32 check, a cut deflate stream, a short file, a header
    changed into one zip cannot open, a directory that lost members) raises
    :class:`DamagedFile`, a ValueError, as numpy's other refusals are: callers catch
    (OSError, ValueError)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return loaded
        with loaded as z:
            arrays = {k: z[k] for k in z.files if keys is None or k in keys}
            counted = _zip_members(path)
            if counted is not None and counted != len(z.zip.namelist()):
                raise DamagedFile(f"damaged: its directory lists {len(z.zip.namelist())} of the {counted} "
                                  f"members its end record counts")
            return arrays
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
        raise DamagedFile(f"damaged: {e}") from e


def _zip_members(path: str | os.PathLike) -> int | None:
    """How many members the zip's end record counts (None for a zip64 count, which lives in
    another record). zip reads its directory by size, so a damaged length in the directory
    drops the members after it without an error; this count is the second record of them."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - (22 + 0xFFFF)))   # the end record, after a comment of up to 64 KiB
        tail = fh.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        raise zipfile.BadZipFile("no end of central directory record")
    total = struct.unpack_from("<H", tail, at + 10)[0]
    return None if total == 0xFFFF else total


def read_dataset(f: h5py.File, path: Path, name: str, read: bool = True) -> Any:
    """Dataset ``name`` of the scores file ``f`` (ids as :func:`read_ids` gives them), or a
    GradscoreError naming it where it fails to read (its checksum: the file is damaged).
    ``read=False`` only opens it (its link and header) and gives None."""
    try:
        d = f[name]
        return None if not read else read_ids(d) if name == "ids" else d[()]
    except (OSError, RuntimeError) as e:
        raise damaged(path, e, f"/{name}") from e


def read_group(f: h5py.File, path: Path, name: str, keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """{key: array} of the datasets in group ``name`` of ``f`` ({} without it), those in ``keys``
    only if given (the others opened, not read: a damaged link is still named), each by
    :func:`read_dataset`: by name, since h5py's ``Group.items()`` gives None for a damaged link."""
    if name not in f:
        return {}
    found = {k: read_dataset(f, path, f"{name}/{k}", keys is None or k in keys) for k in f[name]}
    return {k: v for k, v in found.items() if keys is None or k in keys}


def load_inrun_rows(path: str | Path, keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """The per-(step, example) records of an in-run scores file (``gs.InRun``): (M,) arrays,
    every field or those in ``keys``; GradscoreError for a file without them."""
    path = Path(path)
    try:
        with damage_named(path), _scores_file(path) as f:
            if "inrun" not in f:
                raise GradscoreError(f"{path}: has no in-run records (it was written by gradscore run, not "
                                     f"gs.InRun)")
            return read_group(f, path, "inrun", keys)
    except (OSError, KeyError) as e:
        raise GradscoreError(f"{path}: has no readable in-run records ({e})") from e


def inrun_blocks(path: str | Path,
                 block: int = 1 << 20) -> Callable[[Collection[str]], Iterator[dict[str, np.ndarray]]]:
    """An in-run scores file's records, ``block`` records at a time: a function that gives,
    at each call, a new iterator of {field: (≤ block,) array} of the fields ``keys`` it is
    given (a computation of two passes calls it twice, each with what it reads).
    GradscoreError now for a file without records (as :func:`load_inrun_rows`), and at a
    block that fails its checksum."""
    path = Path(path)
    load_inrun_rows(path, keys=())   # a scores file with in-run records: its links open, nothing read

    def blocks(keys: Collection[str]) -> Iterator[dict[str, np.ndarray]]:
        with h5py.File(path, "r") as f:
            group = f["inrun"]
            for a in range(0, len(group["row"]), block):
                found = {}
                for k in keys:
                    try:
                        found[k] = group[k][a:a + block]
                    except (OSError, RuntimeError) as e:
                        raise damaged(path, e, f"/inrun/{k}") from e
                yield found
    return blocks


def load_scores(path: str | Path, per_checkpoint: bool | Collection[str] = True) -> dict[str, Any]:
    """Read a finished scores file into memory: ``{"scores": {...}, "per_checkpoint": {...},
    "ids", "noisy" (or None), "checkpoints": {step, epoch, lr, eta, ref_norm_*...}, "config"}``.
    ``per_checkpoint``: which (T, N) rows to read, all (True), none (False: {}) or those
    named (the names the file has): 8·T·N bytes each, where the rest is 8·N.
    GradscoreError for a file that is not one, or is damaged (a dataset fails its checksum);
    a GradscoreWarning for an in-run recording not closed (its scores: the steps so far)."""
    keys = (None if per_checkpoint is True else () if per_checkpoint is False
            else {per_checkpoint} if isinstance(per_checkpoint, str) else set(per_checkpoint))
    path = as_path(path, "path")
    try:
        with damage_named(path), _scores_file(path) as f:
            verify(f, path)
            if not f.attrs.get("inrun_complete", True):
                _warn_unfinished(path, f["inrun/step"])
            return {
                "scores": read_group(f, path, "scores"),
                "per_checkpoint": read_group(f, path, "per_checkpoint", keys),
                "ids": read_dataset(f, path, "ids"),
                "noisy": read_dataset(f, path, "noisy") if "noisy" in f else None,
                "checkpoints": read_group(f, path, "checkpoints"),
                "config": json_attr(f, path, "config"),
                "warnings": json_attr(f, path, "warnings", "[]"),
            }
    except (OSError, KeyError) as e:
        raise GradscoreError(f"{path}: not a gradscore scores file ({e})") from e


def _warn_unfinished(path: Path, steps: h5py.Dataset) -> None:
    """Say that the recording in ``path`` was not closed: its ``steps`` (in order) are those
    of its last rewrite, which a selection made from it may not expect."""
    span = f"steps {int(steps[0])} to {int(steps[-1])}" if len(steps) else "no steps"
    warn(f"{path}: an unfinished in-run recording (still recording, or interrupted): its scores are of "
         f"{span}, those flushed so far, not of the whole training; gs.InRun(..., resume=True) continues "
         f"an interrupted one")


class CheckpointRows:
    """One (T, N) per-checkpoint metric of a scores file, read a checkpoint at a time:
    ``rows[t]`` is checkpoint t's (N,) row (t < 0 counts from the end); ``shape``, ``dtype``.
    A row that fails its checksum is a GradscoreError naming the file and the metric."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.name, self.shape, self.dtype = path, name, shape, dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"CheckpointRows({str(self.path)!r}, {self.name!r}, shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, t: int) -> np.ndarray:
        if not -self.shape[0] <= t < self.shape[0]:
            raise IndexError(f"checkpoint {t} of {self.shape[0]}")
        with h5py.File(self.path, "r") as f:
            try:
                return f["per_checkpoint"][self.name][t % self.shape[0]]
            except (OSError, RuntimeError) as e:
                raise damaged(self.path, e, f"/per_checkpoint/{self.name}") from e


def checkpoint_rows(path: str | Path, keys: Collection[str]) -> dict[str, CheckpointRows]:
    """The (T, N) per-checkpoint metrics ``keys`` that the scores file ``path`` holds, each
    read a checkpoint's row at a time (:class:`CheckpointRows`): memory O(N), not O(T·N).
    GradscoreError for a file that is not a scores file."""
    path = Path(path)
    try:
        with damage_named(path), _scores_file(path) as f:
            group = f["per_checkpoint"] if "per_checkpoint" in f else {}
            return {k: CheckpointRows(path, k, group[k].shape, group[k].dtype) for k in keys if k in group}
    except (OSError, KeyError) as e:
        raise GradscoreError(f"{path}: not a gradscore scores file ({e})") from e
