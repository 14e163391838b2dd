"""Import training dynamics recorded by other tools; export scores for them.

Import (``gradscore import-dynamics DIR``): one ``dynamics_epoch_<e>.jsonl`` per epoch
(in DIR, or DIR/training_dynamics for ``--format cartography``, as allenai/cartography
writes them), one JSON record per line with ``guid``, ``gold`` and the logits under
``logits_epoch_<e>`` (cartography) or ``logits``. Files are parsed line by line; every
epoch must list the same guids. The result is an ordinary scores file: per epoch
loss (cross-entropy), el2n, p_gold and correct, and the dynamics scores.

Export (``gradscore export``): ``td_metrics`` (jsonl: guid, index, threshold_closeness,
confidence, variability, correctness, forgetfulness, as TrainingDynamics writes them),
``csv`` and ``parquet`` (one row per example: id and every score).
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from .._version import __version__
from .atomic import atomic_path, json_text
from ..exceptions import DataError, GradscoreError, warn
from .outputs import MARK, SUFFIX_FORMATS, claim, lock
from ..losses import resolve_loss
from ..scores import datadiet
from ..scores.registry import Window, aggregate, how_to_add
from .store import HDF5ScoresWriter, load_scores

_BLOCK = 65536  # rows of the first epoch converted to an array at a time
_EPOCH_FILE = re.compile(r"^dynamics_epoch_(\d+)\.jsonl$")
FORMATS = ("cartography", "trainingdynamics")


def _epoch_files(directory: Path, fmt: str) -> list[tuple[int, Path]]:
    if fmt not in FORMATS:
        raise GradscoreError(f"unknown dynamics format '{fmt}'; use one of {', '.join(FORMATS)}")
    if fmt == "cartography" and (directory / "training_dynamics").is_dir():
        directory = directory / "training_dynamics"
    if directory.is_file():
        raise DataError(f"{directory}: is one epoch's file; give its folder, {directory.parent}"
                        if _EPOCH_FILE.match(directory.name) else
                        f"{directory}: is a file, not a folder of dynamics_epoch_<e>.jsonl files (one per epoch, "
                        f"as cartography and TrainingDynamics write them); give that folder")
    if not directory.is_dir():
        raise DataError(f"{directory}: dynamics directory does not exist")
    files = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _EPOCH_FILE.match(p.name)))
    if not files:
        raise DataError(f"{directory}: no dynamics_epoch_<e>.jsonl files")
    epochs = [e for e, _ in files]
    missing = sorted(set(range(epochs[0], epochs[-1] + 1)) - set(epochs))
    if missing:
        raise DataError(f"{directory}: epoch file(s) {missing} missing between {epochs[0]} and {epochs[-1]}")
    return files


def _records(path: Path, epoch: int, advance: Callable[[int], object]) -> Iterator[tuple[int, Any, int, list]]:
    """(line number, guid, gold, logits list) per line, validated; ``advance(n)`` after each
    line of n bytes. UTF-8, with or without a byte-order mark."""
    key = f"logits_epoch_{epoch}"
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            advance(len(raw))
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at {e.start}); save the "
                                f"file as UTF-8") from e
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            for field in ("guid", "gold"):
                if field not in rec:
                    raise DataError(f"{path}:{lineno}: record has no '{field}'")
            logits = rec.get(key, rec.get("logits"))
            if logits is None:
                raise DataError(f"{path}:{lineno}: record has no '{key}' (or 'logits')")
            if not isinstance(logits, list):
                raise DataError(f"{path}:{lineno}: '{key}' is not a list of numbers")
            yield lineno, rec["guid"], int(rec["gold"]), logits


def _metrics(logits: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    """loss, el2n, p_gold, correct (N,) from logits (N, C): the same code as `run`'s."""
    import torch
    x, y = torch.from_numpy(np.asarray(logits, dtype=np.float64)), torch.from_numpy(gold)
    loss = resolve_loss("cross_entropy")
    out = {"loss": loss.fn(x, y), **datadiet.classification_metrics(loss, x, y)}
    return {k: v.numpy() for k, v in out.items()}


def import_dynamics(directory: str | Path, out: str | Path, *, fmt: str = "cartography",
                    overwrite: bool = False, progress: bool = True, probabilities: bool = False) -> Path:
    """Read per-epoch dynamics jsonl files into a scores file (see module docstring).

    Each epoch is parsed line by line and its metrics written out before the next is
    read. On bad input nothing is left behind: the journal of the import is removed.
    ``progress``: a bar over the files' bytes on a terminal, after 5 s. ``probabilities``:
    the records hold each example's class probabilities, not logits (read as their logs);
    without it, files whose every row of the first epoch is a probability vector (and some
    row not one-hot) are refused, since the softmax of probabilities is not the model's.
    """
    directory = Path(directory)
    files = _epoch_files(directory, fmt)
    claim(out, "scores", inputs={"a dynamics file": [p for _, p in files]}, overwrite=overwrite, resumable=True)
    with lock(out), tqdm(total=sum(p.stat().st_size for _, p in files), disable=None if progress else True,
                         desc=f"reading {directory.name or directory}", unit="B", unit_scale=True, delay=5,
                         dynamic_ncols=True) as bar:   # one writer per scores file
        return _import(directory, files, out, fmt, overwrite, bar.update, probabilities)


def _import(directory: Path, files: list[tuple[float, Path]], out: str | Path, fmt: str, overwrite: bool,
            advance: Callable[[int], object], probabilities: bool) -> Path:
    """:func:`import_dynamics` once ``out`` is claimed and locked; ``advance(n)`` after n bytes read."""
    reader = _EpochReader(files)
    store = None
    read_as = {"probabilities": True} if probabilities else {}   # in the fingerprint and config where set
    try:
        for t, (epoch, path) in enumerate(files):
            logits = reader.read(t, epoch, path, advance)
            if probabilities:
                logits = reader.logs(path, logits)
            elif t == 0 and _probabilities(logits):
                raise DataError(f"{path}: every example's logits are probabilities (each row >= 0, summing to 1), "
                                f"and the softmax of probabilities is not the model's: every score would be wrong; "
                                f"record the logits (or their log-softmax), or pass --probabilities to read them "
                                f"as probabilities")
            if store is None:
                fingerprint = {"import": str(directory.resolve()), "format": fmt,
                               "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for _, p in files],
                               **read_as}
                store = HDF5ScoresWriter(out, fingerprint, n=len(reader.index), T=len(files),
                                       chunk_size=max(1, len(reader.index)), overwrite=overwrite)
            m = _metrics(logits, reader.gold)
            store.write_chunk(t, 0, {k: (v if k == "correct" else v.astype(np.float32)) for k, v in m.items()})
            del logits, m
    except DataError:
        if store is not None:
            store.journal.finish()
        raise
    window = Window(select=np.ones(len(files), dtype=bool))
    guids = list(reader.index)
    ids = (np.array(guids, dtype=np.int64) if all(isinstance(g, int) for g in guids)
           else np.array([str(g) for g in guids], dtype=object))
    return store.finalize(ids=ids, extras={"checkpoints": {"epoch": np.array([e for e, _ in files])}},
                          aggregate=lambda pc: aggregate(pc, window),
                          attrs={"config": {"imported_from": str(directory), "format": fmt, **read_as},
                                 "gradscore_version": __version__})


class _EpochReader:
    """Reads epoch files into (N, C) logits in the row order of the first file's guids."""

    def __init__(self, files: list[tuple[int, Path]]) -> None:
        self.first = files[0][1].name
        self.index: dict[Any, int] = {}
        self.golds: list[int] = []
        self.gold = np.zeros(0, dtype=np.int64)
        self.n_classes: int | None = None

    def _check(self, path: Path, lineno: int, gold: int, logits: list) -> None:
        if self.n_classes is None:
            self.n_classes = len(logits)
        if len(logits) != self.n_classes:
            raise DataError(f"{path}:{lineno}: {len(logits)} logits where earlier records have {self.n_classes}")
        if not 0 <= gold < self.n_classes:
            raise DataError(f"{path}:{lineno}: gold {gold} outside [0, {self.n_classes})")

    def read(self, t: int, epoch: int, path: Path, advance: Callable[[int], object]) -> np.ndarray:
        """(N, C) float64 logits of one epoch file; ``advance(n)`` after each line of n bytes."""
        if t == 0:  # learns the guids; N is unknown until the end, so rows go in blocks
            blocks: list[np.ndarray] = []
            rows: list[list] = []
            for lineno, guid, gold, logits in _records(path, epoch, advance):
                self._check(path, lineno, gold, logits)
                if guid in self.index:
                    raise DataError(f"{path}:{lineno}: guid {guid!r} appears twice")
                self.index[guid] = len(self.golds)
                self.golds.append(gold)
                rows.append(logits)
                if len(rows) == _BLOCK:
                    blocks.append(_as_array(path, rows))
                    rows = []
            blocks.append(_as_array(path, rows).reshape(len(rows), self.n_classes or 0))
            self.gold = np.asarray(self.golds)
            return self._finite(path, np.concatenate(blocks))
        out = np.empty((len(self.index), self.n_classes), dtype=np.float64)
        seen = np.zeros(len(self.index), dtype=bool)
        for lineno, guid, gold, logits in _records(path, epoch, advance):
            self._check(path, lineno, gold, logits)
            row = self.index.get(guid)
            if row is None:
                raise DataError(f"{path}:{lineno}: guid {guid!r} is not in {self.first}")
            if seen[row]:
                raise DataError(f"{path}:{lineno}: guid {guid!r} appears twice")
            if gold != self.golds[row]:
                raise DataError(f"{path}:{lineno}: gold {gold} of guid {guid!r} differs from {self.first}")
            seen[row] = True
            try:
                out[row] = logits
            except (TypeError, ValueError) as e:
                raise DataError(f"{path}:{lineno}: logits are not all numbers ({e})") from e
        if not seen.all():
            missing = next(g for g, r in self.index.items() if not seen[r])
            raise DataError(f"{path}: {int((~seen).sum())} guid(s) of {self.first} are missing, e.g. {missing!r}")
        return self._finite(path, out)

    def logs(self, path: Path, probs: np.ndarray) -> np.ndarray:
        """(N, C) logits whose softmax is ``probs``: their logs (0 as the smallest float64);
        a DataError naming the first example whose row is not a probability vector."""
        bad = np.flatnonzero(~_probability_rows(probs))
        if len(bad):
            guid = next(g for g, r in self.index.items() if r == bad[0])
            raise DataError(f"{path}: guid {guid!r} has {probs[bad[0]].tolist()}, not probabilities (each >= 0, "
                            f"summing to 1); without --probabilities, records are read as logits")
        return np.log(np.maximum(probs, np.finfo(np.float64).tiny))

    def _finite(self, path: Path, logits: np.ndarray) -> np.ndarray:
        """``logits`` (N, C) of ``path``; a DataError naming the first example with a NaN or
        infinite logit (whose scores would be NaN, and its forgetting "never learned")."""
        bad = np.flatnonzero(~np.isfinite(logits).all(1))
        if len(bad):
            guid = next(g for g, r in self.index.items() if r == bad[0])
            value = logits[bad[0]][~np.isfinite(logits[bad[0]])][0]
            raise DataError(f"{path}: guid {guid!r} has logit {value}, not finite (a diverged epoch?), and "
                            f"{len(bad) - 1} more example(s): fix the records, or leave those examples out of "
                            f"every epoch's file")
        return logits


def _probabilities(logits: np.ndarray) -> bool:
    """Whether an epoch's (N, C) logits look like probabilities: every row one, and some row
    not one-hot (one-hot rows, [1, 0], are as likely logits)."""
    return (logits.shape[1] >= 2 and bool(_probability_rows(logits).all())
            and bool(((logits > 0) & (logits < 1)).any()))


def _probability_rows(values: np.ndarray) -> np.ndarray:
    """(N,) whether each row of ``values`` (N, C) is a probability vector: >= 0, summing to 1
    (to 1e-3: probabilities written in float32)."""
    return (values >= 0).all(1) & (np.abs(values.sum(1) - 1) <= 1e-3)


def _as_array(path: Path, rows: list[list]) -> np.ndarray:
    try:
        return np.array(rows, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: logits are not all numbers ({e})") from e


#: the suffix each export format writes, and the format a file name's suffix says
EXPORT_SUFFIX = {"td_metrics": ".jsonl", "csv": ".csv", "parquet": ".parquet"}
EXPORT_SUFFIXES = {**{v: k for k, v in EXPORT_SUFFIX.items()}, ".json": "td_metrics"}


def export_scores(scores: str | Path, out: str | Path, *, fmt: str | None = None, overwrite: bool = False,
                  progress: bool = True) -> Path:
    """Write the scores of a scores file as ``td_metrics`` jsonl, ``csv`` or ``parquet`` (an
    existing ``out`` only with ``overwrite``, and only if it is a gradscore export; not a
    name whose suffix is another format's, ``x.parquet`` for csv); ``fmt`` None: the one
    ``out``'s suffix names (.jsonl or .json, .csv, .parquet);
    ``progress``: a bar over the rows of jsonl and csv on a terminal, after 5 s. The scores
    file's warnings (what made its scores wrong or partial) are given as GradscoreWarnings:
    the export has no place for them."""
    suffix = Path(out).suffix.lower()
    named = EXPORT_SUFFIXES.get(suffix)
    if fmt is None and named is None:
        raise GradscoreError(f"{out}: its name says no export format; name it *.jsonl (td_metrics), *.csv or "
                             f"*.parquet, or give --format td_metrics, csv or parquet")
    fmt = fmt or named
    claim(out, "export", inputs={"the scores file": [scores]}, overwrite=overwrite)
    if named is not None and named != fmt:
        raise GradscoreError(f"{out}: its name says {named}, but --format {fmt} writes "
                             f"{EXPORT_SUFFIX[fmt]}; name it *{EXPORT_SUFFIX[fmt]} or use --format {named}")
    if named is None and suffix in SUFFIX_FORMATS:   # x.h5, x.npz: no export format at all
        raise GradscoreError(f"{out}: its name says {SUFFIX_FORMATS[suffix]}, but --format {fmt} writes "
                             f"{EXPORT_SUFFIX[fmt]}; name it *{EXPORT_SUFFIX[fmt]}")
    res = load_scores(scores, per_checkpoint=False)
    for text in res["warnings"]:
        warn(text)
    ids = [i.decode() if isinstance(i, bytes) else i.item() if hasattr(i, "item") else i for i in res["ids"]]
    s = res["scores"]
    out = Path(out)

    def rows() -> Iterator[tuple[int, Any]]:
        return tqdm(enumerate(ids), total=len(ids), disable=None if progress else True, desc=f"writing {out.name}",
                    unit=" rows", unit_scale=True, delay=5, dynamic_ncols=True)
    if fmt == "td_metrics":
        need = ("confidence", "variability", "correctness", "forgetting")
        missing = [k for k in need if k not in s]
        if missing:
            raise GradscoreError(f"{scores}: no {', '.join(missing)} scores for td_metrics; "
                                 f"{how_to_add(res['config'], missing)}")
        if "threshold_closeness" not in s:   # its definition (scores.dynamics), from the file's confidence
            s["threshold_closeness"] = s["confidence"] * (1 - s["confidence"])
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for i, guid in rows():
                f.write(json_text({"guid": guid, "index": i, "threshold_closeness": float(s["threshold_closeness"][i]),
                                   "confidence": float(s["confidence"][i]), "variability": float(s["variability"][i]),
                                   "correctness": float(s["correctness"][i]),
                                   "forgetfulness": float(s["forgetting"][i])}) + "\n")
    elif fmt == "csv":
        names = sorted(s)
        with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", *names])
            for i, guid in rows():
                w.writerow([guid, *(repr(float(s[k][i])) for k in names)])
    elif fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise GradscoreError("parquet export needs pyarrow: pip install pyarrow") from e
        table = pa.table({"id": ids, **{k: s[k] for k in sorted(s)}},
                         metadata={MARK: __version__})   # marks it as gradscore's (see outputs.claim)
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
    else:
        raise GradscoreError(f"unknown export format '{fmt}'; use td_metrics, csv or parquet")
    return out
