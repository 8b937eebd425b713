"""Exported generators as MLflow registry models: the pyfunc model and its loader, its signature and example,
and resolving ``models:/name@alias`` URIs to the exported safetensors file.

A registered model is an MLflow pyfunc model whose ``loader_module`` is :data:`PYFUNC_LOADER`, so no pickled
code is stored; its data is the exported generator file itself. It is self-contained: the Python sources of
this package travel with it (MLflow's ``code_paths``, which ``load_model`` puts first on ``sys.path``), so a
process without this repository loads and runs it with only the model's requirements installed; those are
pinned to public versions (``torch==2.13.0``, never ``+cpu``), which the CPU and the CUDA wheels both satisfy.
The model version carries the validation figures of the step the export was selected at
(:func:`selected_metrics`) as tags, and its logged model as metrics; once the main job has evaluated it on
the held-out split, the figures of that evaluation too (:func:`set_version_evaluation`, ``eval_*``).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.atomic import write_atomic
from pipeline.tracking.base import REGISTRY_NAME, Tracker, default_tracking_uri

REGISTERED_FILE = "registered.json"  # beside an export: the registration that completed its run or phase


def is_registered(export: Path, name: str, alias: str | None, sha256: str) -> bool:
    """Whether the ``registered.json`` marker beside ``export`` records this registration (name, alias and
    the file's sha256): a run killed between its export and the registry registers on resume."""
    try:
        marker = json.loads((export.parent / REGISTERED_FILE).read_text())
    except (OSError, ValueError):
        return False
    wanted = {"name": name, "alias": alias, "sha256": sha256}
    return isinstance(marker, dict) and all(marker.get(k) == v for k, v in wanted.items())


def mark_registered(export: Path, uri: str, name: str, alias: str | None, sha256: str) -> None:
    """Write the ``registered.json`` marker beside ``export`` (atomically): the registration is done."""
    marker = {"uri": uri, "name": name, "alias": alias, "sha256": sha256}
    write_atomic(export.parent / REGISTERED_FILE, json.dumps(marker, sort_keys=True))


if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import ModelSignature
    from torch import nn

    from pipeline.model.spec import GeneratorSpec

# The loader module recorded in every registered model's MLmodel file. It names the package, which
# re-exports _load_pyfunc, so the models registered before the package was split keep loading.
PYFUNC_LOADER = "pipeline.tracking"
GENERATOR_ARTIFACT = "generator"
_ALIAS = re.compile(r"^[\w\-]+$")
_MODEL_ID = re.compile(r"(?:^|/)(m-[0-9a-f]{32})(?:/|$)")


def check_registration(
    generator_file: str | Path, name: str, alias: str | None, spec: GeneratorSpec | None
) -> tuple[Path, GeneratorSpec]:
    """The resolved generator file and its spec (read from the file unless given); refuses a missing
    file, a bad name or a bad alias."""
    from pipeline.model.export import read_spec

    path = Path(generator_file).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"exported generator not found: {path}")
    check_names(name, alias)
    return path, spec if spec is not None else read_spec(path)


def check_names(name: str, alias: str | None) -> None:
    """Refuse a registered-model name or alias the registry would refuse (before anything is trained)."""
    if not REGISTRY_NAME.match(name):
        raise ValueError(f"invalid registered-model name {name!r} (letters, digits, '.', '_', '-')")
    if alias is not None and (not _ALIAS.match(alias) or re.fullmatch(r"[vV]\d+|latest", alias)):
        raise ValueError(f"invalid alias {alias!r}: letters, digits, '_' and '-', not 'latest' or v<number>")


def register_generator(
    tracker: Tracker,
    generator_file: str | Path,
    name: str,
    alias: str | None = None,
    spec: GeneratorSpec | None = None,
) -> str | None:
    """Register an exported generator through ``tracker`` (see :meth:`Tracker.register_generator`)."""
    return tracker.register_generator(generator_file, name, alias=alias, spec=spec)


# What the pyfunc's code imports (pipeline.tracking -> pipeline.config needs yaml; the generator needs torch,
# safetensors and numpy).
PYFUNC_PACKAGES = ("mlflow", "torch", "safetensors", "numpy", "pyyaml")


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc model (given, so MLflow does not infer them in a subprocess).

    Public versions only: a local label (``2.13.0+cpu``) exists on one wheel index alone, while
    ``torch==2.13.0`` is met by the CPU and the CUDA builds alike.
    """
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    out = []
    for package in PYFUNC_PACKAGES:
        try:
            out.append(f"{package}=={Version(version(package)).public}")
        except PackageNotFoundError:
            out.append(package)
    return out


def copy_code(dst: Path) -> Path:
    """The package's Python sources (no data, no caches) copied under ``dst/pipeline``, for ``code_paths``."""
    import pipeline

    src = Path(pipeline.__file__).resolve().parent
    target = dst / "pipeline"
    for file in sorted(src.rglob("*.py")):
        if "__pycache__" in file.parts:
            continue
        (target / file.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target / file.relative_to(src))
    return target


def selected_metrics(spec: GeneratorSpec) -> dict[str, float]:
    """The validation figures of the step an export was selected at (``spec.selected``, written by the
    trainer): ``val_<score>`` for each score (``val_psnr``, ``val_delta_psnr``, ...) and ``selected_step``;
    empty for an export without validation."""
    selected = spec.selected or {}
    out = {
        f"val_{k}": float(v)
        for k, v in (selected.get("scores") or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    step = selected.get("step")
    if isinstance(step, int) and not isinstance(step, bool):
        out["selected_step"] = float(step)
    return out


def _version_model_id(version: ModelVersion) -> str | None:
    """The logged model behind a model version: its ``model_id``, which a SQL store does not keep, else the
    ``m-<id>`` folder its source (the logged model's artifact location) lies in."""
    if version.model_id:
        return str(version.model_id)
    found = _MODEL_ID.search(version.source or "")
    return found.group(1) if found else None


def set_version_evaluation(
    uri: str,
    figures: Mapping[str, float],
    notes: Mapping[str, str] | None = None,
    *,
    tracking_uri: str = "",
    run_id: str | None = None,
) -> str:
    """Put an evaluation's ``figures`` (``eval_psnr``, ...) on the model version ``uri``
    (``models:/name/<version>`` or ``models:/name@alias``) as tags, beside the validation ones, with
    ``notes`` (``eval_split``, ...) as tags as they are; with ``run_id`` (the evaluating run) the figures
    are also logged there as metrics of the version's logged model. Returns ``models:/name/<version>``."""
    from mlflow.entities import Metric

    store = default_tracking_uri(tracking_uri)
    pinned = pin_model_uri(uri, tracking_uri=store)
    name, slash, version = pinned.removeprefix("models:/").strip("/").partition("/")
    if not (pinned.startswith("models:/") and name and slash and version.isdigit()):
        raise _bad_uri(uri)
    tags = {**{k: repr(float(v)) for k, v in figures.items()}, **(notes or {})}
    with _registry_call(uri, store, "model version tags"):
        client = _client(store, uri)
        model_id = _version_model_id(client.get_model_version(name, version))
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if run_id is not None and model_id and figures:
            ms = int(time.time() * 1000)
            metrics = [Metric(k, float(v), ms, 0, model_id=model_id) for k, v in figures.items()]
            client.log_batch(run_id, metrics=metrics)
    return pinned


def example_input(spec: GeneratorSpec, batch: int = 1) -> dict[str, np.ndarray]:
    """A zero input of the smallest comfortable size for the generator ``spec`` describes."""
    side = 2 * 2**spec.n_downsample
    inputs = {
        "label": np.zeros((batch, side, side), np.int64),
        "decoded": np.zeros((batch, 3, side, side), np.float32),
    }
    if spec.use_instance:
        inputs["edge"] = np.zeros((batch, 1, side, side), np.float32)
    if spec.quality_input:
        from pipeline.data.codecs.base import codec_class

        inputs["quality"] = np.full(batch, codec_class(str(spec.codec)).quality_range[0], np.int64)
    from pipeline.model.correction_scale import GAIN_UNIT, GAIN_ZERO, SCALE_UNIT, gain_count, sends_scale

    if sends_scale(spec):
        inputs["correction_scale"] = np.full(batch, SCALE_UNIT, np.int64)
    if gain_count(spec):
        inputs["correction_gains"] = np.full((batch, gain_count(spec)), GAIN_ZERO + GAIN_UNIT, np.int64)
    return inputs


def predict(generator: nn.Module, spec: GeneratorSpec, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Run an exported generator on numpy inputs (:func:`pipeline.model.inference.enhance_batch`):
    ``label`` int ``B x H x W``, ``decoded`` float32 ``B x 3 x H x W`` in [-1, 1], ``edge`` float32
    ``B x 1 x H x W`` (with instances), ``quality`` int ``B`` (the codec quality of each frame, for a
    ``quality_input`` model), ``correction_scale`` int ``B`` (each frame's code from its encoder, for a
    model with ``correction_scale: frame``; :mod:`pipeline.model.correction_scale`, applied here in float,
    within a grey level of the decoder's uint8 output), ``correction_gains`` int ``B x (ngf + 1)`` (each
    frame's gain codes, for a model with ``correction_scale: channels``). Returns the enhanced image,
    float32 ``B x 3 x H x W`` in [-1, 1]."""
    from pipeline.model.correction_scale import (
        apply_codes,
        check_gain_codes,
        gain_count,
        gains_of,
        sends_scale,
    )
    from pipeline.model.inference import enhance_batch

    scales, count = sends_scale(spec), gain_count(spec)
    needed = ["label", "decoded"] + ["edge"] * spec.use_instance + ["quality"] * bool(spec.quality_input)
    needed += ["correction_scale"] * scales + ["correction_gains"] * bool(count)
    missing = [k for k in needed if k not in inputs]
    if missing:
        raise ValueError(f"generator input lacks {missing}; it takes {needed}")
    edge = inputs["edge"] if spec.use_instance else None
    quality = inputs["quality"] if spec.quality_input else None
    gains = None
    if count:
        codes = check_gain_codes(inputs["correction_gains"], count)
        if codes.shape != (len(inputs["decoded"]), count):
            raise ValueError(
                f"correction_gains must be {len(inputs['decoded'])} x {count}, got {codes.shape}"
            )
        gains = gains_of(codes)
    out = enhance_batch(generator, spec, inputs["label"], inputs["decoded"], edge, quality, gains)
    out = out.cpu().numpy()
    if not scales:
        return out
    return apply_codes(np.asarray(inputs["decoded"], np.float32), out, inputs["correction_scale"])


def generator_signature(generator_file: Path) -> ModelSignature:
    """The pyfunc signature, inferred from an example run; height and width are left free (-1)."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import Schema, TensorSpec

    from pipeline.model.export import load_generator

    generator, spec = load_generator(generator_file)
    inputs = example_input(spec)
    inferred = infer_signature(inputs, predict(generator, spec, inputs))

    def free(schema: Schema) -> Schema:  # images: free height and width; per-frame values as they are
        return Schema(
            [TensorSpec(s.type, (*s.shape[:-2], -1, -1) if len(s.shape) > 2 else s.shape, s.name)
             for s in schema.inputs]
        )  # fmt: skip

    return ModelSignature(inputs=free(inferred.inputs), outputs=free(inferred.outputs))


def save_pyfunc_model(
    folder: Path,
    generator_file: Path,
    spec: GeneratorSpec,
    signature: ModelSignature,
    *,
    run_id: str,
    model_id: str,
) -> None:
    """Write the pyfunc model folder of ``generator_file`` (logged model ``model_id`` of run ``run_id``)."""
    import mlflow
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="jpdse-code-") as code:
        mlflow.pyfunc.save_model(
            str(folder),
            loader_module=PYFUNC_LOADER,
            data_path=str(generator_file),
            code_paths=[str(copy_code(Path(code)))],
            signature=signature,
            input_example=example_input(spec),
            pip_requirements=pip_requirements(),
            model_config=spec.to_json(),
            mlflow_model=Model(run_id=run_id, model_id=model_id),
        )


class GeneratorPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps for a registered generator."""

    def __init__(self, generator_file: str | Path) -> None:
        from pipeline.model.export import load_generator

        self.generator_file = Path(generator_file)
        self.generator, self.spec = load_generator(generator_file)

    def predict(self, model_input: dict[str, np.ndarray], params: dict[str, Any] | None = None) -> np.ndarray:
        return predict(self.generator, self.spec, model_input)


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> GeneratorPyfunc:
    """MLflow pyfunc loader (:data:`PYFUNC_LOADER` re-exports it)."""
    return GeneratorPyfunc(data_path)


class ModelURIError(ValueError):
    """A ``models:/`` or ``runs:/`` URI that is malformed or names nothing in the store."""


def _bad_uri(uri: str) -> ModelURIError:
    return ModelURIError(
        f"bad model URI {uri!r}; expected models:/name@alias, models:/name/<version>, models:/<model id> "
        "or runs:/<run id>/<path>"
    )


@contextlib.contextmanager
def _registry_call(uri: str, store: str, what: str) -> Iterator[None]:
    """A bounded call to the store (:func:`~pipeline.tracking.mlflow_store.store_call`) about model ``uri``;
    the store's refusals (no such model, version or alias) become :class:`ModelURIError`."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.mlflow_store import store_call

    try:
        with store_call(store, what):
            yield
    except MlflowException as err:
        message = str(err).splitlines()[0] if str(err) else err.error_code
        raise ModelURIError(f"{uri}: {message} (store {store})") from err


def _client(store: str, uri: str) -> MlflowClient:
    """A client of ``store`` to look ``uri`` up in; a SQLite store that does not exist is refused (MLflow
    would create an empty one)."""
    from mlflow import MlflowClient

    db = store.removeprefix("sqlite:///") if store.startswith("sqlite:///") else ""
    if db and not db.endswith(":memory:") and not Path(db).is_file():
        raise ModelURIError(f"{uri}: there is no MLflow store at {store}")
    return MlflowClient(tracking_uri=store, registry_uri=store)


def _model_location(uri: str, store: str) -> str:
    """Where the artifacts of ``models:/name@alias``, ``models:/name/version`` or ``models:/<model id>`` lie.

    Resolved with an explicit client: MLflow's own ``models:/`` download ignores the registry
    URI it is given and asks the global one.
    """
    ref = pin_model_uri(uri, tracking_uri=store).removeprefix("models:/").strip("/")
    name, slash, version = ref.partition("/")
    with _registry_call(uri, store, "model location"):
        if slash and version.isdigit() and name:
            return _client(store, uri).get_model_version_download_uri(name, version)
        if not slash and name.startswith("m-"):
            return _client(store, uri).get_logged_model(name).artifact_location
    raise _bad_uri(uri)


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
        raise _bad_uri(uri)
    store = default_tracking_uri(tracking_uri)
    with _registry_call(uri, store, "model alias"):
        return f"models:/{name}/{_client(store, uri).get_model_version_by_alias(name, alias).version}"


def check_model_uri(uri: str, *, tracking_uri: str = "") -> str:
    """Check, without downloading, that a ``models:/`` or ``runs:/`` URI names a model in the store at
    ``tracking_uri`` (default :func:`default_tracking_uri`); returns it pinned. Raises
    :class:`ModelURIError` (or :class:`~pipeline.tracking.mlflow_store.StoreUnavailable`)."""
    store = default_tracking_uri(tracking_uri)
    if uri.startswith("runs:/"):
        run_id, slash, path = uri.removeprefix("runs:/").partition("/")
        if not run_id or not slash or not path.strip("/"):
            raise _bad_uri(uri)
        with _registry_call(uri, store, "run"):
            _client(store, uri).get_run(run_id)
        return uri
    if not uri.startswith("models:/"):
        raise _bad_uri(uri)
    _model_location(uri, store)
    return pin_model_uri(uri, tracking_uri=store)


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
    with _registry_call(uri, store, "model download"):
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
