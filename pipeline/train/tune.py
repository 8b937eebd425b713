"""Ray Tune search of the phase-2 loss weights: JPD-SE's perception-distortion trade-off.

Every trial fine-tunes phase 2 from the same starting point (``train.init_from``, a phase-1 export: the
sweep compares weightings on one shared semantic prior; without it a residual generator starts every trial
at the codec itself) for ``tune.max_steps`` steps with
its own values of the searched keys (``tune.search_space``, dotted config keys, e.g.
``phase2.loss.dist: {loguniform: [1, 100]}``; also ``uniform``, ``randint`` and ``choice``). Every
``tune.report_every`` steps, and once more on the exported generator at the end, it evaluates the first
``tune.eval_images`` frames of ``validate.split`` of the shards (held-out frames, never the training split,
and best not the reported ``eval.split``): mean PSNR (distortion), mean standard NIQE (perception,
published pristine model) and ``val_score = val_psnr - tune.niqe_weight * val_niqe``. ``tune.metric``
picks one of the three as the objective; ASHA (``time_attr="step"``) stops the weak trials at those
reports. The best trial is the best *completed* one (early-stopped trials have no exported generator).

Layout: ``<tune.output_dir>/<tune.name>/`` is Ray's experiment folder (``Tuner.restore`` resumes it); each
trial folder ``trial_<id>/`` holds Ray's results and ``train/``, the trial's own ``train.output_dir``
(checkpoints, ``phase2/generator.safetensors``). An interrupted trial resumes from its newest trainer
checkpoint. ``best.json`` lies in the experiment folder.

Tracking: one sweep run in the driver; in the Ray worker each trial opens a run nested under it
(``mlflow.parentRunId``) against the tracking URI resolved once in the driver (a worker's working
directory is Ray's trial folder, so ``default_tracking_uri`` there would point elsewhere); the trainer's run
and its ``phase2`` run nest under the trial's run.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from pipeline.config import TUNE_MODES, ConfigError, JobConfig, from_dict, resolve_path, with_overrides
from pipeline.data.manifest import Manifest, dataset_info
from pipeline.data.splits import refuse_overlap
from pipeline.eval.inputs import EvalSample
from pipeline.eval.scoring import Scores
from pipeline.model.export import load_generator, read_spec
from pipeline.tracking import MLflowTracker, Tracker, default_tracking_uri, make_tracker, run_tags
from pipeline.train.checkpoint import read_latest
from pipeline.train.trainer import StepEvent, train
from pipeline.train.validation import Validator, load_frames

if TYPE_CHECKING:  # ray is imported where it is used: loading it takes seconds
    from ray.tune import Result, ResultGrid
    from ray.tune.experiment import Trial

SPEC_KINDS = ("loguniform", "uniform", "randint", "choice")
DEFAULT_SPACE: dict[str, Any] = {
    "phase2.loss.dist": {"loguniform": [1.0, 100.0]},
    "phase2.loss.feat": {"loguniform": [1.0, 100.0]},
}
# Keys every trial sets itself; searching them would break the sweep.
RESERVED = ("train.output_dir", "train.init_from", "phase2.steps", "tracking.", "tune.")
BEST_FILE = "best.json"
TRAIN_DIR = "train"


@dataclass
class TrialSummary:
    """One trial as the sweep ended it: its values, its last result and, when it completed, its export."""

    trial_id: str
    params: dict[str, Any]
    metrics: dict[str, float]  # val_psnr, val_niqe, val_score of its last result
    step: int  # phase-2 step of that result
    generator: str  # the exported generator; empty unless the trial ran all its steps
    path: str  # Ray's trial folder
    error: str = ""

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        return "done" if self.generator else f"stopped@{self.step}"


@dataclass
class TuneResult:
    """What :func:`tune` returns (and writes to ``best.json``)."""

    experiment: str
    metric: str
    mode: str
    best: TrialSummary
    trials: list[TrialSummary]
    baseline: dict[str, float]  # the codec's decoded images on the same held-out images
    best_file: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "metric": self.metric,
            "mode": self.mode,
            "best": {**asdict(self.best), "status": self.best.status},
            "baseline": self.baseline,
            "trials": [{**asdict(t), "status": t.status} for t in self.trials],
        }


@dataclass
class _Setup:
    """What every trial gets from the driver (through Ray's object store)."""

    base: dict[str, Any]  # the resolved JobConfig: absolute paths, tracking URI, phase2.steps
    experiment: str
    parent_run_id: str | None
    samples: list[EvalSample] = field(default_factory=list)
    codec: Scores | None = None  # the codec's own scores on the samples, computed once in the driver


# ------------------------------------------------------------------------------------- search space


def _domain(key: str, entry: Any) -> Any:
    from ray import tune as ray_tune

    hint = f"tune.search_space.{key} must be one of {{loguniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
    hint += "{randint: [lo, hi]}, {choice: [a, b, ...]}"
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise ConfigError(f"{hint}; got {entry!r}")
    ((kind, args),) = entry.items()
    if kind not in SPEC_KINDS or not isinstance(args, list) or not args:
        raise ConfigError(f"{hint}; got {entry!r}")
    if kind == "choice":
        return ray_tune.choice(args)
    if len(args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"tune.search_space.{key}: {kind} needs [lo, hi] numbers, got {args!r}")
    lo, hi = args
    if not lo < hi or (kind == "loguniform" and lo <= 0):
        raise ConfigError(
            f"tune.search_space.{key}: {kind} needs 0 < lo < hi (lo < hi for uniform), got {args}"
        )
    return {"loguniform": ray_tune.loguniform, "uniform": ray_tune.uniform, "randint": ray_tune.randint}[
        kind
    ](lo, hi)


def search_space(cfg: JobConfig) -> dict[str, Any]:
    """Ray Tune domains for ``cfg.tune.search_space`` (default: :data:`DEFAULT_SPACE`), keys checked
    against the config and one value of each domain checked against the key's type."""
    spec = cfg.tune.search_space or DEFAULT_SPACE
    known = cfg.flat()
    space = {}
    for key, entry in spec.items():
        if key not in known:
            raise ConfigError(f"tune.search_space: {key!r} is not a config value (e.g. phase2.loss.dist)")
        if key.startswith(RESERVED):
            raise ConfigError(f"tune.search_space: {key!r} is set by the sweep itself and cannot be searched")
        space[key] = _domain(key, entry)
        with_overrides(cfg, {key: space[key].sample()})
    return space


def _absolute(path: str) -> str:
    if not path or "://" in path or path.startswith("pipe:"):
        return path
    return str(Path(path).expanduser().resolve())


def trial_base(cfg: JobConfig) -> JobConfig:
    """The config every trial starts from: local paths made absolute (Ray runs trials in folders of its
    own), the tracking URI resolved, ``phase2.steps = tune.max_steps``, no phase-2 registration and no
    validation inside the trainer (the sweep's own reports rank the trials)."""
    if not cfg.train.init_from and not cfg.model.residual:
        raise ConfigError(
            "tune needs train.init_from=<phase-1 exported generator>: every trial fine-tunes phase 2 from "
            "the same semantic prior (train one with `python -m pipeline train --phases 1`)"
        )
    init = Path(cfg.train.init_from).expanduser().resolve() if cfg.train.init_from else None
    if init is not None and not init.is_file():
        raise ConfigError(f"train.init_from: no such file {init}")
    phase = read_spec(init).phase if init is not None else 1
    if phase != 1:
        warnings.warn(f"train.init_from {init} is a phase-{phase} export, not phase 1's", stacklevel=2)
    values: dict[str, Any] = {
        "data.root": _absolute(cfg.data.root),
        "shards.output": _absolute(cfg.shards.output),
        "loader.shards": _absolute(cfg.loader.shards),
        "loss.vgg_weights": _absolute(cfg.loss.vgg_weights),
        "train.init_from": str(init) if init is not None else "",
        "train.deepspeed_config": str(resolve_path(cfg.train.deepspeed_config).resolve()),
        "phase2.steps": cfg.tune.max_steps,
        "tracking.register_phase2": False,
        # the sweep scores its trials itself (every tune.report_every steps); a trial exports its last step
        "validate.every": 0,
    }
    if cfg.tracking.enabled:
        values["tracking.uri"] = default_tracking_uri(cfg.tracking.uri)
    return with_overrides(cfg, values)


# -------------------------------------------------------------------------------------- evaluation


def eval_set(cfg: JobConfig) -> list[EvalSample]:
    """The held-out frames trials are scored on: ``tune.eval_images`` of ``validate.split`` at
    ``loader.quality``, refused when they overlap the training split."""
    samples = load_frames(cfg, cfg.validate.split, cfg.tune.eval_images)
    if not cfg.loader.shards:
        train = Manifest.read(cfg.shards.output).split(cfg.loader.split).keys
        what = f"validate.split={cfg.validate.split!r} (the frames trials are scored on)"
        refuse_overlap(what, (s.key for s in samples), train, cfg.loader.split)
    return samples


def summarize(psnr: float, niqe: float, niqe_weight: float) -> dict[str, float]:
    """Mean PSNR, mean NIQE and the combined score, under the names Tune reports."""
    return {"val_psnr": psnr, "val_niqe": niqe, "val_score": psnr - niqe_weight * niqe}


class Evaluator:
    """Scores a generator on the held-out frames (see :class:`pipeline.train.validation.Validator`)."""

    def __init__(self, cfg: JobConfig, samples: list[EvalSample], codec: Scores | None = None) -> None:
        data = dataset_info(cfg)
        self.validator = Validator(cfg, data.label_nc, data.use_instance, samples, codec)
        self.device = self.validator.device
        self.niqe_weight = cfg.tune.niqe_weight

    @property
    def baseline(self) -> dict[str, float]:
        """The codec's own scores on the frames."""
        codec = self.validator.codec
        return summarize(codec.psnr, codec.niqe, self.niqe_weight)

    def __call__(self, generator: nn.Module) -> dict[str, float]:
        scores = self.validator(generator)
        return summarize(scores["psnr"], scores["niqe"], self.niqe_weight)


# ------------------------------------------------------------------------------------------ a trial


def run_trial(config: dict[str, Any], setup: _Setup) -> None:
    """One trial, in a Ray worker: phase 2 with the trial's values, evaluated and reported to Tune."""
    from ray import tune as ray_tune

    context = ray_tune.get_context()
    trial_id = context.get_trial_id()
    out = Path(setup.experiment) / Path(context.get_trial_dir()).name / TRAIN_DIR
    cfg = with_overrides(from_dict(setup.base), {**config, "train.output_dir": str(out)})
    evaluate = Evaluator(cfg, setup.samples, setup.codec)
    tracker = make_tracker(cfg)
    tags = {**run_tags(cfg, 2), "sweep": Path(setup.experiment).name, "trial_id": trial_id}
    if setup.parent_run_id:
        tags["mlflow.parentRunId"] = setup.parent_run_id
    every = cfg.tune.report_every

    def on_step(event: StepEvent) -> None:
        if event.phase != 2 or event.step >= event.steps or event.step % every:
            return
        scores = evaluate(event.generator)
        tracker.log_metrics(scores, step=event.step)
        # ASHA may stop the trial here: Ray then raises SystemExit in this thread and ends the worker
        # process (see _close_stopped_runs for the MLflow runs it leaves open)
        ray_tune.report({"step": event.step, **scores})

    with tracker.start_run(f"trial-{trial_id}", params=config, tags=tags):
        exports = train(
            cfg, [2], resume=read_latest(out) is not None, tracker=tracker, run_name="train", on_step=on_step
        )
        generator, _ = load_generator(exports[2], evaluate.device)
        scores = evaluate(generator)
        tracker.log_metrics({**scores, "stopped_early": 0.0}, step=cfg.phase2.steps)
    ray_tune.report({"step": cfg.phase2.steps, **scores, "generator": str(exports[2])})


def trial_dirname(trial: Trial) -> str:
    return f"trial_{trial.trial_id}"


# -------------------------------------------------------------------------------------------- sweep


def _close_stopped_runs(tracker: Tracker, sweep_run_id: str | None, trials: list[TrialSummary]) -> None:
    """End the MLflow runs of trials that did not complete: KILLED (stopped early or interrupted) or
    FAILED (errors).

    Ray ends an early-stopped trial by raising SystemExit in its report call and exiting the worker
    process right away, which races the runs' own ending: they may be left RUNNING or FAILED.
    """
    status = {t.trial_id: ("FAILED" if t.error else "KILLED") for t in trials if not t.generator}
    if not status or sweep_run_id is None or not isinstance(tracker, MLflowTracker) or tracker.offline:
        return
    client, experiment_id = tracker.client, tracker.experiment_id

    def children(run_id: str) -> list[Any]:
        return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000)

    try:
        for trial_run in children(sweep_run_id):
            trial_status = status.get(trial_run.data.tags.get("trial_id", ""))
            if trial_status is None:
                continue
            pending = [trial_run]
            while pending:
                run = pending.pop()
                pending += children(run.info.run_id)
                if run.info.status != trial_status:
                    end_time = run.info.end_time or int(time.time() * 1000)
                    client.set_terminated(run.info.run_id, status=trial_status, end_time=end_time)
            client.log_metric(
                trial_run.info.run_id, "stopped_early", 1.0, timestamp=int(time.time() * 1000), step=0
            )
    except Exception as err:  # tracking never fails the sweep
        warnings.warn(f"could not close the runs of stopped trials: {err}", RuntimeWarning, stacklevel=2)


def _unfinished(experiment: Path, expected: int | None) -> str:
    """Why the sweep in ``experiment`` is not finished, from the state Ray saved ("" when it is).

    After an interrupted ``fit()`` the trials Ray stopped on its way out read TERMINATED in memory;
    the saved state keeps them RUNNING/PENDING, as ``Tuner.restore`` will see them.
    """
    from ray.tune import ExperimentAnalysis

    states = [t.status for t in ExperimentAnalysis(str(experiment)).trials]
    open_trials = sum(state not in ("TERMINATED", "ERROR") for state in states)
    if open_trials:
        return f"{open_trials} trial(s) unfinished"
    if expected is not None and len(states) < expected:
        return f"{expected - len(states)} of {expected} trials not started"
    return ""


def _summary(result: Result) -> TrialSummary:
    metrics = dict(result.metrics or {})
    config = {k: v for k, v in (result.config or {}).items() if not k.startswith("_")}
    return TrialSummary(
        trial_id=str(metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")),
        params=config,
        metrics={k: float(metrics[k]) for k in TUNE_MODES if k in metrics},
        step=int(metrics.get("step", 0)),
        generator=str(metrics.get("generator", "")),
        path=str(result.path),
        error=str(result.error).splitlines()[0] if result.error else "",
    )


def best_trial(trials: list[TrialSummary], metric: str, mode: str) -> TrialSummary:
    """The completed trial with the best finite ``metric``."""
    scored = [t for t in trials if t.generator and math.isfinite(t.metrics.get(metric, math.nan))]
    if not scored:
        states = ", ".join(f"{t.trial_id}: {t.status}" for t in trials) or "no trials"
        raise RuntimeError(f"no trial completed with a finite {metric} ({states})")
    pick = max if mode == "max" else min
    return pick(scored, key=lambda t: t.metrics[metric])


def format_table(result: TuneResult) -> str:
    keys = sorted({k for t in result.trials for k in t.params})
    width = max([16, *map(len, keys)])
    head = f"{'trial':<12} " + " ".join(f"{k:>{width}}" for k in keys)
    lines = [head + f" {'step':>6} {'PSNR':>7} {'NIQE':>7} {'score':>8}  status"]
    base = result.baseline
    lines.append(
        f"{'codec':<12} "
        + " ".join(f"{'':>{width}}" for _ in keys)
        + f" {'':>6} {base['val_psnr']:>7.3f} {base['val_niqe']:>7.3f} {base['val_score']:>8.3f}  baseline"
    )
    for t in sorted(result.trials, key=lambda t: t.trial_id):
        values = " ".join(
            f"{t.params[k]:>{width}.4g}"
            if isinstance(t.params.get(k), float)
            else f"{t.params.get(k, '')!s:>{width}}"
            for k in keys
        )
        m = {k: t.metrics.get(k, math.nan) for k in TUNE_MODES}
        mark = "  <- best" if t.trial_id == result.best.trial_id else ""
        lines.append(
            f"{t.trial_id:<12} {values} {t.step:>6} {m['val_psnr']:>7.3f} {m['val_niqe']:>7.3f} "
            f"{m['val_score']:>8.3f}  {t.status}{mark}"
        )
    return "\n".join(lines)


def tune(cfg: JobConfig, resume: bool = False) -> TuneResult:
    """Run (or with ``resume`` continue, via ``Tuner.restore``) the sweep; write ``best.json``, print the
    table of trials and return the result (best trial's values, metrics and exported generator)."""
    import ray
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise ConfigError(
            "run the sweep as one plain process, not under torchrun/deepspeed: each trial makes its own "
            "world of one (Ray's workers inherit RANK/WORLD_SIZE and would try to join the launcher's world)"
        )
    settings = cfg.tune
    base = trial_base(cfg)
    space = search_space(base)
    experiment = Path(settings.output_dir).expanduser().resolve() / (settings.name or f"{cfg.name}-tune")
    restore = resume and ray_tune.Tuner.can_restore(str(experiment))
    if resume and not restore:
        print(f"[tune] --resume: no experiment to restore in {experiment}, starting afresh")
    elif not resume and ray_tune.Tuner.can_restore(str(experiment)):
        raise ConfigError(
            f"{experiment} already holds a sweep: resume it (--resume) or set another tune.name"
        )
    if cfg.validate.split == cfg.eval.split:
        print(
            f"[tune] WARNING: validate.split = eval.split = {cfg.eval.split!r}: the sweep is tuned on the "
            "frames results are reported on"
        )
    samples = eval_set(base)
    driver = Evaluator(base, samples)
    baseline = driver.baseline

    tracker = make_tracker(base)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False)
    try:
        params = {k: json.dumps(v) for k, v in (settings.search_space or DEFAULT_SPACE).items()}
        tags = {**run_tags(base, 2), "sweep": experiment.name}
        with tracker.start_run(experiment.name, params={**base.flat(), **params}, tags=tags):
            setup = _Setup(
                base.to_dict(), str(experiment), tracker.active_run_id, samples, driver.validator.codec
            )
            trainable = ray_tune.with_resources(
                ray_tune.with_parameters(run_trial, setup=setup),
                {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
            )
            if restore:
                tuner = ray_tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
            else:
                scheduler = ASHAScheduler(
                    time_attr="step",
                    max_t=settings.max_steps,
                    grace_period=settings.grace_period or min(settings.report_every, settings.max_steps),
                    reduction_factor=settings.reduction_factor,
                )
                tuner = ray_tune.Tuner(
                    trainable,
                    param_space=space,
                    tune_config=ray_tune.TuneConfig(
                        metric=settings.metric,
                        mode=settings.mode,
                        # the concurrency limit goes to the generator: Tune ignores max_concurrent_trials
                        # when it is given a search algorithm
                        search_alg=BasicVariantGenerator(
                            max_concurrent=settings.max_concurrent_trials, random_state=cfg.train.seed
                        ),
                        scheduler=scheduler,
                        num_samples=settings.num_samples,
                        trial_dirname_creator=trial_dirname,
                    ),
                    run_config=ray_tune.RunConfig(
                        name=experiment.name, storage_path=str(experiment.parent), verbose=1
                    ),
                )
            grid: ResultGrid = tuner.fit()
            trials = [_summary(r) for r in grid]
            _close_stopped_runs(tracker, setup.parent_run_id, trials)
            unfinished = _unfinished(experiment, None if restore else settings.num_samples)
            if unfinished:  # Ray returns from fit() on Ctrl-C, having saved the experiment's state
                raise KeyboardInterrupt(f"sweep interrupted ({unfinished}); continue it with --resume")
            result = TuneResult(
                str(experiment),
                settings.metric,
                settings.mode,
                best_trial(trials, settings.metric, settings.mode),
                trials,
                baseline,
            )
            best_file = experiment / BEST_FILE
            best_file.write_text(json.dumps(result.to_dict(), indent=2))
            result.best_file = str(best_file)
            tracker.log_metrics({f"best.{k}": v for k, v in result.best.metrics.items()})
            tracker.log_artifact(best_file, "tune")
    finally:
        if started_ray:
            ray.shutdown()
    print(format_table(result))
    print(f"[tune] best trial {result.best.trial_id}: {result.best.params} -> {result.best.generator}")
    return result
