"""The MLflow store sink: every call the tracker and the replay make to an MLflow tracking store, through one
``MlflowClient`` (no global MLflow state: no active run, no global URI).

Every call is bounded (:func:`store_call`): against an http(s) store MLflow's retries and timeout are capped
(the first contact gives up within seconds), a call that takes long says so on stderr, and a store that
cannot be reached raises :class:`StoreUnavailable` (one line) instead of MLflow's nested retry errors.
MLflow gives requests one timeout for the connection and each read alike; so the first contact first opens
a plain TCP connection to the store (or to the proxy requests would use) under its own, shorter, connect
timeout (``tracking.connect_timeout``): a store that does not answer the connect fails within it.

Runs carry their process (host, pid, its start time, pid namespace) as tags; the start of a top-level run
marks FAILED the runs of this experiment left RUNNING by a process of this host that is gone (killed).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.config import TrackingConfig
from pipeline.lock import pid_start, process_alive
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

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# MLflow's HTTP client retries 7 times with exponential backoff by default (minutes against a dead
# server). While the tracker talks to an http(s) store these apply, unless the user set them: the
# first contact fails within seconds; later calls tolerate a short blip before going offline. The
# timeout bounds the connection and each read alike (MLflow passes one value to requests).
FIRST_CONTACT_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
NOTICE_AFTER_S = 3.0  # a call to a remote store that takes longer says so on stderr
DEFAULT_CONNECT_TIMEOUT = TrackingConfig.__dataclass_fields__["connect_timeout"].default
# run tags naming the process that runs it, to tell a killed run from a running one
PROCESS_TAGS = ("pipeline.host", "pipeline.pid", "pipeline.pid_start", "pipeline.pid_ns")


_calls = threading.local()  # depth of bounded calls in this thread


class StoreUnavailable(ConnectionError):
    """The tracking store cannot be reached (refused, unresolvable or timed out)."""


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


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


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is a failure to reach the server."""
    import requests

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        current = current.__cause__ or current.__context__
    return False


def _reason(err: BaseException) -> str:
    """The innermost cause's name, e.g. ``Connection refused``, for the one-line error."""
    text = str(err)
    for marker in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
        if marker in text:
            return marker.lower()
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    return type(err).__name__


def _unavailable(uri: str, what: str, reason: str) -> StoreUnavailable:
    return StoreUnavailable(
        f"MLflow store {uri} unreachable ({what}: {reason}); check the tracking URI "
        "(tracking.uri, $MLFLOW_TRACKING_URI) and that its server is up"
    )


def _endpoint(uri: str) -> tuple[str, int]:
    """The host and port a request to ``uri`` connects to: the proxy's when requests would use one."""
    import requests

    proxy = requests.utils.select_proxy(uri, requests.utils.get_environ_proxies(uri))
    target = urllib.parse.urlsplit(requests.utils.prepend_scheme_if_needed(proxy, "http") if proxy else uri)
    if not target.hostname:
        raise _unavailable(uri, "connect", "no host in the URI")
    return target.hostname, target.port or (443 if target.scheme == "https" else 80)


def check_connect(uri: str, timeout: float = DEFAULT_CONNECT_TIMEOUT, what: str = "connect") -> None:
    """Open and close a TCP connection to the store at ``uri`` (name resolution included) within ``timeout``
    seconds, or raise :class:`StoreUnavailable`: the first contact's fast failure for a store that does not
    answer (MLflow's own timeout bounds each request as a whole, reads included, so it is longer)."""
    host, port = _endpoint(uri)
    outcome: list[OSError | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=connect, name="store-connect", daemon=True)  # a slow DNS is bounded too
    thread.start()
    thread.join(timeout)
    silent = f"no answer to connect within {timeout:g} s (tracking.connect_timeout)"
    if not outcome:
        raise _unavailable(uri, what, silent)
    if outcome[0] is not None:
        err = outcome[0]
        raise _unavailable(uri, what, silent if isinstance(err, TimeoutError) else _reason(err)) from err


@contextlib.contextmanager
def store_call(
    uri: str, what: str, *, first_contact: bool = True, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> Iterator[None]:
    """One bounded call (or a few) to the store at ``uri``: on first contact a TCP connect within
    ``connect_timeout`` (:func:`check_connect`), short HTTP retries and timeout (see
    :data:`FIRST_CONTACT_HTTP_ENV`, :data:`HTTP_ENV`; settings the user made win), a line on stderr when it
    takes longer than :data:`NOTICE_AFTER_S`, and :class:`StoreUnavailable` when the store cannot be
    reached. Other store errors pass unchanged."""
    if not is_remote(uri) or getattr(_calls, "depth", 0):  # a call inside a bounded call is part of it
        yield
        return
    if first_contact:
        check_connect(uri, connect_timeout, what)
    env = FIRST_CONTACT_HTTP_ENV if first_contact else HTTP_ENV
    _calls.depth = 1
    with _env_defaults(env):
        limit = os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]
        retries = os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        notice = threading.Timer(
            NOTICE_AFTER_S,
            lambda: print(
                f"waiting for the MLflow store at {uri} ({what}; timeout {limit} s, {retries} retries)...",
                file=sys.stderr,
                flush=True,
            ),
        )
        notice.daemon = True
        notice.start()
        try:
            yield
        except StoreUnavailable:
            raise
        except Exception as err:
            if _unreachable(err):
                raise _unavailable(uri, what, _reason(err)) from err
            raise
        finally:
            notice.cancel()
            _calls.depth = 0


def _bounded(method: F) -> F:
    """A store method as one :func:`store_call` (the short first-contact settings until the client exists)."""

    @functools.wraps(method)
    def wrapper(self: MLflowStore, *args: Any, **kwargs: Any) -> Any:
        first = self._client is None
        with store_call(self.uri, method.__name__, first_contact=first, connect_timeout=self.connect_timeout):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_tags() -> dict[str, str]:
    """:data:`PROCESS_TAGS` of this process."""
    pid = os.getpid()
    values = (socket.gethostname(), str(pid), pid_start(pid) or "", _pid_namespace())
    return dict(zip(PROCESS_TAGS, values, strict=True))


def _gone(tags: Mapping[str, str]) -> bool:
    """Whether the process named by a run's :data:`PROCESS_TAGS` ran here (this host and pid namespace)
    and is gone; a process that cannot be checked from here counts as alive."""
    host, pid, start, namespace = (tags.get(k, "") for k in PROCESS_TAGS)
    if host != socket.gethostname() or namespace != _pid_namespace() or not pid.isdigit():
        return False
    return not process_alive(int(pid), start or None)


class MLflowStore:
    """Runs of experiment ``experiment`` in the MLflow store at ``uri``; the client (and the experiment,
    got or created) come on first use, after a TCP connect within ``connect_timeout`` seconds
    (``tracking.connect_timeout``) to an http(s) store. Store errors raise."""

    def __init__(self, uri: str, experiment: str, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        if not experiment:
            raise ValueError("an MLflow experiment name is needed")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout}")
        self.uri = uri
        self.connect_timeout = connect_timeout
        self.experiment = experiment
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._orphans_checked = False

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

    @_bounded
    def has_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException as err:
            if _unreachable(err):
                raise
            return False
        return True

    @_bounded
    def start_run(self, run: RunInfo, parent: RunInfo | None) -> None:
        """Create ``run`` (nested under ``parent``) with its tags, this process's tags and params; sets
        ``run.run_id``. A top-level run first marks the runs of killed processes FAILED."""
        if parent is None and not self._orphans_checked:
            self._orphans_checked = True
            self.fail_orphaned_runs()
        tags = {**run.tags, **process_tags()}
        if parent is not None and parent.run_id:
            tags["mlflow.parentRunId"] = parent.run_id
        created = self.client.create_run(
            self.experiment_id, start_time=run.start_ms, tags=tags, run_name=run.name
        )
        run.run_id = created.info.run_id
        self.log_params(run)

    @_bounded
    def fail_orphaned_runs(self) -> list[str]:
        """Mark FAILED the runs of this experiment left RUNNING by a process of this host that is gone
        (killed before it could end them); returns their ids."""
        from mlflow.entities import RunStatus

        host = socket.gethostname().replace("'", "")
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAGS[0]}` = '{host}'",
            max_results=1000,
        )
        failed = [r.info.run_id for r in found if _gone(r.data.tags)]
        end_ms = int(time.time() * 1000)
        for run_id in failed:
            self.client.set_tag(
                run_id, "pipeline.failed_reason", "its process was gone (killed) at the next start"
            )
            self.client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FAILED), end_time=end_ms)
        if failed:
            log.warning(
                "marked %d run(s) of killed processes FAILED in %s: %s", len(failed), self.uri, failed
            )
        return failed

    @_bounded
    def log_params(self, run: RunInfo) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self._id(run), params=[Param(k, v) for k, v in run.params.items()])

    @_bounded
    def log_metrics(self, run: RunInfo, metrics: Mapping[str, float], step: int, ms: int) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(self._id(run), metrics=[Metric(k, v, ms, step) for k, v in metrics.items()])

    @_bounded
    def log_artifact(self, run: RunInfo, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self._id(run), str(path), artifact_path)
        else:
            self.client.log_artifact(self._id(run), str(path), artifact_path)

    @_bounded
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
        client, run_id = self.client, self._id(run)
        signature = signature or generator_signature(generator_file)
        params = spec.to_json()
        tags = {k: str(params[k]) for k in ("codec", "quality", "phase") if k in params}

        def write(local: Path, model_id: str) -> None:
            save_pyfunc_model(local, generator_file, spec, signature, run_id=run_id, model_id=model_id)

        logged = self._logged_model(run_id, GENERATOR_ARTIFACT, "jpd-se-generator", tags, params, write)
        # the validation figures the export was selected by (at its step): logged-model metrics, version tags
        metrics = selected_metrics(spec)
        if metrics:
            from mlflow.entities import Metric

            ms, step = int(time.time() * 1000), int(metrics.get("selected_step", 0))
            linked = [Metric(k, v, ms, step, model_id=logged.model_id) for k, v in metrics.items()]
            client.log_batch(run_id, metrics=linked)
            tags.update({k: repr(v) for k, v in metrics.items()})
        description = "JPD-SE generator (pipeline.model.export safetensors)"
        return self._new_version(name, description, logged, run_id, tags, alias)

    @_bounded
    def register_segmenter(self, run: RunInfo, segmenter_file: Path, name: str, alias: str | None) -> str:
        """Log a segmenter file as a pyfunc model of ``run`` (:mod:`pipeline.segment.registry`), register
        it with its sha256, architecture and class count as version tags, set ``alias``; returns
        ``models:/name/version``."""

        from pipeline.model.export import weights_sha256
        from pipeline.segment.base import read_spec
        from pipeline.segment.registry import SEGMENTER_ARTIFACT, save_segmenter_pyfunc

        run_id = self._id(run)
        spec = read_spec(segmenter_file)
        tags = {
            "sha256": weights_sha256(segmenter_file),
            **{k: str(spec[k]) for k in ("architecture", "num_classes", "label_space")},
        }

        def write(local: Path, model_id: str) -> None:
            save_segmenter_pyfunc(local, segmenter_file, run_id=run_id, model_id=model_id)

        logged = self._logged_model(run_id, SEGMENTER_ARTIFACT, "jpd-se-segmenter", tags, spec, write)
        description = "semantic segmenter (pipeline.segment, train ids)"
        return self._new_version(name, description, logged, run_id, tags, alias)

    def _logged_model(
        self,
        run_id: str,
        artifact: str,
        model_type: str,
        tags: dict[str, str],
        params: dict[str, Any],
        write: Callable[[Path, str], None],
    ) -> Any:
        """A READY logged model of ``run_id``: ``write(folder, model_id)`` saves the pyfunc model, which is
        logged as its artifacts."""
        from mlflow.entities import LoggedModelOutput

        client = self.client
        logged = client.create_logged_model(
            self.experiment_id,
            name=artifact,
            source_run_id=run_id,
            tags=tags,
            params=clean_params(params),
            model_type=model_type,
        )
        with tempfile.TemporaryDirectory(prefix="jpdse-model-") as tmp:
            local = Path(tmp) / "model"
            write(local, logged.model_id)
            client.log_model_artifacts(logged.model_id, str(local))
        client.finalize_logged_model(logged.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        return logged

    def _new_version(
        self, name: str, description: str, logged: Any, run_id: str, tags: dict[str, str], alias: str | None
    ) -> str:
        """A new version of registered model ``name`` (made when missing) from the logged model, with
        ``tags`` and, when given, ``alias``; returns ``models:/name/version``."""
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name, source=logged.artifact_location, run_id=run_id, tags=tags, model_id=logged.model_id
        )
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
        return f"models:/{name}/{version.version}"

    @_bounded
    def end_run(self, run: RunInfo, status: str, ms: int) -> None:
        self.client.set_terminated(self._id(run), status=status, end_time=ms)

    @staticmethod
    def _id(run: RunInfo) -> str:
        if run.run_id is None:
            raise RuntimeError(f"run {run.name!r} was never created in the store")
        return run.run_id
