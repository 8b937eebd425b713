"""Shared fixtures: the read-only Cityscapes sample beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No network here: MLflow's usage telemetry would only fail in the background.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

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
