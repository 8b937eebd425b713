"""What one segmenter training run does; light to import (the command line reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ConfigError


@dataclass
class SegmentTraining:
    """What one segmenter training run does (the data comes from the job config's shards and loader)."""

    output: str = "experiments/segmenter/segmenter.safetensors"
    architecture: str = "segformer"
    options: dict[str, Any] = field(default_factory=lambda: {"variant": "b0"})
    init_from: str = ""  # an external weights file of the same architecture and class count
    steps: int = 1000
    lr: float = 6e-4
    weight_decay: float = 0.01
    warmup: int = 50
    originals: float = 0.5  # share of batches on the original images
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0 or self.lr <= 0 or not 0 <= self.originals <= 1:
            raise ConfigError("segment: steps >= 1, warmup >= 0, lr > 0 and originals in [0, 1] are required")
