"""Generator step benchmark: pix2pixHD's layers against the quality benchmark's, per training step.

Times the quality benchmark's phase-3 step in fp32 (``bench_quality.RECIPE``'s generator and crop: the
residual output, MSE against the original, backward, Adam; the benchmark itself trains in bf16 autocast
where that is the faster, ``bench/step_pace.py``) with five generators that differ only in four settings:
``model.padding`` (``reflect``: pix2pixHD's reflection-pad layers; ``zeros``: padded inside the convs),
``model.end_kernel`` (7: pix2pixHD's 7x7 front conv and heads; 3), ``model.activation`` (pix2pixHD's
``relu``; ``leaky_relu``) and ``model.semantic_modulation`` (off, pix2pixHD's; on: the residual blocks
scaled and shifted by the classes). All five run in one process, from the same seed and on the same
batch, on one CPU thread (``--threads``). After a warm-up, ``--repeats`` timed blocks of ``--steps`` steps
alternate the order of the generators; the table gives the median seconds per step of each and its ratio
to pix2pixHD's. The data loader and DeepSpeed are left out: only the network differs.

Usage:  python bench/bench_generator_step.py [--steps N] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

from pipeline.model.networks import build_models

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import RECIPE  # noqa: E402
from step_pace import CATEGORIES, step_batch, step_config, time_steps  # noqa: E402

# (model.padding, model.end_kernel, model.activation, model.semantic_modulation): pix2pixHD's first, then
# the quality benchmark's since runs 31, 38 and 42, then with the semantic modulation
VARIANTS = (
    ("reflect", 7, "relu", False),
    ("zeros", 7, "relu", False),
    ("zeros", 3, "relu", False),
    ("zeros", 3, "leaky_relu", False),
    ("zeros", 3, "leaky_relu", True),
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per generator")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the benchmark's: 1)")
    args = parser.parse_args()
    if min(args.steps, args.repeats, args.threads) < 1:
        parser.error("--steps, --repeats and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    generators = {}
    for variant in VARIANTS:
        padding, kernel, activation, modulation = variant
        cfg = step_config(RECIPE, f"model.padding={padding}", f"model.end_kernel={kernel}",
                          f"model.activation={activation}",
                          f"model.semantic_modulation={str(modulation).lower()}")  # fmt: skip
        torch.manual_seed(0)
        generators[variant], _ = build_models(cfg.model, CATEGORIES, use_instance=False)
    height, width = cfg.loader.crop
    x, target = step_batch(cfg, generators[VARIANTS[0]])
    for generator in generators.values():
        time_steps(generator, x, target, 3)  # warm-up
    seconds: dict[tuple[str, int, str, bool], list[float]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
            seconds[variant].append(time_steps(generators[variant], x, target, args.steps))
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    model = cfg.model
    print(f"generator: ngf={model.ngf} n_downsample={model.n_downsample} n_blocks={model.n_blocks} "
          f"norm={model.norm}; batch {cfg.loader.batch_size} x {height}x{width}; "
          f"{args.repeats} blocks of {args.steps} steps each")  # fmt: skip
    medians = {v: statistics.median(s) for v, s in seconds.items()}
    for variant, median in medians.items():
        padding, kernel, activation, modulation = variant
        low, high = min(seconds[variant]), max(seconds[variant])
        ratio = median / medians[VARIANTS[0]]
        print(f"  padding={padding:<7} end_kernel={kernel} activation={activation:<10} "
              f"semantic_modulation={modulation!s:<5}: {median:.4f} s/step "
              f"(blocks {low:.4f} to {high:.4f}), {ratio:.3f} of pix2pixHD's time")  # fmt: skip


if __name__ == "__main__":
    main()
