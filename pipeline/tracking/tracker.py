"""The MLflow tracker: the run stack over two sinks, the MLflow store and, once the store has failed, the
offline record; and :func:`make_tracker`, which picks the job's tracker."""

from __future__ import annotations

import contextlib
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.config import JobConfig
from pipeline.tracking.base import (
    RunInfo,
    Sink,
    Tracker,
    TrackingUnavailableWarning,
    clean_key,
    clean_params,
    clean_tags,
    default_tracking_uri,
    now_ms,
    source_tags,
)
from pipeline.tracking.mlflow_store import DEFAULT_CONNECT_TIMEOUT, MLflowStore
from pipeline.tracking.offline import OfflineRecord
from pipeline.tracking.registry import check_names, check_registration, generator_signature

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.model.spec import GeneratorSpec

T = TypeVar("T")


class MLflowTracker(Tracker):
    """MLflow tracking that never stops the job: events go to the store until its first failure, then (with
    one :class:`TrackingUnavailableWarning`) to an offline record under ``offline_dir`` (default
    ``<cwd>/mlruns/offline``), which starts with the open runs.

    Nested runs carry the ``mlflow.parentRunId`` tag, as MLflow's own nested runs do.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        offline_dir: str | Path | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.store = MLflowStore(uri, experiment, connect_timeout)
        self.record = OfflineRecord(
            Path(offline_dir) if offline_dir else Path.cwd() / "mlruns" / "offline", experiment
        )
        self.offline = False
        self._stack: list[RunInfo] = []
        self._warned_outside = False

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def experiment(self) -> str:
        return self.store.experiment

    @property
    def client(self) -> MlflowClient:
        return self.store.client

    @property
    def experiment_id(self) -> str:
        return self.store.experiment_id

    @property
    def offline_record(self) -> Path | None:
        """The offline record written last; None while the store never failed."""
        return self.record.path

    def _send(self, call: Callable[[Sink], T]) -> T:
        """``call`` on the store; on its first failure, go offline and make it on the offline record."""
        if not self.offline:
            try:
                return call(self.store)  # every store call is bounded (mlflow_store.store_call)
            except Exception as err:
                self._go_offline(err)
        return call(self.record)

    def _go_offline(self, err: Exception) -> None:
        self.offline = True
        for parent, run in zip([None, *self._stack[:-1]], self._stack, strict=True):
            self.record.start_run(run, parent)
        message = str(err).splitlines()[0][:300] if str(err) else ""
        warnings.warn(
            f"MLflow tracking store {self.uri} failed ({type(err).__name__}: {message}); "
            f"logging goes on offline into {self.record.path} — replay it later with "
            f"`python -m pipeline tracking-replay FILE`",
            TrackingUnavailableWarning,
            stacklevel=4,
        )

    @contextlib.contextmanager
    def start_run(
        self, name: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[None]:
        parent = self._stack[-1] if self._stack else None
        run = RunInfo(
            uuid.uuid4().hex,
            name,
            parent.key if parent else None,
            clean_params(params or {}),
            clean_tags({**source_tags(), **(tags or {})}),
            now_ms(),
        )
        self._stack.append(run)
        self._send(lambda sink: sink.start_run(run, parent))
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            ms = now_ms()
            self._send(lambda sink: sink.end_run(run, status, ms))
            self._stack.pop()

    @property
    def active_run_id(self) -> str | None:
        return self._stack[-1].run_id if self._stack else None

    def _current(self, what: str) -> RunInfo | None:
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
        values = {clean_key(k): float(v) for k, v in metrics.items() if v is not None}
        step, ms = int(step or 0), now_ms()
        self._send(lambda sink: sink.log_metrics(run, values, step, ms))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        run = self._current("log_artifact")
        if run is None:
            return
        path = Path(path).resolve()
        if not path.exists():
            warnings.warn(f"artifact {path} does not exist; not logged", RuntimeWarning, stacklevel=2)
            return
        self._send(lambda sink: sink.log_artifact(run, path, artifact_path))

    def register_generator(
        self,
        generator_file: str | Path,
        name: str,
        *,
        alias: str | None = None,
        spec: GeneratorSpec | None = None,
    ) -> str | None:
        """Register under the current run (or a run ``register-<name>`` of its own).

        Returns ``models:/name/version``, or None when the store is unreachable (then the
        registration is in the offline record).
        """
        generator_file, spec = check_registration(generator_file, name, alias, spec)
        if not self._stack:
            with self.start_run(f"register-{name}", tags={"registered_model": name}):
                return self.register_generator(generator_file, name, alias=alias, spec=spec)
        run = self._stack[-1]
        # Inferred before the store call, so that a bad file raises instead of taking the tracker
        # offline; the offline record does not need it.
        signature = None if self.offline else generator_signature(generator_file)
        return self._send(lambda sink: sink.register(run, generator_file, name, alias, spec, signature))

    def register_segmenter(
        self, segmenter_file: str | Path, name: str, *, alias: str | None = None
    ) -> str | None:
        """Register a segmenter file under the current run (or a run ``register-<name>`` of its own);
        returns ``models:/name/version``, or None when the store is unreachable (then the registration
        is in the offline record)."""
        from pipeline.segment.base import read_spec

        segmenter_file = Path(segmenter_file).resolve()
        read_spec(segmenter_file)  # a missing or foreign file raises here, not in the store
        check_names(name, alias)
        if not self._stack:
            with self.start_run(f"register-{name}", tags={"registered_model": name}):
                return self.register_segmenter(segmenter_file, name, alias=alias)
        run = self._stack[-1]
        return self._send(lambda sink: sink.register_segmenter(run, segmenter_file, name, alias))


def make_tracker(cfg: JobConfig, *, rank: int = 0) -> Tracker:
    """The job's tracker: MLflow on rank 0 when ``cfg.tracking.enabled``, the no-op tracker otherwise."""
    if rank != 0 or not cfg.tracking.enabled:
        return Tracker()
    return MLflowTracker(
        default_tracking_uri(cfg.tracking.uri),
        cfg.tracking.experiment,
        connect_timeout=cfg.tracking.connect_timeout,
    )
