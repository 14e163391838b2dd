"""gradscore: per-example gradient scores for every training example, at every checkpoint.

Public API::

    import gradscore as gs
    scorer = gs.Scorer(model, loss="cross_entropy", engine="auto")
    out = scorer.score_batch(x, y, refs=None)      # ScoreBatch(loss, sq_norm, dots, logits)
    gs.score(checkpoints="ckpts/", data="train.h5", out="scores.h5")
    gs.diagnose("scores.h5", score="pds")         # why examples score high: norm vs direction
    rec = gs.InRun(model, out="inrun.h5")         # scores from the training steps themselves
    gs.sketch(checkpoints="ckpts/", data="train.h5", out="train.sketch.h5", dim=8192)
    gs.attribute("train.sketch.h5", "test.h5", out="attr.h5", method="tracin")
"""
import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .exceptions import (CheckpointError, ConfigError, ConfigMismatchError, DataError, EngineError, GradscoreError,
                         FileLockError, GradscoreWarning, OutputError)

#: the rest of the public API, by the module that defines it: imported on first use, so that
#: ``import gradscore`` (and the command line) is ready before torch loads; Ctrl-C while it
#: loads is then the command's one-line interruption, not a traceback
_LAZY = {
    "CheckpointInfo": "io.checkpoints", "CheckpointStore": "io.checkpoints", "CheckpointWriter": "io.checkpoints",
    "RunConfig": "config", "Dataset": "io.datasets", "load_dataset": "io.datasets", "save_dataset": "io.datasets",
    "Engine": "engines", "ScoreBatch": "engines", "VmapTraceError": "engines.vmap", "Loss": "losses",
    "causal_lm": "losses", "masked_lm": "losses", "resolve_loss": "losses", "Scorer": "scorer",
    "load_scores": "io.store", "checkpoint_rows": "io.store",
    "reaggregate": "pipeline", "run": "pipeline", "score": "pipeline", "CostateConfig": "scores.costate",
    "CostateFile": "scores.costate", "compute_costate": "scores.costate", "select": "reports.select",
    "diagnose": "reports.diagnose", "flag": "reports.flag", "InRun": "inrun", "sketch": "sketches.store",
    "attribute": "sketches.attribute", "Projection": "sketches.projection",
    "import_checkpoints": "io.checkpoint_import", "import_dynamics": "io.dynamics", "export_scores": "io.dynamics",
}


if TYPE_CHECKING:   # the same names, for type checkers and editors
    from .config import RunConfig
    from .engines import Engine, ScoreBatch
    from .engines.vmap import VmapTraceError
    from .inrun import InRun
    from .io.checkpoint_import import import_checkpoints
    from .io.checkpoints import CheckpointInfo, CheckpointStore, CheckpointWriter
    from .io.datasets import Dataset, load_dataset, save_dataset
    from .io.dynamics import export_scores, import_dynamics
    from .io.store import checkpoint_rows, load_scores
    from .losses import Loss, causal_lm, masked_lm, resolve_loss
    from .pipeline import reaggregate, run, score
    from .reports.diagnose import diagnose
    from .reports.flag import flag
    from .reports.select import select
    from .scorer import Scorer
    from .scores.costate import CostateConfig, CostateFile, compute_costate
    from .sketches.attribute import attribute
    from .sketches.projection import Projection
    from .sketches.store import sketch


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradscore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "__version__", "Scorer", "ScoreBatch", "Engine", "score", "run", "reaggregate", "RunConfig",
    "CheckpointWriter", "CheckpointStore", "CheckpointInfo", "Dataset", "load_dataset",
    "save_dataset", "load_scores", "checkpoint_rows", "Loss", "causal_lm", "masked_lm", "resolve_loss",
    "GradscoreError", "ConfigError", "CheckpointError", "DataError", "EngineError",
    "ConfigMismatchError", "OutputError", "FileLockError",
    "GradscoreWarning",
    "VmapTraceError", "CostateConfig", "CostateFile", "compute_costate", "select", "diagnose", "flag", "InRun",
    "sketch", "attribute", "Projection", "import_checkpoints", "import_dynamics", "export_scores",
]
