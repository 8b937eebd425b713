"""Ray Tune sweep of the phase-2 weights: a tiny 3-trial ASHA sweep (2 concurrent trials) on CPU, resume, a
trial retried from its Ray checkpoint, a sweep interrupted and resumed, the Pareto front and its configs."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle
from ray.tune import Callback

from pipeline.config import ConfigError, JobConfig, load_config
from pipeline.model.export import read_spec
from pipeline.ray_session import SIGNALS
from pipeline.tracking import Tracker
from pipeline.train.trainer import train
from pipeline.train.tune import BEST_FILE, run_trial, search_space, trial_base, tune
from pipeline.train.tune.pareto import CONFIG_DIR, CSV_FILE, PLOT_FILE, Point, pareto_front

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


def sweep_cfg(shards: Path, phase1: Path, root: Path, *extra: str) -> JobConfig:
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
        *extra,
    )


@pytest.fixture(scope="module")
def sweep(
    shards: Path, phase1: Path, ray_cluster: None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sweep")
    cfg = sweep_cfg(shards, phase1, root)
    before = mlflow_process_uris(), signal_handlers()
    result = tune(cfg)
    return {
        "cfg": cfg,
        "result": result,
        "experiment": root / "tune" / "sweep",
        "root": root,
        "process": (before, (mlflow_process_uris(), signal_handlers())),
    }


def signal_handlers() -> dict[int, Any]:
    return {number: signal.getsignal(number) for number in SIGNALS}


def mlflow_process_uris() -> tuple[str, str, str | None, str | None]:
    """The MLflow tracking and registry URIs this process would use, and their environment variables."""
    import mlflow

    env = os.environ
    return (
        mlflow.get_tracking_uri(),
        mlflow.get_registry_uri(),
        env.get("MLFLOW_TRACKING_URI"),
        env.get("MLFLOW_REGISTRY_URI"),
    )


def test_the_sweep_leaves_the_process_as_it_found_it(sweep: dict[str, Any]) -> None:
    """Ray's MLflow callback sets the process-wide URIs to the sweep's store; a later
    ``mlflow.pyfunc.load_model("models:/...")`` in the same process must not read that store. Tune's
    ``fit`` installs its SIGINT and SIGUSR1 handlers, which would swallow the next Ctrl-C."""
    (uris_before, handlers_before), (uris_after, handlers_after) = sweep["process"]
    assert uris_after == uris_before
    assert handlers_after == handlers_before


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
        (["tune.workers_per_trial=0"], "tune.workers_per_trial must be >= 1"),
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


# ------------------------------------------------------------------------- Pareto front and its configs


def test_pareto_front_keeps_the_non_dominated_points() -> None:
    points = [
        Point("a", 30.0, 6.0, {}),  # best PSNR
        Point("b", 29.0, 4.0, {}),  # trade-off
        Point("c", 28.0, 5.0, {}),  # dominated by b
        Point("d", 27.0, 3.0, {}),  # best NIQE
        Point("e", 29.0, 4.0, {}),  # ties b: neither dominates the other
        Point("f", math.nan, 1.0, {}),  # not scored
    ]
    front = pareto_front(points)
    assert [p.trial_id for p in front] == ["a", "b", "e", "d"]
    assert pareto_front([]) == []


@pytest.mark.slow
def test_the_sweep_writes_its_pareto_front(sweep: dict[str, Any]) -> None:
    experiment, result = sweep["experiment"], sweep["result"]
    rows = list(csv.DictReader((experiment / CSV_FILE).open()))
    completed = {t.trial_id: t for t in result.trials if t.generator}
    assert {r["trial_id"] for r in rows} == set(completed)
    front = [r for r in rows if r["on_front"] == "1"]
    assert [r["trial_id"] for r in front] == result.pareto and front
    for row in front:  # nothing completed dominates a front point
        psnr, niqe = float(row["val_psnr"]), float(row["val_niqe"])
        assert not any(
            t.metrics["val_psnr"] >= psnr
            and t.metrics["val_niqe"] <= niqe
            and (t.metrics["val_psnr"] > psnr or t.metrics["val_niqe"] < niqe)
            for t in completed.values()
        )
    assert (experiment / PLOT_FILE).stat().st_size > 0
    best = json.loads((experiment / BEST_FILE).read_text())
    assert best["pareto"] == result.pareto


@pytest.mark.slow
def test_a_pareto_config_holds_the_trial_weights_and_trains_phases_2_and_3(sweep: dict[str, Any]) -> None:
    result = sweep["result"]
    trial_id = result.pareto[0]
    path = Path(result.pareto_configs[trial_id])
    assert path.parent == sweep["experiment"] / CONFIG_DIR
    trial = next(t for t in result.trials if t.trial_id == trial_id)
    cfg = load_config(path)
    for key, value in trial.params.items():
        assert cfg.flat()[key] == pytest.approx(value)
    assert cfg.phase2.steps == sweep["cfg"].phase2.steps  # the sweep's config, not a trial's shortened one
    assert Path(cfg.train.init_from).is_file() and Path(cfg.train.output_dir).is_absolute()
    short = load_config(path, ["phase2.steps=1", "phase3.steps=1", "tracking.enabled=false"])
    exports = train(short, [2, 3], tracker=Tracker())
    assert (read_spec(exports[2]).phase, read_spec(exports[3]).phase) == (2, 3)
    assert str(exports[3]).startswith(str(sweep["experiment"] / CONFIG_DIR / trial_id))


# ----------------------------------------------------- the trials' MLflow runs (Ray's MLflowLoggerCallback)


@dataclass(eq=False)
class FakeTrial:
    """What the callback reads of a Ray trial."""

    trial_id: str
    config: dict[str, Any] = field(default_factory=lambda: {"phase2.loss.dist": 3.0})
    last_result: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"run_trial_{self.trial_id}"


@pytest.fixture
def process_uris() -> Iterator[None]:
    """Ray's callback sets MLflow's process-wide URIs in its setup; the sweep restores them after the run
    (:func:`~pipeline.train.tune.mlflow_runs.process_uris_kept`), so does a test that drives it."""
    from pipeline.train.tune.mlflow_runs import process_uris_kept

    with process_uris_kept():
        yield


def test_trial_runs_nest_under_the_sweep_and_end_in_the_trial_state(
    tmp_path: Path, process_uris: None
) -> None:
    from mlflow import MlflowClient

    from pipeline.train.tune.mlflow_runs import TrialRuns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("runs-test")
    sweep_id = client.create_run(experiment_id, run_name="sweep").info.run_id

    def callback() -> TrialRuns:
        runs = TrialRuns(uri, "runs-test", sweep_id, "sweep")
        runs.setup()
        return runs

    runs = callback()
    done, stopped, failed, open_ = (FakeTrial(i) for i in ("done", "stopped", "failed", "open"))
    for trial in (done, stopped, failed, open_):
        runs.log_trial_start(trial)
        trial.last_result = {
            "step": 2,
            "val_psnr": 30.0,
            "loss.g_total": 1.5,
            "hostname": "x",
            "time_this_iter_s": 1,
        }
        runs.log_trial_result(1, trial, trial.last_result)
    done.last_result = {"step": 4, "val_psnr": 31.0, "generator": "g.safetensors"}
    runs.log_trial_result(2, done, done.last_result)
    runs.log_trial_end(done)
    runs.log_trial_end(stopped)  # ASHA stopped it: no export
    runs.log_trial_end(failed, failed=True)
    runs.on_experiment_end([open_])  # the driver was interrupted
    restored = callback()  # a resumed sweep: Ray's callback starts with no runs
    restored.log_trial_start(open_)
    reopened = {
        r.data.tags["trial_id"]: r for r in client.search_runs([experiment_id], "tags.trial_id = 'open'")
    }
    assert reopened["open"].info.status == "RUNNING"
    restored.log_trial_end(open_)

    trial_runs = {
        r.data.tags["trial_id"]: r
        for r in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{sweep_id}'")
    }
    assert set(trial_runs) == {"done", "stopped", "failed", "open"}  # the restore added none
    status = {k: r.info.status for k, r in trial_runs.items()}
    assert status == {"done": "FINISHED", "stopped": "KILLED", "failed": "FAILED", "open": "KILLED"}
    assert trial_runs["done"].info.run_name == "trial-done"
    assert trial_runs["done"].data.params["phase2.loss.dist"] == "3.0"
    history = client.get_metric_history(trial_runs["done"].info.run_id, "val_psnr")
    assert [(m.step, m.value) for m in history] == [(2, 30.0), (4, 31.0)]  # at the phase-2 step
    assert (
        "hostname" not in trial_runs["done"].data.metrics
        and "time_this_iter_s" not in trial_runs["done"].data.metrics
    )
    assert trial_runs["done"].data.metrics["loss.g_total"] == 1.5
    assert trial_runs["done"].data.metrics["stopped_early"] == 0.0
    assert trial_runs["stopped"].data.metrics["stopped_early"] == 1.0


# ------------------------------------------------------------- a failed trial retried, a sweep resumed

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this module


def flaky_trial(config: dict[str, Any], setup: Any) -> None:
    """:func:`run_trial` that fails once in the whole sweep, right after its first Ray checkpoint."""
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


class InterruptOnce(Callback):
    """Interrupts the sweep (SIGUSR1, as SLURM sends before a time limit) when its first trial completes."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if not self.marker.exists():
            self.marker.write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture(scope="module")
def resilient(
    shards: Path, phase1: Path, ray_cluster: None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Two trials one after the other (FIFO: none stopped early); the first fails once after its step-2
    checkpoint, and the sweep is interrupted when it completes, then resumed."""
    root = tmp_path_factory.mktemp("resilient")
    cfg = sweep_cfg(
        shards,
        phase1,
        root,
        "tune.num_samples=2",
        "tune.max_concurrent_trials=1",
        "tune.scheduler=fifo",
        "tune.max_failures=1",
    )
    interrupt = InterruptOnce(root / "interrupted")
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        tune(cfg, callbacks=[interrupt], trial_fn=flaky_trial)
    experiment = root / "tune" / "sweep"
    first = {d.name: ray_results(d) for d in trial_dirs(experiment) if (d / "result.json").is_file()}
    result = tune(cfg, resume=True, trial_fn=flaky_trial)
    return {
        "root": root,
        "experiment": experiment,
        "first": first,
        "result": result,
        "failed": (root / "tune" / "failed-once").read_text(),
        "interrupted": (root / "interrupted").read_text(),
    }


@pytest.mark.slow
def test_a_failed_trial_is_retried_from_its_ray_checkpoint(resilient: dict[str, Any]) -> None:
    failed = resilient["failed"]
    assert failed == resilient["interrupted"]  # the first trial failed, was retried, then completed
    results = ray_results(resilient["experiment"] / f"trial_{failed}")
    # the retry started at the step-2 checkpoint (from scratch it would start at 0 and report step 2 again);
    # Ray keeps the results from the restored checkpoint on
    steps = [(r["step"], r["start_step"]) for r in results]
    assert steps[-1] == (MAX_STEPS, 2) and (2, 2) not in steps, steps
    assert list((resilient["experiment"] / f"trial_{failed}").glob("checkpoint_*"))
    (trial,) = [t for t in resilient["result"].trials if t.trial_id == failed]
    assert trial.generator and (trial.step, trial.error) == (MAX_STEPS, "")


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(resilient: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    first, experiment = resilient["first"], resilient["experiment"]
    done = f"trial_{resilient['interrupted']}"
    assert ray_results(experiment / done) == first[done]  # not one result more
    trials = resilient["result"].trials
    assert len(trials) == 2 and all(t.generator for t in trials)
    client = MlflowClient(f"sqlite:///{resilient['root'] / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tune-test").experiment_id])
    trial_runs = [r for r in runs if r.info.run_name.startswith("trial-")]
    assert sorted(r.data.tags["trial_id"] for r in trial_runs) == sorted(t.trial_id for t in trials)
    assert {r.info.status for r in trial_runs} == {"FINISHED"}
    (sweep_run,) = [r for r in runs if r.info.run_name == "sweep"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {sweep_run.info.run_id}
    (resumed,) = [r for r in runs if r.info.run_name == "sweep-resume"]
    assert resumed.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
    assert sweep_run.info.status == "KILLED" and resumed.info.status == "FINISHED"
