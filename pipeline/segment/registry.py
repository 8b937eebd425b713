"""Segmenter files as MLflow registry models: a pyfunc that maps RGB images to Cityscapes train ids.

Registered like the generator (:mod:`pipeline.tracking.registry`): no pickled code, the segmenter file is
the model's data, the package's sources travel with it (``code_paths``) and its loader module is this one
(:data:`SEGMENTER_LOADER`). ``mlflow.pyfunc.load_model(uri).predict(images)`` takes RGB ``uint8``
``B x H x W x 3`` and returns train ids ``uint8`` ``B x H x W`` (:mod:`pipeline.segment.labels`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.segment.base import Segmenter, load_segmenter, read_spec

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

SEGMENTER_LOADER = "pipeline.segment.registry"
SEGMENTER_ARTIFACT = "segmenter"
# what the pyfunc's code imports besides the generator's (pipeline.segment.labels, SegFormer)
EXTRA_PACKAGES = ("transformers", "cityscapesscripts")


def example_input(height: int = 64, width: int = 64) -> np.ndarray:
    """A black RGB image batch of one, the smallest comfortable input."""
    return np.zeros((1, height, width, 3), np.uint8)


def predict(model: Segmenter, images: np.ndarray) -> np.ndarray:
    """Train ids (``uint8`` ``B x H x W``) of RGB ``uint8`` images ``B x H x W x 3`` (or one image)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB uint8 images B x H x W x 3, got {images.dtype} {images.shape}")
    return np.stack([model.predict(np.ascontiguousarray(image)) for image in images])


class SegmenterPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps for a registered segmenter."""

    def __init__(self, segmenter_file: str | Path) -> None:
        self.segmenter_file = Path(segmenter_file)
        self.model = load_segmenter(segmenter_file, num_classes=None)

    def predict(self, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        return predict(self.model, model_input)


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> SegmenterPyfunc:
    """MLflow pyfunc loader of registered segmenters (:data:`SEGMENTER_LOADER`)."""
    return SegmenterPyfunc(data_path)


def segmenter_signature() -> ModelSignature:
    """The pyfunc signature: RGB ``uint8`` ``B x H x W x 3`` in, train ids ``uint8`` ``B x H x W`` out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    images = TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))
    train_ids = TensorSpec(np.dtype(np.uint8), (-1, -1, -1))
    return ModelSignature(inputs=Schema([images]), outputs=Schema([train_ids]))


def pip_requirements() -> list[str]:
    """The generator pyfunc's pinned requirements and :data:`EXTRA_PACKAGES` (public versions)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    from pipeline.tracking.registry import pip_requirements as generator_requirements

    out = generator_requirements()
    for package in EXTRA_PACKAGES:
        try:
            out.append(f"{package}=={Version(version(package)).public}")
        except PackageNotFoundError:
            out.append(package)
    return out


def save_segmenter_pyfunc(folder: Path, segmenter_file: Path, *, run_id: str, model_id: str) -> None:
    """Write the pyfunc model folder of ``segmenter_file`` (logged model ``model_id`` of run ``run_id``)."""
    import mlflow
    from mlflow.models import Model

    from pipeline.tracking.registry import copy_code

    with tempfile.TemporaryDirectory(prefix="jpdse-code-") as code:
        mlflow.pyfunc.save_model(
            str(folder),
            loader_module=SEGMENTER_LOADER,
            data_path=str(segmenter_file),
            code_paths=[str(copy_code(Path(code)))],
            signature=segmenter_signature(),
            input_example=example_input(),
            pip_requirements=pip_requirements(),
            model_config=read_spec(segmenter_file),
            mlflow_model=Model(run_id=run_id, model_id=model_id),
        )
