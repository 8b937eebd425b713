"""The pace of the quality benchmark's training step on this machine, measured without the trainer.

``bench_generator_step.py`` compares generators with it; ``bench_quality.py`` measures it before training to
fit its steps to its time budget (the development machines of this project have run the same step from 1x
to 3.5x the time of the fastest).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from pipeline.config import JobConfig, load_config
from pipeline.model.networks import Generator, build_models
from pipeline.train.engine import autocast_dtype, read_deepspeed_config

CATEGORIES = 8  # Cityscapes' categories, the recipe's model.semantic_classes


def step_config(recipe: list[str], *more: str) -> JobConfig:
    """The default config with ``recipe``'s generator, crop, batch size and DeepSpeed file (its precision),
    then ``more`` overrides."""
    prefixes = ("model.", "loader.crop=", "loader.batch_size=", "train.deepspeed_config=")
    chosen = [o for o in recipe if o.startswith(prefixes)]
    return load_config(overrides=[*chosen, *more])


def step_batch(cfg: JobConfig, generator: Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of ``cfg``'s crop and batch size for ``generator``, and a target near its image."""
    height, width = cfg.loader.crop
    torch.manual_seed(1)
    x = torch.rand(cfg.loader.batch_size, generator.hparams["input_nc"], height, width) * 2 - 1
    return x, (x[:, -3:] + 0.05 * torch.randn_like(x[:, -3:])).clamp(-1, 1)


def step_autocast(cfg: JobConfig) -> torch.dtype | None:
    """The dtype the trainer's engine autocasts the forward pass to on CPU (``train.deepspeed_config``'s
    ``torch_autocast``), or ``None`` for fp32."""
    key = "train.deepspeed_config"
    return autocast_dtype(read_deepspeed_config(cfg.train.deepspeed_config, torch.device("cpu"), key))


def time_steps(
    generator: Generator,
    x: torch.Tensor,
    target: torch.Tensor,
    steps: int,
    autocast: torch.dtype | None = None,
) -> float:
    """Seconds per step of ``steps`` MSE steps of the residual output (Adam), the forward pass autocast to
    ``autocast`` where it is given (as the trainer's engine does with its DeepSpeed file's
    ``torch_autocast``)."""
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
            out = generator(x)
        loss = (out.float() - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def _paced(recipes: list[list[str]], seconds: float) -> list[float]:
    """Each recipe's median seconds per step over blocks of 5 steps run for ``seconds``, on one thread, in
    the precision of its DeepSpeed file; one recipe after the other, so that processes started together
    time the same recipe side by side."""
    torch.set_num_threads(1)
    paces = []
    for recipe in recipes:
        cfg = step_config(recipe)
        autocast = step_autocast(cfg)
        torch.manual_seed(0)
        generator, _ = build_models(cfg.model, CATEGORIES, use_instance=False)
        x, target = step_batch(cfg, generator)
        time_steps(generator, x, target, 3, autocast)  # warm-up
        blocks: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(blocks) < 3:
            blocks.append(time_steps(generator, x, target, 5, autocast))
        paces.append(statistics.median(blocks))
    return paces


def step_seconds(recipes: list[list[str]], processes: int, seconds: float = 8.0) -> list[float]:
    """Seconds per bare step of each recipe's generator (no data loader, moving average or DeepSpeed) with
    ``processes`` spawned processes of one thread stepping side by side, as the benchmark trains, ``seconds``
    each: for each recipe the median over the processes. Every process times every recipe, one after the
    other: one start-up for all (taking turns block by block, a process would time one precision beside the
    other's steps in the other, not as the models train)."""
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        paces = list(pool.map(_paced, [recipes] * processes, [seconds] * processes))
    return [statistics.median(each) for each in zip(*paces, strict=True)]
