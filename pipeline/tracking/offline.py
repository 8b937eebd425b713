"""The offline sink: a JSON-lines record of a tracker's events, written while the store is unreachable, and
:func:`replay_offline`, which logs such a record into a store later.

One record per top-level run, ``<offline dir>/<run name>-<time>-<random>.jsonl``; each line is one event:
``start_run`` (key, name, parent key, store run id if the store had created it, experiment, params, tags,
time), ``metrics`` (key, metrics, step, time), ``artifact`` (key, path, artifact_path), ``register`` (key,
file, name, alias, spec), ``register_segmenter`` (key, file, name, alias) or ``end_run`` (key, status, time).
"""

from __future__ import annotations

import json
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tracking.base import (
    RunInfo,
    TrackingUnavailableWarning,
    clean_key,
    default_tracking_uri,
    now_ms,
)
from pipeline.tracking.mlflow_store import MLflowStore

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

    from pipeline.model.spec import GeneratorSpec


class OfflineRecord:
    """The offline sink: appends events to a record in ``directory``; a write failure warns once."""

    def __init__(self, directory: Path, experiment: str) -> None:
        self.directory = directory
        self.experiment = experiment
        self.path: Path | None = None
        self._started: set[str] = set()
        self._warned = False

    def start_run(self, run: RunInfo, parent: RunInfo | None) -> None:
        """Record the start of ``run`` once; a top-level run opens a new record."""
        if run.key in self._started:
            return
        self._started.add(run.key)
        if run.parent is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            stem = f"{clean_key(run.name).replace('/', '_')}-{stamp}-{uuid.uuid4().hex[:8]}"
            self.path = self.directory / f"{stem}.jsonl"
        self._write(
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

    def log_metrics(self, run: RunInfo, metrics: Mapping[str, float], step: int, ms: int) -> None:
        self._write({"event": "metrics", "key": run.key, "metrics": dict(metrics), "step": step, "time": ms})

    def log_artifact(self, run: RunInfo, path: Path, artifact_path: str | None) -> None:
        self._write({"event": "artifact", "key": run.key, "path": str(path), "artifact_path": artifact_path})

    def register(
        self,
        run: RunInfo,
        generator_file: Path,
        name: str,
        alias: str | None,
        spec: GeneratorSpec,
        signature: ModelSignature | None = None,
    ) -> None:
        self._write(
            {
                "event": "register",
                "key": run.key,
                "file": str(generator_file),
                "name": name,
                "alias": alias,
                "spec": spec.to_json(),
            }
        )

    def register_segmenter(self, run: RunInfo, segmenter_file: Path, name: str, alias: str | None) -> None:
        self._write(
            {
                "event": "register_segmenter",
                "key": run.key,
                "file": str(segmenter_file),
                "name": name,
                "alias": alias,
            }
        )

    def end_run(self, run: RunInfo, status: str, ms: int) -> None:
        self._write({"event": "end_run", "key": run.key, "status": status, "time": ms})

    def _write(self, event: dict[str, Any]) -> None:
        if self.path is None:
            raise RuntimeError("an offline record starts with a top-level run")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(event, default=str) + "\n")
        except OSError as err:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"cannot write the offline tracking record {self.path}: {err}",
                    TrackingUnavailableWarning,
                    stacklevel=6,  # the tracker's caller: _write, sink method, lambda, _send, tracker method
                )


def _read_events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"offline tracking record not found: {path}")
    events = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line: {err}") from err
    return events


def replay_offline(record_path: str | Path, tracker_uri: str = "", *, experiment: str = "") -> dict[str, str]:
    """Log an offline record into the store at ``tracker_uri`` (default: :func:`default_tracking_uri`).

    Runs that existed in that store before it became unreachable are continued, the others
    created (nested as recorded). Returns ``{record run key: MLflow run id}``. Store errors raise.
    Replaying the same record twice logs it twice.
    """
    path = Path(record_path)
    events = _read_events(path)
    starts = [e for e in events if e.get("event") == "start_run"]
    if not starts:
        raise ValueError(f"{path} holds no runs")
    store = MLflowStore(default_tracking_uri(tracker_uri), experiment or starts[0]["experiment"])
    runs: dict[str, RunInfo] = {}
    ended: set[str] = set()
    for event in events:
        kind, key = event.get("event"), event.get("key")
        if kind == "start_run":
            run = RunInfo(
                event["key"],
                event["name"],
                event.get("parent"),
                event["params"],
                event["tags"],
                int(event["time"]),
                event.get("run_id"),
            )
            if run.run_id and store.has_run(run.run_id):  # created before the store became unreachable
                store.log_params(run)
            else:
                run.run_id = None
                store.start_run(run, runs.get(run.parent) if run.parent else None)
            runs[run.key] = run
        elif key not in runs:
            raise ValueError(f"{path}: event {kind!r} for a run that was never started")
        elif kind == "metrics":
            store.log_metrics(runs[key], event["metrics"], int(event["step"]), int(event["time"]))
        elif kind == "artifact":
            artifact = Path(event["path"])
            if artifact.exists():
                store.log_artifact(runs[key], artifact, event.get("artifact_path"))
            else:
                warnings.warn(
                    f"artifact {artifact} of the offline record is gone; skipped",
                    RuntimeWarning,
                    stacklevel=2,
                )
        elif kind == "register":
            from pipeline.model.spec import FORMAT_VERSION, GeneratorSpec  # torch, only when a model is

            spec = GeneratorSpec.from_json(event["spec"], FORMAT_VERSION)
            store.register(runs[key], Path(event["file"]), event["name"], event.get("alias"), spec)
        elif kind == "register_segmenter":
            store.register_segmenter(runs[key], Path(event["file"]), event["name"], event.get("alias"))
        elif kind == "end_run":
            store.end_run(runs[key], event["status"], int(event["time"]))
            ended.add(key)
        else:
            raise ValueError(f"{path}: unknown event {kind!r}")
    for key in runs.keys() - ended:  # the process died before the run ended
        store.end_run(runs[key], "FAILED", now_ms())
    return {key: run.run_id for key, run in runs.items() if run.run_id is not None}
