"""Where in-run records go: a journal of row files, and the scores file made from them.

Each rank appends its records as immutable files ``<out>.partial/rank<r>_<k>.npz``
(written atomically, so a crash loses only the rows not yet flushed). Rank 0 writes
``out`` from every row file present, atomically, at each flush of its own and at the
end: the file on disk is always a complete, readable scores file of the steps flushed so
far (``inrun_complete`` says whether the recording ended). Rows are ordered by step
(stable: rank, then recording order), so the scores do not depend on the flush times or
the number of ranks.

A resumed recording (a training restarted from a saved state at step s) writes a new
*segment* of row files, ``seg<g>_rank<r>_<k>.npz``, each holding s as ``segment_start``:
the training runs steps s, s+1, … again, so the rows of earlier segments from step s on
are void. That cut is made when rows are read, never by changing a file, so a crash at
any point leaves the journal consistent.

Rows are read a few row files at a time (:func:`iter_rows`), merged by step across ranks:
writing the scores file holds O(examples) arrays and those files, never every record.
"""
from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Sequence

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..interrupts import stop_if_interrupted
from ..io.atomic import atomic_h5, atomic_path
from ..io.attrs import attributes, json_attr, write_attrs
from ..exceptions import ConfigError, OutputError
from ..io.journal import Journal, read_fingerprint
from ..io.store import damage_named, inrun_blocks, put, read_ids, read_numpy, write_ids
from ..scores import inrun as inrun_scores

#: per-row fields and their stored dtype (ids are kept as given: int64 or str)
FIELDS = {"step": np.int64, "lr": np.float64, "loss": np.float64, "share": np.float64, "share_sq_norm": np.float64,
          "sq_norm": np.float64, "el2n": np.float64, "p_gold": np.float64, "correct": np.int8,
          "margin": np.float64, "dot": np.float64, "target_norm": np.float64, "label": np.int64}
#: the fields every record has (a classifier's loss adds el2n, p_gold, correct, margin and label)
RECORDED = ("step", "lr", "loss", "share", "share_sq_norm", "sq_norm", "dot", "target_norm")


def _concat(parts: list) -> np.ndarray:
    """One array from per-step numpy arrays or (device) tensors, copied to the host once. A
    field may be both: a step without a target gradient records its dots as a NaN array."""
    like = next((p for p in parts if isinstance(p, torch.Tensor)), None)
    if like is None:
        return np.concatenate(parts)
    parts = [p.detach() if isinstance(p, torch.Tensor) else torch.from_numpy(np.asarray(p)).to(like.device)
             for p in parts]
    return torch.cat([p.double() if p.is_floating_point() else p for p in parts]).cpu().numpy()


def joined(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """One record on the host from several (each a dict of (B,) arrays or tensors): each
    field's parts in order (:func:`_concat`)."""
    return {k: _concat([r[k] for r in records]) for k in records[0]}


#: a row file's name: segment (absent: 0, a recording's first), rank, order
_ROW_FILE = re.compile(r"^(?:seg(\d+)_)?rank(\d+)_(\d+)\.npz$")


class RowJournal:
    """One rank's row files in the journal of ``out``, in ``segment`` (see the module
    docstring); ``start``, the segment's first step, is set by its first step."""

    def __init__(self, journal: Journal, rank: int, segment: int = 0) -> None:
        self.journal, self.rank, self.segment, self.count = journal, rank, segment, 0
        self.start: int | None = None

    def append(self, records: list[dict[str, np.ndarray]]) -> None:
        """Write ``records`` (dicts of (B,) arrays or tensors, ``ids`` and :data:`FIELDS`) as one
        row file."""
        if not records:
            return
        rows = joined(records)
        rows = {k: (v if k == "ids" else v.astype(FIELDS[k])) for k, v in rows.items()}
        if rows["ids"].dtype.kind in "OUS":
            rows["ids"] = rows["ids"].astype(str)
        name = f"{self._prefix}_{self.count:06d}.npz"
        if self.segment:
            rows["segment_start"] = np.int64(self.start)
        self.journal.open()
        with atomic_path(self.journal.unit(name)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **rows)
        self.count += 1

    def note(self, lines: list[str]) -> None:
        """Keep ``lines``, every warning about the scores this rank gave in this segment so far,
        beside its row files (``<prefix>.warnings.json``, rewritten): a resumed recording's
        file keeps those a crashed or closed one gave. :func:`write` reads them."""
        self.journal.keep_warnings(self._prefix, lines)

    @property
    def _prefix(self) -> str:
        """The names' start: ``rank<r>``, or ``seg<g>_rank<r>`` after the first segment."""
        return f"seg{self.segment:03d}_rank{self.rank:03d}" if self.segment else f"rank{self.rank:03d}"


#: the fix for a damaged warnings file of a recording's journal (:meth:`RowJournal.note`)
_LOSE_WARNINGS = "delete it: the recording keeps its records, without the warnings given while they were made"


#: records a closed recording's rows go back into its journal by (one row file each), and the
#: ids a streamed write gathers before it joins them to those found so far
CHUNK_ROWS = 1 << 20


def _row_files(partial: Path) -> list[tuple[int, int, Path]]:
    """(segment, rank, path) of every row file in the journal folder ``partial``, in
    (segment, rank, order) order."""
    found = [(m, p) for p in (partial.iterdir() if partial.is_dir() else ()) if (m := _ROW_FILE.match(p.name))]
    found.sort(key=lambda mp: (int(mp[0][1] or 0), int(mp[0][2]), int(mp[0][3])))
    return [(int(m[1] or 0), int(m[2]), p) for m, p in found]


def row_files(journal: Journal) -> list[Path]:
    """Every rank's row files in the journal, in (segment, rank, order) order."""
    return [p for _, _, p in _row_files(journal.partial)]


def _load(path: Path, keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of the row file ``path`` (those in ``keys`` if given); an OutputError
    naming it where it is damaged."""
    try:
        return read_numpy(path, keys)
    except FileNotFoundError:   # listed, then removed: by hand, or a recorder with overwrite=True
        raise OutputError(f"{path}: a row file of this in-run recording was removed while the file was written "
                          f"from them; write it again (close() or flush()) from the row files there are") from None
    except ValueError as e:   # damaged on disk (row files are written atomically)
        raise OutputError(f"{path}: a row file of this in-run recording cannot be read ({e}); its records "
                          f"cannot be made again: delete the file to write the recording without them") from e


def _joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One step-ordered chunk from ranks' step-ordered ``parts``, in rank order: sorted
    by step, stable (a step's rows rank by rank, each in recording order)."""
    # the fields all parts have (a recording resumed by a newer gradscore adds fields to its later rows)
    rows = ({k: np.concatenate([p[k] for p in parts]) for k in parts[0] if all(k in p for p in parts)}
            if len(parts) > 1 else parts[0])
    step = rows["step"]
    if len(parts) > 1 and (step[1:] < step[:-1]).any():
        order = np.argsort(step, kind="stable")
        rows = {k: v[order] for k, v in rows.items()}
    return rows


def _merged(streams: dict[int, deque], cut: int | None, keys: Collection[str] | None) -> Iterator[dict]:
    """Step-ordered chunks of one segment's rows: its ranks' row files (``streams``, rank →
    paths in order, each rank's steps never decreasing) merged by step, without the rows
    from step ``cut`` on. Holds about one file per rank: the rows below the least step
    that a rank with files left has reached are complete, and go."""
    held: dict[int, dict[str, np.ndarray] | None] = dict.fromkeys(streams)
    reached: dict[int, int] = {}   # per rank, the last step read

    def more(rank: int) -> None:   # the rank's next file, after the rows it holds
        path = streams[rank].popleft()
        rows = _load(path, None if keys is None else {*keys, "step"})
        rows.pop("segment_start", None)
        if cut is not None:
            rows = {k: v[rows["step"] < cut] for k, v in rows.items()}
        step = rows["step"]
        if len(step) and ((step[1:] < step[:-1]).any() or step[0] < reached.get(rank, step[0])):
            raise OutputError(f"{path}: its steps go back (a recorder numbers them never decreasing), so this "
                              f"journal holds rows of another recording; record into another file")
        if len(step):
            reached[rank] = int(step[-1])
        held[rank] = rows if held[rank] is None else {k: np.concatenate([held[rank][k], v]) for k, v in rows.items()
                                                      if k in held[rank]}

    while True:
        for rank in streams:
            while streams[rank] and (held[rank] is None or not len(held[rank]["step"])):
                more(rank)
        waiting = [r for r in streams if streams[r]]
        bound = min((held[r]["step"][-1] for r in waiting), default=None)
        parts = []
        for rank, rows in held.items():
            if rows is None or not len(rows["step"]):
                continue
            k = len(rows["step"]) if bound is None else int(np.searchsorted(rows["step"], bound))
            if k:
                parts.append({f: v[:k] for f, v in rows.items()})
                held[rank] = {f: v[k:] for f, v in rows.items()}
        if parts:
            yield {k: v for k, v in _joined(parts).items() if keys is None or k in keys}
        if bound is None:
            return
        for rank in waiting:
            if held[rank]["step"][-1] == bound:   # its next file may hold that step too
                more(rank)


def _chunks(files: list[tuple[int, int, Path]], keys: Collection[str] | None = None) -> Iterator[dict]:
    """Every rank's rows of ``files`` (:func:`_row_files`) in step order, in chunks of a few
    row files, without the rows that a later segment's steps replace (module docstring):
    a segment's kept steps come before every later segment's."""
    starts: dict[int, int] = {}
    for segment, _, path in files:
        if segment:
            start = int(_load(path, ("segment_start",))["segment_start"])
            starts[segment] = min(start, starts.get(segment, start))
    for segment in sorted({g for g, _, _ in files}):
        cut = min((s for g, s in starts.items() if g > segment), default=None)
        streams: dict[int, deque] = {}
        for g, rank, path in files:
            if g == segment:
                streams.setdefault(rank, deque()).append(path)
        yield from _merged(streams, cut, keys)


def iter_rows(journal: Journal, keys: Collection[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every rank's rows in the journal in step order, as chunks ({field: (m,) array}, the
    fields in ``keys`` if given), a few row files at a time (module docstring)."""
    return _chunks(_row_files(journal.partial), keys)


def last_step(journal: Journal) -> tuple[int, str] | None:
    """The last recorded step in the journal and the kind of its ids ("integers" or
    "strings"), or None where it has no rows. Reads every field: a damaged row file is
    named now, not when the recording closes."""
    last, kind = None, None
    for rows in iter_rows(journal):
        if len(rows["step"]):
            last = int(rows["step"][-1])
            kind = kind or ("strings" if rows["ids"].dtype.kind in "OUS" else "integers")
    return None if last is None else (last, kind)


@dataclass(frozen=True)
class Recording:
    """An in-run recording found at ``out``: its fingerprint, whether its rows are in the
    journal (an interrupted recording's; else only in the finished scores file), its next
    segment, whether it ended (:meth:`InRun.close`) and, closed, what its recorders warned of."""

    fingerprint: dict
    in_journal: bool
    segment: int
    complete: bool
    given: tuple[str, ...] = ()   # a closed recording's: the warnings its recorders gave (:func:`write`)


def find_recording(out: Path) -> Recording | None:
    """The in-run recording in ``out`` and its journal, or None where there is none: no
    file, or a scores file of ``gradscore run``."""
    files = _row_files(Journal.partial_of(out))
    if files:
        try:
            fingerprint = json.loads((files[0][2].parent / "meta.json").read_text())
        except (OSError, ValueError):
            fingerprint = None
        if isinstance(fingerprint, dict) and "inrun" in fingerprint:
            return Recording(fingerprint, True, files[-1][0] + 1, False)
    fingerprint = read_fingerprint(out) if out.is_file() else None
    if not (isinstance(fingerprint, dict) and "inrun" in fingerprint):
        return None
    with damage_named(out), h5py.File(out, "r") as f:
        complete = bool(f.attrs.get("inrun_complete", True))
        given = json_attr(f, out, "inrun_given", "[]")   # (none in a file written before it was kept)
    return Recording(fingerprint, False, 1, complete, tuple(given))


def recorded_rows(out: Path) -> Iterator[dict[str, np.ndarray]]:
    """The rows of the in-run scores file ``out`` (its ``/inrun`` group) in step order, in
    chunks of :data:`CHUNK_ROWS`, as :class:`RowJournal` writes them: what a resumed
    recording continues when its journal is gone (the recording was closed)."""
    with damage_named(out), h5py.File(out, "r") as f:
        group = f["inrun"]
        missing = [k for k in (*RECORDED, "row") if k not in group]
        if missing:
            raise OutputError(f"{out}: its in-run records lack {', '.join(missing)} (written by an older gradscore), "
                              f"so it cannot be continued; record into another file")
        ids = read_ids(f["ids"])
        fields = [k for k in FIELDS if k in group]
    for block in inrun_blocks(out, CHUNK_ROWS)([*fields, "row"]):
        yield {"ids": ids[block.pop("row")], **block}


def _verb(n: int, one: str, many: str) -> str:
    """``one`` for a count of 1, else ``many`` ("1 record is", "2 records are")."""
    return one if n == 1 else many


def _first(rows: dict[str, np.ndarray], mask: np.ndarray) -> str:
    """"step s, id i" of the first record in ``mask``."""
    i = int(np.flatnonzero(mask)[0])
    first = rows["ids"][i]
    return f"step {int(rows['step'][i])}, id {first.item() if hasattr(first, 'item') else first}"


class _Findings:
    """What the scores leave out or may get wrong (:func:`warnings_of`), counted over chunks
    of step-ordered records."""

    def __init__(self, ids: np.ndarray | None = None) -> None:
        self.total = 0
        self.counts = [0, 0, 0, 0]                    # non-finite, share above 1, share 0, share unread
        self.first: list[str | None] = [None, None, None, None]
        self.ids = np.zeros(0, np.int64) if ids is None else ids   # the rows' ids
        self.label = np.full(len(self.ids), -1, np.int64)   # each id's first label (-1: none yet), where recorded
        self.relabeled = np.zeros(len(self.ids), bool)      # ids met with a second label
        self.two_labels: str | None = None                  # the first such id, and its two labels

    def add(self, rows: dict[str, np.ndarray]) -> None:
        """Count the records ``rows`` (with ``ids``, ``step``, ``loss``, ``share``, ``share_sq_norm``)."""
        bad = ~np.isfinite(rows["loss"]) | ~np.isfinite(rows["share_sq_norm"])
        masks = (bad, (rows["share"] > 1 + 1e-6) & ~bad,   # NaN compares False
                 (rows["share"] == 0) & ~bad, np.isnan(rows["share"]) & ~bad)
        self.total += len(bad)
        for i, m in enumerate(masks):
            if n := int(m.sum()):
                self.counts[i] += n
                self.first[i] = self.first[i] or _first(rows, m)
        if "label" in rows and "row" in rows and len(self.label):
            self._labels(rows["row"], rows["label"])

    def _labels(self, row: np.ndarray, label: np.ndarray) -> None:
        """Note the ids whose records give them a second label: ids that are not the examples'."""
        known = self.label[row]
        clash = (known >= 0) & (known != label)
        new = known < 0
        self.label[row[new]] = label[new]   # of an id first met twice in these records: one of its labels
        clash |= new & (self.label[row] != label)
        if clash.any():
            i = int(np.argmax(clash))
            a, b = sorted((int(self.label[row[i]]), int(label[i])))
            self.relabeled[row[clash]] = True
            self.two_labels = self.two_labels or f"id {self.ids[row[i]]}: {a} and {b}"

    def lines(self) -> list[str]:
        """The warnings, in words."""
        (bad, above, zero, unread), (at_bad, _, at_zero, _) = self.counts, self.first
        counted = [
            (bad, f"a non-finite loss or gradient (first at {at_bad}): a diverging step, a corrupt input, or an "
                  f"overflow that a loss scaler skips; the scores leave those records out"),
            (above, "a share above 1 (the step's loss weighs the example more than its own loss): if the loss was "
                    "scaled (torch.amp.GradScaler, fp16 training), pass scaler= to gs.InRun, as share, "
                    "share_sq_norm, dot and inrun_value are then the scale times too large"),
            (zero, f"share 0 (the step's loss leaves the example out: a mask, a detached output, a weight 0; first "
                   f"at {at_zero}): no gradient of it to read, so its sq_norm is NaN and grand leaves it out; "
                   f"inrun_value counts it as 0"),
        ]
        out = [f"{n} of {self.total} records {_verb(n, 'has', 'have')} {what}" for n, what in counted if n]
        if relabeled := int(self.relabeled.sum()):
            out.append(f"{relabeled} of {len(self.label)} ids {_verb(relabeled, 'was', 'were')} given more than one "
                       f"label ({self.two_labels}): the ids must name the examples "
                       f"(their indices in the dataset), not their places in the batch; every score of such an id "
                       f"mixes the examples that came under it")
        if unread:
            out.append(f"{unread} {_verb(unread, 'record is', 'records are')} of examples the loss no longer moves, "
                       f"with no readable share (a batch of them, or a language model's): their sq_norm is NaN and "
                       f"grand leaves them out")
        return out


def warnings_of(rows: dict[str, np.ndarray]) -> list[str]:
    """What the scores leave out or may get wrong, in words: records with a non-finite loss or
    gradient (a diverging step, a corrupt input), shares above 1 (a scaled loss), shares of 0
    (examples the step's loss leaves out), and records whose share was unreadable."""
    found = _Findings()
    found.add(rows)
    return found.lines()


def _unmeasured(hits: np.ndarray, every: int) -> list[str]:
    """A warning naming how many examples have no measured presentation (``hits`` (n,): per
    example, its records with a target gradient, :attr:`Aggregator.measured`; their
    inrun_value and inrun_value_cos are NaN)."""
    k = int((hits == 0).sum())
    why = (f"met no step with a target gradient (every={every})" if every > 1
           else "have no finite dot with the target gradient")
    return [f"{k} of {len(hits)} examples {why}: their inrun_value and inrun_value_cos are NaN"
            + ("; a smaller every measures more of them" if every > 1 else "")] if k else []


def _ids(files: list[tuple[int, int, Path]]) -> tuple[np.ndarray, int]:
    """The sorted unique ids of the rows of ``files`` and how many rows there are, joining
    each chunk's unique ids to those found so far once :data:`CHUNK_ROWS` have gathered."""
    found, gathered, rows = [], 0, 0
    for chunk in _chunks(files, ("ids",)):
        found.append(np.unique(chunk["ids"]))
        gathered, rows = gathered + len(found[-1]), rows + len(chunk["ids"])
        if gathered > CHUNK_ROWS and len(found) > 1:
            found, gathered = [np.unique(np.concatenate(found))], 0
    return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64), rows


def write(out: Path, journal: Journal, *, config: dict[str, Any], fingerprint: dict, loss: str,
          wanted: set[str], complete: bool, progress: bool = False, given: Sequence[str] = ()) -> list[str] | None:
    """The scores file ``out`` from the rows in ``journal`` (:func:`_write_rows`), with ``given``
    (what the recorder warned of) joined to the warnings that every rank's row journal kept
    (:meth:`RowJournal.note`). Two passes over the row files (the ids, then the rest), each
    a few files at a time. Returns the rows' warnings (None, and nothing written, where the
    journal has no row files)."""
    files = _row_files(journal.partial)   # the rows of this moment: other ranks may be adding theirs
    if not files:
        return None
    given = list(dict.fromkeys([*journal.kept_warnings("warnings of the recording", _LOSE_WARNINGS), *given]))
    ids, m = _ids(files)
    like = {k: v.dtype for k, v in _load(files[0][2]).items() if k not in ("ids", "segment_start")}
    chunks = ({**c, "row": np.searchsorted(ids, c["ids"]).astype(np.int64)} for c in _chunks(files))
    return _write_rows(out, ids, m, like, chunks, config=config, fingerprint=fingerprint, loss=loss, wanted=wanted,
                       complete=complete, progress=progress, given=given)


def _write_rows(out: Path, ids: np.ndarray, m: int, like: dict[str, np.dtype], chunks: Iterable[dict[str, np.ndarray]],
                *, config: dict[str, Any], fingerprint: dict, loss: str, wanted: set[str], complete: bool,
                progress: bool, given: list[str]) -> list[str]:
    """The scores file ``out``, atomically: ``/ids`` (sorted unique), ``/scores``
    (:mod:`gradscore.scores.inrun`), ``/inrun/<field>`` (dtypes ``like``) in step order with
    ``/inrun/row`` (index into ``/ids``), an empty ``/per_checkpoint`` and the run's
    attributes, with ``given`` and :func:`warnings_of` the rows as its ``warnings``;
    ``given`` is kept alone as ``inrun_given``. ``chunks``: the m records in step order, each
    chunk with its ``ids`` and ``row``. ``progress``: a bar on a terminal, once it has taken
    5 s. Returns the rows' warnings."""
    n, found, any_target = len(ids), _Findings(ids), False
    like = {**like, "row": np.dtype(np.int64)}
    scores = inrun_scores.Aggregator(n, wanted, set(like))
    targets = bool(scores.pick & inrun_scores.TARGET_SCORES)   # (its records' fields are always there)
    with atomic_h5(out) as f:
        write_ids(f, "ids", ids if ids.dtype.kind in "OUS" else ids.astype(np.int64))
        rec, at = f.create_group("inrun"), 0
        for k, dtype in like.items():
            put(rec, k, shape=(m,), dtype=dtype, **({"compression": "gzip", "chunks": (min(m, 1 << 14),)} if m else {}))
        bar = tqdm(total=m, desc=f"writing {out.name}", unit=" records", unit_scale=True, delay=5,
                   disable=None if progress else True)
        for chunk in chunks:
            stop_if_interrupted()   # Ctrl-C stops the rewrite here: the file stays the last one
            bar.update(len(chunk["ids"]))
            rows = {k: v for k, v in chunk.items() if k != "ids"}
            found.add(chunk)
            scores.add(rows)
            any_target = any_target or (targets and bool(np.isfinite(rows["target_norm"]).any()))
            for k, v in rows.items():
                if k in like:   # a field the first rows lack (written by an older gradscore, resumed): not stored
                    rec[k][at:at + len(v)] = v
            at += len(rows["row"])
        bar.close()
        lines = found.lines() + (_unmeasured(scores.measured, config.get("every", 1)) if any_target else [])
        write_attrs(f, {"config": config, "fingerprint": fingerprint, "gradscore_version": __version__,
                        "loss": loss, "warnings": [*given, *lines], "inrun_given": given,
                        "inrun_complete": complete})
        group = f.create_group("scores")
        for k, v in scores.result().items():
            put(group, k, v)
        f.create_group("per_checkpoint")   # none: the records are per (step, example)
    return lines


def write_window(src: Path, out: Path, steps: str, *, wanted: Sequence[str] = (), progress: bool = False) -> Path:
    """The in-run scores file ``out`` from the records of the in-run scores file ``src`` at
    steps A <= step < B (``steps``, "A:B", either end may be left out): what a recording of
    those steps alone writes (the ids they met, the scores over them, their records), with
    ``src``'s recorder warnings; ``wanted``: scores to write instead of ``src``'s (those its
    records allow). ``src`` is only read. ConfigError for a window with no record, or one
    wider than a window ``src`` was cut to."""
    from ..config import parse_range
    with damage_named(src), h5py.File(src, "r") as f:
        config, fingerprint = json_attr(f, src, "config"), json_attr(f, src, "fingerprint")
        loss, complete = attributes(f)["loss"], bool(f.attrs.get("inrun_complete", True))
        given = json_attr(f, src, "inrun_given", "[]")
        group, ids = f["inrun"], read_ids(f["ids"])
        like, have = {k: group[k].dtype for k in FIELDS if k in group}, set(group)
    if missing := [k for k in (*RECORDED, "row") if k not in have]:
        raise OutputError(f"{src}: its in-run records lack {', '.join(missing)} (written by an older gradscore); "
                          f"record the training again to cut it into windows")
    (a, b), (a0, b0) = parse_range(steps, "steps"), parse_range(config.get("steps") or ":", "steps")
    if (a or 0) < (a0 or 0) or (b0 is not None and (b is None or b > b0)):
        raise ConfigError(f"invalid value for 'steps': {src} holds the records of steps {config['steps']} only; "
                          f"give a window inside it, or aggregate the recording it was cut from")
    can = [s for s, need in inrun_scores.NEEDS.items()
           if need <= set(like) and (config.get("targets") or s not in inrun_scores.TARGET_SCORES)]
    if unknown := sorted(set(wanted) - set(can)):
        raise ConfigError(f"invalid value for 'scores': {', '.join(unknown)} cannot be made from the records of "
                          f"{src}; choose from {', '.join(can)}")
    blocks = inrun_blocks(src, CHUNK_ROWS)

    def inside(step: np.ndarray) -> np.ndarray:
        return (step >= (a or 0)) & (step < b if b is not None else True)
    met, m, span = np.zeros(len(ids), bool), 0, [None, None]
    for block in blocks(("step", "row")):   # first pass: the examples the window meets
        keep = inside(block["step"])
        met[block["row"][keep]] = True
        m += int(keep.sum())
        if len(block["step"]):
            span = [block["step"][0] if span[0] is None else span[0], block["step"][-1]]
    if not m:
        held = f"steps {span[0]} to {span[1]}" if span[0] is not None else "no record"
        raise ConfigError(f"invalid value for 'steps': {src} has no record at steps {steps} (it holds {held}); "
                          f"give a window that meets its steps")
    new_row, kept = np.cumsum(met) - 1, ids[met]   # an example's index among those met; their ids

    def chunks() -> Iterator[dict[str, np.ndarray]]:
        for block in blocks([*like, "row"]):
            keep = inside(block["step"])
            row = new_row[block["row"][keep]]
            yield {**{k: block[k][keep] for k in like}, "row": row, "ids": kept[row]}
    config = {**config, "out": str(out), "steps": steps, **({"scores": list(wanted)} if wanted else {})}
    _write_rows(out, kept, m, like, chunks(), config=config, fingerprint={**fingerprint, "config": config},
                loss=loss, wanted=set(config["scores"]), complete=complete, progress=progress, given=list(given))
    return out
