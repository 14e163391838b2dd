"""Score definitions: each module states its formula, sign and units."""
from . import datadiet, dynamics, pds

__all__ = ["datadiet", "dynamics", "pds"]
