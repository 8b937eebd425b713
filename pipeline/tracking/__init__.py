"""Run tracking behind one small interface; the base class logs nothing.

Training, sweeps and evaluation talk only to :class:`Tracker`; MLflow is one
implementation of it (:class:`MLflowTracker`, built by :func:`make_tracker`).

Logging never stops training: when the tracking store cannot be reached, the MLflow
tracker warns once (:class:`TrackingUnavailableWarning`) and writes every later event to
a JSON-lines record under ``<cwd>/mlruns/offline/``; :func:`replay_offline` (CLI:
``python -m pipeline tracking-replay FILE``) logs such a record into a store later.

Exported generators are registered as MLflow pyfunc models whose loader is this package
(:func:`_load_pyfunc`), so no pickled code is stored; ``models:/name@alias`` URIs resolve to
the exported safetensors file with :func:`resolve_model_uri`. ``import mlflow`` costs seconds,
so it happens only when an MLflow tracker or registry function is used.

Modules: :mod:`~pipeline.tracking.base` (the interface, the no-op tracker, tags, names, key cleaning),
:mod:`~pipeline.tracking.tracker` (the MLflow tracker and :func:`make_tracker`),
:mod:`~pipeline.tracking.mlflow_store` (the store sink), :mod:`~pipeline.tracking.offline` (the offline
sink and its replay), :mod:`~pipeline.tracking.registry` (the registry's models).
"""

from pipeline.tracking.base import (
    MAX_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    TRUNCATED,
    RunInfo,
    Sink,
    Tracker,
    TrackingUnavailableWarning,
    clean_key,
    clean_params,
    clean_tags,
    default_tracking_uri,
    git_commit,
    registry_name,
    run_tags,
)
from pipeline.tracking.mlflow_store import MLflowStore
from pipeline.tracking.offline import OfflineRecord, replay_offline
from pipeline.tracking.registry import (
    PYFUNC_LOADER,
    GeneratorPyfunc,
    download_model,
    example_input,
    generator_signature,
    pin_model_uri,
    predict,
    register_generator,
    resolve_model_uri,
)
from pipeline.tracking.registry import _load_pyfunc as _load_pyfunc  # PYFUNC_LOADER names this package
from pipeline.tracking.tracker import MLflowTracker, make_tracker

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "PYFUNC_LOADER",
    "TRUNCATED",
    "GeneratorPyfunc",
    "MLflowStore",
    "MLflowTracker",
    "OfflineRecord",
    "RunInfo",
    "Sink",
    "Tracker",
    "TrackingUnavailableWarning",
    "clean_key",
    "clean_params",
    "clean_tags",
    "default_tracking_uri",
    "download_model",
    "example_input",
    "generator_signature",
    "git_commit",
    "make_tracker",
    "pin_model_uri",
    "predict",
    "register_generator",
    "registry_name",
    "replay_offline",
    "resolve_model_uri",
    "run_tags",
]
