"""Ray Tune sweep of the phase-2 weights: a tiny 3-trial ASHA sweep (2 concurrent trials) on CPU, resume."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from pipeline.config import ConfigError, JobConfig, load_config
from pipeline.model.export import read_spec
from pipeline.tracking import MLflowTracker, Tracker
from pipeline.train.trainer import train
from pipeline.train.tune import (
    BEST_FILE,
    TrialSummary,
    _close_stopped_runs,
    search_space,
    trial_base,
    tune,
)

REPO = Path(__file__).resolve().parents[1]
BOUNDS = {"phase2.loss.dist": (1.0, 100.0), "phase2.loss.feat": (0.5, 20.0)}
MAX_STEPS = 4


@pytest.fixture(scope="module")
def shards(small_shards: Path) -> Path:
    return small_shards


def base_cfg(shards: Path, out: Path, *extra: str) -> JobConfig:
    return load_config(
        None,
        [
            f"shards.output={shards}",
            f"train.output_dir={out / 'phase1'}",
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


@pytest.fixture(scope="module")
def phase1(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prior")
    return train(base_cfg(shards, out), [1], tracker=Tracker())[1]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def sweep_cfg(shards: Path, phase1: Path, root: Path) -> JobConfig:
    space = "{" + ", ".join(f"{k}: {{loguniform: [{lo}, {hi}]}}" for k, (lo, hi) in BOUNDS.items()) + "}"
    return base_cfg(
        shards,
        root,
        f"train.init_from={phase1}",
        "tracking.enabled=true",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "tracking.experiment=tune-test",
        "tracking.log_every=2",
        f"tune.output_dir={root / 'tune'}",
        "tune.name=sweep",
        "tune.num_samples=3",
        f"tune.max_steps={MAX_STEPS}",
        "tune.report_every=2",
        "tune.eval_images=2",
        "tune.max_concurrent_trials=2",
        "tune.reduction_factor=4",  # ASHA keeps the top quarter at step 2: early stops are likely
        "tune.metric=val_psnr",
        "tune.mode=max",
        f"tune.search_space={space}",
    )


@pytest.fixture(scope="module")
def sweep(
    shards: Path, phase1: Path, ray_cluster: None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sweep")
    cfg = sweep_cfg(shards, phase1, root)
    return {"cfg": cfg, "result": tune(cfg), "experiment": root / "tune" / "sweep", "root": root}


def ray_results(trial_dir: Path) -> list[dict[str, Any]]:
    """Every result Ray recorded for a trial (its result.json, one JSON object a line)."""
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


def trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("trial_"))


@pytest.mark.slow
def test_each_trial_gets_its_own_weights_from_the_space(sweep: dict[str, Any]) -> None:
    trials = sweep["result"].trials
    assert len(trials) == 3
    for trial in trials:
        assert set(trial.params) == set(BOUNDS)
        for key, (lo, hi) in BOUNDS.items():
            assert lo <= trial.params[key] <= hi
    for a, b in itertools.combinations(trials, 2):
        assert all(a.params[k] != b.params[k] for k in BOUNDS)


@pytest.mark.slow
def test_results_hold_psnr_and_niqe(sweep: dict[str, Any]) -> None:
    experiment = sweep["experiment"]
    dirs = trial_dirs(experiment)
    assert len(dirs) == 3
    for trial_dir in dirs:
        results = ray_results(trial_dir)
        assert results and results[0]["step"] == 2
        for result in results:
            assert math.isfinite(result["val_psnr"]) and 5 < result["val_psnr"] < 60
            assert math.isfinite(result["val_niqe"]) and result["val_niqe"] >= 0
        # each trial trained in its own output dir
        assert (trial_dir / "train" / "checkpoints").is_dir()
    baseline = sweep["result"].baseline
    assert math.isfinite(baseline["val_psnr"]) and math.isfinite(baseline["val_niqe"])


@pytest.mark.slow
def test_two_trials_ran_at_once(sweep: dict[str, Any]) -> None:
    """max_concurrent_trials=2: two DeepSpeed worlds of one in two Ray workers did not collide."""
    spans = []
    for trial_dir in trial_dirs(sweep["experiment"]):
        results = ray_results(trial_dir)
        spans.append((results[0]["timestamp"] - results[0]["time_total_s"], results[-1]["timestamp"]))
    assert any(a[0] < b[1] and b[0] < a[1] for a, b in itertools.combinations(spans, 2)), spans


@pytest.mark.slow
def test_best_json_names_the_best_completed_trial(sweep: dict[str, Any]) -> None:
    best_file = sweep["experiment"] / BEST_FILE
    best = json.loads(best_file.read_text())
    completed = {}
    for trial_dir in trial_dirs(sweep["experiment"]):
        last = ray_results(trial_dir)[-1]
        if "generator" in last:
            completed[last["trial_id"]] = last
    assert completed
    winner = max(completed.values(), key=lambda r: r["val_psnr"])
    assert best["best"]["trial_id"] == winner["trial_id"]
    assert best["best"]["params"] == {k: winner["config"][k] for k in BOUNDS}
    assert best["best"]["metrics"]["val_psnr"] == pytest.approx(winner["val_psnr"])
    spec = read_spec(best["best"]["generator"])
    assert (spec.phase, spec.steps) == (2, MAX_STEPS)
    assert sweep["result"].best.trial_id == winner["trial_id"]
    assert len(best["trials"]) == 3


@pytest.mark.slow
def test_trials_are_runs_nested_under_the_sweep_run(sweep: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{sweep['root'] / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    trial_runs = [r for r in runs if r.info.run_name.startswith("trial-")]
    assert len(trial_runs) == 3
    parents = {r.data.tags["mlflow.parentRunId"] for r in trial_runs}
    assert len(parents) == 1
    (sweep_run,) = [r for r in runs if r.info.run_id in parents]
    assert sweep_run.info.run_name == "sweep" and "mlflow.parentRunId" not in sweep_run.data.tags
    assert sweep_run.data.metrics["best.val_psnr"] == pytest.approx(sweep["result"].best.metrics["val_psnr"])
    assert {r.data.tags["trial_id"] for r in trial_runs} == {t.trial_id for t in sweep["result"].trials}
    completed = {t.trial_id for t in sweep["result"].trials if t.generator}
    for run in trial_runs:
        if run.data.tags["trial_id"] in completed:
            assert run.info.status == "FINISHED"
            assert run.data.metrics["stopped_early"] == 0.0 and math.isfinite(run.data.metrics["val_psnr"])
        else:  # stopped by ASHA: Ray ended the worker mid-trial; the sweep closed its runs
            assert run.info.status == "KILLED" and run.data.metrics["stopped_early"] == 1.0
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def test_runs_of_stopped_trials_are_closed(tmp_path: Path) -> None:
    """A stopped trial's worker dies with its runs open; the sweep ends them KILLED (errors: FAILED)."""
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "close-test", offline_dir=tmp_path)
    client, experiment_id = tracker.client, tracker.experiment_id

    def open_run(name: str, parent: str, **tags: str) -> str:
        tags = {"mlflow.parentRunId": parent, **tags}
        return client.create_run(experiment_id, tags=tags, run_name=name).info.run_id

    def trial(trial_id: str, generator: str = "", error: str = "") -> TrialSummary:
        return TrialSummary(trial_id, {}, {}, 2, generator, "", error)

    with tracker.start_run("sweep"):
        sweep_id = tracker.active_run_id
        assert sweep_id
        stopped = open_run("trial-a", sweep_id, trial_id="a")
        stopped_child = open_run("phase2", open_run("train", stopped))
        client.set_terminated(stopped_child, "FAILED")  # ended by the SystemExit before the worker died
        errored = open_run("trial-b", sweep_id, trial_id="b")
        done = open_run("trial-c", sweep_id, trial_id="c")
        client.set_terminated(done, "FINISHED")
        _close_stopped_runs(tracker, sweep_id, [trial("a"), trial("b", error="boom"), trial("c", "g.st")])
    runs = {r.info.run_id: r for r in client.search_runs([experiment_id])}
    assert [runs[i].info.status for i in (stopped, stopped_child, errored, done)] == [
        "KILLED",
        "KILLED",
        "FAILED",
        "FINISHED",
    ]
    assert runs[stopped].data.metrics["stopped_early"] == 1.0
    assert "stopped_early" not in runs[done].data.metrics


@pytest.mark.slow
def test_resume_restores_the_finished_sweep_without_rerunning_it(sweep: dict[str, Any]) -> None:
    dirs = trial_dirs(sweep["experiment"])
    before = {d.name: len(ray_results(d)) for d in dirs}
    result = tune(sweep["cfg"], resume=True)
    assert {d.name: len(ray_results(d)) for d in trial_dirs(sweep["experiment"])} == before
    assert result.best.trial_id == sweep["result"].best.trial_id
    assert result.best.params == sweep["result"].best.params


@pytest.mark.slow
def test_a_second_sweep_into_the_same_folder_needs_resume(sweep: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="--resume"):
        tune(sweep["cfg"])


def test_a_plain_sweep_needs_a_phase1_export(shards: Path, tmp_path: Path) -> None:
    """A plain generator cannot start phase 2 from nothing; a residual one starts every trial at the codec."""
    with pytest.raises(ConfigError, match="train.init_from"):
        trial_base(base_cfg(shards, tmp_path, "model.residual=false"))
    assert trial_base(base_cfg(shards, tmp_path)).train.init_from == ""
    with pytest.raises(ConfigError, match="no such file"):
        trial_base(base_cfg(shards, tmp_path, f"train.init_from={tmp_path / 'missing.safetensors'}"))


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("{phase2.loss.nope: {uniform: [0, 1]}}", "not a config value"),
        ("{phase2.steps: {randint: [1, 9]}}", "set by the sweep"),
        ("{phase2.loss.dist: {loguniform: [0, 10]}}", "0 < lo < hi"),
        ("{phase2.loss.dist: {normal: [0, 1]}}", "must be one of"),
        ("{phase2.loss.dist: {choice: [a, b]}}", "expected float"),
    ],
)
def test_bad_search_spaces_are_refused(space: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        search_space(load_config(None, [f"tune.search_space={space}"]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tune.metric=val_niqe", "tune.mode=max"], "tune.mode must be 'min'"),
        (["tune.metric=lpips"], "tune.metric must be one of"),
        (["tune.report_every=0"], "tune.report_every must be >= 1"),
        (["tune.max_steps=10", "tune.grace_period=20"], r"tune.grace_period must lie in \[0, max_steps\]"),
        (["tune.reduction_factor=1"], "tune.reduction_factor must be > 1"),
        (["tune.cpus_per_trial=0"], "tune.cpus_per_trial must be > 0"),
        (["tune.eval_images=-1"], r"tune.eval_images must be >= 0 \(0: all\)"),
    ],
)
def test_bad_settings_are_refused_by_the_config(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_tune_config_composes_the_default() -> None:
    cfg = load_config(REPO / "configs" / "tune.yaml")
    assert cfg.model.ngf == load_config(None).model.ngf
    assert set(search_space(cfg)) >= {"phase2.loss.dist", "phase2.loss.feat"}
    assert cfg.tune.metric in {"val_psnr", "val_niqe", "val_score"}
