"""Per-example gradient engines; importing this package registers them all."""
from . import ghost, loop, vmap  # noqa: F401  (registration on import)
from .base import Engine, ScoreBatch, check_eval_mode, engine_class, register_engine

__all__ = ["Engine", "ScoreBatch", "check_eval_mode", "engine_class", "register_engine"]
