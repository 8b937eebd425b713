"""Network weights that no installed package ships (LPIPS, FID), read from local files only.

A loader whose file is missing or unusable returns :class:`Unavailable` with the reason, never a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Unavailable:
    """A metric that could not be computed, and why (written as NaN plus the reason in CSVs)."""

    reason: str


def hub_checkpoint(name: str) -> Path:
    """The torch hub cache's path of the weights file ``name``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name
