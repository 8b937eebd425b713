"""Shared fixtures: the read-only Cityscapes sample beside the project, the benchmark script as a module,
and a check that no test leaves the process changed for the next (:func:`process_state_kept`)."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pipeline.ray_session import SIGNALS

# No network here: MLflow's usage telemetry would only fail in the background.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Under pytest-xdist (make test runs a worker per core) each worker, and what it starts, computes on one
# thread: two workers of two threads each on two cores would only take turns.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# What the pipeline reads from the process's environment, and PYTHONBREAKPOINT, which ray.init points at
# its remote debugger (pipeline/ray_session.py). DeepSpeed sets LOCAL_RANK (0) in a single process for its
# own engine, which the pipeline reads the same way, so it is not among them.
WATCHED_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "TQDM_DISABLE",
    "RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PYTHONBREAKPOINT",
)


def _process_state() -> dict[str, Any]:
    """What one test may leave changed for the next in the same worker: MLflow's process-wide tracking and
    registry URIs (None until MLflow is imported), :data:`WATCHED_VARIABLES`, the working folder and the
    handlers of the signals Ray and the trainer catch (:data:`pipeline.ray_session.SIGNALS`)."""
    state: dict[str, Any] = {"tracking URI": None, "registry URI": None, "cwd": os.getcwd()}
    if "mlflow" in sys.modules:
        from mlflow.tracking import _model_registry, _tracking_service

        state["tracking URI"] = _tracking_service.utils._tracking_uri
        state["registry URI"] = _model_registry.utils._registry_uri
    state.update({key: os.environ.get(key) for key in WATCHED_VARIABLES})
    state.update({number: signal.getsignal(number) for number in SIGNALS})
    return state


def _restore(state: dict[str, Any]) -> None:
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(state["tracking URI"])
        mlflow.set_registry_uri(state["registry URI"])
    for key in WATCHED_VARIABLES:
        if state[key] is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = state[key]
    os.chdir(state["cwd"])
    for number in SIGNALS:
        if state[number] is not None:
            signal.signal(number, state[number])


@pytest.fixture(autouse=True)
def process_state_kept() -> Iterator[None]:
    """Fail a test that leaves :func:`_process_state` changed, and restore it. Left changed, it reaches
    whichever test the same worker runs next, and fails that one only in some test orders (a later test's
    ``models:/`` look-up read another test's MLflow store; a progress bar went missing)."""
    before = _process_state()
    yield
    after = _process_state()
    changed = {key: (before[key], after[key]) for key in before if after[key] != before[key]}
    if changed:
        _restore(before)
        pytest.fail(f"the test left the process changed (before, after): {changed}")


SAMPLE_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cityscapes_sample"


@pytest.fixture(scope="session")
def cityscapes_root() -> Path:
    """The Cityscapes sample (read-only: tests copy what they modify into tmp_path)."""
    if not (SAMPLE_ROOT / "leftImg8bit").is_dir():
        pytest.fail(f"Cityscapes sample not found at {SAMPLE_ROOT}; it is expected beside the project")
    return SAMPLE_ROOT


@pytest.fixture(scope="session")
def sample_image(cityscapes_root: Path):
    """One real frame as an RGB uint8 array, down-sized to 256x128."""
    import cv2

    path = sorted((cityscapes_root / "leftImg8bit").rglob("*_leftImg8bit.png"))[0]
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return cv2.cvtColor(cv2.resize(bgr, (256, 128), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


SMALL_SHARDS = {"width": 256, "height": 128, "qualities": [37, 42], "samples_per_shard": 4}
# as configs/default.yaml: frankfurt (10 frames) trains, munster (2) validates, lindau (10) is reported
HOLDOUT = [
    {"name": "valid", "from_split": "val", "cities": ["munster"]},
    {"name": "test", "from_split": "val", "cities": ["lindau"]},
]


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory: pytest.TempPathFactory, cityscapes_root: Path) -> Path:
    """Shards of the whole sample (:data:`SMALL_SHARDS`, split as :data:`HOLDOUT`), built once per session;
    tests only read them."""
    from pipeline.config import from_dict
    from pipeline.data.shards import build_shards

    out = tmp_path_factory.mktemp("small-shards")
    cfg = from_dict(
        {
            "data": {
                "root": str(cityscapes_root),
                "width": SMALL_SHARDS["width"],
                "height": SMALL_SHARDS["height"],
                "holdout": HOLDOUT,
            },
            "shards": {
                "output": str(out),
                "codecs": [{"name": "hevc", "qualities": SMALL_SHARDS["qualities"]}],
                "samples_per_shard": SMALL_SHARDS["samples_per_shard"],
                "workers": 1,
            },
        }
    )
    build_shards(cfg)
    return out


@pytest.fixture
def png_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The member names the loader PNG-decodes from now on, in order (its ``_png`` wrapped)."""
    from pipeline.data import loader

    decoded: list[str] = []
    png = loader._png

    def counting(key: str, data: bytes, max_pixels: int):  # noqa: ANN202
        decoded.append(key)
        return png(key, data, max_pixels)

    monkeypatch.setattr(loader, "_png", counting)
    return decoded


def bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module, not entered in ``sys.modules``."""
    script = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench_quality(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``bench/bench_quality.py`` as a module; the progress-bar switch it sets for its children on import
    (``TQDM_DISABLE``) is undone afterwards."""
    monkeypatch.setenv("TQDM_DISABLE", "")
    return bench_script("bench_quality")


@pytest.fixture
def seed_runs(bench_quality: ModuleType, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``bench/seed_runs.py`` as a module; the ``bench_quality`` it imports is the fixture's, and the path
    it adds to ``sys.path`` is dropped afterwards."""
    monkeypatch.setitem(sys.modules, "bench_quality", bench_quality)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return bench_script("seed_runs")
