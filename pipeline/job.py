"""The main job, end to end: shards -> three phases per quality -> R-PD evaluation, in one tracked run.

The semantic prior (phase 1) does not see the decoded image, so it is trained once and shared;
phases 2 and 3 are trained per codec quality, one model per codec x quality as in the paper.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, JobConfig
from pipeline.evaluate import evaluate
from pipeline.shards import build_shards, format_summary
from pipeline.tracking import default_tracking_uri, make_tracker, run_tags
from pipeline.trainer import train


def job_qualities(cfg: JobConfig, manifest: dict[str, Any]) -> list[int]:
    """``eval.qualities``, else every quality built for ``loader.codec``."""
    built = sorted(c["quality"] for c in manifest["codecs"].values() if c["codec"] == cfg.loader.codec)
    if not built:
        raise ConfigError(f"loader.codec={cfg.loader.codec!r} was not built; shards.codecs has none of it")
    wanted = sorted(set(cfg.eval.qualities)) or built
    missing = sorted(set(wanted) - set(built))
    if missing:
        raise ConfigError(f"eval.qualities {missing} were not built for {cfg.loader.codec} (built: {built})")
    return list(wanted)


def _for_quality(cfg: JobConfig, quality: int, prior: Path) -> JobConfig:
    out = Path(cfg.train.output_dir) / f"{cfg.loader.codec}_q{quality}"
    return replace(
        cfg,
        loader=replace(cfg.loader, quality=quality),
        train=replace(cfg.train, output_dir=str(out), init_from=str(prior)),
    )


def run(cfg: JobConfig) -> Path:
    """Run the whole pipeline on ``cfg``; return the evaluation folder.

    Training resumes from its newest complete checkpoints, so a rerun after a crash (or of a
    finished job) picks up where the last one stopped instead of starting over.
    """
    manifest = build_shards(cfg)
    print(format_summary(manifest), flush=True)
    qualities = job_qualities(cfg, manifest)
    tracker = make_tracker(cfg)
    with tracker.start_run(cfg.name, params=cfg.flat(), tags={**run_tags(cfg), "job": "main"}):
        prior_dir = str(Path(cfg.train.output_dir) / "prior")
        # Phase 1 zeroes the decoded image; any built quality satisfies the loader.
        loader = replace(cfg.loader, quality=qualities[0])
        prior_cfg = replace(cfg, loader=loader, train=replace(cfg.train, output_dir=prior_dir))
        prior = train(prior_cfg, [1], resume=True, tracker=tracker, run_name="semantic-prior")[1]
        exports = []
        for q in qualities:
            qcfg = _for_quality(cfg, q, prior)
            exports.append(train(qcfg, [2, 3], resume=True, tracker=tracker, run_name=f"train-q{q}")[3])
        results = evaluate(cfg, models=[str(e) for e in exports], tracker=tracker)
    print(f"\nR-PD results: {results.resolve()} (rpd_mean.csv, rpd_*.png, bdrate.json, crops/)")
    print(f"Generators:   {', '.join(str(e) for e in exports)}")
    if cfg.tracking.enabled:
        uri = default_tracking_uri(cfg.tracking.uri)
        print(f"MLflow:       {sys.executable} -m mlflow ui --backend-store-uri {shlex.quote(uri)}")
    return results
