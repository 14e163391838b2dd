"""Several processes for one ``gradscore run``, on torch.distributed as torchrun starts it.

``torchrun --nproc-per-node N -m gradscore run …`` (or ``gradscore run --distributed``
under torchrun) sets RANK, WORLD_SIZE and LOCAL_RANK; gradscore joins the process group
(NCCL on CUDA, gloo on CPU) and splits the work by rank:

- the dataset's chunks are split into W contiguous ranges, rank r scores range r at
  every checkpoint, streaming its chunks (the next one is read while one is scored);
- the reference vectors (∇J(θ_t), λ_t) are computed once, by rank 0, into the co-state
  file, which every rank then reads;
- every rank writes its chunks, atomically, into the run's journal ``<out>.partial/``:
  each finished (checkpoint, chunk) is one file, so the journal is every rank's shard
  and done-bitmap at once, safe under SIGKILL;
- rank 0 joins them into ``<out>`` once every rank is done; an error on one rank
  (bad data in its range) is raised on every rank (:func:`raise_everywhere`).

A chunk's numbers do not depend on which rank computed it, so the joined file is
bit-identical to a one-process run, and a rerun of the same command after a crash
(of any rank) resumes every range where it stopped.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch

from .exceptions import ConfigError, GradscoreError, OutputError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, world size, local rank (GPU index)."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n_chunks: int) -> range:
        """The contiguous chunk indices of this rank (the first ranks take one more)."""
        lo = self.rank * n_chunks // self.world
        return range(lo, (self.rank + 1) * n_chunks // self.world)

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 while the other ranks wait (None on them); a GradscoreError it
        raises is raised on every rank (:func:`raise_everywhere`), not left to end rank 0
        alone while the others die in a barrier."""
        value, failed = None, None
        if self.main:
            try:
                value = fn()
            except GradscoreError as e:
                failed = e
        raise_everywhere(failed)
        return value


def current_ranks() -> tuple[int, int]:
    """(rank, world size) of the initialized torch.distributed process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def raise_everywhere(error: Exception | None, value: Any = None, *, every: bool = False) -> Any:
    """Raise on every rank where any rank has an ``error``: a rank its own, the others an
    OutputError with the first failed rank's message; else return rank 0's ``value`` on every
    rank (``every``: the list of every rank's, in rank order). A collective (every rank calls
    it; no rank passes it before all have come)."""
    dist = torch.distributed
    values = [value]
    if dist.is_available() and dist.is_initialized():
        said = [None] * dist.get_world_size()
        dist.all_gather_object(said, (None if error is None else str(error), value))
        first = next(((rank, message) for rank, (message, _) in enumerate(said) if message is not None), None)
        if first is not None and error is None:
            raise OutputError(f"rank {first[0]}: {first[1]}")
        values = [v for _, v in said]
    if error is not None:
        raise error
    return values if every else values[0]


def env_ranks() -> Ranks | None:
    """Ranks from torchrun's environment variables, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                 int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


@contextmanager
def process_group(device: str, required: bool = False) -> Iterator[Ranks]:
    """Join torchrun's process group for the duration (one process: a no-op).

    ``required``: refuse to run without torchrun's environment (``--distributed``).
    """
    ranks = env_ranks()
    if ranks is None:
        if required:
            raise ConfigError("invalid value for 'distributed': no torchrun environment (RANK, "
                              "WORLD_SIZE); start it as `torchrun --nproc-per-node N -m gradscore run …`")
        yield Ranks()
        return
    if ranks.world == 1 or torch.distributed.is_initialized():
        yield ranks
        return
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(ranks.local)
    torch.distributed.init_process_group(backend=backend)
    try:
        yield ranks
    finally:
        torch.distributed.destroy_process_group()
