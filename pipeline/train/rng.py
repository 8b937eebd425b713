"""The process's random streams (Python, NumPy, torch, CUDA): seeding, saving and restoring them.

A checkpoint saves each rank's states (:mod:`pipeline.train.checkpoint`) so that a resume continues bit for
bit; :func:`rng_untouched` keeps work done between steps (a validation) from moving them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states, as ``torch.load(weights_only=True)``
    reads them back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Runs the block and puts every RNG back as it found it: what happens inside (a validation, a
    sweep's trial report) leaves the training's random stream (its semantic dropout) as it was."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
