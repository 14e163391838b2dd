"""Random options of `gs.score` against one reference run: engine, batch and chunk sizes,
a subset of the examples (ids or a range), the window, the scores, and an earlier run into
the same file whose rows the last one reuses. Every score of the file must equal the
reference run's (the per-example loop, float64, every example, one batch) for the same
window, example by example. This found a ∇J-only --costate file refused under --overwrite."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import gradscore as gs
from helpers import MLP_KWARGS, make_run

SCORES = ["el2n", "grand", "loss", "pds", "target_dot", "target_cos", "confidence", "variability", "correctness",
          "forgetting", "threshold_closeness", "aum", "mislabel"]


class _Reference:
    """A run of 40 examples and 4 checkpoints, a target set, and the reference scores by window."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ckpts, self.data = make_run(root, n=40, n_ckpts=4)
        g = torch.Generator().manual_seed(5)
        self.target = gs.save_dataset(root / "val.h5", torch.randn(6, MLP_KWARGS["d_in"], generator=g).numpy(),
                                      torch.randint(0, MLP_KWARGS["n_classes"], (6,), generator=g).numpy())
        self._scores: dict = {}

    def scores(self, window: float | None) -> dict:
        if window not in self._scores:
            out = self.root / f"reference_{window}.h5"
            gs.score(self.ckpts, self.data, out=out, scores=SCORES, target=self.target, engine="loop",
                     dtype="float64", batch_size=40, epochs_upto=window, costate=self.root / f"cs_{window}.h5",
                     progress=False)
            self._scores[window] = gs.load_scores(out, per_checkpoint=False)
        return self._scores[window]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> _Reference:
    return _Reference(tmp_path_factory.mktemp("reference"))


def _options(rng: random.Random, work: Path) -> tuple[dict, list[str]]:
    """One draw of options and scores (the subset's ids file written in ``work``)."""
    options = {"engine": rng.choice(["auto", "ghost", "vmap", "loop"]), "batch_size": rng.randint(1, 45),
               "chunk_size": rng.randint(1, 50), "dtype": "float64", "epochs_upto": rng.choice([None, 0, 1, 2]),
               "costate": work / "costate.h5"}
    subset = rng.choice(["all", "all", "ids", "range"])
    if subset == "ids":
        ids = sorted(rng.sample(range(100, 140), rng.randint(1, 40)))
        (work / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
        options["ids"] = work / "ids.txt"
    elif subset == "range":
        lo = rng.randint(0, 38)
        options["index_range"] = f"{lo}:{rng.randint(lo + 1, 40)}"
    return options, SCORES if rng.random() < 0.5 else rng.sample(SCORES, rng.randint(1, 5))


def _check(seed: int, reference: _Reference, work: Path) -> None:
    rng = random.Random(seed)
    work.mkdir()
    out = work / "scores.h5"
    if rng.random() < 0.4:   # an earlier run into the same file: the last one reuses its rows
        options, scores = _options(rng, work)
        gs.score(reference.ckpts, reference.data, out=out, scores=scores, target=reference.target, progress=False,
                 **options)
    options, scores = _options(rng, work)
    gs.score(reference.ckpts, reference.data, out=out, scores=scores, target=reference.target, overwrite=True,
             progress=False, **options)
    got, want = gs.load_scores(out, per_checkpoint=False), reference.scores(options["epochs_upto"])
    at = np.searchsorted(want["ids"], got["ids"])
    np.testing.assert_array_equal(want["ids"][at], got["ids"])
    assert set(scores) <= set(got["scores"]), (seed, scores, sorted(got["scores"]))
    for name, values in got["scores"].items():   # the scores asked for, and those kept from the earlier run
        np.testing.assert_allclose(values, want["scores"][name][at], rtol=1e-9, atol=1e-12,
                                   err_msg=f"seed {seed}, {name}, {options}, {scores}")
    shutil.rmtree(work)


def test_random_run_options_give_the_reference_scores(reference, tmp_path):
    for seed in range(8):
        _check(seed, reference, tmp_path / str(seed))


@pytest.mark.slow
def test_many_random_run_options_give_the_reference_scores(reference, tmp_path):
    for seed in range(8, 308):
        _check(seed, reference, tmp_path / str(seed))
