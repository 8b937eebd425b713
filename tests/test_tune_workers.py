"""Multi-worker trials (``tune.workers_per_trial``): one trial trained by 2 Ray Train workers on CPU (gloo),
failed once after its first Ray checkpoint and retried from it, its metrics and checkpoint in the result."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle

from pipeline.config import JobConfig, load_config
from pipeline.model.export import read_spec
from pipeline.tracking import Tracker
from pipeline.train.checkpoint import STATE_FILE
from pipeline.train.trainer import train
from pipeline.train.tune import run_trial, tune

MAX_STEPS = 4
WORKERS = 2


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    # logical CPUs: the trial's driver takes one, each of its two workers one
    ray.init(num_cpus=1 + WORKERS, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def job_cfg(shards: Path, root: Path, *extra: str) -> JobConfig:
    return load_config(
        None,
        [
            f"shards.output={shards}",
            f"train.output_dir={root / 'phase1'}",
            "loader.crop=[64, 128]",
            "loader.batch_size=1",
            "loader.shuffle=4",
            "phase1.steps=2",
            "phase1.loss.vgg=0",
            "phase2.loss.vgg=0",
            "train.checkpoint_every=0",
            "tracking.enabled=false",
            *extra,
        ],
    )


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this module


def fail_once(config: dict[str, Any], setup: Any) -> None:
    """:func:`run_trial` whose driver fails once, right after reporting its first Ray checkpoint."""
    import ray.tune as ray_tune

    marker = Path(setup.experiment).parent / "failed-once"
    real = ray_tune.report

    def report(metrics: dict[str, Any], *, checkpoint: Any = None, **kwargs: Any) -> None:
        real(metrics, checkpoint=checkpoint, **kwargs)
        if checkpoint is not None and not marker.exists():
            marker.write_text(ray_tune.get_context().get_trial_id())
            raise RuntimeError("injected failure after the first checkpoint")

    ray_tune.report = report
    try:
        run_trial(config, setup)
    finally:
        ray_tune.report = real


@pytest.fixture(scope="module")
def sweep(small_shards: Path, ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("workers")
    phase1 = train(job_cfg(small_shards, root), [1], tracker=Tracker())[1]
    cfg = job_cfg(
        small_shards,
        root,
        f"train.init_from={phase1}",
        "tracking.enabled=true",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "tracking.experiment=tune-workers",
        f"tune.output_dir={root / 'tune'}",
        "tune.name=sweep",
        "tune.num_samples=1",
        f"tune.max_steps={MAX_STEPS}",
        "tune.report_every=2",
        "tune.eval_images=2",
        "tune.scheduler=fifo",
        "tune.max_failures=1",
        f"tune.workers_per_trial={WORKERS}",
        "tune.search_space={phase2.loss.dist: {loguniform: [1.0, 100.0]}}",
    )
    result = tune(cfg, trial_fn=fail_once)
    return {"root": root, "result": result, "experiment": root / "tune" / "sweep"}


def ray_results(trial_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_two_worker_trial_trains_on_both_and_reports_through_rank_0(sweep: dict[str, Any]) -> None:
    (trial,) = sweep["result"].trials
    assert trial.generator and (trial.step, trial.error) == (MAX_STEPS, "")
    spec = read_spec(trial.generator)
    assert (spec.phase, spec.steps) == (2, MAX_STEPS)
    trial_dir = Path(trial.path)
    results = ray_results(trial_dir)
    assert results and {r["world_size"] for r in results} == {WORKERS}
    assert all(5 < r["val_psnr"] < 60 and r["val_niqe"] >= 0 for r in results)
    # the Ray checkpoint holds the trainer checkpoint of both ranks (each wrote its RNG and data position)
    (checkpoint,) = sorted(trial_dir.glob("checkpoint_*"))
    (state_file,) = checkpoint.glob(f"*/{STATE_FILE}")
    state = json.loads(state_file.read_text())
    assert (state["phase"], state["step"], state["world_size"]) == (2, 2, WORKERS)
    assert sorted(p.name for p in state_file.parent.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert len(set(state["generator_sha256"])) == 1  # the two replicas stayed identical


@pytest.mark.slow
def test_a_failed_multi_worker_trial_resumes_from_its_ray_checkpoint(sweep: dict[str, Any]) -> None:
    (trial,) = sweep["result"].trials
    assert (sweep["root"] / "tune" / "failed-once").read_text() == trial.trial_id
    steps = [(r["step"], r["start_step"]) for r in ray_results(Path(trial.path))]
    assert steps[-1] == (MAX_STEPS, 2) and (2, 2) not in steps, steps


@pytest.mark.slow
def test_the_trial_run_holds_the_workers_metrics(sweep: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{sweep['root'] / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tune-workers").experiment_id])
    (trial_run,) = [r for r in runs if r.info.run_name.startswith("trial-")]
    (sweep_run,) = [r for r in runs if r.info.run_name == "sweep"]
    assert trial_run.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
    assert trial_run.info.status == "FINISHED"
    assert trial_run.data.metrics["world_size"] == WORKERS
    assert sweep_run.data.metrics["best.val_psnr"] == pytest.approx(sweep["result"].best.metrics["val_psnr"])
