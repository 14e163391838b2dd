"""Gradient sketches: a fixed random projection of every example's gradient, stored once,
then any number of targets and queries scored against it (TracIn, TRAK)."""
from .engine import SketchEngine
from .projection import Projection, SketchSpec

__all__ = ["Projection", "SketchEngine", "SketchSpec"]
