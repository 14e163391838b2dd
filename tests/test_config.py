"""RunConfig validation names the field; round trip through JSON."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import gradscore as gs
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


def test_names_given_as_one_string_are_names_not_letters(tmp_path):
    """``scores="el2n"`` was taken letter by letter ("unknown score 'e'"), ``params="2.*"``
    as the patterns '2', '.' and '*'. A string is now one name, or several separated by
    commas as on the command line, wherever the Python API takes names."""
    from gradscore.config import SketchConfig
    cfg = RunConfig(checkpoints="c", data="d", scores="el2n, pds", variants="cos", params="2.*", target="t.h5")
    assert (cfg.scores, cfg.variants, cfg.params) == (("el2n", "pds"), ("cos",), ("2.*",))
    cfg = RunConfig(checkpoints="c", data="d", scores="pds", target="t.h5")
    assert cfg.scores == ("pds",)
    assert SketchConfig(checkpoints="c", data="d", params="2.*").params == ("2.*",)
    from gradscore.demos.models import mlp
    model = mlp(d_in=6, hidden=4, n_classes=3, depth=1)
    assert gs.Scorer(model, params="3.*").param_names == ["3.weight", "3.bias"]
    rec = gs.InRun(model, out=tmp_path / "r.h5", scores="loss,grand")
    assert rec.config.scores == ("loss", "grand")


@pytest.mark.parametrize("given", [None, 3], ids=["none", "int"])
def test_a_path_that_is_none_or_a_number_is_one_config_error(tmp_path, given):
    """load_scores, select, diagnose, flag, CheckpointStore, CheckpointWriter and save_dataset
    given None (a variable not set) or a number for their file or folder raised pathlib's
    TypeError."""
    calls = {"path": lambda: gs.load_scores(given), "scores": lambda: gs.select(given, by="el2n"),
             "scores ": lambda: gs.diagnose(given), "scores  ": lambda: gs.flag(given),
             "directory": lambda: gs.CheckpointStore(given),
             "directory ": lambda: gs.CheckpointWriter(given, model_factory="gradscore.demos.models:mlp"),
             "path ": lambda: gs.save_dataset(given, np.zeros((3, 2), np.float32), np.arange(3))}
    for name, call in calls.items():
        with pytest.raises(ConfigError, match=rf"invalid value for '{name.strip()}': {given!r}; give a path"):
            call()


def test_examples_held_in_memory_are_refused_with_the_way_to_give_them(tmp_path):
    """gs.score and gs.sketch given a list or a torch Dataset for ``data`` turned it into a
    path with str(): OSError "File name too long" printing every tensor. The configs took
    any object for a path. Now one ConfigError naming the field and what it is (not its
    repr), and how to give such examples (gs.save_dataset or a 'module:fn' factory)."""
    from gradscore.scores.costate import CostateConfig
    examples = [(torch.zeros(64), 1)] * 3
    calls = {"data": [lambda d: gs.score("ck", d, out=tmp_path / "s.h5"),
                      lambda d: gs.sketch("ck", d, out=tmp_path / "k.h5"),
                      lambda d: gs.RunConfig(checkpoints="ck", data=d), gs.load_dataset],
             "target": [lambda d: gs.RunConfig(checkpoints="ck", data="d.h5", scores=("pds",), target=d)],
             "proxy": [lambda d: CostateConfig(checkpoints="ck", proxy=d, target="t.h5")],
             "checkpoints": [lambda d: gs.score(d, "d.h5", out=tmp_path / "s.h5")],
             "query": [lambda d: gs.attribute("k.h5", d, out=tmp_path / "a.h5")]}
    for given, shown in ((examples, "a list"), (torch.utils.data.TensorDataset(torch.zeros(3, 2)), "a TensorDataset")):
        for name, ways in calls.items():
            for call in ways:
                with pytest.raises(ConfigError) as e:
                    call(given)
                said = str(e.value)
                assert said.startswith(f"invalid value for '{name}': {shown}; give ") and len(said) < 300, said
                assert name == "checkpoints" or "gs.save_dataset" in said, said
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("config,field,value", [
    ("SketchConfig", "batch_size", 1.5), ("SketchConfig", "batch_size", "8"), ("SketchConfig", "chunk_size", "8"),
    ("SketchConfig", "dim", True), ("AttributeConfig", "batch_size", 0), ("AttributeConfig", "batch_size", "8"),
    ("AttributeConfig", "block_size", 1.5), ("AttributeConfig", "ridge", "1"), ("AttributeConfig", "top", True),
    ("RunConfig", "batch_size", True), ("RunConfig", "chunk_size", 2.0), ("InRunConfig", "every", True),
    ("CostateConfig", "batch_size", True)])
def test_a_number_of_the_wrong_kind_names_its_field(config, field, value):
    """`gs.sketch(batch_size=1.5)` or "8" and `gs.attribute(batch_size=0)` were Python's
    TypeError or range()'s ValueError from inside; `dim=True` sketched one dimension, as
    `gs.InRun(every=True)` took a target every step and `hvp_batch=True` one example a batch."""
    from gradscore import config as configs
    from gradscore.inrun.recorder import InRunConfig
    from gradscore.scores.costate import CostateConfig
    paths = {"AttributeConfig": {"sketch": "s", "query": "q"}, "InRunConfig": {"out": "o.h5"},
             "CostateConfig": {"checkpoints": "c", "proxy": "p", "target": "t"}}.get(config, {"checkpoints": "c",
                                                                                               "data": "d"})
    kinds = {"InRunConfig": InRunConfig, "CostateConfig": CostateConfig}
    with pytest.raises(ConfigError, match=f"invalid value for '{field}'"):
        kinds.get(config, getattr(configs, config, None))(**paths, **{field: value})


def test_numpy_numbers_in_a_config_are_kept_as_plain_numbers(tmp_path):
    """`gs.score(batch_size=np.int64(16))` scored, then crashed writing its config (int64 is
    not JSON serializable); `gs.sketch(dim=np.int64(8))` was refused as not a whole number;
    `gs.InRun(every=np.int64(2))` lost the recording at close. Every numeric field is stored
    as the int or float it is, and the config saves."""
    from gradscore import config as configs
    from gradscore.inrun.recorder import InRunConfig
    from gradscore.scores.costate import CostateConfig
    i, f = np.int64, np.float32
    configs = [RunConfig(checkpoints="c", data="d", batch_size=i(16), chunk_size=i(32), chunk_bytes=i(2**20),
                         epochs_upto=f(1.5), clip_quantile=f(0.5)),
               configs.SketchConfig(checkpoints="c", data="d", dim=i(8), seed=i(1), batch_size=i(16),
                                             chunk_size=i(32)),
               configs.AttributeConfig(sketch="s", query="q", top=i(3), ridge=f(0.5), block_size=i(64),
                                                batch_size=i(16)),
               InRunConfig(out="o.h5", every=i(2)), CostateConfig(checkpoints="c", proxy="p", target="t",
                                                                  batch_size=i(16))]
    for config in configs:
        d = dataclasses.asdict(config)
        json.dumps(d)
        numpy = {k: type(v).__name__ for k, v in d.items() if isinstance(v, np.number)}   # np.float64 is a float too
        assert not numpy, (config, numpy)


@pytest.mark.parametrize("field,value", [("epochs_upto", "1"), ("clip_quantile", "0.9"), ("epochs_upto", float("nan")),
                                         ("clip_quantile", float("nan")), ("clip_quantile", 0)])
def test_a_fraction_or_an_epoch_of_the_wrong_kind_names_its_field(field, value):
    """`RunConfig(epochs_upto="1")` and `clip_quantile="0.9"` raised Python's TypeError ('>='
    not supported) from inside."""
    with pytest.raises(ConfigError, match=f"invalid value for '{field}': "):
        RunConfig(checkpoints="c", data="d", **{field: value})


@pytest.mark.parametrize("value", [True, 2.0, "3", 0])
def test_whole_number_arguments_of_the_recorders_are_refused_in_other_kinds(tmp_path, value):
    """`writer.every(True)` saved θ at every step; `rec.data_parallel = True` took one process."""
    writer = gs.CheckpointWriter(tmp_path / "c", model_factory="gradscore.demos.models:mlp")
    with pytest.raises(gs.GradscoreError, match=r"n_steps"):
        writer.every(value)
    rec = gs.InRun(torch.nn.Linear(2, 2), out=tmp_path / "r.h5")
    with pytest.raises(ConfigError, match=r"invalid value for 'data_parallel'"):
        rec.data_parallel = value
