"""Shared fixtures: the read-only Cityscapes sample beside the project."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# No network here: MLflow's usage telemetry would only fail in the background.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Under pytest-xdist (make test runs a worker per core) each worker, and what it starts, computes on one
# thread: two workers of two threads each on two cores would only take turns.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _mlflow_uris() -> tuple[str | None, ...]:
    """MLflow's process-wide tracking and registry URIs (None when MLflow is not imported yet) and their
    environment variables."""
    if "mlflow" in sys.modules:
        from mlflow.tracking import _model_registry, _tracking_service

        own = (_tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri)
    else:
        own = (None, None)
    return (*own, *(os.environ.get(key) for key in MLFLOW_URI_VARIABLES))


@pytest.fixture(autouse=True)
def mlflow_uris_kept() -> Iterator[None]:
    """Fail a test that leaves MLflow's process-wide URIs changed, and restore them. Left set, they send a
    later test's ``models:/`` look-ups, in the same worker, to another test's store: a failure that shows
    only in some test orders."""
    before = _mlflow_uris()
    yield
    after = _mlflow_uris()
    if after == before:
        return
    import mlflow

    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])
    for key, value in zip(MLFLOW_URI_VARIABLES, before[2:], strict=True):
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    pytest.fail(f"the test left MLflow's URIs changed: {before} -> {after}")


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
