"""Hugging Face ``transformers`` models as gradscore model factories (extra ``hf``).

Checkpoints name ``gradscore.integrations.hf:from_config`` as their factory with
``model_kwargs = {"config": {"model_type": "gpt2", "n_layer": 2, ...}, "task": "causal_lm"}``:
the architecture is rebuilt from the config dict, so checkpoints stay self-describing
and no weights are ever downloaded. gradscore reads the model's ``.logits``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..exceptions import CheckpointError

#: task -> the transformers auto class that builds it
TASKS = {"causal_lm": "AutoModelForCausalLM",
         "sequence_classification": "AutoModelForSequenceClassification",
         "masked_lm": "AutoModelForMaskedLM",
         "image_classification": "AutoModelForImageClassification"}


def require_transformers():
    """The ``transformers`` module, or one CheckpointError naming the ``hf`` extra."""
    try:
        import transformers
    except ImportError as e:
        raise CheckpointError("this model needs Hugging Face transformers: "
                              "pip install 'gradscore[hf]'") from e
    return transformers


#: the end of a transformers class name (a saved config's "architectures") -> its task
_CLASS_TASKS = {"ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm",
                "ForSequenceClassification": "sequence_classification", "ForMaskedLM": "masked_lm",
                "ForImageClassification": "image_classification"}


def _task_of(config: dict[str, Any]) -> str:
    """The task of the class a saved config names (its ``architectures``); ``causal_lm``
    where it names none of :data:`TASKS`."""
    names = config.get("architectures") or []
    found = [t for name in names for end, t in _CLASS_TASKS.items() if isinstance(name, str) and name.endswith(end)]
    return found[0] if found else "causal_lm"


def from_config(config: dict[str, Any], task: str | None = None,
                attn_implementation: str | None = None) -> nn.Module:
    """A randomly initialized transformers model from a config dict, in eval mode.

    config: ``{"model_type": "gpt2" | "bert" | …, **config fields}`` (a ``config.json`` that
    ``save_pretrained`` wrote, as it is); task: one of ``causal_lm``,
    ``sequence_classification``, ``masked_lm``, ``image_classification`` (default: the
    task of the class the config's ``architectures`` names, else ``causal_lm``);
    attn_implementation: e.g. "eager" or "sdpa" (default: the library's choice).
    """
    tf = require_transformers()
    task = _task_of(config) if task is None else task
    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise CheckpointError(f"model_kwargs 'config' needs a 'model_type' (e.g. 'gpt2'), got {sorted(config)}")
    if task not in TASKS:
        raise CheckpointError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    try:
        hf_config = tf.AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"transformers cannot build a '{model_type}' config: {e}") from e
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return getattr(tf, TASKS[task]).from_config(hf_config, **kwargs).eval()
