"""One MLflow run per trial, nested under the sweep's run: Ray's ``MLflowLoggerCallback``, in the driver.

The callback runs in the Ray driver, so a trial's run is opened and closed there whatever happens to the
trial's worker (ASHA ending it, a crash, a retry): no run is left RUNNING by a worker that died. On top of
Ray's callback: the run is named ``trial-<id>`` and tagged ``trial_id``/``sweep``/``mlflow.parentRunId``;
metrics are logged at the trial's phase-2 ``step`` (not Ray's report count), only the trial's own ones
(scores, losses); a trial that ends without completing (stopped early) ends KILLED with
``stopped_early = 1``; a restored sweep continues each trial's existing run; and a store failure warns
once and never stops the sweep.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ray.air.integrations.mlflow import MLflowLoggerCallback

from pipeline.train.tune.sweep import COMPLETED_KEY

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

METRIC_PREFIXES = ("val_", "loss.")
METRIC_KEYS = ("world_size",)  # a multi-worker trial's (tune.workers_per_trial)


def _own_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trial's own metrics out of a Ray result (Ray adds timings, hostnames, the config ...)."""
    out = {}
    for key, value in result.items():
        own = key.startswith(METRIC_PREFIXES) or key in METRIC_KEYS
        if own and isinstance(value, int | float) and math.isfinite(value):
            out[key] = float(value)
    return out


@contextlib.contextmanager
def process_uris_kept() -> Iterator[None]:
    """Restore MLflow's process-wide tracking and registry URIs (and their environment variables) after
    the block. Ray's callback sets them to the sweep's store in the driver; left set, a caller's later
    ``mlflow.pyfunc.load_model("models:/...")`` or default store would read the sweep's store instead."""
    import mlflow
    from mlflow.tracking import _model_registry, _tracking_service

    tracking, registry = _tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri
    env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking)  # None: unset, as it was
        mlflow.set_registry_uri(registry)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class TrialRuns(MLflowLoggerCallback):
    """Ray's MLflow logger with the sweep's nesting and run states (see the module docstring)."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, sweep: str) -> None:
        super().__init__(
            tracking_uri,
            experiment_name=experiment,
            tags={"mlflow.parentRunId": parent_run_id, "sweep": sweep},
        )
        self.parent_run_id = parent_run_id
        self._warned = False

    def _guard(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except Exception as err:  # tracking never fails the sweep
            if not self._warned:
                self._warned = True
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                warnings.warn(f"MLflow {what} failed: {first}", RuntimeWarning, stacklevel=2)
            return None

    def _existing_run(self, trial: Trial) -> str | None:
        """The run a restored sweep's trial already has (Ray's callback forgets it across a restore)."""
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        query = f"tags.trial_id = '{trial.trial_id}' and tags.mlflow.parentRunId = '{self.parent_run_id}'"
        runs = client.search_runs([self.mlflow_util.experiment_id], query, max_results=1)
        if not runs:
            return None
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id

    def _start(self, trial: Trial) -> str | None:
        run_id = self._existing_run(trial)
        if run_id is None:
            tags = {**self.tags, "trial_id": trial.trial_id, "trial_name": str(trial)}
            run = self.mlflow_util.start_run(tags=tags, run_name=f"trial-{trial.trial_id}")
            run_id = run.info.run_id
            self.mlflow_util.log_params(run_id=run_id, params_to_log=trial.config)
        return run_id

    def log_trial_start(self, trial: Trial) -> None:
        if trial not in self._trial_runs:
            run_id = self._guard("run start", self._start, trial)
            if run_id is not None:
                self._trial_runs[trial] = run_id

    def log_trial_result(self, iteration: int, trial: Trial, result: dict[str, Any]) -> None:
        run_id = self._trial_runs.get(trial)
        if run_id is not None:
            step = int(result.get("step", iteration))
            self._guard(
                "metrics",
                self.mlflow_util.log_metrics,
                step=step,
                metrics_to_log=_own_metrics(result),
                run_id=run_id,
            )

    def log_trial_end(self, trial: Trial, failed: bool = False) -> None:
        run_id = self._trial_runs.pop(trial, None)
        if run_id is None:
            return
        completed = COMPLETED_KEY in (trial.last_result or {})
        status = "FAILED" if failed else ("FINISHED" if completed else "KILLED")
        step = int((trial.last_result or {}).get("step", 0))
        stopped = {"stopped_early": 0.0 if completed or failed else 1.0}
        self._guard("metrics", self.mlflow_util.log_metrics, step=step, metrics_to_log=stopped, run_id=run_id)
        self._guard("run end", self.mlflow_util.end_run, run_id=run_id, status=status)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        """An interrupted sweep (Ctrl-C) leaves trials unfinished: their runs end KILLED (a restore
        reopens them)."""
        for trial, run_id in list(self._trial_runs.items()):
            self._guard("run end", self.mlflow_util.end_run, run_id=run_id, status="KILLED")
            del self._trial_runs[trial]
