"""Run tracking behind one small interface; the base class logs nothing.

Training, sweeps and evaluation talk only to :class:`Tracker`; MLflow is one
implementation of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class Tracker:
    """No-op tracker: every method is safe to call and does nothing."""

    @contextlib.contextmanager
    def start_run(
        self, name: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[None]:
        """A run; a run started inside another is nested under it."""
        yield

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Scalar metrics at a step."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (or folder) produced by the run."""
