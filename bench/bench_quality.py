"""Quality benchmark: does codec-SE beat its codec on frames training never saw, and do semantics help?

From scratch, on the embedded Cityscapes sample at 512x256 with HEVC at four QPs:

1. shards with three disjoint splits (``configs/default.yaml``): frankfurt (10 frames) trains, munster (2)
   validates, lindau (10) is reported; ``--extra-size 1024x512`` also builds the training frames at that
   size (those alone, ``shards.splits``) and trains on them (``loader.extra_shards``; runs 1 to 53 did);
2. the codec-SE generator and its zero-semantics ablation are trained side by side, one process and one
   CPU thread each, with the same recipe and steps (``RECIPE`` below): by default the most that fit the
   budget at the pace of the recipe's step, timed on this machine once the shards are built
   (``bench/step_pace.py``; ``--steps N`` fixes them), its forward pass in bf16 autocast where that step
   is the faster here, else in fp32 (``AUTOCAST`` below); each validates on munster five times and exports
   its best step (the codec itself, step 0, included);
3. both are evaluated with ``python -m pipeline evaluate``'s code on the lindau frames (the figure) and on
   the training frames (to show over-fitting, ``eval.allow_training_frames``), the two side by side, one
   process per core.

It prints, per QP: bpp (codec bits, and total with codec-SE's lossless label map: on categories, the class
map, :mod:`pipeline.eval.label_rate`), PSNR, MS-SSIM and NIQE of the codec, codec-SE and the ablation; the
PSNR gains on held-out and on training frames side by side; the mean scale each model's encoder sent for
its correction (with ``model.correction_scale=frame``: below 1 where the model over-corrects the held-out
frames; ``-`` with the recipe's per-part gains);
codec-SE's held-out gain with its own map withheld (``eval.withheld_maps``: the same weights on zero
semantics, no label bits; what the map adds to that model, free of the training noise between two models);
codec-SE's held-out gain with its encoder choosing frame by frame whether to send the map
(``eval.map_choice``: the map only where the squared error it removes beats what its bits would remove
spent on HEVC itself; a flag bit a frame), its total bpp and the share of frames sent their map; the
held-out gains frame by frame (codec-SE and the ablation against HEVC, codec-SE against the ablation and
against itself without its map: mean, 95 % interval over the frames, worst frame, frames that gained;
:mod:`pipeline.eval.gains`); the BD-rates against HEVC on codec bits and on total bits (codec-SE, the
ablation and codec-SE with the map chosen); and the held-out BD-rates of HEVC, codec-SE and the ablation
against the reference codecs (``eval.reference_codecs``: AVIF and JPEG XL). The elapsed wall time of every
stage is printed too; the budget (``--budget-min``, default 15) is what the whole script must fit in on 2
cores.

With ``--segmenter FILE`` (a segmenter trained on the training frames, ``python -m pipeline segment``) a
third model is trained beside them on the label maps that segmenter predicts from the decoded image
(``data.label_source=decoder``: 0 label bits), the same segmenter judges downstream accuracy (mIoU against the
ground truth, ``eval.segmenter``), and a second table gives per QP the PSNR gains of codec-SE on ground-truth
maps and on decoder maps, each at its total bits, and the mIoU of every reconstruction. Three models share
the 2 cores then, so fewer steps fit the budget (run 64, docs/quality_runs.md: 4000 steps in 13.6 minutes).

The splits are ``configs/default.yaml``'s; ``--set "data.holdout=[...]"`` chooses others (e.g. lindau
training and frankfurt held out), and the printed labels follow.

With ``--seeds N`` each model is trained N times, with ``train.seed`` and the N-1 seeds after it, one pair
after the other (fitted steps share the budget among the seeds), and a last table gives per QP the held-out
gains of every seed's models: their mean, lowest and highest (and for codec-SE over its ablation the 95 %
Student-t interval of the mean over the seeds), and in how many seeds codec-SE is ahead of its ablation.
The tables above it are those of the first seed. The frame intervals say which frames were
scored; only this table says how much another training run moves the gains.

Usage:  python bench/bench_quality.py [--steps N] [--budget-min M] [--seeds N] [--keep DIR]
                                      [--extra-size WxH|none] [--set KEY=VALUE] [--segmenter FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

# No progress bars, here (the evaluation) and in the training processes started below, which inherit the
# variable: tqdm reads it once, when the pipeline imports it, hence before those imports.
os.environ.setdefault("TQDM_DISABLE", "1")

from pipeline.config import (  # noqa: E402
    REPO_ROOT,
    JobConfig,
    TrainConfig,
    flatten,
    load_config,
    with_overrides,
)
from pipeline.data.shards import build_shards  # noqa: E402
from pipeline.eval.evaluate import evaluate  # noqa: E402
from pipeline.eval.gains import SEMANTICS_SUFFIX, WITHHELD_SUFFIX, Gain, ci95_half_width, format_gains  # noqa: E402
from pipeline.eval.methods import CHOSEN_SUFFIX  # noqa: E402
from pipeline.eval.report import BDRATE_FILE, format_reference_bdrate, means_by_curve  # noqa: E402
from pipeline.model.export import read_spec  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from sizes import frame_size  # noqa: E402
from step_pace import step_seconds  # noqa: E402

# The CPU recipe (configs/presets/cpu_recipe.yaml, with the figures behind each of its values) as the
# overrides each training is given; its DeepSpeed file autocasts the forward pass to bf16 (AUTOCAST), and
# FP32 is the default file, taken where bf16 is not the faster step on this machine (budget_steps).
RECIPE_FILE = REPO_ROOT / "configs" / "presets" / "cpu_recipe.yaml"


def preset_overrides(tree: dict[str, Any]) -> list[str]:
    """A preset's settings as ``key=value`` overrides (``model.ngf=16``, ``loader.crop=[128, 256]``)."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in flatten(tree).items()]


PRESET = yaml.safe_load(RECIPE_FILE.read_text())
RECIPE = preset_overrides(PRESET)
AUTOCAST = next(o for o in RECIPE if o.startswith("train.deepspeed_config="))
FP32 = f"train.deepspeed_config={TrainConfig.deepspeed_config}"  # the default
QUALITIES: list[int] = PRESET["loader"]["qualities"]

# The steps: the most, in hundreds, that fit the budget on the machine that runs the script (``--steps N``
# fixes them). The same script has trained at paces 3.5 times apart on this project's development
# machines (runs 21 to 26), so a fixed count either wastes the budget or overruns it. Once the shards are
# built, the recipe's bare step is timed in as many processes side by side as models train
# (step_pace.step_seconds, in both precisions) and the rest of the run is reckoned in those steps' time, with
# the costs of run 49 (3600 steps; 0.176 and 0.183 s a bare step, timed right after it): a step of the
# trainer (its data, moving average and DeepSpeed) costs STEP_COST bare steps, a training's start, its
# validation of the codec at step 0 and its later validations TRAIN_FIXED, and the evaluation of one pair
# of models EVAL_COST, the last two in bare fp32 steps (they run in fp32). Run 60 (the first in bf16
# autocast; 0.143 s a bare bf16 step and 0.266 in fp32) ran over its budget, 15.7 minutes: its 5200 steps
# trained in 659 s, 0.74 of a bare step each once TRAIN_FIXED is taken off (fitted at 0.71, from the munster
# pair above), and its evaluation took 217 s, 816 bare fp32 steps (run 56: 101 s at 0.159 s, 635).
# STEP_COST and TRAIN_FIXED are run 60's; the fitted runs since have trained at 0.68 to 0.77 of a bare step
# (runs 71, 72, 77 and 80). EVAL_COST is re-fitted to those four runs, whose evaluations took 424 to 575
# bare fp32 steps (71 to 88 s over each run's printed fp32 pace, by hand), where run 60's 820 had reckoned
# 37 to 78 s more than each took. With the semantic modulation the fitted runs 82 and 83 trained at 0.76 and
# 0.81 of a bare step (by hand) and took 13.4 and 14.3 minutes: the second beyond PLANNED_SHARE's 13.5,
# within the budget. Two runs do not re-fit STEP_COST; more such overruns would.
# Validations after step 0, whatever the steps: under the cosine decay the curve rises to its end (every
# model of runs 29 to 49 but run 41's stalled codec-SE exported its last step), so more would cost steps.
VALIDATIONS = 4
STEP_COST = {FP32: 1.0, AUTOCAST: 0.75}  # the trainer's step in bare steps of its own precision
TRAIN_FIXED = 240 + 40 * VALIDATIONS  # the start and step 0, then 40 for each later validation
EVAL_COST = 600
# The other evaluation jobs, in shares of the held-out pair's (EVAL_COST). Run 63 (--segmenter, three jobs
# on two workers) evaluated in 183 s where the fit had reckoned two full rounds, 454 s, and fitted 1600
# steps, 7.8 minutes in all. Its jobs, scored again one by one, two side by side (a throwaway script):
# the held-out pair 156 s, the training frames' pair 60 and 63 s, codec-SE on decoder maps 120 s.
TRAIN_EVAL_SHARE = 0.4
DECODER_EVAL_SHARE = 0.77
PLANNED_SHARE = 0.9  # of the budget: the machine's pace drifts (runs 60 to 62: 0.134 to 0.143 s a bf16 step)
# a floor: 1400 steps gained a half to three quarters of what 5000 did (runs 33 and 34 against 25 and 26)
MIN_STEPS = 1000
# The first seed's evaluation on the held-out frames, in the work folder (bench/seed_runs.py reads it).
HELD_OUT_EVAL = "eval-test"
# The two curves every table compares: codec-SE and its zero-semantics ablation.
SE = "hevc-SE"
ABLATION = SE + SEMANTICS_SUFFIX
# Decoded training samples kept in memory (MiB per model): the PNGs are decoded once, not every epoch.
CACHE_MB = 512

# ``--extra-size WxH`` also builds the training frames at that size and trains on them (loader.extra_shards):
# more content per frame, at another scale, each with HEVC's own artifacts at that size. Off since run 54:
# codec-SE validated on munster as well or better without the training frames at 1024x512, which runs 1 to
# 53 trained on, at 2000, 2800, 3200 and 3600 steps; a first 3600-step check that favoured them did not
# repeat (docs/recipe_choices.md, "Checked after run 53").
EXTRA_SIZE = "none"


def size_choice(text: str) -> tuple[int, int] | None:
    """``--extra-size``'s value: ``(width, height)`` for WxH in pixels, ``None`` for ``none``."""
    if text == "none":
        return None
    try:
        return frame_size(text)
    except argparse.ArgumentTypeError:
        message = f"expected none or WIDTHxHEIGHT (e.g. 1024x512), got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def validation_every(steps: int) -> int:
    """Steps between validations, in hundreds: VALIDATIONS of them after step 0, the last at ``steps``."""
    return math.ceil(steps / (VALIDATIONS * 100)) * 100


def overrides(work: Path, steps: int) -> list[str]:
    return [
        f"shards.output={work / 'shards'}",
        f"shards.codecs=[{{name: hevc, qualities: {QUALITIES}}}]",
        *RECIPE,
        f"phase3.steps={steps}",
        f"validate.every={validation_every(steps)}",
        f"train.checkpoint_every={steps}",
        "train.log_every=100",
        "tracking.enabled=false",
        f"loader.cache_mb={CACHE_MB}",
    ]


def fitted_steps(
    budget_s: float, spent_s: float, step_s: float, unit: float, seeds: int, evaluations: float
) -> int:
    """The most phase-3 steps, in hundreds, that each of ``seeds`` trainings can take in what
    PLANNED_SHARE of ``budget_s`` leaves after ``spent_s`` and ``evaluations`` held-out pair evaluations, at
    ``step_s`` seconds a trainer's step, the fixed costs reckoned at ``unit`` seconds a bare fp32 step
    (the start, validation and evaluation run in fp32); below MIN_STEPS the budget is refused."""
    left = budget_s * PLANNED_SHARE - spent_s - unit * EVAL_COST * evaluations
    steps = int((left / seeds - unit * TRAIN_FIXED) / step_s) // 100 * 100
    if steps < MIN_STEPS:
        raise SystemExit(
            f"at {step_s:.3f} s a step, {seeds} seed(s) fit {max(steps, 0)} steps in a {budget_s / 60:g}-"
            f"minute budget, under the floor of {MIN_STEPS}: give more --budget-min, or --steps N"
        )
    return steps


def budget_steps(budget_s: float, start: float, seeds: int, decoder_maps: bool) -> tuple[int, str]:
    """:func:`fitted_steps` at this machine's paces, timed now, as the models will train (side by side),
    and the precision they train in: the recipe's bf16 autocast where its trainer's step is the faster
    here, else fp32 (its DeepSpeed-file override)."""
    models = 3 if decoder_maps else 2
    timed = time.perf_counter()
    paces = dict(zip((AUTOCAST, FP32), step_seconds([RECIPE, [*RECIPE, FP32]], models), strict=True))
    precision = min(paces, key=lambda p: paces[p] * STEP_COST[p])
    rounds = evaluation_rounds(seeds, decoder_maps)
    step_s = paces[precision] * STEP_COST[precision]
    steps = fitted_steps(budget_s, time.perf_counter() - start, step_s, paces[FP32], seeds, rounds)
    print(f"steps: {steps}, the most that fit the budget at {paces[AUTOCAST]:.3f} s a bare step in bf16 "
          f"autocast and {paces[FP32]:.3f} in fp32 ({models} side by side, timed in "
          f"{time.perf_counter() - timed:.0f} s; bench/step_pace.py); training in "
          f"{'bf16 autocast' if precision == AUTOCAST else 'fp32'}")  # fmt: skip
    return steps, precision


def evaluation_rounds(seeds: int, decoder_maps: bool) -> float:
    """The evaluation's wall time in held-out pair evaluations (EVAL_COST): the jobs of
    :func:`scored_in_parallel` in the order main submits them (the held-out pair, the training frames' pair,
    codec-SE on decoder maps, one held-out pair a further seed), each taken by the first free worker."""
    shares = [1.0, TRAIN_EVAL_SHARE] + [DECODER_EVAL_SHARE] * decoder_maps + [1.0] * (seeds - 1)
    free = [0.0] * evaluation_workers(len(shares))
    for share in shares:
        free[free.index(min(free))] += share
    return max(free)


def train_all(
    cfg_args: list[str], work: Path, segmenter: Path | None, seed: int, tag: str
) -> dict[str, Path]:
    """codec-SE and the ablation (and codec-SE on decoder maps, with a segmenter) in one process and one
    thread each, with the same budget and ``train.seed``; their folders under ``work/train`` end in
    ``tag``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs, logs = {}, {}
    variants = [("codec-SE", []), ("ablation", ["model.zero_semantics=true"])]
    if segmenter is not None:
        variants.append(("codec-SE-dec", ["data.label_source=decoder", f"data.segmenter={segmenter}"]))
    for name, extra in variants:
        out = work / "train" / f"{name}{tag}"
        logs[name] = (work / f"train-{name}{tag}.log").open("w")
        command = [sys.executable, "-m", "pipeline", "train", "--phases", "3", *cfg_args,
                   f"train.seed={seed}", f"train.output_dir={out}", *extra]  # fmt: skip
        procs[name] = (subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=logs[name],
                                        stderr=subprocess.STDOUT), out)  # fmt: skip
    exports = {}
    for name, (proc, out) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"training {name} failed; see {logs[name].name}")
        logs[name].close()
        exports[name] = out / "phase3" / "generator.safetensors"
    return exports


def f(row: dict[str, Any], key: str) -> float:
    return float(row[key])


def table(held: dict, train: dict, report: dict) -> str:
    lines = [
        f"{'QP':>3} {'bpp':>6} {'bpp+map':>7} | {'PSNR hevc':>9} {'SE':>7} {'abl':>7} | "
        f"{'dPSNR SE':>8} {'abl':>7} {'train SE':>8} {'abl':>7} | "
        f"{'MS-SSIM hevc':>12} {'SE':>7} {'abl':>7} | {'NIQE hevc':>9} {'SE':>6} {'abl':>6} | "
        f"{'scale SE':>8} {'abl':>5} | {'SE no map':>9} {'SE - no map':>11} | "
        f"{'SE map chosen':>13} {'bpp+map':>7} {'maps':>4}"
    ]
    for q in QUALITIES:
        h, s, a, w = held[("hevc", q)], held[(SE, q)], held[(ABLATION, q)], held[(SE + WITHHELD_SUFFIX, q)]
        c = held[(SE + CHOSEN_SUFFIX, q)]
        th, ts, ta = train[("hevc", q)], train[(SE, q)], train[(ABLATION, q)]
        lines.append(
            f"{q:>3} {f(h, 'bpp_codec'):>6.4f} {f(s, 'bpp_total'):>7.4f} | {f(h, 'psnr'):>9.3f} "
            f"{f(s, 'psnr'):>7.3f} {f(a, 'psnr'):>7.3f} | {f(s, 'psnr') - f(h, 'psnr'):>+8.3f} "
            f"{f(a, 'psnr') - f(h, 'psnr'):>+7.3f} {f(ts, 'psnr') - f(th, 'psnr'):>+8.3f} "
            f"{f(ta, 'psnr') - f(th, 'psnr'):>+7.3f} | {f(h, 'ms_ssim'):>12.5f} {f(s, 'ms_ssim'):>7.5f} "
            f"{f(a, 'ms_ssim'):>7.5f} | {f(h, 'niqe'):>9.3f} {f(s, 'niqe'):>6.3f} {f(a, 'niqe'):>6.3f} | "
            f"{_scale(s):>8} {_scale(a):>5} | {f(w, 'psnr') - f(h, 'psnr'):>+9.3f} "
            f"{f(s, 'psnr') - f(w, 'psnr'):>+11.3f} | {f(c, 'psnr') - f(h, 'psnr'):>+13.3f} "
            f"{f(c, 'bpp_total'):>7.4f} {f(c, 'map_sent'):>4.0%}"
        )
    lines.append("BD-rate vs HEVC (negative = fewer bits at equal quality), held-out frames:")
    for name in (SE, ABLATION, SE + CHOSEN_SUFFIX):
        entry = report["methods"][name]
        if not entry["available"]:
            lines.append(f"  {name}: {entry['reason']}")
            continue
        rates = entry["bd_rate_pct"]
        lines.append(
            f"  {name:<24} PSNR, codec bits {rates['psnr/bpp_codec']:+7.2f} %   total bits "
            f"{rates['psnr/bpp_total']:+7.2f} %   MS-SSIM, codec bits {rates['ms_ssim/bpp_codec']:+7.2f} %"
            f"   total bits {rates['ms_ssim/bpp_total']:+7.2f} %"
        )
    return "\n".join(lines)


def _scale(row: dict[str, Any]) -> str:
    """The mean correction scale the encoder sent (``model.correction_scale``), or ``-`` without one."""
    value = row.get("correction_scale")
    return f"{float(value):.2f}" if value else "-"


def where(cfg: JobConfig, split: str) -> str:
    """Which frames ``split`` holds, in words: the cities (or list file) it was carved out by, or for a
    split others were carved out of, what they left of it."""
    for holdout in cfg.data.holdout:
        if holdout.name == split:
            return ", ".join(
                [*holdout.cities, *([Path(holdout.list_file).name] if holdout.list_file else [])]
            )
    taken = [", ".join(h.cities) or Path(h.list_file).name for h in cfg.data.holdout if h.from_split == split]
    return f"{split} without {', '.join(taken)}" if taken else split


def _tag(seeds: list[int], seed: int) -> str:
    """What tells one seed's models and folders apart: nothing when there is one seed."""
    return f"-seed{seed}" if len(seeds) > 1 else ""


def seeds_table(held: dict[Any, Path], what: str = "seeds") -> str:
    """The held-out gains of codec-SE and the ablation over HEVC, and of codec-SE over the ablation, for
    each seed and their mean: what the frame intervals leave out, how much training noise moves them.
    ``held`` maps each seed (or run, ``what`` says which: ``bench/seed_runs.py``) to its evaluation folder."""
    means = {seed: means_by_curve(folder) for seed, folder in held.items()}
    rates = {seed: json.loads((folder / BDRATE_FILE).read_text())["methods"] for seed, folder in held.items()}
    seeds = list(held)
    lines = [
        f"held-out gains across the {what} {seeds} (mean over the {what} [lowest, highest]; SE - abl also "
        f"± the 95 % interval of its mean over the {what}; every one's models trained anew; NIQE: lower is "
        "better):",
        f"{'QP':>3} | {'SE - hevc':>24} | {'abl - hevc':>24} | {'SE - abl':>32} | SE ahead | "
        f"{'dNIQE SE - abl':>24} | SE lower | {'SE - SE no map':>24} | SE ahead",
    ]
    by_quality: dict[int, dict[str, list[float]]] = {}
    for q in QUALITIES:
        gains = {}
        for name in (SE, ABLATION, SE + WITHHELD_SUFFIX):
            gains[name] = [f(m[(name, q)], "psnr") - f(m[("hevc", q)], "psnr") for m in means.values()]
        by_quality[q] = gains
        diff = [a - b for a, b in zip(gains[SE], gains[ABLATION], strict=True)]
        own = [a - b for a, b in zip(gains[SE], gains[SE + WITHHELD_SUFFIX], strict=True)]
        niqe = [f(m[(SE, q)], "niqe") - f(m[(ABLATION, q)], "niqe") for m in means.values()]
        cells = [_spread(gains[SE]), _spread(gains[ABLATION]), _spread(diff, interval=True)]
        ahead, lower = sum(d > 0 for d in diff), sum(d < 0 for d in niqe)
        lines.append(
            f"{q:>3} | " + " | ".join(cells) + f" | {ahead}/{len(seeds)} {what} | {_spread(niqe)} | "
            f"{lower}/{len(seeds)} {what} | {_spread(own)} | {sum(d > 0 for d in own)}/{len(seeds)} {what}"
        )
    lines.append(each_seed_table(by_quality, seeds, what))
    for name in (SE, ABLATION, SE + CHOSEN_SUFFIX):
        values = [r[name]["bd_rate_pct"]["psnr/bpp_codec"] for r in rates.values() if r[name]["available"]]
        totals = [r[name]["bd_rate_pct"]["psnr/bpp_total"] for r in rates.values() if r[name]["available"]]
        each, each_total = (" ".join(f"{v:+.2f}" for v in vs) for vs in (values, totals))
        lines.append(
            f"  {name:<24} PSNR BD-rate vs HEVC, codec bits {np.mean(values):+7.2f} % ({what}: {each}), "
            f"total bits {np.mean(totals):+7.2f} % ({what}: {each_total})"
        )
    return "\n".join(lines)


def each_seed_table(by_quality: dict[int, dict[str, list[float]]], seeds: list[Any], what: str) -> str:
    """One row per seed (or run) of :func:`seeds_table`: its own gains over HEVC at each QP, codec-SE's,
    the ablation's and codec-SE's over the ablation. ``by_quality`` maps each QP to each curve's gains,
    listed in the order of ``seeds``."""
    width = max(len(what), *(len(str(seed)) for seed in seeds))
    qps = " / ".join(str(q) for q in QUALITIES)
    cell = 7 * len(QUALITIES) - 1  # each gain "+0.123" and a space between
    lines = [
        f"  each one's gains in dB at QP {qps}:",
        f"  {what:<{width}} | {'SE - hevc':<{cell}} | {'abl - hevc':<{cell}} | SE - abl",
    ]
    for i, seed in enumerate(seeds):
        se_gains = [by_quality[q][SE][i] for q in QUALITIES]
        ab_gains = [by_quality[q][ABLATION][i] for q in QUALITIES]
        cells = [se_gains, ab_gains, [a - b for a, b in zip(se_gains, ab_gains, strict=True)]]
        lines.append(f"  {seed!s:<{width}} | " + " | ".join(" ".join(f"{v:+.3f}" for v in c) for c in cells))
    return "\n".join(lines)


def _spread(values: list[float], interval: bool = False) -> str:
    """``mean [lowest, highest]``; with ``interval`` also the half-width of the mean's 95 % Student-t
    interval over the values (``nan`` for one value): each value is one training run's, so this is the
    interval that says whether a mean over seeds is more than their noise."""
    mean = f"{np.mean(values):+.3f}"
    if interval:
        mean += f" ±{ci95_half_width(values):.3f}"
    return f"{mean} [{min(values):+.3f}, {max(values):+.3f}]"


def reference_table(report: dict[str, Any]) -> str:
    """The BD-rates of every curve of ``report`` (its ``bdrate.json``) against each reference codec."""
    if not report.get("references"):
        return "no reference codecs (eval.reference_codecs is empty)"
    return format_reference_bdrate(report)


def decoder_table(held: dict, held_dec: dict, report: dict, report_dec: dict, accuracy: dict) -> str:
    """Codec-SE on ground-truth maps and on decoder maps, each at its total bits, with the mIoU of every
    reconstruction (the judge is the segmenter that made the decoder maps)."""
    lines = [
        f"decoder label maps (0 label bits) beside ground-truth maps, held-out; mIoU judged by "
        f"{accuracy['judge']['name']}; original frames' mIoU {accuracy['original']['miou']:.4f}",
        f"{'QP':>3} {'bpp':>6} {'bpp+map':>7} | {'dPSNR SE':>8} {'SE-dec':>7} {'abl':>7} | "
        f"{'mIoU hevc':>9} {'SE':>7} {'SE-dec':>7} {'abl':>7}",
    ]
    for q in QUALITIES:
        h, s, a, d = held[("hevc", q)], held[(SE, q)], held[(ABLATION, q)], held_dec[(SE, q)]
        gains = " ".join(f"{f(m, 'psnr') - f(h, 'psnr'):>+{w}.3f}" for m, w in ((s, 8), (d, 7), (a, 7)))
        mious = " ".join(f"{f(m, 'miou'):>{w}.4f}" for m, w in ((h, 9), (s, 7), (d, 7), (a, 7)))
        lines.append(f"{q:>3} {f(h, 'bpp_codec'):>6.4f} {f(s, 'bpp_total'):>7.4f} | {gains} | {mious}")
    lines.append("BD-rate (PSNR) vs HEVC on total bits (codec bits + label map):")
    for name, entry in (
        (f"{SE} (gt maps)", report["methods"][SE]),
        (f"{SE} (decoder maps)", report_dec["methods"][SE]),
    ):
        rate = entry["bd_rate_pct"]["psnr/bpp_total"] if entry["available"] else None
        lines.append(
            f"  {name:<24} " + (f"{rate:+7.2f} %" if rate is not None else entry.get("reason", "n/a"))
        )
    return "\n".join(lines)


def scored(cfg: JobConfig, models: list[Path], split: str, out: Path, on_training: bool, **more: Any) -> Path:
    args = {"eval.split": split, "eval.output_dir": str(out), "eval.crops": 0, **more}
    if on_training:  # the reference codecs, withheld and chosen maps are read on the held-out frames only
        args["eval.reference_codecs"] = []
    else:
        args["eval.withheld_maps"] = True
        args["eval.map_choice"] = True
    run = with_overrides(cfg, {**args, "eval.allow_training_frames": on_training})
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the table below says it all
        return evaluate(run, [str(m) for m in models])


def _scored_job(threads: int, job: tuple[Any, ...]) -> Path:
    torch.set_num_threads(threads)
    *args, more = job
    return scored(*args, **more)


def evaluation_workers(jobs: int) -> int:
    """The processes :func:`scored_in_parallel` scores ``jobs`` jobs in: one a core, at most one a job."""
    return min(jobs, os.cpu_count() or 1)


def scored_in_parallel(jobs: dict[str, tuple[Any, ...]]) -> dict[str, Path]:
    """:func:`scored` of every job (its arguments, the last one its ``more``), in as many processes as there
    are jobs and cores, the cores shared out as threads: the evaluation's codecs, NIQE and MS-SSIM run on one
    core each, so one process per core keeps both cores busy where one process of two threads would not."""
    cores = os.cpu_count() or 1
    workers = evaluation_workers(len(jobs))
    spawn = multiprocessing.get_context("spawn")  # no fork of a process holding torch's thread pools
    with ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool:
        futures = {
            name: pool.submit(_scored_job, max(1, cores // workers), job) for name, job in jobs.items()
        }
        return {name: future.result() for name, future in futures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", type=int, help="phase-3 steps of each model (default: the most that fit --budget-min)"
    )
    parser.add_argument(
        "--budget-min", type=float, default=15.0, help="minutes the whole script may take; the steps fit it"
    )
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    parser.add_argument(
        "--extra-size",
        type=size_choice,
        default=EXTRA_SIZE,
        help="WxH: the training frames also built at this size (loader.extra_shards); 'none': not",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train each model with this many seeds (train.seed, +1, ...), one pair after the other, and "
        "print the held-out gains across them; fitted steps share the budget among them",
    )
    parser.add_argument("--set", action="append", default=[], help="one more config override (repeatable)")
    parser.add_argument(
        "--segmenter", type=Path, help="segmenter file: judge mIoU and train codec-SE on its decoder maps"
    )
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1 or args.seeds < 1 or args.budget_min <= 0:
        parser.error("--steps and --seeds must be at least 1, --budget-min above 0")
    start = time.perf_counter()
    print(
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
        f"torch {version('torch')}, deepspeed {version('deepspeed')}, python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="jpdse-bench-quality-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # the shards do not depend on the steps, which may be fitted to the budget once they are built
        cfg = load_config(None, overrides(work, args.steps or MIN_STEPS) + args.set)
        manifest = build_shards(cfg)
        sizes = {s: e.samples for s, e in manifest.splits.items()}
        extra_shards = []
        print(f"shards: {cfg.data.width}x{cfg.data.height}, HEVC QP {QUALITIES}, frames per split {sizes}")
        if args.extra_size is not None:
            width, height = args.extra_size
            extra = work / f"shards-{width}x{height}"
            # the same label blocks on the content: a map twice the size is down-sampled twice as much
            downsample = max(1, cfg.shards.label_downsample * width // cfg.data.width)
            size = {"data.width": width, "data.height": height, "shards.output": str(extra),
                    "shards.label_downsample": downsample, "shards.splits": [cfg.loader.split]}  # fmt: skip
            build_shards(with_overrides(cfg, size))
            extra_shards.append(f"loader.extra_shards=[{extra}]")
            print(f"  training frames also at {width}x{height} (loader.extra_shards)")
        print(f"  built in {time.perf_counter() - start:.0f} s")
        segmenter = args.segmenter.resolve() if args.segmenter else None
        steps, precision = args.steps, AUTOCAST
        if steps is None:
            steps, precision = budget_steps(args.budget_min * 60, start, args.seeds, segmenter is not None)
        fp32 = [] if precision == AUTOCAST else [precision]  # where bf16 is not the faster step here
        cfg_args = overrides(work, steps) + fp32 + args.set + extra_shards
        print(f"recipe: {' '.join(RECIPE)} phase3.steps={steps} validate.every={validation_every(steps)} "
              "(1 process x 1 thread per model)")  # fmt: skip
        if args.set:
            print(f"  with --set {' '.join(args.set)}")
        seeds = [cfg.train.seed + i for i in range(args.seeds)]
        if len(seeds) > 1:
            print(f"  seeds {seeds} (train.seed), one pair of models after the other")
        t = time.perf_counter()
        runs = {}
        for seed in seeds:
            started = time.perf_counter()
            decoder_maps = segmenter if seed == seeds[0] else None  # its table is the first seed's
            runs[seed] = train_all(cfg_args, work, decoder_maps, seed, _tag(seeds, seed))
            if len(seeds) > 1:
                print(f"  seed {seed} trained in {time.perf_counter() - started:.0f} s")
        print(f"  trained in {time.perf_counter() - t:.0f} s")
        for seed, exports in runs.items():
            for name, path in exports.items():
                spec = read_spec(path)
                chosen = spec.selected or {}
                print(f"  {name}{_tag(seeds, seed)}: exported step {chosen.get('step', spec.steps)} of "
                      f"{spec.steps} (best validation PSNR on {where(cfg, cfg.validate.split)})")  # fmt: skip
        t = time.perf_counter()
        exports = runs[seeds[0]]
        models = [exports["codec-SE"], exports["ablation"]]
        judge = {"eval.segmenter": str(segmenter)} if segmenter else {}
        jobs: dict[str, tuple[Any, ...]] = {
            "held": (cfg, models, "test", work / HELD_OUT_EVAL, False, judge),
            "train": (cfg, models, "val", work / "eval-train", True, {}),
        }
        if segmenter is not None:
            source = {"data.label_source": "decoder", "data.segmenter": str(segmenter), **judge}
            decoder_eval = work / f"{HELD_OUT_EVAL}-dec"
            jobs["held_dec"] = (cfg, [exports["codec-SE-dec"]], "test", decoder_eval, False, source)
        for seed in seeds[1:]:
            pair = [runs[seed]["codec-SE"], runs[seed]["ablation"]]
            seed_eval = work / f"{HELD_OUT_EVAL}{_tag(seeds, seed)}"
            jobs[f"seed {seed}"] = (cfg, pair, "test", seed_eval, False, {})
        done = scored_in_parallel(jobs)
        held, train, held_dec = done["held"], done["train"], done.get("held_dec")
        held_seeds = {seeds[0]: held, **{seed: done[f"seed {seed}"] for seed in seeds[1:]}}
        print(f"  evaluated in {time.perf_counter() - t:.0f} s")
        report = json.loads((held / BDRATE_FILE).read_text())
        first = f", seed {seeds[0]}" if len(seeds) > 1 else ""
        trained_on = json.loads((train / BDRATE_FILE).read_text())["frames"]["count"]
        print(f"held-out: {report['frames']['count']} {report['frames']['split']} frames "
              f"({where(cfg, 'test')}); train: the {trained_on} training frames "
              f"({where(cfg, cfg.loader.split)}){first}")  # fmt: skip
        print(table(means_by_curve(held), means_by_curve(train), report))
        print(f"held-out gains frame by frame (of one training run each{first}):")
        print(format_gains([Gain.from_dict(g) for g in report["frame_gains"]]))
        print(reference_table(report))
        if len(seeds) > 1:
            print(seeds_table(held_seeds))
        if held_dec is not None:
            report_dec = json.loads((held_dec / BDRATE_FILE).read_text())
            accuracy = json.loads((held / "segmentation.json").read_text())
            print(decoder_table(means_by_curve(held), means_by_curve(held_dec), report, report_dec, accuracy))
            print("codec-SE on decoder maps against the reference codecs:")
            print(reference_table(report_dec))
        total = (time.perf_counter() - start) / 60
        verdict = "within" if total <= args.budget_min else "OVER"
        print(f"total {total:.1f} min ({verdict} the {args.budget_min:g}-minute budget)")


if __name__ == "__main__":
    main()
