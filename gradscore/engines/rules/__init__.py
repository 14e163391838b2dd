"""Ghost rules, one file per layer family; importing this package registers them all."""
from . import conv, embedding, linear, norm  # noqa: F401  (registration on import)
from .registry import Rule, find_rule, register_rule, registered_types

__all__ = ["Rule", "find_rule", "register_rule", "registered_types"]
