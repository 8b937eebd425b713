"""``python -m pipeline <command> [--config FILE] [key.sub=value ...]``; ``compress`` and ``decompress``
take no config (``python -m pipeline compress --help``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    p = command(
        "segment",
        "train a segmenter (segment.*; SegFormer by default) on the shards with DeepSpeed, export it",
    )
    from pipeline.segment.commands import add_arguments as add_segment_arguments

    add_segment_arguments(p)
    command("labels", "predict the label maps of data.label_source (decoder, encoder) beside the shards")
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
    if args.command == "labels":
        from pipeline.data.predicted_labels import build_predicted_labels

        for folder in build_predicted_labels(cfg):
            print(folder)
        return 0
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


def _check_codecs(cfg: JobConfig) -> None:
    """Every codec of ``shards.codecs`` built with its options, its qualities checked against its range and
    one round trip of a small image made: unknown names, bad options and missing binaries stop here."""
    import numpy as np

    from pipeline.data.codecs import CodecError, CodecUnavailable, get_codec

    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for spec in cfg.shards.codecs:
        try:
            codec = get_codec(spec.name, single_thread=True, **spec.options)
            lo, hi = codec.quality_range
            bad = [q for q in spec.qualities if not lo <= q <= hi]
            if bad:
                raise ValueError(f"qualities {bad} outside {spec.name}'s range [{lo}, {hi}]")
            codec.roundtrip(rgb, spec.qualities[0])
        except (ValueError, TypeError, CodecError, CodecUnavailable) as err:
            raise ConfigError(f"shards.codecs: codec {spec.name!r}: {_first_line(err)}") from None


def _check_known_codec(cfg: JobConfig) -> None:
    from pipeline.data.codecs import available_codecs

    if cfg.loader.codec not in available_codecs():
        raise ConfigError(
            f"loader.codec: unknown codec {cfg.loader.codec!r}; known: {', '.join(available_codecs())}"
        )


def _check_shards(cfg: JobConfig) -> None:
    """Training reads ``shards.output`` (unless ``loader.shards`` names the tars) and the folders of
    ``loader.extra_shards``: each must hold a built shard folder."""
    from pipeline.data.manifest import MANIFEST

    folders = [] if cfg.loader.shards else [cfg.shards.output]
    for folder in [*folders, *cfg.loader.extra_shards]:
        if not (Path(folder) / MANIFEST).is_file():
            state = f"the folder has no {MANIFEST}" if Path(folder).is_dir() else "the folder does not exist"
            raise ConfigError(
                f"no shard manifest in {folder} ({state}); build the shards first (python -m pipeline "
                f"shards shards.output={folder}) or set shards.output"
            )


def _check_models(cfg: JobConfig, models: list[str]) -> None:
    """Each ``--model`` exists before any work: a file holding an exported generator, or a registry URI
    that names a model in the store (checked without downloading, with bounded store calls)."""
    from pipeline.tracking.registry import check_model_uri

    for model in models:
        if model.startswith(("models:/", "runs:/")):
            check_model_uri(model, tracking_uri=cfg.tracking.uri)
            continue
        from pipeline.model.export import read_spec

        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"--model {model}: no such file (give a generator file or models:/name@alias)")
        try:
            read_spec(path)
        except ValueError as err:
            raise ConfigError(f"--model {model}: {_first_line(err)}") from None


def check_command(args: argparse.Namespace, cfg: JobConfig) -> None:
    """What each command needs, checked before it starts any work (the config's own ranges and
    enumerations are checked when it loads)."""
    if cfg.tracking.enabled and args.command != "shards" and not cfg.tracking.experiment.strip():
        raise ConfigError(
            "tracking.experiment is empty; name the MLflow experiment or set tracking.enabled=false"
        )
    if args.command in ("train", "run"):
        from pipeline.train.trainer import check_registration_settings

        check_registration_settings(cfg, getattr(args, "phases", [1, 2, 3]))
    if args.command in ("shards", "run"):
        _check_codecs(cfg)
    if args.command in ("train", "evaluate", "run", "tune"):
        _check_known_codec(cfg)
    if args.command in ("train", "tune", "segment"):
        _check_shards(cfg)
    if args.command == "segment":
        from pipeline.segment.train import check_settings

        _check_known_codec(cfg)
        check_settings(cfg)
    if args.command == "evaluate":
        if cfg.eval.input == "shards" and not (Path(cfg.shards.output) / "manifest.json").is_file():
            raise ConfigError(
                f"eval.input is shards but {cfg.shards.output} holds no shards (no manifest.json)"
            )
        _check_models(cfg, args.model)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _expected(err: BaseException) -> bool:
    """Whether ``err`` is a failure the user can act on (shown as one line, exit 2), not a bug."""
    from pipeline.tracking.mlflow_store import StoreUnavailable
    from pipeline.tracking.registry import ModelURIError

    if isinstance(err, ConfigError | FileNotFoundError | StoreUnavailable | ModelURIError):
        return True
    codecs = sys.modules.get("pipeline.data.codecs.base")
    if codecs is not None and isinstance(err, codecs.CodecUnavailable):
        return True
    return type(err).__module__.startswith("mlflow.")  # the store refused (replay)


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures (bad settings, missing inputs, an unreachable store) are one
    line on stderr and exit 2, before any work where they can be checked up front."""
    args = _parser().parse_args(argv)
    if args.command in ("compress", "decompress"):
        from pipeline.compress.commands import run

        return run(args.command, args)
    try:
        if args.command == "tracking-replay":
            from pipeline.tracking import replay_offline

            try:
                runs = replay_offline(args.record, args.uri, experiment=args.experiment)
            except ValueError as err:  # a bad record
                raise ConfigError(str(err)) from None
            print(f"replayed {len(runs)} run(s) from {args.record}")
            return 0
        cfg = load_config(args.config, args.overrides)
        check_command(args, cfg)
        return _dispatch(args, cfg)
    except Exception as err:
        if not _expected(err):
            raise
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return 2
