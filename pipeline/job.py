"""The main job, end to end: shards -> three phases -> R-PD evaluation, all in one tracked run."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from pipeline.config import JobConfig
from pipeline.evaluate import evaluate
from pipeline.shards import build_shards, format_summary
from pipeline.tracking import default_tracking_uri, make_tracker, run_tags
from pipeline.trainer import train


def run(cfg: JobConfig) -> Path:
    """Run the whole pipeline on ``cfg``; return the evaluation folder.

    Training resumes from its newest complete checkpoint, so a rerun after a crash (or of a
    finished job) picks up where the last one stopped instead of starting over.
    """
    print(format_summary(build_shards(cfg)), flush=True)
    tracker = make_tracker(cfg)
    with tracker.start_run(cfg.name, params=cfg.flat(), tags={**run_tags(cfg), "job": "main"}):
        exports = train(cfg, phases=[1, 2, 3], resume=True, tracker=tracker, run_name="train")
        results = evaluate(cfg, models=[str(exports[3])], tracker=tracker)
    print(f"\nR-PD results: {results.resolve()} (rpd_mean.csv, rpd_*.png, crops/)")
    print(f"Generators:   {exports[3].parent.parent.resolve()}/phase{{1,2,3}}/generator.safetensors")
    if cfg.tracking.enabled:
        uri = default_tracking_uri(cfg.tracking.uri)
        print(f"MLflow:       {sys.executable} -m mlflow ui --backend-store-uri {shlex.quote(uri)}")
    return results
