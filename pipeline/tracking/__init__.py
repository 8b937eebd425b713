"""Run tracking behind one small interface; the base class logs nothing.

Training, sweeps and evaluation talk only to :class:`Tracker`; MLflow is one
implementation of it (:class:`MLflowTracker`, built by :func:`make_tracker`).

Logging never stops training: when the tracking store cannot be reached, the MLflow
tracker warns once (:class:`TrackingUnavailableWarning`) and writes every later event to
a JSON-lines record under ``<cwd>/mlruns/offline/``; :func:`replay_offline` (CLI:
``python -m pipeline tracking-replay FILE``) logs such a record into a store later.

Exported generators are registered as MLflow pyfunc models whose loader is this module
(:func:`_load_pyfunc`), so no pickled code is stored; ``models:/name@alias`` URIs resolve to
the exported safetensors file with :func:`resolve_model_uri`. ``import mlflow`` costs seconds,
so it happens only when an MLflow tracker or registry function is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipeline.config import REPO_ROOT, JobConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature
    from torch import nn

T = TypeVar("T")

# MLflow 3.17's length limits (mlflow.utils.validation). Longer values are cut here, visibly, rather
# than left to the store (which rejects them when MLFLOW_TRUNCATE_LONG_VALUES=false). The per-batch
# limits (100 params/tags, 1000 metrics) need nothing here: MlflowClient.log_batch splits batches itself.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
TRUNCATED = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")
_REGISTRY_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*$")
_ALIAS = re.compile(r"^[\w\-]+$")

# MLflow's HTTP client retries 7 times with exponential backoff by default (minutes against a dead
# server). While this tracker talks to an http(s) store these apply, unless the user set them: the
# first contact fails within seconds; later calls tolerate a short blip before going offline.
FIRST_CONTACT_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}

PYFUNC_LOADER = __name__
GENERATOR_ARTIFACT = "generator"


class TrackingUnavailableWarning(RuntimeWarning):
    """The tracking store failed; logging goes on into a local offline record."""


class Tracker:
    """No-op tracker: every method is safe to call and does nothing."""

    @contextlib.contextmanager
    def start_run(
        self, name: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[None]:
        """A run; a run started inside another is nested under it."""
        yield

    @property
    def active_run_id(self) -> str | None:
        """The store id of the innermost open run; None without a store (or while offline)."""
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Scalar metrics at a step."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (or folder) produced by the run."""

    def register_generator(
        self,
        generator_file: str | Path,
        name: str,
        *,
        alias: str | None = None,
        spec: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Register an exported generator under ``name``; returns ``models:/name/version`` or None."""
        return None


def git_commit(repo: str | Path = REPO_ROOT) -> str:
    """The checked-out commit of ``repo`` (default: this project), or ``"unknown"``."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def run_tags(cfg: JobConfig, phase: int | None = None) -> dict[str, str]:
    """Tags every run of a job carries: codec, quality, dataset, git commit, config hash (and phase)."""
    commit = git_commit()
    tags = {
        "job": cfg.name,
        "codec": cfg.loader.codec,
        "quality": str(cfg.loader.quality),
        "dataset": cfg.data.source,
        "zero_semantics": str(cfg.model.zero_semantics).lower(),
        "config_hash": cfg.digest(),
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
    }
    if phase is not None:
        tags["phase"] = str(phase)
    return tags


def registry_name(codec: str, quality: int, zero_semantics: bool = False) -> str:
    """Registered-model name of a generator: ``hevc-se-q42`` (``hevc-nosem-q42`` without semantics)."""
    name = f"{codec}-{'nosem' if zero_semantics else 'se'}-q{int(quality)}"
    if not _REGISTRY_NAME.match(name):
        raise ValueError(f"codec name {codec!r} gives an invalid registered-model name {name!r}")
    return name


def default_tracking_uri(uri: str = "") -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store ``<cwd>/mlruns/mlflow.db`` (no server)."""
    return (
        uri or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"
    )


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def make_tracker(cfg: JobConfig, *, rank: int = 0) -> Tracker:
    """The job's tracker: MLflow on rank 0 when ``cfg.tracking.enabled``, the no-op tracker otherwise."""
    if rank != 0 or not cfg.tracking.enabled:
        return Tracker()
    return MLflowTracker(default_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment)


def _key(key: Any) -> str:
    """A key MLflow accepts: odd characters become ``_``, over-long keys keep a hash suffix."""
    text = _BAD_KEY_CHARS.sub("_", str(key)) or "_"
    if len(text) > MAX_KEY_LENGTH:
        text = text[: MAX_KEY_LENGTH - 9] + "~" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return text


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED


def clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them: strings (lists and dicts as JSON), cut to MLflow's length limit."""
    out = {}
    for key, value in params.items():
        text = (
            value
            if isinstance(value, str)
            else (json.dumps(value, default=str) if isinstance(value, list | tuple | dict) else str(value))
        )
        out[_key(key)] = _truncate(text, MAX_PARAM_VALUE_LENGTH)
    return out


def clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {_key(k): _truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in tags.items()}


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def _env_defaults(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables the user has not set, for the duration of the block."""
    added = [k for k in values if k not in os.environ]
    for key in added:
        os.environ[key] = values[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@dataclass
class _Run:
    """A run opened by :meth:`MLflowTracker.start_run`; ``run_id`` is None while the store is unreachable."""

    key: str
    name: str
    parent: str | None
    params: dict[str, str]
    tags: dict[str, str]
    start_ms: int
    run_id: str | None = None
    recorded: bool = False


class MLflowTracker(Tracker):
    """MLflow tracking through one ``MlflowClient`` (no global MLflow state: no active run, no global URI).

    Nested runs carry the ``mlflow.parentRunId`` tag, as MLflow's own nested runs do. With
    ``fallback=False`` store errors are raised instead (used by :func:`replay_offline`).
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        offline_dir: str | Path | None = None,
        fallback: bool = True,
    ) -> None:
        if not experiment:
            raise ValueError("an MLflow experiment name is needed")
        self.uri = uri
        self.experiment = experiment
        self.offline_dir = Path(offline_dir) if offline_dir else Path.cwd() / "mlruns" / "offline"
        self.fallback = fallback
        self.offline = False
        self.offline_record: Path | None = None
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._stack: list[_Run] = []
        self._record_open = False
        self._warned_record = False
        self._warned_outside = False

    # ------------------------------------------------------------------ store calls

    @property
    def client(self) -> MlflowClient:
        """The client, created (and the experiment got or created) on first use."""
        if self._client is None:
            from mlflow import MlflowClient

            db = _sqlite_file(self.uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            self._experiment_id = self._get_or_create_experiment(client, db)
            self._client = client
        return self._client

    @property
    def experiment_id(self) -> str:
        client = self.client
        if self._experiment_id is None:  # set together with the client
            raise RuntimeError(f"MLflow client for {client.tracking_uri} has no experiment")
        return self._experiment_id

    def _get_or_create_experiment(self, client: MlflowClient, db: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            location = (db.parent / "artifacts").as_uri() if db is not None else None
            try:
                return client.create_experiment(self.experiment, artifact_location=location)
            except MlflowException:
                experiment = client.get_experiment_by_name(self.experiment)  # created meanwhile
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(...)`` against the store; on failure switch to the offline record (or raise)."""
        if self.offline:
            return None
        http = self.uri.startswith(("http://", "https://"))
        env = (HTTP_ENV if self._client is not None else FIRST_CONTACT_HTTP_ENV) if http else {}
        try:
            with _env_defaults(env):
                return fn(*args, **kwargs)
        except Exception as err:
            if not self.fallback:
                raise
            self._go_offline(err)
            return None

    def _go_offline(self, err: Exception) -> None:
        self.offline = True
        for run in self._stack:
            self._record_start(run)
        message = str(err).splitlines()[0][:300] if str(err) else ""
        warnings.warn(
            f"MLflow tracking store {self.uri} failed ({type(err).__name__}: {message}); "
            f"logging goes on offline into {self._record_path()} — replay it later with "
            f"`python -m pipeline tracking-replay FILE`",
            TrackingUnavailableWarning,
            stacklevel=4,
        )

    def create_run(self, run: _Run, parent_id: str | None) -> str:
        """Create ``run`` (nested under ``parent_id``) with its tags and params; return its id."""
        tags = dict(run.tags)
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        created = self.client.create_run(
            self.experiment_id, start_time=run.start_ms, tags=tags, run_name=run.name
        )
        run.run_id = created.info.run_id
        self.log_params(run.run_id, run.params)
        return run.run_id

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])

    def log_metric_values(self, run_id: str, metrics: Mapping[str, float], step: int, ms: int) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(run_id, metrics=[Metric(k, v, ms, step) for k, v in metrics.items()])

    def upload_artifact(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str, ms: int) -> None:
        self.client.set_terminated(run_id, status=status, end_time=ms)

    def register(
        self,
        run_id: str,
        generator_file: Path,
        name: str,
        alias: str | None,
        spec: Mapping[str, Any],
        signature: ModelSignature | None = None,
    ) -> str:
        """Log ``generator_file`` as a pyfunc model of run ``run_id``, register it, set ``alias``."""
        import mlflow
        from mlflow.entities import LoggedModelOutput
        from mlflow.exceptions import MlflowException
        from mlflow.models import Model

        client = self.client
        signature = signature or generator_signature(generator_file)
        tags = {k: str(spec[k]) for k in ("codec", "quality", "phase") if k in spec}
        logged = client.create_logged_model(
            self.experiment_id,
            name=GENERATOR_ARTIFACT,
            source_run_id=run_id,
            tags=tags,
            params=clean_params(spec),
            model_type="jpd-se-generator",
        )
        with tempfile.TemporaryDirectory(prefix="jpdse-model-") as tmp:
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                str(local),
                loader_module=PYFUNC_LOADER,
                data_path=str(generator_file),
                signature=signature,
                input_example=example_input(spec),
                pip_requirements=_pip_requirements(),
                model_config=dict(spec),
                mlflow_model=Model(run_id=run_id, model_id=logged.model_id),
            )
            client.log_model_artifacts(logged.model_id, str(local))
        client.finalize_logged_model(logged.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        try:
            client.create_registered_model(
                name, description="JPD-SE generator (pipeline.model.export safetensors)"
            )
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name, source=logged.artifact_location, run_id=run_id, tags=tags, model_id=logged.model_id
        )
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
        return f"models:/{name}/{version.version}"

    # ------------------------------------------------------------------ offline record

    def _record_path(self) -> Path:
        if not self._record_open or self.offline_record is None:
            root = self._stack[0].name if self._stack else "run"
            stamp = time.strftime("%Y%m%d-%H%M%S")
            stem = f"{_key(root).replace('/', '_')}-{stamp}-{uuid.uuid4().hex[:8]}"
            self.offline_record = self.offline_dir / f"{stem}.jsonl"
            self._record_open = True
        return self.offline_record

    def _record(self, event: dict[str, Any]) -> None:
        path = self._record_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(event, default=str) + "\n")
        except OSError as err:
            if not self._warned_record:
                self._warned_record = True
                warnings.warn(
                    f"cannot write the offline tracking record {path}: {err}",
                    TrackingUnavailableWarning,
                    stacklevel=3,
                )

    def _record_start(self, run: _Run) -> None:
        if run.recorded:
            return
        run.recorded = True
        self._record(
            {
                "event": "start_run",
                "key": run.key,
                "name": run.name,
                "parent": run.parent,
                "run_id": run.run_id,
                "experiment": self.experiment,
                "params": run.params,
                "tags": run.tags,
                "time": run.start_ms,
            }
        )

    # ------------------------------------------------------------------ Tracker interface

    @contextlib.contextmanager
    def start_run(
        self, name: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[None]:
        parent = self._stack[-1] if self._stack else None
        if parent is None:
            self._record_open = False  # every top-level run gets its own offline record
        run = _Run(
            uuid.uuid4().hex,
            name,
            parent.key if parent else None,
            clean_params(params or {}),
            clean_tags(tags or {}),
            _now_ms(),
        )
        self._stack.append(run)
        if not self.offline and (parent is None or parent.run_id is not None):
            self._call(self.create_run, run, parent.run_id if parent else None)
        if self.offline:
            self._record_start(run)
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._end(run, status)

    def _end(self, run: _Run, status: str) -> None:
        ms = _now_ms()
        if not self.offline and run.run_id is not None:
            self._call(self.end_run, run.run_id, status, ms)
        if self.offline:
            self._record({"event": "end_run", "key": run.key, "status": status, "time": ms})
        self._stack.pop()

    @property
    def active_run_id(self) -> str | None:
        return self._stack[-1].run_id if self._stack else None

    def _current(self, what: str) -> _Run | None:
        if not self._stack:
            if not self._warned_outside:
                self._warned_outside = True
                warnings.warn(f"{what} outside start_run(...) is ignored", RuntimeWarning, stacklevel=3)
            return None
        return self._stack[-1]

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        run = self._current("log_metrics")
        if run is None:
            return
        values = {_key(k): float(v) for k, v in metrics.items() if v is not None}
        step, ms = int(step or 0), _now_ms()
        if not self.offline and run.run_id is not None:
            self._call(self.log_metric_values, run.run_id, values, step, ms)
        if self.offline:
            self._record({"event": "metrics", "key": run.key, "metrics": values, "step": step, "time": ms})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        run = self._current("log_artifact")
        if run is None:
            return
        path = Path(path).resolve()
        if not path.exists():
            warnings.warn(f"artifact {path} does not exist; not logged", RuntimeWarning, stacklevel=2)
            return
        if not self.offline and run.run_id is not None:
            self._call(self.upload_artifact, run.run_id, path, artifact_path)
        if self.offline:
            self._record(
                {"event": "artifact", "key": run.key, "path": str(path), "artifact_path": artifact_path}
            )

    def register_generator(
        self,
        generator_file: str | Path,
        name: str,
        *,
        alias: str | None = None,
        spec: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Register under the current run (or a run ``register-<name>`` of its own).

        Returns ``models:/name/version``, or None when the store is unreachable (then the
        registration is in the offline record).
        """
        generator_file, spec = _check_registration(generator_file, name, alias, spec)
        if not self._stack:
            with self.start_run(f"register-{name}", tags={"registered_model": name}):
                return self.register_generator(generator_file, name, alias=alias, spec=spec)
        run = self._stack[-1]
        uri = None
        if not self.offline and run.run_id is not None:
            signature = generator_signature(generator_file)  # a bad file raises here, not as a store failure
            uri = self._call(self.register, run.run_id, generator_file, name, alias, spec, signature)
        if self.offline:
            self._record(
                {
                    "event": "register",
                    "key": run.key,
                    "file": str(generator_file),
                    "name": name,
                    "alias": alias,
                    "spec": spec,
                }
            )
        return uri


def _check_registration(
    generator_file: str | Path, name: str, alias: str | None, spec: Mapping[str, Any] | None
) -> tuple[Path, dict[str, Any]]:
    from pipeline.model.export import read_spec

    path = Path(generator_file).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"exported generator not found: {path}")
    if not _REGISTRY_NAME.match(name):
        raise ValueError(f"invalid registered-model name {name!r} (letters, digits, '.', '_', '-')")
    if alias is not None and (not _ALIAS.match(alias) or re.fullmatch(r"[vV]\d+|latest", alias)):
        raise ValueError(f"invalid alias {alias!r}: letters, digits, '_' and '-', not 'latest' or v<number>")
    return path, dict(spec) if spec is not None else read_spec(path)


def register_generator(
    tracker: Tracker,
    generator_file: str | Path,
    name: str,
    alias: str | None = None,
    spec: Mapping[str, Any] | None = None,
) -> str | None:
    """Register an exported generator through ``tracker`` (see :meth:`Tracker.register_generator`)."""
    return tracker.register_generator(generator_file, name, alias=alias, spec=spec)


# ---------------------------------------------------------------------- replay


def replay_offline(record_path: str | Path, tracker_uri: str = "", *, experiment: str = "") -> dict[str, str]:
    """Log an offline record into the store at ``tracker_uri`` (default: :func:`default_tracking_uri`).

    Runs that existed in that store before it became unreachable are continued, the others
    created (nested as recorded). Returns ``{record run key: MLflow run id}``. Store errors raise.
    Replaying the same record twice logs it twice.
    """
    path = Path(record_path)
    if not path.is_file():
        raise FileNotFoundError(f"offline tracking record not found: {path}")
    events = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line: {err}") from err
    starts = [e for e in events if e.get("event") == "start_run"]
    if not starts:
        raise ValueError(f"{path} holds no runs")
    tracker = MLflowTracker(
        default_tracking_uri(tracker_uri), experiment or starts[0]["experiment"], fallback=False
    )
    ids: dict[str, str] = {}
    ended: set[str] = set()
    for event in events:
        kind, key = event.get("event"), event.get("key")
        if kind == "start_run":
            ids[key] = _replay_start(tracker, event, ids)
        elif key not in ids:
            raise ValueError(f"{path}: event {kind!r} for a run that was never started")
        elif kind == "metrics":
            tracker.log_metric_values(ids[key], event["metrics"], int(event["step"]), int(event["time"]))
        elif kind == "artifact":
            artifact = Path(event["path"])
            if artifact.exists():
                tracker.upload_artifact(ids[key], artifact, event.get("artifact_path"))
            else:
                warnings.warn(
                    f"artifact {artifact} of the offline record is gone; skipped",
                    RuntimeWarning,
                    stacklevel=2,
                )
        elif kind == "register":
            tracker.register(ids[key], Path(event["file"]), event["name"], event.get("alias"), event["spec"])
        elif kind == "end_run":
            tracker.end_run(ids[key], event["status"], int(event["time"]))
            ended.add(key)
        else:
            raise ValueError(f"{path}: unknown event {kind!r}")
    for key in ids.keys() - ended:  # the process died before the run ended
        tracker.end_run(ids[key], "FAILED", _now_ms())
    return ids


def _replay_start(tracker: MLflowTracker, event: dict[str, Any], ids: dict[str, str]) -> str:
    from mlflow.exceptions import MlflowException

    run_id = event.get("run_id")
    if run_id:
        try:
            tracker.client.get_run(run_id)
        except MlflowException:
            run_id = None
        else:
            tracker.log_params(run_id, event["params"])
            return run_id
    run = _Run(
        event["key"], event["name"], event.get("parent"), event["params"], event["tags"], int(event["time"])
    )
    return tracker.create_run(run, ids.get(event["parent"]) if event.get("parent") else None)


# ---------------------------------------------------------------------- registry models


def _pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc model (given, so MLflow does not infer them in a subprocess)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("mlflow", "torch", "safetensors", "numpy"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            out.append(package)
    return out


def example_input(spec: Mapping[str, Any], batch: int = 1) -> dict[str, np.ndarray]:
    """A zero input of the smallest comfortable size for the generator ``spec`` describes."""
    side = 2 * 2 ** int(spec["n_downsample"])
    inputs = {
        "label": np.zeros((batch, side, side), np.int64),
        "decoded": np.zeros((batch, 3, side, side), np.float32),
    }
    if spec["use_instance"]:
        inputs["edge"] = np.zeros((batch, 1, side, side), np.float32)
    return inputs


def predict(generator: nn.Module, spec: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Run an exported generator on numpy inputs: ``label`` int ``B x H x W``, ``decoded`` float32
    ``B x 3 x H x W`` in [-1, 1], ``edge`` float32 ``B x 1 x H x W`` (with instances). Returns the
    enhanced image, float32 ``B x 3 x H x W`` in [-1, 1]."""
    import torch

    from pipeline.model.export import uses_synthesis, visual_input
    from pipeline.model.networks import generator_input

    needed = ("label", "decoded", "edge") if spec["use_instance"] else ("label", "decoded")
    missing = [k for k in needed if k not in inputs]
    if missing:
        raise ValueError(f"generator input lacks {missing}; it takes {list(needed)}")
    edge = inputs.get("edge") if spec["use_instance"] else None
    x = generator_input(
        torch.as_tensor(np.asarray(inputs["label"])),
        torch.as_tensor(np.asarray(edge, np.float32)) if edge is not None else None,
        torch.as_tensor(np.asarray(inputs["decoded"], np.float32)),
        label_nc=int(spec["label_nc"]),
        use_instance=bool(spec["use_instance"]),
        zero_semantics=bool(spec.get("zero_semantics", False)),
        visual_input=visual_input(spec),
    )
    with torch.no_grad():
        return generator(x, synthesis=uses_synthesis(spec)).numpy()


def generator_signature(generator_file: Path) -> ModelSignature:
    """The pyfunc signature, inferred from an example run; height and width are left free (-1)."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import Schema, TensorSpec

    from pipeline.model.export import load_generator

    generator, spec = load_generator(generator_file)
    inputs = example_input(spec)
    inferred = infer_signature(inputs, predict(generator, spec, inputs))

    def free(schema: Schema) -> Schema:
        return Schema([TensorSpec(s.type, (*s.shape[:-2], -1, -1), s.name) for s in schema.inputs])

    return ModelSignature(inputs=free(inferred.inputs), outputs=free(inferred.outputs))


class GeneratorPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps for a registered generator."""

    def __init__(self, generator_file: str | Path) -> None:
        from pipeline.model.export import load_generator

        self.generator_file = Path(generator_file)
        self.generator, self.spec = load_generator(generator_file)

    def predict(self, model_input: dict[str, np.ndarray], params: dict[str, Any] | None = None) -> np.ndarray:
        return predict(self.generator, self.spec, model_input)


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> GeneratorPyfunc:
    """MLflow pyfunc loader (this module is the model's ``loader_module``)."""
    return GeneratorPyfunc(data_path)


def _model_location(uri: str, store: str) -> str:
    """Where the artifacts of ``models:/name@alias``, ``models:/name/version`` or ``models:/<model id>`` lie.

    Resolved with an explicit client: MLflow's own ``models:/`` download ignores the registry
    URI it is given and asks the global one.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    ref = pin_model_uri(uri, tracking_uri=store).removeprefix("models:/").strip("/")
    name, slash, version = ref.partition("/")
    if slash and version.isdigit():
        return client.get_model_version_download_uri(name, version)
    if not slash and name.startswith("m-"):
        return client.get_logged_model(name).artifact_location
    raise ValueError(f"bad model URI {uri!r}; expected models:/name@alias or models:/name/version")


def pin_model_uri(uri: str, *, tracking_uri: str = "") -> str:
    """``models:/name@alias`` as ``models:/name/<version>``, the version the alias points at now (in the
    store at ``tracking_uri``, default :func:`default_tracking_uri`); any other URI or path as given.

    A model's identity: what an evaluation names a registry model by, and downloads, so that an alias
    moved meanwhile cannot mix two models.
    """
    if not uri.startswith("models:/"):
        return uri
    name, at, alias = uri.removeprefix("models:/").strip("/").partition("@")
    if not at:
        return uri
    if not name or not alias or "/" in alias:
        raise ValueError(f"bad model URI {uri!r}; expected models:/name@alias or models:/name/version")
    from mlflow import MlflowClient

    store = default_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    return f"models:/{name}/{client.get_model_version_by_alias(name, alias).version}"


def download_model(uri: str, *, tracking_uri: str = "", dst_dir: str | Path | None = None) -> Path:
    """Download a registered generator model (``models:/name@alias``, ``models:/name/1``, ``runs:/...``)
    from the store at ``tracking_uri`` (default: :func:`default_tracking_uri`) into ``dst_dir``
    (default: a new private temp dir) and return the model folder."""
    import mlflow

    store = default_tracking_uri(tracking_uri)
    dst = Path(dst_dir) if dst_dir else Path(tempfile.mkdtemp(prefix="jpdse-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    if uri.startswith("models:/"):
        uri = _model_location(uri, store)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=str(dst), tracking_uri=store, registry_uri=store
    )
    return Path(local)


def resolve_model_uri(uri: str, *, tracking_uri: str = "", dst_dir: str | Path | None = None) -> Path:
    """The local exported generator file behind ``uri``.

    ``models:/...`` and ``runs:/...`` URIs are downloaded from the registry at ``tracking_uri``
    (default: :func:`default_tracking_uri`); anything else is taken as a local file path.
    """
    if not uri.startswith(("models:/", "runs:/")):
        path = Path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"generator file not found: {path} (or give a models:/name@alias URI)")
        return path
    from mlflow.models import Model

    model_dir = download_model(uri, tracking_uri=tracking_uri, dst_dir=dst_dir)
    if not (model_dir / "MLmodel").is_file():
        raise ValueError(f"{uri} is not an MLflow model (no MLmodel file in {model_dir})")
    flavor = Model.load(str(model_dir / "MLmodel")).flavors.get("python_function", {})
    if flavor.get("loader_module") != PYFUNC_LOADER or not flavor.get("data"):
        loader = flavor.get("loader_module")
        raise ValueError(f"{uri} is not a registered JPD-SE generator (pyfunc loader {loader!r})")
    path = model_dir / flavor["data"]
    if not path.is_file():
        raise ValueError(f"{uri}: the model's generator file {path} is missing")
    return path
