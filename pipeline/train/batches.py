"""The training batches of one rank, and their position in the data: what a resume restores."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypedDict

import torch
import torch.distributed as dist

from pipeline.config import JobConfig
from pipeline.data.loader import DecodedCache, make_loader
from pipeline.train.engine import DistEnv


class Position(TypedDict):
    """Where a rank stands in its data (ranks read different numbers of batches per epoch)."""

    epoch: int
    batches_in_epoch: int
    samples: int  # this rank's, in the phase


class Batches:
    """Endless batches for one rank: epoch after epoch, each from a fresh loader seeded by
    ``(seed, phase, epoch)``, so a position ``(epoch, batch)`` can be found again after a restart.

    The epoch's loader is opened at the first batch asked for, not before. With ``loader.cache_mb`` the
    epochs' loaders share one :class:`DecodedCache`.
    """

    def __init__(self, cfg: JobConfig, env: DistEnv, phase: int) -> None:
        self.cfg, self.env, self.phase = cfg, env, phase
        self.epoch = self.in_epoch = self.samples = 0
        self._iter: Iterator[dict[str, Any]] | None = None
        self._cache = DecodedCache(cfg.loader.cache_mb * 2**20) if cfg.loader.cache_mb else None

    def _open(self) -> Iterator[dict[str, Any]]:
        seed = self.cfg.train.seed * 1_000_003 + self.phase * 10_007 + self.epoch
        loader = make_loader(
            self.cfg,
            rank=self.env.rank,
            world_size=self.env.world_size,
            train=True,
            seed=seed,
            cache=self._cache,
        )
        return iter(loader)

    def next(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = self._open()
        try:
            batch = next(self._iter)
        except StopIteration:
            if self.in_epoch == 0:
                raise RuntimeError(
                    f"rank {self.env.rank} got no batches from split {self.cfg.loader.split!r}"
                ) from None
            self.epoch, self.in_epoch, self._iter = self.epoch + 1, 0, None
            return self.next()
        self.in_epoch += 1
        self.samples += len(batch["key"])
        return batch

    def state_dict(self) -> Position:
        return {"epoch": self.epoch, "batches_in_epoch": self.in_epoch, "samples": self.samples}

    def load_state_dict(self, position: Position) -> None:
        """Continue at ``position``: the epoch's loader is rebuilt from its seed and the batches
        consumed before are read and dropped."""
        self.epoch, self.in_epoch, self._iter = int(position["epoch"]), 0, None
        for _ in range(int(position["batches_in_epoch"])):
            self.next()
        self.samples = int(position["samples"])


def due(step: int, last: int, every: int) -> bool:
    """Whether something done every ``every`` steps (0: only at the last step ``last``) is due at ``step``."""
    return step == last or (every > 0 and step % every == 0)


def all_samples(batches: Batches) -> int:
    """Samples consumed by all ranks so far (a collective: every rank must call it)."""
    samples = torch.tensor(batches.samples, dtype=torch.int64, device=batches.env.device)
    dist.all_reduce(samples)
    return int(samples)
