"""Multi-worker trials (``tune.workers_per_trial > 1``): one trial trains on several Ray Train workers.

The Tune trial is the driver (Ray's "Tune over Train" pattern): it puts its Ray checkpoint back as the
trainer's checkpoint, then runs a :class:`ray.train.torch.TorchTrainer` of ``tune.workers_per_trial``
workers (``tune.cpus_per_trial`` / ``tune.gpus_per_trial`` each; gloo on CPU, NCCL on GPU). Ray Train sets
up torch.distributed and the launcher variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), so every worker
runs the same :func:`pipeline.train.trainer.train` as a ``torchrun`` rank would. Rank 0 scores the
generator at each report and hands the metrics and a snapshot of the step's checkpoint to the driver
through a Ray queue; the driver reports them to Tune (the trial's Ray checkpoint) and only then lets rank
0 go on, so ASHA stops the trial and retries resume from a checkpoint exactly as for a one-worker trial.

Failures are Tune's to retry (``tune.max_failures``, from the newest Ray checkpoint): the Train run itself
retries nothing. When Tune ends the trial (ASHA, an error), the Train controller and its workers, owned by
the trial's actor, end with it. The trial folder (under ``tune.output_dir``) must be on storage every
worker's node sees.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from pipeline.config import ConfigError, JobConfig, from_dict, with_overrides
from pipeline.model.export import load_generator
from pipeline.tracking import Tracker
from pipeline.train.trainer import StepEvent, train

if TYPE_CHECKING:
    from pipeline.train.tune.sweep import _Setup

SNAPSHOT_DIR = "ray-snapshots"  # under the trial's train/: checkpoint snapshots waiting for Tune
TRAIN_RUN = "workers"  # Ray Train's run folder inside the trial folder
POLL_S = 1.0
END_TIMEOUT_S = 120.0  # for a Train run ended by its trial to free its workers


class ReportChannel:
    """Rank 0 -> the trial's driver: ``(metrics, snapshot folder or "")``, one at a time; rank 0 waits
    until the driver has reported it to Tune (and Tune has persisted the checkpoint)."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.results: Any = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.acks: Any = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.workers: Any = Queue(actor_options={"num_cpus": 0})  # their actors, to end them with the trial

    def join(self) -> None:
        """Called by each worker as it starts."""
        import ray

        self.workers.put(ray.get_runtime_context().current_actor)

    def end_workers(self) -> None:
        """Kill the run's workers (when they did not end on their own)."""
        import ray

        while not self.workers.empty():
            ray.kill(self.workers.get(), no_restart=True)

    def report(self, metrics: dict[str, Any], folder: str = "") -> None:
        self.results.put((metrics, folder))
        if not self.acks.get():
            raise TrialEnded("the trial ended (stopped by Tune or failed) while its workers trained")

    def next(self, running: threading.Thread) -> tuple[dict[str, Any], str] | None:
        """The next report; None once the Train run has ended and every report is taken."""
        from ray.util.queue import Empty

        while True:
            try:
                return self.results.get(timeout=POLL_S)
            except Empty:
                if not running.is_alive() and self.results.empty():
                    return None

    def done(self, go_on: bool = True) -> None:
        self.acks.put(go_on)


class TrialEnded(RuntimeError):
    """Raised in rank 0 when the trial's driver ends the Train run (Tune stopped the trial, or it failed)."""


def _launcher_env() -> int:
    """Make the worker look like a ``torchrun`` rank to :func:`pipeline.train.engine.init_distributed`;
    returns the world rank. ``LOCAL_RANK`` is the worker's CUDA device index within the devices Ray shows
    it (the trainer pins its device by it)."""
    import ray.train

    context = ray.train.get_context()
    local = context.get_local_rank()
    if torch.cuda.is_available():
        from ray.train.torch import get_device

        local = get_device().index or 0
    os.environ.update(
        RANK=str(context.get_world_rank()),
        WORLD_SIZE=str(context.get_world_size()),
        LOCAL_RANK=str(local),
    )
    return context.get_world_rank()


def train_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: phase 2 with the trial's values; rank 0 scores and reports."""
    from pipeline.train.tune.sweep import COMPLETED_KEY, Evaluator, checkpoint_snapshot

    rank = _launcher_env()
    setup: _Setup = loop["setup"]
    channel: ReportChannel = loop["channel"]
    channel.join()
    out = Path(loop["out"])
    start: int | None = loop["start"]
    cfg = with_overrides(from_dict(setup.base), {**loop["config"], "train.output_dir": str(out)})
    evaluate = Evaluator(cfg, setup.samples, setup.codec) if rank == 0 else None
    every = cfg.tune.report_every

    def on_step(event: StepEvent) -> None:
        if evaluate is None or event.phase != 2 or event.step >= event.steps or event.step % every:
            return
        scores = evaluate(event.scored)
        losses = {f"loss.{k}": float(v) for k, v in event.losses.items()}
        metrics = {"step": event.step, "start_step": start or 0, "world_size": dist.get_world_size()}
        with checkpoint_snapshot(out, event.step, out / SNAPSHOT_DIR) as folder:
            channel.report({**metrics, **scores, **losses}, str(folder))

    exports = train(cfg, [2], resume=start is not None, tracker=Tracker(), run_name="train", on_step=on_step)
    if evaluate is not None:
        generator, _ = load_generator(exports[2], evaluate.device)
        metrics = {"step": cfg.phase2.steps, "start_step": start or 0, "world_size": dist.get_world_size()}
        channel.report({**metrics, **evaluate(generator), COMPLETED_KEY: str(exports[2])})


def trainer_class() -> Any:
    """Ray Train's TorchTrainer, refused unless it is Train V2's (run from inside a Tune trial)."""
    from ray.train.torch import TorchTrainer

    if not TorchTrainer.__module__.startswith("ray.train.v2"):
        raise ConfigError(
            "tune.workers_per_trial > 1 needs Ray Train V2 (Ray >= 2.43 with RAY_TRAIN_V2_ENABLED=1, the "
            "default in later releases)"
        )
    return TorchTrainer


def run_workers(cfg: JobConfig, config: dict[str, Any], setup: _Setup, out: Path, start: int | None) -> None:
    """The trial's driver: a TorchTrainer of ``tune.workers_per_trial`` workers running
    :func:`train_worker`, their reports passed on to Tune (see the module's docstring)."""
    from ray import tune as ray_tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    settings = cfg.tune
    shutil.rmtree(out / SNAPSHOT_DIR, ignore_errors=True)  # what a stopped attempt left
    resources = {"CPU": settings.cpus_per_trial}
    if settings.gpus_per_trial:
        resources["GPU"] = settings.gpus_per_trial
    channel = ReportChannel()
    trainer = trainer_class()(
        train_worker,
        train_loop_config={
            "config": config,
            "setup": setup,
            "out": str(out),
            "start": start,
            "channel": channel,
        },
        scaling_config=ScalingConfig(
            num_workers=settings.workers_per_trial,
            use_gpu=settings.gpus_per_trial > 0,
            resources_per_worker=resources,
        ),
        torch_config=TorchConfig(backend="nccl" if settings.gpus_per_trial > 0 else "gloo"),
        run_config=RunConfig(
            name=TRAIN_RUN,
            storage_path=str(out.parent),
            failure_config=FailureConfig(max_failures=0),  # Tune retries the trial from its checkpoint
        ),
    )
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # re-raised in the trial's thread, where Tune sees it
            outcome["error"] = err

    running = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    running.start()
    try:
        while (item := channel.next(running)) is not None:
            metrics, folder = item
            if folder:
                ray_tune.report(metrics, checkpoint=ray_tune.Checkpoint.from_directory(folder))
            else:
                ray_tune.report(metrics)
            channel.done()
    except BaseException:
        # Tune stopped the trial (ASHA: SystemExit in report) or a report failed, rank 0 waiting for its
        # answer: it raises, and Ray Train ends the run and frees its resources before the trial goes
        channel.done(go_on=False)
        running.join(END_TIMEOUT_S)
        if running.is_alive():
            channel.end_workers()
        raise
    running.join()
    if "error" in outcome:
        raise outcome["error"]
