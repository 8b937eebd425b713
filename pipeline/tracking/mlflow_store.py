"""The MLflow store sink: every call the tracker and the replay make to an MLflow tracking store, through one
``MlflowClient`` (no global MLflow state: no active run, no global URI)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.tracking.base import RunInfo, clean_params
from pipeline.tracking.registry import (
    GENERATOR_ARTIFACT,
    generator_signature,
    save_pyfunc_model,
    selected_metrics,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature

    from pipeline.model.spec import GeneratorSpec

# MLflow's HTTP client retries 7 times with exponential backoff by default (minutes against a dead
# server). While the tracker talks to an http(s) store these apply, unless the user set them: the
# first contact fails within seconds; later calls tolerate a short blip before going offline.
FIRST_CONTACT_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


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


class MLflowStore:
    """Runs of experiment ``experiment`` in the MLflow store at ``uri``; the client (and the experiment,
    got or created) come on first use. Store errors raise."""

    def __init__(self, uri: str, experiment: str) -> None:
        if not experiment:
            raise ValueError("an MLflow experiment name is needed")
        self.uri = uri
        self.experiment = experiment
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    @property
    def client(self) -> MlflowClient:
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

    def request_env(self) -> contextlib.AbstractContextManager[None]:
        """HTTP retry and timeout defaults for one call of the tracker (short before the first contact)."""
        if not self.uri.startswith(("http://", "https://")):
            return contextlib.nullcontext()
        return _env_defaults(HTTP_ENV if self._client is not None else FIRST_CONTACT_HTTP_ENV)

    def has_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def start_run(self, run: RunInfo, parent: RunInfo | None) -> None:
        """Create ``run`` (nested under ``parent``) with its tags and params; sets ``run.run_id``."""
        tags = dict(run.tags)
        if parent is not None and parent.run_id:
            tags["mlflow.parentRunId"] = parent.run_id
        created = self.client.create_run(
            self.experiment_id, start_time=run.start_ms, tags=tags, run_name=run.name
        )
        run.run_id = created.info.run_id
        self.log_params(run)

    def log_params(self, run: RunInfo) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self._id(run), params=[Param(k, v) for k, v in run.params.items()])

    def log_metrics(self, run: RunInfo, metrics: Mapping[str, float], step: int, ms: int) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(self._id(run), metrics=[Metric(k, v, ms, step) for k, v in metrics.items()])

    def log_artifact(self, run: RunInfo, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self._id(run), str(path), artifact_path)
        else:
            self.client.log_artifact(self._id(run), str(path), artifact_path)

    def register(
        self,
        run: RunInfo,
        generator_file: Path,
        name: str,
        alias: str | None,
        spec: GeneratorSpec,
        signature: ModelSignature | None = None,
    ) -> str:
        """Log ``generator_file`` as a pyfunc model of ``run``, register it, set ``alias``; returns
        ``models:/name/version``."""
        from mlflow.entities import LoggedModelOutput
        from mlflow.exceptions import MlflowException

        client, run_id = self.client, self._id(run)
        signature = signature or generator_signature(generator_file)
        params = spec.to_json()
        tags = {k: str(params[k]) for k in ("codec", "quality", "phase") if k in params}
        logged = client.create_logged_model(
            self.experiment_id,
            name=GENERATOR_ARTIFACT,
            source_run_id=run_id,
            tags=tags,
            params=clean_params(params),
            model_type="jpd-se-generator",
        )
        with tempfile.TemporaryDirectory(prefix="jpdse-model-") as tmp:
            local = Path(tmp) / "model"
            save_pyfunc_model(local, generator_file, spec, signature, run_id=run_id, model_id=logged.model_id)
            client.log_model_artifacts(logged.model_id, str(local))
        client.finalize_logged_model(logged.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        # the validation figures the export was selected by (at its step): logged-model metrics, version tags
        metrics = selected_metrics(spec)
        if metrics:
            from mlflow.entities import Metric

            ms, step = int(time.time() * 1000), int(metrics.get("selected_step", 0))
            linked = [Metric(k, v, ms, step, model_id=logged.model_id) for k, v in metrics.items()]
            client.log_batch(run_id, metrics=linked)
            tags.update({k: repr(v) for k, v in metrics.items()})
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

    def end_run(self, run: RunInfo, status: str, ms: int) -> None:
        self.client.set_terminated(self._id(run), status=status, end_time=ms)

    @staticmethod
    def _id(run: RunInfo) -> str:
        if run.run_id is None:
            raise RuntimeError(f"run {run.name!r} was never created in the store")
        return run.run_id
