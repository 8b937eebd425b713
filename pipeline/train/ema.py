"""An exponential moving average of the generator's weights (``train.ema_decay``).

Small-batch training leaves the weights of any one step noisy: the average of the recent steps scores
better and more steadily than the last step does. With an average on, it is what validation scores, what
the best-step selection keeps, what the phase exports and what a sweep's trials are judged by; the
optimiser keeps stepping the network itself. It starts at the phase's initial weights (the codec itself,
for a fresh residual generator) with a warm-up: step ``s`` averages with ``min(decay, (1 + s) / (10 + s))``,
so the first steps are not drowned by the starting point.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class WeightAverage:
    """A float32 copy of ``network`` in eval mode whose weights follow the network's moving average."""

    def __init__(self, network: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"the average's decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(network).float().eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay at optimizer step ``step`` (1 after the first step): the warm-up, then ``decay``."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, network: nn.Module, step: int) -> None:
        """Fold the network's weights after optimizer step ``step`` into the average (buffers are copied)."""
        decay = self.decay_at(step)
        current = network.state_dict()
        for name, average in self.module.state_dict().items():
            value = current[name].detach()
            if average.is_floating_point():
                average.lerp_(value.to(average.dtype), 1.0 - decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)
