"""``python -m pipeline segment [--config FILE] [segment.steps=N ...] [--resume]``: train a segmenter on the
job's shards and export it (settings: the ``segment`` section of the job config; see
:mod:`pipeline.segment.train`)."""

from __future__ import annotations

import argparse
import json
import os

from pipeline.config import ConfigError, JobConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The segment command's one option; everything else is a config key (``segment.*``, ``loader.*``)."""
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")


def run(args: argparse.Namespace, cfg: JobConfig) -> int:
    """Train, export, register; prints the file, its sha256 and its spec. A segmenter file or option that
    cannot be used is a :class:`ConfigError` (one line, exit 2)."""
    from pipeline.model.export import weights_sha256
    from pipeline.segment.base import SegmenterError, read_spec
    from pipeline.segment.train import train_segmenter

    try:
        path = train_segmenter(cfg, resume=args.resume)
    except SegmenterError as err:
        raise ConfigError(f"segment: {err}") from None
    if int(os.environ.get("RANK", "0")) == 0:  # once per job, not once per rank
        spec = read_spec(path)
        print(json.dumps({"file": str(path), "sha256": weights_sha256(path), **spec}, indent=1))
    return 0
