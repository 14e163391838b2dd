"""Score definitions: each module states its formula, sign and units."""
from . import datadiet

__all__ = ["datadiet"]
