"""Score definitions (each module states its formula, sign and units) and the one
registry of aggregators that turns per-checkpoint metrics into scores."""
from . import datadiet, dynamics, mislabel, pds
from .registry import AGGREGATORS, Window, aggregate

__all__ = ["datadiet", "dynamics", "mislabel", "pds", "AGGREGATORS", "Window", "aggregate"]
