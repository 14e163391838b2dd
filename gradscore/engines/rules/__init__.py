"""Ghost rules, one file per layer family; importing this package registers them all."""
from . import (attention, conv, embedding, experts, hf_conv1d, linear, norm, recurrent,  # noqa: F401  (registration)
               scale, std_conv)
from .registry import Factor, Rule, computes_otherwise, find_rule, has_rule, register_rule, registered_types, tied_sq

__all__ = ["Factor", "Rule", "computes_otherwise", "find_rule", "has_rule", "register_rule",
           "registered_types", "tied_sq"]
