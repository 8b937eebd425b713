"""``python -m pipeline <command> [--config FILE] [key.sub=value ...]``; ``compress`` and ``decompress``
take no config (``python -m pipeline compress --help``)."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, JobConfig, load_config, with_overrides


def _parse_phases(text: str) -> list[int]:
    try:
        phases = [int(p) for p in text.split(",") if p.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"phases must look like 1,2,3, got {text!r}") from err
    if not phases or any(p not in (1, 2, 3) for p in phases) or phases != sorted(set(phases)):
        raise argparse.ArgumentTypeError(f"phases must be increasing values out of 1,2,3, got {text!r}")
    return phases


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML job config (default: configs/default.yaml)")
        p.add_argument("overrides", nargs="*", help="config overrides, e.g. shards.workers=2")
        return p

    p = command("shards", "build WebDataset shards (image, decoded images, label map)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any input was rejected")
    p = command("train", "run training phases with DeepSpeed (single process, torchrun or deepspeed)")
    p.add_argument("--phases", type=_parse_phases, default=[1, 2, 3], help="e.g. 1,2,3 or 2")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p = command("evaluate", "R-PD evaluation of codec vs codec-SE")
    p.add_argument("--model", action="append", default=[], help="generator file or models:/name@alias")
    command("run", "main job end to end: shards, three phases, evaluation, tracking")
    p = command("segment", "train a segmenter (SegFormer) on the shards' images and label maps, export it")
    from pipeline.segment.commands import add_arguments as add_segment_arguments

    add_segment_arguments(p)
    p = command("tune", "Ray Tune search of the phase-2 perception-distortion loss weights")
    p.add_argument("--resume", action="store_true", help="continue the sweep in tune.output_dir")
    p.add_argument("--address", default="", help="Ray cluster to join (tune.address), e.g. auto or host:6379")
    p = sub.add_parser("tracking-replay", help="log an offline tracking record to an MLflow store")
    p.add_argument("record", help="a .jsonl record written while the store was unreachable")
    p.add_argument("--uri", default="", help="tracking URI (default: $MLFLOW_TRACKING_URI, else local)")
    p.add_argument("--experiment", default="", help="experiment name (default: the recorded one)")
    from pipeline.compress.commands import add_arguments

    add_arguments(
        sub.add_parser("compress", help="image + label map -> one .jse file (prints the bpp of each part)"),
        sub.add_parser("decompress", help=".jse file -> enhanced PNG (or the codec's own output)"),
    )
    return parser


def _dispatch(args: argparse.Namespace, cfg: JobConfig) -> int:
    if args.command == "shards":
        from pipeline.data.shards import build_shards, format_summary

        manifest = build_shards(cfg)
        print(format_summary(manifest))
        return 1 if (args.strict or cfg.shards.strict) and manifest.rejects else 0
    if args.command == "train":
        from pipeline.train.trainer import train

        train(cfg, phases=args.phases, resume=args.resume)
        return 0
    if args.command == "evaluate":
        from pipeline.eval.evaluate import evaluate
        from pipeline.tracking import make_tracker, run_tags

        tracker = make_tracker(cfg)
        with tracker.start_run(f"{cfg.name}-evaluate", params=cfg.flat(), tags=run_tags(cfg)):
            evaluate(cfg, models=args.model, tracker=tracker)
        return 0
    if args.command == "tune":
        from pipeline.train.tune import tune

        try:
            if args.address:
                cfg = with_overrides(cfg, {"tune.address": args.address})
            tune(cfg, resume=args.resume)
        except KeyboardInterrupt as err:
            print(f"interrupted: {err}", file=sys.stderr)
            return 130
        return 0
    if args.command == "segment":
        from pipeline.segment.commands import run as run_segment

        return run_segment(args, cfg)
    if args.command == "run":
        from pipeline.job import run

        run(cfg)
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("compress", "decompress"):
        from pipeline.compress.commands import run

        return run(args.command, args)
    if args.command == "tracking-replay":
        from pipeline.tracking import replay_offline

        runs = replay_offline(args.record, args.uri, experiment=args.experiment)
        print(f"replayed {len(runs)} run(s) from {args.record}")
        return 0
    try:
        return _dispatch(args, load_config(args.config, args.overrides))
    except (ConfigError, FileNotFoundError) as err:  # bad settings or missing inputs: no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
