"""RunConfig validation names the field; round trip through JSON."""
from __future__ import annotations

import json
import os

import pytest

from gradscore import ConfigError, RunConfig


@pytest.mark.parametrize("field,value", [("scores", ()), ("scores", ("el2n", "el2n")),
                                         ("engine", "fast"), ("device", "tpu"), ("dtype", "int8"),
                                         ("batch_size", -1), ("chunk_size", 1.5),
                                         ("chunk_bytes", 0), ("epochs_upto", -2)])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        RunConfig(checkpoints="c", data="d", **{field: value})


def test_round_trip_and_gradient_need():
    cfg = RunConfig(checkpoints="/c", data="/d", scores=["el2n"], epochs_upto=3)
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    relative = RunConfig(checkpoints="./c/", data="d.h5", target="t.h5", ids="i.txt")
    saved = relative.to_dict()   # paths saved (and compared) absolute; a dataset factory as given
    assert [saved[k] for k in ("checkpoints", "data", "target", "ids", "costate")] == [
        os.path.abspath(p) for p in ("c", "d.h5", "t.h5", "i.txt")] + [None]
    assert RunConfig.from_dict(saved).to_dict() == saved
    assert RunConfig(checkpoints="c", data="my.module:make").to_dict()["data"] == "my.module:make"
    assert not cfg.needs_gradients
    assert RunConfig(checkpoints="c", data="d").needs_gradients
