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
from typing import Any, Iterator

import numpy as np

from .atomic import atomic_path
from .exceptions import DataError, GradscoreError
from .scores import datadiet, dynamics
from .store import HDF5ScoreStore, load_scores

_EPOCH_FILE = re.compile(r"^dynamics_epoch_(\d+)\.jsonl$")
FORMATS = ("cartography", "trainingdynamics")


def _epoch_files(directory: Path, fmt: str) -> list[tuple[int, Path]]:
    if fmt not in FORMATS:
        raise GradscoreError(f"unknown dynamics format '{fmt}'; use one of {', '.join(FORMATS)}")
    if fmt == "cartography" and (directory / "training_dynamics").is_dir():
        directory = directory / "training_dynamics"
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


def _records(path: Path, epoch: int) -> Iterator[tuple[int, Any, int, list]]:
    """(line number, guid, gold, logits list) per line, validated."""
    key = f"logits_epoch_{epoch}"
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    p = np.exp(logp)
    p_gold = p[np.arange(len(gold)), gold]
    onehot = np.zeros_like(p)
    onehot[np.arange(len(gold)), gold] = 1
    return {"loss": -logp[np.arange(len(gold)), gold], "el2n": np.linalg.norm(p - onehot, axis=1),
            "p_gold": p_gold, "correct": (p.argmax(1) == gold).astype(np.int8)}


def import_dynamics(directory: str | Path, out: str | Path, *, fmt: str = "cartography",
                    overwrite: bool = False) -> Path:
    """Read per-epoch dynamics jsonl files into a scores file (see module docstring)."""
    directory = Path(directory)
    files = _epoch_files(directory, fmt)
    index: dict[Any, int] = {}
    golds: list[int] = []
    n_classes = None
    per_epoch: list[dict[str, np.ndarray]] = []
    for t, (epoch, path) in enumerate(files):
        rows, gold_t, logits_t = [], [], []
        for lineno, guid, gold, logits in _records(path, epoch):
            if n_classes is None:
                n_classes = len(logits)
            if len(logits) != n_classes:
                raise DataError(f"{path}:{lineno}: {len(logits)} logits where earlier records have {n_classes}")
            if t == 0:
                if guid in index:
                    raise DataError(f"{path}:{lineno}: guid {guid!r} appears twice")
                index[guid] = len(golds)
                golds.append(gold)
            elif guid not in index:
                raise DataError(f"{path}:{lineno}: guid {guid!r} is not in {files[0][1].name}")
            if not 0 <= gold < n_classes:
                raise DataError(f"{path}:{lineno}: gold {gold} outside [0, {n_classes})")
            rows.append(index[guid])
            gold_t.append(gold)
            logits_t.append(logits)
        if len(rows) != len(index) or len(set(rows)) != len(rows):
            raise DataError(f"{path}: has {len(set(rows))} distinct guids, {files[0][1].name} has {len(index)}")
        order = np.argsort(rows)
        try:
            logits_arr = np.array(logits_t, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: logits are not all numbers ({e})") from e
        per_epoch.append(_metrics(logits_arr[order], np.asarray(gold_t)[order]))
        del logits_t
    n, T = len(index), len(files)
    fingerprint = {"import": str(directory.resolve()), "format": fmt,
                   "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for _, p in files]}
    store = HDF5ScoreStore(out, fingerprint, n=n, T=T, chunk_size=max(1, n), overwrite=overwrite)
    for t, m in enumerate(per_epoch):
        store.write_chunk(t, 0, {k: (v if k == "correct" else v.astype(np.float32)) for k, v in m.items()})
    select = np.ones(T, dtype=bool)

    def aggregate(pc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        agg = datadiet.aggregate(pc, select)
        agg.update(dynamics.aggregate(pc, select))
        return agg

    guids = list(index)
    ids = (np.array(guids, dtype=np.int64) if all(isinstance(g, int) for g in guids)
           else np.array([str(g) for g in guids], dtype=object))
    return store.finalize(ids=ids, extras={"checkpoints": {"epoch": np.array([e for e, _ in files])}},
                          aggregate=aggregate, attrs={"config": {"imported_from": str(directory), "format": fmt}})


def export_scores(scores: str | Path, out: str | Path, *, fmt: str) -> Path:
    """Write the scores of a scores file as ``td_metrics`` jsonl, ``csv`` or ``parquet``."""
    res = load_scores(scores)
    ids = [i.decode() if isinstance(i, bytes) else i.item() if hasattr(i, "item") else i for i in res["ids"]]
    s = res["scores"]
    out = Path(out)
    if fmt == "td_metrics":
        need = ("threshold_closeness", "confidence", "variability", "correctness", "forgetting")
        missing = [k for k in need if k not in s]
        if missing:
            raise GradscoreError(f"{scores}: no {', '.join(missing)} scores for td_metrics; rerun `gradscore run "
                                 f"--scores {','.join(need)}`")
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for i, guid in enumerate(ids):
                f.write(json.dumps({"guid": guid, "index": i, "threshold_closeness": float(s["threshold_closeness"][i]),
                                    "confidence": float(s["confidence"][i]), "variability": float(s["variability"][i]),
                                    "correctness": float(s["correctness"][i]),
                                    "forgetfulness": float(s["forgetting"][i])}) + "\n")
    elif fmt == "csv":
        names = sorted(s)
        with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", *names])
            for i, guid in enumerate(ids):
                w.writerow([guid, *(repr(float(s[k][i])) for k in names)])
    elif fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise GradscoreError("parquet export needs pyarrow: pip install pyarrow") from e
        table = pa.table({"id": ids, **{k: s[k] for k in sorted(s)}})
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
    else:
        raise GradscoreError(f"unknown export format '{fmt}'; use td_metrics, csv or parquet")
    return out
