"""Human-readable descriptions for ``gradscore info``."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..exceptions import GradscoreError
from ..io.attrs import attributes, kind_of, verify
from ..io.outputs import written_kind
from ..io.store import damage_named


def environment() -> dict[str, Any]:
    """Versions, the CUDA device, and the kernel backend chosen for each device kind."""
    import importlib.metadata

    import torch

    from .._version import __version__
    from ..kernels import describe as kernel_backends

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    cuda = (f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} device(s), CUDA {torch.version.cuda})"
            if torch.cuda.is_available() else "none")
    return {"gradscore": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "cuda_device": cuda, "triton": version("triton"),
            "numba": version("numba"), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
            "kernels": kernel_backends()}


def _describe_checkpoints(path: Path) -> str:
    from ..io.checkpoints import CheckpointStore
    store = CheckpointStore(path)
    first = store[0]
    with h5py.File(first.path, "r") as f:
        n_params = sum(int(np.prod(f["params"][k].shape)) for k in f["params"])
    lines = [f"checkpoint directory {path}: {len(store)} checkpoints",
             f"  model {first.model}, loss {store.loss}, {n_params:,} parameters",
             *_fold("model_kwargs", first.model_kwargs),
             f"  {'step':>10} {'epoch':>8} {'lr':>10}"]
    lines += [f"  {i.step:>10} {i.epoch:>8g} {i.lr:>10.4g}" for i in store]
    return "\n".join(lines)


def _fold(name: str, items: dict[str, Any], width: int = 96, sep: str = "=") -> list[str]:
    """``name: k=v, k=v, …`` folded into indented lines of at most ``width`` characters
    (a Hugging Face config has dozens of entries); ``sep=" "`` writes ``k v`` as is."""
    import textwrap
    text = ", ".join(f"{k}{sep}{json.dumps(v) if sep == '=' else v}" for k, v in items.items()) or "(none)"
    return textwrap.wrap(text, width=width, initial_indent=f"  {name}: ", subsequent_indent="    ",
                         break_long_words=True, break_on_hyphens=False)


def _describe_dataset(path: Path) -> str:
    from ..io.datasets import ArrayFileDataset, described
    from ..losses import IGNORE_INDEX
    ds = ArrayFileDataset(path)
    x, y = ds.read(0, min(len(ds), 1))
    lines = [f"dataset {path}: {len(ds)} examples{' (text)' if ds.text else ''}",
             f"  inputs: per-example {described(ds, 'inputs', x)}",
             f"  {ds.target_field}: per-example {described(ds, ds.target_field, y)}"]
    if not y.dtype.is_floating_point:
        ranges = [(int(v.min()), int(v.max())) for _, _, yc in ds.chunks()
                  for v in [yc[yc != IGNORE_INDEX]] if v.numel()]
        if ranges:
            kind = "token ids" if ds.text and ds.target_field == "labels" else "classes"
            lines.append(f"  {kind}: {min(r[0] for r in ranges)}..{max(r[1] for r in ranges)}")
    noisy = ds.noisy()
    if noisy is not None:
        lines.append(f"  noisy: {int(noisy.sum())} of {len(noisy)} ({noisy.mean():.1%}) marked")
    ds.close()
    return "\n".join(lines)


def _steps(records: h5py.Group, block: int = 1 << 20) -> tuple[int, int, int]:
    """(records, steps, steps with a target gradient) of an in-run file's ``/inrun``, read
    ``block`` records at a time."""
    steps, targeted = set(), set()
    for a in range(0, len(records["step"]), block):
        step = records["step"][a:a + block]
        steps.update(np.unique(step).tolist())
        targeted.update(np.unique(step[np.isfinite(records["target_norm"][a:a + block])]).tolist())
    return len(records["step"]), len(steps), len(targeted)


def loss_trend(f: h5py.File | str | os.PathLike) -> tuple[str, str | None] | None:
    """How a checkpoint run's scored examples' mean loss, and their accuracy on the given
    labels, went from the first checkpoint to the last (scores or sketch file ``f``, open or
    by its path): (that line, the warning where the loss rose, else None); None without
    per-checkpoint losses. A rise is what mislabeled and held-out examples show, and also
    examples saved otherwise than the model was trained on them, whose every score is then
    wrong without an error."""
    if not isinstance(f, h5py.Group):
        with h5py.File(f, "r") as opened:
            return loss_trend(opened)
    if "per_checkpoint/loss" not in f or "checkpoints/step" not in f or 0 in f["per_checkpoint/loss"].shape:
        return None
    step = f["checkpoints/step"][()]

    def mean(name: str, t: int) -> float:
        row = f["per_checkpoint"][name][t].astype(np.float64)
        return float(row[np.isfinite(row)].mean()) if np.isfinite(row).any() else float("nan")

    shown = [0, len(step) - 1] if len(step) > 1 else [0]
    losses = " -> ".join(f"{mean('loss', t):.3g} at step {step[t]}" for t in shown)
    line = f"mean loss {losses}"
    if "correct" in f["per_checkpoint"]:
        line += "; accuracy on the given labels " + " -> ".join(f"{mean('correct', t):.0%}" for t in shown)
    first, last = mean("loss", 0), mean("loss", -1)
    if not last > first:
        return line, None
    return line, (f"the examples' mean loss rose from {first:.3g} at the first checkpoint to {last:.3g} at the "
                  f"last: so it does for mislabeled or held-out examples, and for examples saved otherwise than "
                  f"the model was trained on them (input scaling, channel order, label ids), whose every score "
                  f"is then wrong; if these are the training examples, check how they were saved")


def _describe_scores(path: Path) -> str:
    import textwrap
    with h5py.File(path, "r") as f:
        attrs = attributes(f)
        cfg, fp = json.loads(attrs["config"]), json.loads(attrs["fingerprint"])
        n, T = len(f["ids"]), len(f["checkpoints/step"]) if "checkpoints/step" in f else 0
        subset = fp.get("data", {}).get("subset") if isinstance(fp.get("data"), dict) else None
        total = len(fp.get("checkpoints_sha256", ())) or T
        window = f" (epochs <= {cfg['epochs_upto']:g})" if cfg.get("epochs_upto") is not None else ""
        head = f"scores file {path} (gradscore {attrs.get('gradscore_version', '?')})"
        if cfg.get("inrun"):   # recorded during training (gs.InRun): rows per (step, example)
            records, steps, with_target = _steps(f["inrun"])
            cut = f" (steps {cfg['steps']} of the recording)" if cfg.get("steps") else ""
            state = ("" if attrs.get("inrun_complete", True) else
                     "; interrupted or still recording (gs.InRun(..., resume=True) continues it)")
            lines = [head + f", recorded in training (gs.InRun){state}",
                     f"  {n:,} examples, {records:,} records over {steps} steps{cut}, target gradient "
                     f"at {with_target} of them (every {cfg['every']}; preconditioner "
                     f"{cfg['preconditioner']})"]
        elif "imported_from" in cfg:   # gradscore import-dynamics: one row per epoch, no checkpoints
            epochs = len(f["checkpoints/epoch"]) if "checkpoints/epoch" in f else 0
            lines = [head + f", imported from {fp.get('import', cfg['imported_from'])} ({cfg['format']})",
                     f"  {n:,} examples, {epochs} epochs"]
        else:
            lines = [head, f"  checkpoints {cfg['checkpoints']}, data {cfg['data']}, engine {cfg['engine']}",
                     f"  {n:,} examples{f' ({subset})' if subset else ''}, {T} of {total} checkpoints{window}"]
        if cfg.get("inrun"):
            lines += textwrap.wrap(", ".join(f["inrun"]), width=96, initial_indent="  per record: ",
                                   subsequent_indent="    ")
        else:
            lines += _fold("per_checkpoint (T×N)", {k: "×".join(map(str, f["per_checkpoint"][k].shape))
                                                    for k in f["per_checkpoint"]}, sep=" ")
            trend = loss_trend(f)
            if trend is not None:
                lines.append(f"  {trend[0]}")
        for k in f["scores"]:
            s = f["scores"][k][()]
            finite = np.isfinite(s)
            stats = (f"mean {s[finite].mean():.4g}, min {s[finite].min():.4g}, max {s[finite].max():.4g}"
                     if finite.any() else "no finite value")
            lines.append(f"  scores/{k}: {stats}" + (f" ({int((~finite).sum())} NaN/Inf)" if not finite.all() else ""))
        for warning in json.loads(attrs.get("warnings", "[]")):
            lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def _describe_sketch(path: Path) -> str:
    from ..sketches.store import SketchFile
    sf = SketchFile.open(path)
    T, N, dim = sf.shape
    kinds = {}
    for b in sf.spec.blocks:
        kinds[b.kind] = kinds.get(b.kind, 0) + b.k
    with h5py.File(path, "r") as f:
        attrs = attributes(f)
        lines = [f"sketch file {path} (gradscore {attrs.get('gradscore_version', '?')})",
                 f"  checkpoints {sf.config['checkpoints']}, data {sf.config['data']}",
                 f"  {T} checkpoints x {N:,} examples x {dim} ({f['sketch'].dtype}), seed {sf.spec.seed}, "
                 f"{len(sf.spec.blocks)} blocks: " + ", ".join(f"{k} {v} rows" for k, v in sorted(kinds.items()))]
        trend = loss_trend(f)
        lines += [f"  {trend[0]}"] if trend is not None else []
        s = f["scores/self_influence"][()]
        lines.append(f"  scores/self_influence: mean {s.mean():.4g}, min {s.min():.4g}, max {s.max():.4g}")
        lines += [f"  warning: {w}" for w in json.loads(attrs.get("warnings", "[]"))]
    return "\n".join(lines)


def _describe_attribution(path: Path) -> str:
    with h5py.File(path, "r") as f:
        attrs = attributes(f)
        cfg, facts = json.loads(attrs["config"]), json.loads(attrs["attribution"])
        top = f["proponents/ids"].shape[1]
        full = "; the full N x Q matrix in /scores" if "scores" in f else ""
        return "\n".join([
            f"attribution file {path} (gradscore {attrs.get('gradscore_version', '?')})",
            f"  {facts['method']} over checkpoints {facts['checkpoints']} of sketch {cfg['sketch']} "
            f"(dim {facts['dim']})",
            f"  {facts['n_query']:,} queries from {cfg['query']} against {facts['n_train']:,} training examples: "
            f"top {top} proponents and opponents each{full}; /target_dot: their mean"]
            + [f"  warning: {w}" for w in json.loads(attrs.get("warnings", "[]"))])


def _describe_costate(path: Path) -> str:
    from ..scores.costate import CostateFile
    cf = CostateFile(path)
    try:
        cfg = cf.config
        steps = [int(s) for s in cf.steps]
        shown = ", ".join(map(str, steps if len(steps) <= 8 else steps[:3] + ["…"] + steps[-2:]))
        finite = cf.grad_target_norm[np.isfinite(cf.grad_target_norm)]

        def span(v: np.ndarray) -> str:
            return f"{v.min():.4g}" if v.min() == v.max() else f"{v.min():.4g}–{v.max():.4g}"
        lines = [f"co-state file {path}",
                 f"  checkpoints {cfg['checkpoints']}, proxy {cfg['proxy'] if cf.has_costates else '(not read)'}, "
                 f"target {cfg['target']}",
                 f"  {len(steps)} checkpoints (steps {shown}), η_t {span(cf.eta)}"
                 if len(cf.eta) else f"  {len(steps)} checkpoints (steps {shown})",
                 f"  ‖∇J(θ_t)‖: {span(finite)}" if len(finite) else "  ‖∇J(θ_t)‖: none finite"]
        lines[-1] += (f"; co-states λ_t, ‖λ_t‖ up to {cf.costate_norm.max():.4g}" if cf.has_costates else
                      "; no co-states λ_t (target gradients only: target_dot, target_cos)")
        lines += [f"  warning: {w}" for w in cf.warnings]
    finally:
        cf.close()
    return "\n".join(lines)


def describe(path: Path) -> str:
    """Describe a checkpoint directory, a dataset (.h5/.npz), a scores, co-state, sketch or
    attribution file; a damaged file is one GradscoreError naming it."""
    with damage_named(path):
        if path.is_file() and path.suffix in (".h5", ".hdf5") and h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                verify(f, path)
        return _describe(path)


def _describe(path: Path) -> str:
    if path.is_dir():
        return _describe_checkpoints(path)
    if not path.exists():
        raise GradscoreError(f"{path}: no such file or directory")
    if (what := written_kind(path)) is not None:   # a report or weights, which were read as a dataset
        raise GradscoreError(f"{path}: is {what}; info describes a checkpoint folder, a dataset (.h5, .npz) or an "
                             f"HDF5 file gradscore wrote: open this one as it is")
    if path.suffix == ".npz":
        return _describe_dataset(path)
    try:
        with h5py.File(path, "r") as f:
            kind = kind_of(f)
    except OSError as e:
        if not h5py.is_hdf5(path):
            raise GradscoreError(f"{path}: is not an HDF5 file; info describes a checkpoint folder, a dataset "
                                 f"(.h5, .npz) or an HDF5 file gradscore wrote (scores, in-run, co-state, sketch, "
                                 f"attribution)") from e
        raise GradscoreError(f"{path}: not a readable HDF5 file ({e})") from e
    if kind == "sketch":
        return _describe_sketch(path)
    if kind == "attribution":
        return _describe_attribution(path)
    if kind == "costate":
        return _describe_costate(path)
    if kind == "scores":
        return _describe_scores(path)
    if kind == "checkpoint":
        return _describe_checkpoints(path.parent)
    return _describe_dataset(path)
