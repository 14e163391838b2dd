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
from ._version import __version__  # noqa: E402

from .io.checkpoints import CheckpointInfo, CheckpointStore, CheckpointWriter  # noqa: E402
from .config import RunConfig  # noqa: E402
from .io.datasets import Dataset, load_dataset, save_dataset  # noqa: E402
from .engines import Engine, ScoreBatch  # noqa: E402
from .exceptions import (CheckpointError, ConfigError, ConfigMismatchError, DataError,  # noqa: E402
                         EngineError, GradscoreError, OutputError)
from .engines.vmap import VmapTraceError  # noqa: E402
from .losses import Loss, causal_lm, resolve_loss  # noqa: E402
from .scorer import Scorer  # noqa: E402
from .io.store import load_scores  # noqa: E402
from .pipeline import reaggregate, run, score  # noqa: E402
from .scores.costate import CostateConfig, CostateFile, compute_costate  # noqa: E402
from .reports.select import select  # noqa: E402
from .reports.diagnose import diagnose  # noqa: E402
from .reports.flag import flag  # noqa: E402
from .inrun import InRun  # noqa: E402
from .sketches.store import sketch  # noqa: E402
from .sketches.attribute import attribute  # noqa: E402
from .sketches.projection import Projection  # noqa: E402

__all__ = [
    "__version__", "Scorer", "ScoreBatch", "Engine", "score", "run", "reaggregate", "RunConfig",
    "CheckpointWriter", "CheckpointStore", "CheckpointInfo", "Dataset", "load_dataset",
    "save_dataset", "load_scores", "Loss", "causal_lm", "resolve_loss", "GradscoreError", "ConfigError",
    "CheckpointError", "DataError", "EngineError", "ConfigMismatchError", "OutputError", "VmapTraceError",
    "CostateConfig", "CostateFile", "compute_costate", "select", "diagnose", "flag", "InRun",
    "sketch", "attribute", "Projection",
]
