"""Generator padding benchmark: ``model.padding=reflect`` (pix2pixHD) against ``zeros``, per training step.

Times the quality benchmark's phase-3 step (``bench_quality.RECIPE``'s generator and crop: the residual
output, MSE against the original, backward, Adam) with each padding, in one process, on the same weights
and batch, on one CPU thread (``--threads``). After a warm-up, ``--repeats`` timed blocks of ``--steps``
steps alternate which padding goes first; the table gives the median seconds per step of each and their
ratio. The data loader and DeepSpeed are left out: only the network differs between the two.

Usage:  python bench/bench_padding.py [--steps N] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline.config import JobConfig, load_config
from pipeline.model.networks import Generator, build_models

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import RECIPE  # noqa: E402

PADDINGS = ("reflect", "zeros")
CATEGORIES = 8  # Cityscapes' categories, the recipe's model.semantic_classes


def recipe_config(padding: str) -> JobConfig:
    """The default config with the quality benchmark's recipe for the generator and its crop, and
    ``padding``."""
    chosen = [o for o in RECIPE if o.startswith(("model.", "loader.crop=", "loader.batch_size="))]
    return load_config(overrides=[*chosen, f"model.padding={padding}"])


def time_steps(generator: Generator, x: torch.Tensor, target: torch.Tensor, steps: int) -> float:
    """Seconds per step of ``steps`` MSE steps of the residual output (Adam)."""
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(steps):
        loss = (generator(x) - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per padding")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the benchmark's: 1)")
    args = parser.parse_args()
    if min(args.steps, args.repeats, args.threads) < 1:
        parser.error("--steps, --repeats and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    generators = {}
    for padding in PADDINGS:
        cfg = recipe_config(padding)
        torch.manual_seed(0)
        generators[padding], _ = build_models(cfg.model, CATEGORIES, use_instance=False)
    height, width = cfg.loader.crop
    torch.manual_seed(1)
    x = torch.rand(cfg.loader.batch_size, generators["zeros"].hparams["input_nc"], height, width) * 2 - 1
    target = (x[:, -3:] + 0.05 * torch.randn_like(x[:, -3:])).clamp(-1, 1)
    for generator in generators.values():
        time_steps(generator, x, target, 3)  # warm-up
    seconds: dict[str, list[float]] = {p: [] for p in PADDINGS}
    for repeat in range(args.repeats):
        for padding in PADDINGS if repeat % 2 == 0 else PADDINGS[::-1]:
            seconds[padding].append(time_steps(generators[padding], x, target, args.steps))
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    model = cfg.model
    print(f"generator: ngf={model.ngf} n_downsample={model.n_downsample} n_blocks={model.n_blocks} "
          f"norm={model.norm}; batch {cfg.loader.batch_size} x {height}x{width}; "
          f"{args.repeats} blocks of {args.steps} steps each")  # fmt: skip
    medians = {p: statistics.median(s) for p, s in seconds.items()}
    for padding, median in medians.items():
        low, high = min(seconds[padding]), max(seconds[padding])
        print(f"  {padding:>7}: {median:.4f} s/step (blocks {low:.4f} to {high:.4f})")
    print(f"  zeros / reflect: {medians['zeros'] / medians['reflect']:.3f} of the time per step")


if __name__ == "__main__":
    main()
