"""The GAN step's pieces, free of engines: the batch as the step sees it, the generator's and the
discriminator's loss terms, and the watch for non-finite losses.

The trainer runs them on its DeepSpeed engines (:meth:`pipeline.train.trainer.PhaseRunner._train_step`);
``bench/bench_train.py`` runs the same functions on bare modules and ``torch.optim``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.config import JobConfig, PhaseConfig
from pipeline.data.manifest import DatasetInfo
from pipeline.model.inputs import discriminator_input, generator_input, quality_level, semantic_channels
from pipeline.model.losses import GeneratorLosses, discriminator_loss


def _as_float(outputs: list[list[Tensor]] | None) -> list[list[Tensor]] | None:
    """Discriminator outputs in float32 for the losses (bf16/fp16 engines compute in half)."""
    if outputs is None:
        return None
    return [[t.float() for t in scale] for scale in outputs]


@dataclass(frozen=True)
class StepInputs:
    """One batch as the GAN step sees it: generator input, its semantic channels, the real image."""

    g_in: Tensor
    semantics: Tensor
    real: Tensor
    synthesis: bool = False  # phase 1: the generator's synthesis head (see pipeline.model.networks.Generator)

    @property
    def real_d(self) -> Tensor:
        return discriminator_input(self.semantics, self.real.to(self.semantics.dtype))


def step_inputs(
    cfg: JobConfig,
    phase_cfg: PhaseConfig,
    data: DatasetInfo,
    batch: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> StepInputs:
    """The batch on ``device``, without a host sync: the images are copied asynchronously (the loader
    pins them on a GPU machine), the label map goes to :func:`generator_input` as the loader gave it (on
    the CPU, where its ids are checked) and is moved there. With ``train.semantic_dropout`` a sample's
    semantic channels are zeroed with that probability (the generator's input only: the discriminator
    keeps its conditioning)."""
    g_in = generator_input(
        batch["label"],
        batch["edge"].to(device, non_blocking=True),
        batch["decoded"].to(device, non_blocking=True),
        label_nc=data.label_nc,
        label_classes=data.label_classes,
        use_instance=data.use_instance,
        zero_semantics=cfg.model.zero_semantics,
        visual_input=phase_cfg.visual_input,
        quality=quality_level(cfg.loader.codec, batch["quality"]) if cfg.model.quality_input else None,
    ).to(dtype)
    semantic_nc = semantic_channels(data.class_nc, data.use_instance)
    semantics = g_in[:, :semantic_nc]
    dropout = cfg.train.semantic_dropout
    if dropout and phase_cfg.visual_input:
        keep = (torch.rand(g_in.shape[0], device=g_in.device) >= dropout).to(dtype).view(-1, 1, 1, 1)
        g_in = torch.cat([semantics * keep, g_in[:, semantic_nc:]], dim=1)
    # channels-last: every convolution after it runs on the faster NHWC kernels (oneDNN, cuDNN), the
    # weights stay contiguous for DeepSpeed
    g_in = g_in.contiguous(memory_format=torch.channels_last)
    real = batch["image"].to(device, non_blocking=True)
    return StepInputs(g_in, semantics, real, synthesis=not phase_cfg.visual_input)


def generator_terms(
    generator: Callable[..., Tensor],
    frozen_d: Callable[[Tensor], Any],
    d_net: nn.Module,
    losses: GeneratorLosses,
    x: StepInputs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The fake image and the generator's loss terms, through the discriminator with its gradients off
    (``frozen_d`` calls ``d_net``; DeepSpeed refuses a backward through the D engine inside G's loss)."""
    fake = generator(x.g_in, synthesis=x.synthesis)
    d_net.requires_grad_(False)
    fake_out = frozen_d(discriminator_input(x.semantics, fake)) if losses.needs_fake_outputs else None
    real_out = None
    if losses.needs_real_outputs:
        with torch.no_grad():
            real_out = frozen_d(x.real_d)
    return fake, losses(fake.float(), x.real, _as_float(fake_out), _as_float(real_out))


def discriminator_terms(
    discriminator: Callable[[Tensor], Any], d_net: nn.Module, x: StepInputs, fake: Tensor, gan_mode: str
) -> dict[str, Tensor]:
    """The discriminator's loss terms on the (detached) fake and the real image."""
    d_net.requires_grad_(True)
    d_fake = discriminator(discriminator_input(x.semantics, fake.detach()))
    d_real = discriminator(x.real_d)
    return discriminator_loss(_as_float(d_fake), _as_float(d_real), gan_mode)


class FiniteWatch:
    """Watches every step's loss terms for NaN and infinity without a host sync.

    :meth:`observe` keeps, on the device, the first step whose terms were not all finite and their values
    at that step; :meth:`check` reads that back (a collective over the ranks: every rank must call it, at
    the same point) and raises for the earliest such step of any rank. The trainer checks where it syncs
    anyway and always before it writes a checkpoint or an export.
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self._first: Tensor | None = None  # [step, *values]; step +inf while every step was finite

    def observe(self, step: int, terms: Mapping[str, Tensor]) -> None:
        if self._first is None:
            self.names = tuple(sorted(terms))
        values = torch.stack([terms[name].detach().reshape(()).double() for name in self.names])
        row = torch.cat([values.new_full((1,), step), values])
        if self._first is None:
            self._first = torch.full_like(row, math.inf)
        first_bad = torch.isinf(self._first[0]) & ~torch.isfinite(values).all()
        self._first = torch.where(first_bad, row, self._first)

    def check(self, phase: int) -> None:
        """Raise :class:`FloatingPointError` naming the phase, the step and the terms if a step was bad."""
        if self._first is None:
            return
        rows = [self._first]
        if dist.is_initialized() and dist.get_world_size() > 1:
            rows = [torch.empty_like(self._first) for _ in range(dist.get_world_size())]
            dist.all_gather(rows, self._first)
        table = torch.stack(rows).cpu()
        rank = int(table[:, 0].argmin())
        step = float(table[rank, 0])
        if math.isinf(step):
            return
        values = dict(zip(self.names, table[rank, 1:].tolist(), strict=True))
        bad = [name for name, value in values.items() if not math.isfinite(value)]
        where = f" on rank {rank}" if len(rows) > 1 else ""
        raise FloatingPointError(f"phase {phase} step {int(step)}{where}: non-finite {bad}: {values}")
