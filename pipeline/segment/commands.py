"""``python -m pipeline segment``: train a segmenter on the job's shards and export it."""

from __future__ import annotations

import argparse
import json

from pipeline.config import JobConfig
from pipeline.segment.recipe import SegmentTraining


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The segment command's own options (the shards and loader come from the job config)."""
    defaults = SegmentTraining()
    p.add_argument("--output", default=defaults.output, help="segmenter file to write (.safetensors)")
    p.add_argument("--architecture", default=defaults.architecture, help="a registered segmenter")
    p.add_argument("--variant", default="b0", help="SegFormer size: b0, b1 or b2")
    p.add_argument("--backbone", default="", help="ImageNet encoder weights (file or save_pretrained folder)")
    p.add_argument("--init-from", default="", help="start from this weights file (same architecture/classes)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument(
        "--originals", type=float, default=defaults.originals, help="share of batches on originals"
    )
    p.add_argument("--seed", type=int, default=defaults.seed)


def run(args: argparse.Namespace, cfg: JobConfig) -> int:
    from pipeline.segment.base import SegmenterError, read_spec, weights_digest
    from pipeline.segment.train import train_segmenter

    options: dict[str, object] = {}
    if args.architecture == "segformer":
        options = {"variant": args.variant, "backbone": args.backbone}
    training = SegmentTraining(
        output=args.output,
        architecture=args.architecture,
        options=options,
        init_from=args.init_from,
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        originals=args.originals,
        seed=args.seed,
    )
    try:
        path = train_segmenter(cfg, training)
    except SegmenterError as err:
        raise SystemExit(f"error: {err}") from None
    spec = read_spec(path)
    print(json.dumps({"file": str(path), "sha256": weights_digest(path), **spec}, indent=1))
    return 0
