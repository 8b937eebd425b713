"""MLflow tracking, the offline fallback and the model registry, against SQLite stores in tmp dirs."""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.models import Model

from pipeline.config import JobConfig, ModelConfig, load_config
from pipeline.model.export import export_generator, load_generator
from pipeline.model.inputs import generator_input
from pipeline.model.networks import build_models
from pipeline.model.spec import GeneratorSpec
from pipeline.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    TRUNCATED,
    MLflowTracker,
    Tracker,
    TrackingUnavailableWarning,
    default_tracking_uri,
    download_model,
    git_commit,
    make_tracker,
    pin_model_uri,
    predict,
    register_generator,
    registry,
    registry_name,
    replay_offline,
    resolve_model_uri,
    run_tags,
)
from pipeline.tracking.base import RunInfo
from pipeline.tracking.mlflow_store import MLflowStore, StoreUnavailable
from pipeline.tracking.registry import ModelURIError, check_model_uri

DEAD_SERVER = "http://127.0.0.1:9"  # loopback discard port: nothing listens
HTTP_ENV = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
)
LABEL_NC = 5


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def job_config(uri: str, experiment: str = "jpd-se-test") -> JobConfig:
    cfg = JobConfig()
    cfg.tracking.uri = uri
    cfg.tracking.experiment = experiment
    return cfg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One working directory per module; no tracking URI in the environment."""
    folder = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        for name in HTTP_ENV:
            mp.delenv(name, raising=False)
        yield folder


@pytest.fixture(scope="module")
def exported(workdir: Path) -> tuple[Path, torch.nn.Module, GeneratorSpec]:
    """A tiny trained-looking generator exported with pipeline.model.export."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(ngf=4, n_downsample=2, n_blocks=1)
    generator, _ = build_models(model_cfg, LABEL_NC, use_instance=True)
    spec = GeneratorSpec.from_config(model_cfg, LABEL_NC, True, codec="hevc", quality=42, phase=2)
    path = export_generator(workdir / "export" / "generator.safetensors", generator, spec)
    return path, generator.eval(), spec


def generator_batch(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "label": rng.integers(0, LABEL_NC, (2, 32, 48), dtype=np.int64),
        "decoded": rng.uniform(-1, 1, (2, 3, 32, 48)).astype(np.float32),
        "edge": (rng.random((2, 1, 32, 48)) > 0.8).astype(np.float32),
    }


def run_job(tracker: Tracker, cfg: JobConfig, artifact: Path, generator_file: Path | None) -> str | None:
    """What the trainer does: a parent run, one nested run per phase, metrics, a checkpoint, registration."""
    extra = {f"sweep.p{i:03d}": i for i in range(150)}  # more params than one MLflow batch holds
    params = {**cfg.flat(), **extra, "notes": "x" * (MAX_PARAM_VALUE_LENGTH + 500)}
    model_uri = None
    with tracker.start_run("job", params=params, tags=run_tags(cfg)):
        for phase in (1, 2):
            with tracker.start_run(
                f"phase{phase}", params={"lr": cfg.phase(phase).lr}, tags=run_tags(cfg, phase)
            ):
                for step in range(3):
                    tracker.log_metrics(
                        {"loss_g": phase + 1.0 / (step + 1), "loss_d": float(step)}, step=step
                    )
                tracker.log_artifact(artifact, "checkpoints")
        if generator_file is not None:
            model_uri = tracker.register_generator(
                generator_file, registry_name("hevc", 42), alias="champion"
            )
    return model_uri


def assert_job_logged(client: MlflowClient, experiment: str, generator_file: Path | None) -> dict[str, Any]:
    """The runs of :func:`run_job` are in the store, nested, with params, tags, metrics, artifacts."""
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"job", "phase1", "phase2"}
    parent = runs["job"]
    assert parent.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in parent.data.tags
    cfg = JobConfig()
    assert len(parent.data.params) == len(cfg.flat()) + 150 + 1
    assert parent.data.params["phase2.loss.dist"] == "10.0"
    assert parent.data.params["sweep.p149"] == "149"
    assert json.loads(parent.data.params["loader.crop"]) == [128, 256]
    notes = parent.data.params["notes"]
    assert len(notes) == MAX_PARAM_VALUE_LENGTH and notes.endswith(TRUNCATED)
    for phase in (1, 2):
        child = runs[f"phase{phase}"]
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["phase"] == str(phase)
        assert child.data.tags["git_commit"] == git_commit()
        assert child.data.tags["codec"] == "hevc" and child.data.tags["quality"] == "42"
        assert child.data.params["lr"] == str(cfg.phase(phase).lr)
        history = client.get_metric_history(child.info.run_id, "loss_g")
        assert sorted((m.step, m.value) for m in history) == [(s, phase + 1.0 / (s + 1)) for s in range(3)]
        artifacts = [a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")]
        assert artifacts == ["checkpoints/ckpt.txt"]
    return runs


def test_no_op_tracker_on_other_ranks_or_when_disabled(workdir: Path) -> None:
    cfg = job_config(sqlite_uri(workdir / "never"))
    assert type(make_tracker(cfg, rank=1)) is Tracker
    cfg.tracking.enabled = False
    tracker = make_tracker(cfg)
    assert type(tracker) is Tracker
    with tracker.start_run("job", params={"a": 1}), tracker.start_run("phase1"):
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_artifact(workdir / "missing.txt")
        assert tracker.register_generator(workdir / "missing.safetensors", "x") is None
    assert not (workdir / "never").exists()


def test_tracking_uri_resolution(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_tracking_uri() == f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////somewhere/else.db")
    assert default_tracking_uri() == "sqlite:////somewhere/else.db"
    assert default_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    tracker = make_tracker(job_config(""))
    assert isinstance(tracker, MLflowTracker) and tracker.uri == "sqlite:////somewhere/else.db"


def test_run_tags_and_names(tmp_path: Path) -> None:
    cfg = JobConfig()
    tags = run_tags(cfg, phase=3)
    assert {k: tags[k] for k in ("codec", "quality", "dataset", "phase")} == {
        "codec": cfg.loader.codec,
        "quality": str(cfg.loader.quality),
        "dataset": cfg.data.source,
        "phase": "3",
    }
    assert "phase" not in run_tags(cfg) and "qualities" not in tags
    several = run_tags(load_config(None, ["loader.qualities=[47, 32, 42]"]))
    assert several["qualities"] == "32,42,47"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"]), tags["git_commit"]
    assert git_commit(tmp_path) == "unknown"
    assert registry_name("hevc", 42) == "hevc-se-q42"
    assert registry_name("jpeg2000", 30, zero_semantics=True) == "jpeg2000-nosem-q30"
    assert registry_name("hevc", 42, label_source="decoder") == "hevc-se-decoder-q42"
    assert registry_name("hevc", 42, label_source="encoder") == "hevc-se-encoder-q42"
    assert registry_name("hevc", 42, zero_semantics=True, label_source="decoder") == "hevc-nosem-q42"
    with pytest.raises(ValueError, match="registered-model name"):
        registry_name("hevc/../x", 42)


@pytest.fixture(scope="module")
def logged_job(
    workdir: Path, exported: tuple[Path, torch.nn.Module, GeneratorSpec]
) -> tuple[str, str | None]:
    """The job of :func:`run_job` logged into the module's default store (``<cwd>/mlruns/mlflow.db``)."""
    artifact = workdir / "ckpt.txt"
    artifact.write_text("checkpoint")
    cfg = job_config("")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingUnavailableWarning)
        model_uri = run_job(make_tracker(cfg), cfg, artifact, exported[0])
    return default_tracking_uri(), model_uri


def test_nested_runs_params_tags_metrics_artifacts(workdir: Path, logged_job: tuple[str, str | None]) -> None:
    uri, _ = logged_job
    assert (workdir / "mlruns" / "mlflow.db").is_file()
    runs = assert_job_logged(MlflowClient(uri), "jpd-se-test", None)
    artifact_root = workdir / "mlruns" / "artifacts"
    assert (artifact_root / runs["phase1"].info.run_id / "artifacts" / "checkpoints" / "ckpt.txt").is_file()


def test_failed_phase_marks_run_failed(workdir: Path, logged_job: tuple[str, str | None]) -> None:
    uri, _ = logged_job
    tracker = MLflowTracker(uri, "jpd-se-failures")
    with pytest.raises(RuntimeError, match="boom"), tracker.start_run("job"), tracker.start_run("phase1"):
        raise RuntimeError("boom")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("jpd-se-failures").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("job", "FAILED"), ("phase1", "FAILED")]


def test_registered_generator_loads_back_bit_identically(
    workdir: Path,
    logged_job: tuple[str, str | None],
    exported: tuple[Path, torch.nn.Module, GeneratorSpec],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, model_uri = logged_job
    path, generator, spec = exported
    name = registry_name("hevc", 42)
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias(name, "champion")
    assert model_uri == f"models:/{name}/{version.version}"
    assert (
        version.run_id
        == client.search_runs(
            [client.get_experiment_by_name("jpd-se-test").experiment_id], "attributes.run_name = 'job'"
        )[0].info.run_id
    )

    assert pin_model_uri(f"models:/{name}@champion", tracking_uri=uri) == model_uri
    assert pin_model_uri(model_uri, tracking_uri=uri) == model_uri
    resolved = resolve_model_uri(f"models:/{name}@champion", tracking_uri=uri, dst_dir=tmp_path / "a")
    assert resolved.read_bytes() == path.read_bytes()
    loaded, loaded_spec = load_generator(resolved)
    assert loaded_spec == spec
    x = torch.randn(2, LABEL_NC + 1 + 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), generator(x))

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the registry found through the environment
    by_version = resolve_model_uri(model_uri, dst_dir=tmp_path / "b")
    assert by_version.read_bytes() == path.read_bytes()

    batch = generator_batch()
    pyfunc = mlflow.pyfunc.load_model(str(download_model(f"models:/{name}@champion", dst_dir=tmp_path / "c")))
    assert {s.name for s in pyfunc.metadata.get_input_schema().inputs} == {"label", "decoded", "edge"}
    assert np.array_equal(pyfunc.predict(batch), predict(generator, spec, batch))
    assert not (workdir / "mlflow.db").exists(), "MLflow's global default store was used"


def test_registered_models_name_the_package_as_their_pyfunc_loader(
    logged_job: tuple[str, str | None], tmp_path: Path
) -> None:
    """Every registered model's MLmodel names ``pipeline.tracking`` as its loader module, as those registered
    before the package was split do: the package stays the loader, so old and new models load alike."""
    uri, model_uri = logged_job
    assert model_uri is not None
    model_dir = download_model(model_uri, tracking_uri=uri, dst_dir=tmp_path)
    flavor = Model.load(str(model_dir / "MLmodel")).flavors["python_function"]
    assert flavor["loader_module"] == "pipeline.tracking"
    assert importlib.import_module("pipeline.tracking")._load_pyfunc is registry._load_pyfunc


def test_predict_runs_the_head_of_the_phase() -> None:
    """Phases 2-3 output through the correction head (a fresh one returns the decoded image); phase 1's
    export draws from the labels with the synthesis head, without seeing the decoded image."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(ngf=4, n_downsample=2, n_blocks=1)
    generator, _ = build_models(model_cfg, LABEL_NC, use_instance=True)
    generator.eval()
    batch = generator_batch()
    for phase in (2, 3):
        spec = GeneratorSpec.from_config(model_cfg, LABEL_NC, True, codec="hevc", quality=42, phase=phase)
        assert np.array_equal(predict(generator, spec, batch), batch["decoded"])
    spec = GeneratorSpec.from_config(model_cfg, LABEL_NC, True, codec="hevc", quality=42, phase=1)
    x = generator_input(
        torch.as_tensor(batch["label"]),
        torch.as_tensor(batch["edge"]),
        torch.zeros(2, 3, 32, 48),
        label_nc=LABEL_NC,
        use_instance=True,
        zero_semantics=False,
        visual_input=True,
    )
    with torch.no_grad():
        drawn = generator(x, synthesis=True).numpy()
    assert np.array_equal(predict(generator, spec, batch), drawn)
    assert not np.allclose(drawn, batch["decoded"])


def test_pin_model_uri_leaves_other_uris_alone() -> None:
    for uri in ("runs:/abc/generator", "models:/hevc-se-q42/3", "some/generator.safetensors"):
        assert pin_model_uri(uri) == uri
    with pytest.raises(ValueError, match="bad model URI"):
        pin_model_uri("models:/@champion")


def test_resolve_model_uri_local_paths(
    exported: tuple[Path, torch.nn.Module, GeneratorSpec], tmp_path: Path
) -> None:
    assert resolve_model_uri(str(exported[0])) == exported[0]
    with pytest.raises(FileNotFoundError, match="models:/name@alias"):
        resolve_model_uri(str(tmp_path / "nope.safetensors"))


def test_register_refuses_bad_input(
    workdir: Path, logged_job: tuple[str, str | None], exported: tuple[Path, torch.nn.Module, GeneratorSpec]
) -> None:
    tracker = MLflowTracker(logged_job[0], "jpd-se-test")
    with pytest.raises(FileNotFoundError):
        register_generator(tracker, workdir / "missing.safetensors", "hevc-se-q42")
    with pytest.raises(ValueError, match="alias"):
        register_generator(tracker, exported[0], "hevc-se-q42", alias="latest")
    not_a_generator = workdir / "plain.txt"
    not_a_generator.write_text("not safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        register_generator(tracker, not_a_generator, "hevc-se-q42")
    assert not tracker.offline


def read_events(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_unreachable_server_goes_offline_and_replays(
    workdir: Path,
    exported: tuple[Path, torch.nn.Module, GeneratorSpec],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    artifact = tmp_path / "ckpt.txt"
    artifact.write_text("checkpoint")
    cfg = job_config(DEAD_SERVER, "jpd-se-offline")
    tracker = make_tracker(cfg)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_job(tracker, cfg, artifact, exported[0]) is None
    elapsed = time.monotonic() - start
    unavailable = [w for w in caught if issubclass(w.category, TrackingUnavailableWarning)]
    assert len(unavailable) == 1, [str(w.message) for w in unavailable]
    assert DEAD_SERVER in str(unavailable[0].message)
    assert elapsed < 30, f"a dead server took {elapsed:.1f}s"
    assert not any(name in os.environ for name in HTTP_ENV), "HTTP settings leaked into the environment"

    record = tracker.offline_record
    assert record is not None and record.parent == tmp_path / "mlruns" / "offline"
    events = read_events(record)
    assert [e["name"] for e in events if e["event"] == "start_run"] == ["job", "phase1", "phase2"]
    steps = [(e["step"], e["metrics"]["loss_g"]) for e in events if e["event"] == "metrics"]
    assert steps == [(s, p + 1.0 / (s + 1)) for p in (1, 2) for s in range(3)]
    assert [e["name"] for e in events if e["event"] == "register"] == ["hevc-se-q42"]

    target = sqlite_uri(tmp_path / "replayed")
    ids = replay_offline(record, target)
    assert len(ids) == 3
    assert_job_logged(MlflowClient(target), "jpd-se-offline", exported[0])
    resolved = resolve_model_uri("models:/hevc-se-q42@champion", tracking_uri=target, dst_dir=tmp_path / "m")
    assert resolved.read_bytes() == exported[0].read_bytes()


def test_unwritable_sqlite_store_goes_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    tracker = MLflowTracker(sqlite_uri(blocker / "store"), "jpd-se-test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracker.start_run("job", params={"a": 1}):
            tracker.log_metrics({"psnr": 30.5}, step=7)
    assert sum(issubclass(w.category, TrackingUnavailableWarning) for w in caught) == 1
    events = read_events(tracker.offline_record)
    assert [e["event"] for e in events] == ["start_run", "metrics", "end_run"]
    assert events[1]["metrics"] == {"psnr": 30.5} and events[1]["step"] == 7
    assert events[2]["status"] == "FINISHED"


def test_store_failing_mid_run_continues_the_runs_on_replay(
    workdir: Path, logged_job: tuple[str, str | None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = logged_job[0]
    tracker = MLflowTracker(uri, "jpd-se-midrun", offline_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracker.start_run("job", params={"phase1.lr": 2e-4}), tracker.start_run("phase1"):
            tracker.log_metrics({"loss": 3.0}, step=0)

            def unreachable(*args: Any, **kwargs: Any) -> None:
                raise ConnectionError("store went away")

            monkeypatch.setattr(tracker.client, "log_batch", unreachable)
            tracker.log_metrics({"loss": 2.0}, step=1)
            tracker.log_metrics({"loss": 1.0}, step=2)
    assert sum(issubclass(w.category, TrackingUnavailableWarning) for w in caught) == 1
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([tracker.experiment_id])}
    assert runs["phase1"].info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(runs["phase1"].info.run_id, "loss")] == [0]

    monkeypatch.undo()
    ids = replay_offline(tracker.offline_record, uri)
    assert set(ids.values()) == {runs["job"].info.run_id, runs["phase1"].info.run_id}
    history = client.get_metric_history(runs["phase1"].info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert client.get_run(runs["phase1"].info.run_id).info.status == "FINISHED"
    job = client.get_run(runs["job"].info.run_id)
    assert job.info.status == "FINISHED" and job.data.params == {"phase1.lr": "0.0002"}
    assert len(client.search_runs([tracker.experiment_id])) == 2


def test_replay_rejects_bad_records(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        replay_offline(tmp_path / "missing.jsonl", sqlite_uri(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        replay_offline(bad, sqlite_uri(tmp_path))


def test_replay_to_an_unreachable_store_ends_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HTTP_ENV:
        monkeypatch.delenv(name, raising=False)
    record = tmp_path / "record.jsonl"
    start = {"event": "start_run", "key": "k", "name": "job", "parent": None, "experiment": "e"}
    record.write_text(json.dumps({**start, "params": {}, "tags": {}, "time": 1}) + "\n")
    began = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable .*connection refused"):
        replay_offline(record, DEAD_SERVER)
    assert time.monotonic() - began < 10
    assert not any(name in os.environ for name in HTTP_ENV)


def test_a_silent_store_times_out_and_says_so_while_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that accepts the connection and never answers: a line on stderr while waiting, then one
    error within the timeout; and a registry URI against it ends the same way."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr("pipeline.tracking.mlflow_store.NOTICE_AFTER_S", 0.3)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # never accepted: the kernel completes the handshake, nobody answers
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timed out"):
            MLflowStore(uri, "jpd-se").start_run(RunInfo("k", "job", None, {}, {}, 1), None)
        assert time.monotonic() - began < 8
        assert f"waiting for the MLflow store at {uri}" in capsys.readouterr().err
        with pytest.raises(StoreUnavailable):
            pin_model_uri("models:/hevc-se-q42@champion", tracking_uri=uri)
    with pytest.raises(StoreUnavailable, match="connection refused"):
        resolve_model_uri("models:/hevc-se-q42/1", tracking_uri=DEAD_SERVER, dst_dir=tmp_path / "m")


def test_bad_and_unknown_model_uris(tmp_path: Path, logged_job: tuple[str, str | None]) -> None:
    uri = logged_job[0]
    for bad in ("models:/", "models:/name@", "models:/name/latest", "runs:/abc"):
        with pytest.raises(ModelURIError, match="bad model URI"):
            check_model_uri(bad, tracking_uri=uri)
    with pytest.raises(ModelURIError, match="not found"):
        check_model_uri("models:/no-such-model@champion", tracking_uri=uri)
    with pytest.raises(ModelURIError, match="no MLflow store"):
        check_model_uri("models:/hevc-se-q42/1", tracking_uri=sqlite_uri(tmp_path / "none"))
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_runs_of_a_killed_process_are_marked_failed_on_the_next_start(tmp_path: Path) -> None:
    uri = sqlite_uri(tmp_path)
    script = (
        "import sys, time\n"
        "from pipeline.tracking import MLflowTracker\n"
        "tracker = MLflowTracker(sys.argv[1], 'jpd-se-killed')\n"
        "runs = [tracker.start_run('job'), tracker.start_run('phase1')]\n"
        "for run in runs: run.__enter__()\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    child = subprocess.Popen(
        [sys.executable, "-c", script, uri], stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=env
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "started"
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("jpd-se-killed").experiment_id
    killed = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert {r.info.status for r in killed.values()} == {"RUNNING"}
    assert killed["job"].data.tags["pipeline.pid"] == str(child.pid)
    # a RUNNING run of another host cannot be checked from here: left alone
    elsewhere = client.create_run(experiment, tags={"pipeline.host": "elsewhere", "pipeline.pid": "1"})

    tracker = MLflowTracker(uri, "jpd-se-killed")
    with tracker.start_run("job"):
        statuses = {r.info.run_id: r.info.status for r in client.search_runs([experiment])}
        assert statuses[killed["job"].info.run_id] == "FAILED"
        assert statuses[killed["phase1"].info.run_id] == "FAILED"
        assert statuses[elsewhere.info.run_id] == "RUNNING"
        assert statuses[tracker.active_run_id] == "RUNNING"
        # a second start in this (live) process leaves the open run alone
        MLflowStore(uri, "jpd-se-killed").fail_orphaned_runs()
        assert client.get_run(tracker.active_run_id).info.status == "RUNNING"
    failed = client.get_run(killed["job"].info.run_id)
    assert "killed" in failed.data.tags["pipeline.failed_reason"] and failed.info.end_time is not None
