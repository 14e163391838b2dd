"""In-run scoring: per-example scores read from the training steps' own backward."""
from .recorder import InRun, InRunConfig

__all__ = ["InRun", "InRunConfig"]
