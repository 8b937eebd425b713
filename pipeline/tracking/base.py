"""The tracking interface, the no-op tracker, and what every implementation shares: run tags, registered-model
names, the default store, and cleaning keys and values to what MLflow accepts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.config import REPO_ROOT, JobConfig

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

    from pipeline.model.spec import GeneratorSpec

# MLflow 3.17's length limits (mlflow.utils.validation). Longer values are cut here, visibly, rather
# than left to the store (which rejects them when MLFLOW_TRUNCATE_LONG_VALUES=false). The per-batch
# limits (100 params/tags, 1000 metrics) need nothing here: MlflowClient.log_batch splits batches itself.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
TRUNCATED = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")
REGISTRY_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*$")


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
        spec: GeneratorSpec | None = None,
    ) -> str | None:
        """Register an exported generator under ``name``; returns ``models:/name/version`` or None."""
        return None

    def register_segmenter(
        self, segmenter_file: str | Path, name: str, *, alias: str | None = None
    ) -> str | None:
        """Register a segmenter file (:mod:`pipeline.segment.registry`) under ``name``, its version tagged
        with the file's sha256; returns ``models:/name/version`` or None."""
        return None


@dataclass
class RunInfo:
    """A run as the sinks see it: ``key`` names it in the offline record, ``run_id`` in the store (None
    until the store created it)."""

    key: str
    name: str
    parent: str | None
    params: dict[str, str]
    tags: dict[str, str]
    start_ms: int
    run_id: str | None = None


class Sink(Protocol):
    """Where a tracker's events go: the MLflow store (:class:`~pipeline.tracking.mlflow_store.MLflowStore`)
    or the offline record (:class:`~pipeline.tracking.offline.OfflineRecord`). Keys and values come
    cleaned."""

    def start_run(self, run: RunInfo, parent: RunInfo | None) -> None: ...

    def log_metrics(self, run: RunInfo, metrics: Mapping[str, float], step: int, ms: int) -> None: ...

    def log_artifact(self, run: RunInfo, path: Path, artifact_path: str | None) -> None: ...

    def register(
        self,
        run: RunInfo,
        generator_file: Path,
        name: str,
        alias: str | None,
        spec: GeneratorSpec,
        signature: ModelSignature | None = None,
    ) -> str | None:
        """Register ``generator_file`` under ``run``; returns ``models:/name/version`` (None offline)."""

    def register_segmenter(
        self, run: RunInfo, segmenter_file: Path, name: str, alias: str | None
    ) -> str | None:
        """Register a segmenter file under ``run``; returns ``models:/name/version`` (None offline)."""

    def end_run(self, run: RunInfo, status: str, ms: int) -> None: ...


def source_tags() -> dict[str, str]:
    """MLflow's standard tags of who ran what (``mlflow.user``, ``mlflow.source.name``/``type``), which a
    run created through a bare client does not get: set on every run the tracker starts."""
    import getpass
    import sys

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name (a container's uid without a passwd entry)
        user = "unknown"
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    source = str(Path(argv0).resolve()) if argv0 and argv0 != "-c" else "python -m pipeline"
    return {"mlflow.user": user, "mlflow.source.name": source, "mlflow.source.type": "LOCAL"}


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
    """Tags every run of a job carries: codec, quality (and the qualities of a model trained on several),
    dataset, git commit, config hash (and phase)."""
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
    if cfg.loader.qualities:  # a model of several qualities (loader.quality then only names it)
        tags["qualities"] = ",".join(str(q) for q in sorted(set(cfg.loader.qualities)))
    if phase is not None:
        tags["phase"] = str(phase)
    return tags


def registry_name(
    codec: str, quality: int | Sequence[int], zero_semantics: bool = False, label_source: str = "gt"
) -> str:
    """Registered-model name of a generator: ``hevc-se-q42`` on ground-truth maps, ``hevc-se-decoder-q42``
    and ``hevc-se-encoder-q42`` on predicted ones (``data.label_source``: a model of one source does not
    decode with another's maps, so each has its own versions and aliases), ``hevc-nosem-q42`` without
    semantics (whatever the source); ``hevc-se-q32-37-42-47`` for one model of several qualities."""
    kind = "nosem" if zero_semantics else "se" if label_source == "gt" else f"se-{label_source}"
    qualities = [quality] if isinstance(quality, int) else sorted(set(quality))
    name = f"{codec}-{kind}-q" + "-".join(str(int(q)) for q in qualities)
    if not REGISTRY_NAME.match(name):
        raise ValueError(f"codec name {codec!r} gives an invalid registered-model name {name!r}")
    return name


def default_tracking_uri(uri: str = "") -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store ``<cwd>/mlruns/mlflow.db`` (no server)."""
    return (
        uri or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"
    )


def clean_key(key: Any) -> str:
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
        out[clean_key(key)] = _truncate(text, MAX_PARAM_VALUE_LENGTH)
    return out


def clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags as MLflow stores them: strings cut to MLflow's length limit."""
    return {clean_key(k): _truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in tags.items()}


def now_ms() -> int:
    return int(time.time() * 1000)
