"""Ray Tune search of the phase-2 loss weights: JPD-SE's perception-distortion trade-off.

Every trial fine-tunes phase 2 from the same starting point (``train.init_from``, a phase-1 export: the
sweep compares weightings on one shared semantic prior; without it a residual generator starts every trial
at the codec itself) for ``tune.max_steps`` steps with its own values of the searched keys
(``tune.search_space``, dotted config keys, e.g. ``phase2.loss.dist: {loguniform: [1, 100]}``; also
``uniform``, ``randint`` and ``choice``). Every ``tune.report_every`` steps, and once more on the exported
generator at the end, it evaluates the first ``tune.eval_images`` frames of ``validate.split`` of the
shards (held-out frames, never the training split, and best not the reported ``eval.split``): mean PSNR
(distortion), mean standard NIQE (perception, published pristine model) and
``val_score = val_psnr - tune.niqe_weight * val_niqe``. ``tune.metric`` picks one of the three as the
objective of the search algorithm (``tune.search_alg``) and the scheduler (``tune.scheduler``: ASHA by
default, ``time_attr="step"``, stopping weak trials at those reports).

Checkpoints: each intermediate report carries a Ray checkpoint, the trainer's checkpoint of that step
(generator and discriminator engines with their optimiser states, the step, RNG states and data position).
A trial that fails is retried ``tune.max_failures`` times from its newest Ray checkpoint, and a sweep
interrupted (Ctrl-C, SIGUSR1, a lost driver) continues with ``--resume`` (``Tuner.restore``): finished
trials are kept, unfinished ones continue from their checkpoints.

Results: the best *completed* trial by ``tune.metric`` (``best.json``) and the Pareto front on
(val_psnr max, val_niqe min) of the completed trials (:mod:`.pareto`: ``pareto.csv``, ``pareto.png`` and a
phase-2 training config per front point), all in the experiment folder and logged to the sweep's run.

Layout: ``<tune.output_dir>/<tune.name>/`` is Ray's experiment folder; each trial folder ``trial_<id>/``
holds Ray's results, its Ray checkpoints (``checkpoint_NNNNNN/``) and ``train/``, the trial's own
``train.output_dir``. On a cluster ``tune.output_dir`` must be a folder every node sees.

Multi-worker trials (``tune.workers_per_trial > 1``, :mod:`.workers`): each trial is the driver of a
Ray Train run of that many workers (``tune.cpus_per_trial``/``gpus_per_trial`` each, the driver one CPU
of its own) training the same DeepSpeed job as ``torchrun`` ranks would; rank 0 scores and hands its
reports and checkpoints to the driver, which reports them to Tune as above.

Tracking: one sweep run in the driver; Ray's MLflow integration (:class:`.mlflow_runs.TrialRuns`, in the
driver) opens one run per trial nested under it, with the trial's values as params and its reports as
metrics at their phase-2 step. Trials themselves log nothing to MLflow, so a trial's worker ending (ASHA,
a crash) leaves no run open.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from pipeline.config import TUNE_MODES, ConfigError, JobConfig, from_dict, resolve_path, with_overrides
from pipeline.data.manifest import dataset_info
from pipeline.data.splits import refuse_overlap
from pipeline.eval.inputs import EvalSample
from pipeline.eval.scoring import Scores
from pipeline.lock import folder_lock
from pipeline.model.export import load_generator, read_spec
from pipeline.ray_session import ray_session
from pipeline.tracking import Tracker, default_tracking_uri, make_tracker, run_tags
from pipeline.train.checkpoint import LATEST, checkpoint_dir, discard_checkpoints, read_latest
from pipeline.train.trainer import StepEvent, train
from pipeline.train.tune import pareto
from pipeline.train.validation import Validator, load_frames

if TYPE_CHECKING:  # ray is imported where it is used: loading it takes seconds
    from ray.tune import Callback, Checkpoint, Result, ResultGrid
    from ray.tune.experiment import Trial

SPEC_KINDS = ("loguniform", "uniform", "randint", "choice")
DEFAULT_SPACE: dict[str, Any] = {
    "phase2.loss.dist": {"loguniform": [1.0, 100.0]},
    "phase2.loss.feat": {"loguniform": [1.0, 100.0]},
}
# Keys every trial sets itself; searching them would break the sweep.
RESERVED = ("train.output_dir", "train.init_from", "phase2.steps", "tracking.", "tune.")
BEST_FILE = "best.json"
SWEEP_RUN_FILE = "sweep_run.json"  # the sweep's MLflow run id: a resumed sweep nests its run under it
TRAIN_DIR = "train"
COMPLETED_KEY = "generator"  # in a trial's last result only when it ran all its steps and exported
PATH_KEYS = ("data.root", "shards.output", "loader.shards", "loss.vgg_weights")


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
    pareto: list[str] = field(default_factory=list)  # trial ids on the front, by PSNR descending
    pareto_configs: dict[str, str] = field(default_factory=dict)  # trial id -> its phase-2 config file

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "metric": self.metric,
            "mode": self.mode,
            "best": {**asdict(self.best), "status": self.best.status},
            "baseline": self.baseline,
            "pareto": self.pareto,
            "pareto_configs": self.pareto_configs,
            "trials": [{**asdict(t), "status": t.status} for t in self.trials],
        }


@dataclass
class _Setup:
    """What every trial gets from the driver (through Ray's object store)."""

    base: dict[str, Any]  # the resolved JobConfig: absolute paths, phase2.steps, checkpoints at the reports
    experiment: str
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


def _init_from(cfg: JobConfig) -> Path | None:
    init = Path(cfg.train.init_from).expanduser().resolve() if cfg.train.init_from else None
    if init is not None and not init.is_file():
        raise ConfigError(f"train.init_from: no such file {init}")
    return init


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """``cfg`` with its local paths absolute (Ray runs trials in folders of its own; a Pareto point's
    config is read from anywhere)."""
    init = _init_from(cfg)
    values: dict[str, Any] = {key: _absolute(value) for key, value in cfg.flat().items() if key in PATH_KEYS}
    values["loader.extra_shards"] = [_absolute(folder) for folder in cfg.loader.extra_shards]
    values["train.init_from"] = str(init) if init is not None else ""
    values["train.deepspeed_config"] = str(resolve_path(cfg.train.deepspeed_config).resolve())
    return with_overrides(cfg, values)


def trial_base(cfg: JobConfig) -> JobConfig:
    """The config every trial starts from: local paths made absolute, the tracking URI resolved,
    ``phase2.steps = tune.max_steps``, a trainer checkpoint at every report (its Ray checkpoint), no
    phase-2 registration and no validation inside the trainer (the sweep's own reports rank the trials)."""
    if not cfg.train.init_from and not cfg.model.residual:
        raise ConfigError(
            "tune needs train.init_from=<phase-1 exported generator>: every trial fine-tunes phase 2 from "
            "the same semantic prior (train one with `python -m pipeline train --phases 1`)"
        )
    init = _init_from(cfg)
    phase = read_spec(init).phase if init is not None else 1
    if phase != 1:
        warnings.warn(f"train.init_from {init} is a phase-{phase} export, not phase 1's", stacklevel=2)
    values: dict[str, Any] = {
        "phase2.steps": cfg.tune.max_steps,
        "tracking.register_phase2": False,
        # the sweep scores its trials itself (every tune.report_every steps); a trial exports its last step
        "validate.every": 0,
        # the trainer's checkpoint of each report's step is that report's Ray checkpoint
        "train.checkpoint_every": cfg.tune.report_every,
        "train.keep_checkpoints": 1,
    }
    if cfg.tracking.enabled:
        values["tracking.uri"] = default_tracking_uri(cfg.tracking.uri)
    return with_overrides(absolute_paths(cfg), values)


# -------------------------------------------------------------------------------------- evaluation


def eval_set(cfg: JobConfig) -> list[EvalSample]:
    """The held-out frames trials are scored on: ``tune.eval_images`` of ``validate.split`` at
    ``loader.quality``, refused when they overlap the training split."""
    samples = load_frames(cfg, cfg.validate.split, cfg.tune.eval_images)
    if not cfg.loader.shards:
        train_keys = dataset_info(cfg).train_frames
        what = f"validate.split={cfg.validate.split!r} (the frames trials are scored on)"
        refuse_overlap(what, (s.key for s in samples), train_keys, cfg.loader.split)
    return samples


def summarize(psnr: float, niqe: float, niqe_weight: float) -> dict[str, float]:
    """Mean PSNR, mean NIQE and the combined score, under the names Tune reports."""
    return {"val_psnr": psnr, "val_niqe": niqe, "val_score": psnr - niqe_weight * niqe}


class Evaluator:
    """Scores a generator on the held-out frames (see :class:`pipeline.train.validation.Validator`)."""

    def __init__(self, cfg: JobConfig, samples: list[EvalSample], codec: Scores | None = None) -> None:
        data = dataset_info(cfg)
        self.validator = Validator(cfg, data, samples, codec)
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


def _link_or_copy(src: str, dst: str) -> None:
    """Hard link (the trainer replaces files atomically, so a link stays a snapshot), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def checkpoint_snapshot(out: Path, step: int, parent: Path | None = None) -> Iterator[Path]:
    """A private snapshot folder (in ``parent``, default the system's temporary folder) of the trainer's
    checkpoint of ``step`` under ``out``: the ``latest.json`` pointer and that checkpoint."""
    latest = read_latest(out)
    if latest is None or latest.step != step:
        found = "none" if latest is None else f"step {latest.step}"
        raise RuntimeError(f"no trainer checkpoint of step {step} under {checkpoint_dir(out)} ({found})")
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ray-ckpt-", dir=parent) as tmp:
        shutil.copytree(latest.path, Path(tmp) / latest.path.name, copy_function=_link_or_copy)
        shutil.copy2(checkpoint_dir(out) / LATEST, Path(tmp) / LATEST)
        yield Path(tmp)


@contextlib.contextmanager
def checkpoint_of(out: Path, step: int) -> Iterator[Checkpoint]:
    """The trainer's checkpoint of ``step`` under ``out`` as a Ray checkpoint (a snapshot, see
    :func:`checkpoint_snapshot`; Ray persists it during ``report``)."""
    from ray.tune import Checkpoint

    with checkpoint_snapshot(out, step) as folder:
        yield Checkpoint.from_directory(folder)


def restore_checkpoint(checkpoint: Checkpoint | None, out: Path) -> int | None:
    """Put a Ray checkpoint back as the trainer's only checkpoint under ``out``; returns its step (None
    without one: the trial starts afresh, and train() discards what a failed first try left)."""
    if checkpoint is None:
        return None
    discard_checkpoints(out)
    with checkpoint.as_directory() as folder:
        shutil.copytree(folder, checkpoint_dir(out), dirs_exist_ok=True)
    latest = read_latest(out)
    if latest is None:
        raise RuntimeError(f"the Ray checkpoint {checkpoint.path} holds no trainer checkpoint")
    return latest.step


def run_trial(config: dict[str, Any], setup: _Setup) -> None:
    """One trial, in a Ray worker: phase 2 with the trial's values, evaluated and reported to Tune, from
    the trial's Ray checkpoint when Ray restores it (a retry after a failure, a resumed sweep). With
    ``tune.workers_per_trial > 1`` this is the driver of a Ray Train run (:mod:`.workers`)."""
    from ray import tune as ray_tune

    context = ray_tune.get_context()
    out = Path(setup.experiment) / Path(context.get_trial_dir()).name / TRAIN_DIR
    cfg = with_overrides(from_dict(setup.base), {**config, "train.output_dir": str(out)})
    if cfg.tune.workers_per_trial > 1:
        from pipeline.train.tune.workers import run_workers

        run_workers(cfg, config, setup, out, restore_checkpoint(ray_tune.get_checkpoint(), out))
        return
    evaluate = Evaluator(cfg, setup.samples, setup.codec)
    start = restore_checkpoint(ray_tune.get_checkpoint(), out)
    every = cfg.tune.report_every

    def on_step(event: StepEvent) -> None:
        if event.phase != 2 or event.step >= event.steps or event.step % every:
            return
        scores = evaluate(event.scored)
        losses = {f"loss.{k}": float(v) for k, v in event.losses.items()}
        with checkpoint_of(out, event.step) as checkpoint:
            # ASHA may stop the trial here: Ray then ends this worker (its MLflow run is the driver's)
            ray_tune.report(
                {"step": event.step, "start_step": start or 0, **scores, **losses}, checkpoint=checkpoint
            )

    exports = train(cfg, [2], resume=start is not None, tracker=Tracker(), run_name="train", on_step=on_step)
    generator, _ = load_generator(exports[2], evaluate.device)
    scores = evaluate(generator)
    ray_tune.report(
        {"step": cfg.phase2.steps, "start_step": start or 0, **scores, COMPLETED_KEY: str(exports[2])}
    )


def trial_dirname(trial: Trial) -> str:
    return f"trial_{trial.trial_id}"


# -------------------------------------------------------------------------------------------- sweep


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
        generator=str(metrics.get(COMPLETED_KEY, "")),
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
    front = set(result.pareto)
    for t in sorted(result.trials, key=lambda t: t.trial_id):
        values = " ".join(
            f"{t.params[k]:>{width}.4g}"
            if isinstance(t.params.get(k), float)
            else f"{t.params.get(k, '')!s:>{width}}"
            for k in keys
        )
        m = {k: t.metrics.get(k, math.nan) for k in TUNE_MODES}
        marks = (" pareto" if t.trial_id in front else "") + (
            "  <- best" if t.trial_id == result.best.trial_id else ""
        )
        lines.append(
            f"{t.trial_id:<12} {values} {t.step:>6} {m['val_psnr']:>7.3f} {m['val_niqe']:>7.3f} "
            f"{m['val_score']:>8.3f}  {t.status}{marks}"
        )
    return "\n".join(lines)


def _search_alg(cfg: JobConfig) -> Any:
    settings = cfg.tune
    if settings.search_alg == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search import ConcurrencyLimiter
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as err:
            raise ConfigError(f"tune.search_alg=optuna needs the optuna package ({err})") from err
        searcher = OptunaSearch(seed=cfg.train.seed)
        return ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent_trials)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # the concurrency limit goes to the generator: Tune ignores max_concurrent_trials given a search algorithm
    return BasicVariantGenerator(max_concurrent=settings.max_concurrent_trials, random_state=cfg.train.seed)


def _scheduler(cfg: JobConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    settings = cfg.tune
    grace = settings.grace_period or min(settings.report_every, settings.max_steps)
    if settings.scheduler == "asha":
        return ASHAScheduler(
            time_attr="step",
            max_t=settings.max_steps,
            grace_period=grace,
            reduction_factor=settings.reduction_factor,
        )
    if settings.scheduler == "median":
        return MedianStoppingRule(time_attr="step", grace_period=grace)
    return FIFOScheduler()


def _points(trials: Sequence[TrialSummary]) -> list[pareto.Point]:
    return [
        pareto.Point(t.trial_id, t.metrics["val_psnr"], t.metrics["val_niqe"], t.params, t.generator)
        for t in trials
        if t.generator and "val_psnr" in t.metrics and "val_niqe" in t.metrics
    ]


def write_pareto(
    cfg: JobConfig, trials: Sequence[TrialSummary], experiment: Path, baseline: dict[str, float] | None = None
) -> tuple[list[str], dict[str, str]]:
    """``pareto.csv``, ``pareto.png`` and a config per front point in ``experiment``; returns the front's
    trial ids and ``{trial_id: config file}``. ``cfg`` is the sweep's own configuration."""
    points = _points(trials)
    front = pareto.pareto_front(points)
    configs = pareto.write_front_configs(absolute_paths(cfg), front, experiment)
    pareto.write_csv(experiment / pareto.CSV_FILE, points, front, configs)
    if points:
        pareto.plot_front(experiment / pareto.PLOT_FILE, points, front, baseline)
    return [p.trial_id for p in front], {k: str(v) for k, v in configs.items()}


def tune(
    cfg: JobConfig,
    resume: bool = False,
    *,
    callbacks: Sequence[Callback] = (),
    trial_fn: Callable[[dict[str, Any], _Setup], None] = run_trial,
) -> TuneResult:
    """Run (or with ``resume`` continue, via ``Tuner.restore``) the sweep; write ``best.json`` and the
    Pareto files, print the table of trials and return the result. ``callbacks`` are further Ray Tune
    callbacks and ``trial_fn`` wraps :func:`run_trial` (instrumentation); a resumed sweep keeps both from
    its first run. The experiment folder is locked throughout: a second sweep into it is refused."""
    experiment = Path(cfg.tune.output_dir).expanduser().resolve() / (cfg.tune.name or f"{cfg.name}-tune")
    with folder_lock(experiment, "tune sweep"):
        return _tune(cfg, resume, experiment, callbacks, trial_fn)


def _sweep_run_tags(base: JobConfig, experiment: Path, restore: bool) -> tuple[str, dict[str, str]]:
    """The driver run's name and tags: a resumed sweep's run is nested under its first run."""
    tags = {**run_tags(base, 2), "sweep": experiment.name}
    first = experiment / SWEEP_RUN_FILE
    if restore and first.is_file():
        tags["mlflow.parentRunId"] = json.loads(first.read_text())["run_id"]
        return f"{experiment.name}-resume", tags
    return experiment.name, tags


def _tune(
    cfg: JobConfig,
    resume: bool,
    experiment: Path,
    callbacks: Sequence[Callback],
    trial_fn: Callable[[dict[str, Any], _Setup], None],
) -> TuneResult:
    from ray import tune as ray_tune

    from pipeline.train.tune.mlflow_runs import TrialRuns, process_uris_kept

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise ConfigError(
            "run the sweep as one plain process, not under torchrun/deepspeed: each trial makes its own "
            "world of one (Ray's workers inherit RANK/WORLD_SIZE and would try to join the launcher's world)"
        )
    settings = cfg.tune
    base = trial_base(cfg)
    space = search_space(base)
    if settings.workers_per_trial > 1:
        from pipeline.train.tune.workers import trainer_class

        trainer_class()
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
    with ray_session({"address": settings.address or None, "include_dashboard": False}):
        params = {k: json.dumps(v) for k, v in (settings.search_space or DEFAULT_SPACE).items()}
        name, tags = _sweep_run_tags(base, experiment, restore)
        with tracker.start_run(name, params={**base.flat(), **params}, tags=tags):
            setup = _Setup(base.to_dict(), str(experiment), samples, driver.validator.codec)
            # a multi-worker trial is a driver of Ray's default size; its workers ask for the resources
            resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
            if settings.workers_per_trial > 1:
                resources = {"cpu": 1}
            trainable = ray_tune.with_resources(ray_tune.with_parameters(trial_fn, setup=setup), resources)
            if restore:
                tuner = ray_tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
            else:
                run_id = tracker.active_run_id
                trial_runs = []
                if base.tracking.enabled and run_id is not None and not getattr(tracker, "offline", True):
                    experiment.mkdir(parents=True, exist_ok=True)
                    (experiment / SWEEP_RUN_FILE).write_text(json.dumps({"run_id": run_id}))
                    uri, mlflow_experiment = base.tracking.uri, getattr(tracker, "experiment", "")
                    trial_runs = [TrialRuns(uri, mlflow_experiment, run_id, experiment.name)]
                tuner = ray_tune.Tuner(
                    trainable,
                    param_space=space,
                    tune_config=ray_tune.TuneConfig(
                        metric=settings.metric,
                        mode=settings.mode,
                        search_alg=_search_alg(cfg),
                        scheduler=_scheduler(cfg),
                        num_samples=settings.num_samples,
                        trial_dirname_creator=trial_dirname,
                    ),
                    run_config=ray_tune.RunConfig(
                        name=experiment.name,
                        storage_path=str(experiment.parent),
                        verbose=1,
                        callbacks=[*trial_runs, *callbacks],
                        failure_config=ray_tune.FailureConfig(max_failures=settings.max_failures),
                        checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=settings.keep_checkpoints),
                    ),
                )
            with process_uris_kept():
                grid: ResultGrid = tuner.fit()
            trials = [_summary(r) for r in grid]
            unfinished = _unfinished(experiment, None if restore else settings.num_samples)
            if unfinished:  # Ray returns from fit() on Ctrl-C or SIGUSR1, having saved the experiment's state
                raise KeyboardInterrupt(f"sweep interrupted ({unfinished}); continue it with --resume")
            front, configs = write_pareto(cfg, trials, experiment, baseline)
            result = TuneResult(
                str(experiment),
                settings.metric,
                settings.mode,
                best_trial(trials, settings.metric, settings.mode),
                trials,
                baseline,
                pareto=front,
                pareto_configs=configs,
            )
            best_file = experiment / BEST_FILE
            best_file.write_text(json.dumps(result.to_dict(), indent=2))
            result.best_file = str(best_file)
            tracker.log_metrics({f"best.{k}": v for k, v in result.best.metrics.items()})
            tracker.log_metrics({"pareto.size": float(len(front))})
            tracker.log_artifact(best_file, "tune")
            for artifact in (pareto.CSV_FILE, pareto.PLOT_FILE, pareto.CONFIG_DIR):
                if (experiment / artifact).exists():
                    tracker.log_artifact(experiment / artifact, "pareto")
    print(format_table(result))
    print(f"[tune] best trial {result.best.trial_id}: {result.best.params} -> {result.best.generator}")
    if front:
        print(
            f"[tune] Pareto front (val_psnr max, val_niqe min): {', '.join(front)}; configs in "
            f"{experiment / pareto.CONFIG_DIR}"
        )
    return result
