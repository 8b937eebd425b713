"""Checkpoint before the job is killed.

SLURM warns a job before its time limit (``#SBATCH --signal=B:USR1@300``), preemption sends SIGTERM, and
torchrun passes a SIGTERM on to its workers. Either signal asks the training loop to save a checkpoint
at the next step it can and to stop with :class:`Preempted`; the requeued job resumes from it
(``--resume``). In a distributed world the ranks agree every :data:`POLL_EVERY` steps (one one-element
all-reduce), so that they all save the same step; a single process checks every step. Handlers are only
installed in the main thread (a Ray trial trains in another one and is stopped by Ray).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
POLL_EVERY = 10


class Preempted(SystemExit):
    """The loop saved a checkpoint on a stop signal and ended; the exit code is 128 + the signal."""


class StopRequest:
    """Set by a stop signal; read by the training loop."""

    def __init__(self) -> None:
        self.signum = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Catch the stop signals for the block (in the main thread; elsewhere a no-op)."""
        self.signum = 0
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def due(self, step: int, device: torch.device) -> int:
        """The signal to stop on at this step (0: go on); in a distributed world every rank answers alike."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signum
        if step % POLL_EVERY:
            return 0
        flag = torch.tensor([float(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


STOP = StopRequest()
