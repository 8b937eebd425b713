"""The perception-distortion Pareto front of a sweep, and a training config for each of its points.

A trial is on the front when no other completed trial is at least as good on both axes and better on one:
distortion is ``val_psnr`` (higher is better), perception ``val_niqe`` (lower is better). The sweep writes
``pareto.csv`` and ``pareto.png`` in its experiment folder and, per front point, ``pareto/<trial_id>.yaml``:
the sweep's own configuration with that trial's values (its phase-2 loss weights), ready for
``python -m pipeline train --phases 2,3 --config pareto/<trial_id>.yaml``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.atomic import atomic_path, write_atomic
from pipeline.config import JobConfig, with_overrides

DISTORTION = "val_psnr"  # maximised
PERCEPTION = "val_niqe"  # minimised
CSV_FILE = "pareto.csv"
PLOT_FILE = "pareto.png"
CONFIG_DIR = "pareto"


@dataclass(frozen=True)
class Point:
    """One completed trial on the (distortion, perception) plane."""

    trial_id: str
    psnr: float
    niqe: float
    params: dict[str, Any]
    generator: str = ""


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as good as ``b`` on both axes and strictly better on one."""
    return a.psnr >= b.psnr and a.niqe <= b.niqe and (a.psnr > b.psnr or a.niqe < b.niqe)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The non-dominated points with finite scores, by PSNR descending (NIQE ascending along the front)."""
    finite = [p for p in points if math.isfinite(p.psnr) and math.isfinite(p.niqe)]
    front = [p for p in finite if not any(dominates(q, p) for q in finite)]
    return sorted(front, key=lambda p: (-p.psnr, p.niqe, p.trial_id))


def front_config(cfg: JobConfig, point: Point, output_dir: Path) -> JobConfig:
    """``cfg`` (the sweep's own configuration, not a trial's shortened one) with the point's values and
    its own training folder."""
    return with_overrides(cfg, {**point.params, "train.output_dir": str(output_dir)})


def write_front_configs(cfg: JobConfig, front: Sequence[Point], experiment: Path) -> dict[str, Path]:
    """One YAML config per front point under ``<experiment>/pareto/``; returns ``{trial_id: file}``.

    Each trains into ``<experiment>/pareto/<trial_id>/`` from the sweep's ``train.init_from``."""
    folder = experiment / CONFIG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for point in front:
        trained = front_config(cfg, point, folder / point.trial_id)
        tree = json.loads(json.dumps(trained.to_dict()))  # plain lists and scalars for safe_dump
        head = (
            f"# Pareto point of sweep {experiment.name}, trial {point.trial_id}: "
            f"val_psnr {point.psnr:.4f}, val_niqe {point.niqe:.4f}\n"
            f"#   python -m pipeline train --phases 2,3 --config {folder / (point.trial_id + '.yaml')}\n"
        )
        path = folder / f"{point.trial_id}.yaml"
        write_atomic(path, head + yaml.safe_dump(tree, sort_keys=False))
        files[point.trial_id] = path
    return files


def write_csv(path: Path, points: Sequence[Point], front: Sequence[Point], configs: dict[str, Path]) -> None:
    """Every completed trial, ``on_front`` marking the non-dominated ones; front points first."""
    keys = sorted({k for p in points for k in p.params})
    on_front = {p.trial_id for p in front}
    ordered = [*front, *sorted((p for p in points if p.trial_id not in on_front), key=lambda p: -p.psnr)]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_id", "on_front", DISTORTION, PERCEPTION, *keys, "generator", "config"])
        for p in ordered:
            config = str(configs.get(p.trial_id, ""))
            row = [p.trial_id, int(p.trial_id in on_front), p.psnr, p.niqe]
            writer.writerow([*row, *(p.params.get(k, "") for k in keys), p.generator, config])


def plot_front(
    path: Path, points: Sequence[Point], front: Sequence[Point], baseline: dict[str, float] | None = None
) -> None:
    """PSNR against NIQE: every completed trial, the front as a line, the codec as a reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([p.niqe for p in points], [p.psnr for p in points], c="0.6", label="trials")
    ax.plot([p.niqe for p in front], [p.psnr for p in front], "o-", c="C3", label="Pareto front")
    for p in front:
        ax.annotate(p.trial_id, (p.niqe, p.psnr), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if baseline and math.isfinite(baseline.get(DISTORTION, math.nan)):
        ax.scatter([baseline[PERCEPTION]], [baseline[DISTORTION]], marker="x", c="k", label="codec")
    ax.set_xlabel("NIQE (perception, lower is better)")
    ax.set_ylabel("PSNR dB (distortion, higher is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
