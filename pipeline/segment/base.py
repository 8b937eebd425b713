"""The segmenter interface, its registry, and segmenter files (safetensors + spec).

A segmenter is a ``torch.nn.Module`` that maps a batch of RGB images ``N x 3 x H x W`` in ``[-1, 1]``
(the loader's convention) to logits ``N x C x H x W`` over the train classes at the input's size.
Training needs only that; :meth:`Segmenter.predict` turns it into a train-id map of one image. A new
architecture is one small subclass with :func:`register_segmenter`, e.g. on a cluster where
torchvision works::

    @register_segmenter
    class DeepLabV3(Segmenter):
        architecture = "deeplabv3-resnet50"

        def __init__(self, num_classes: int = 19) -> None:
            super().__init__(num_classes)
            from torchvision.models.segmentation import deeplabv3_resnet50

            self.net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes)

        def forward(self, images: Tensor) -> Tensor:
            return self.net(imagenet_normalise(images))["out"]

A segmenter file is its ``state_dict`` as safetensors with a spec in the metadata (``format``
``jpdse-segmenter``, ``format_version`` 1, ``spec``: architecture, class count, label space and the
options that rebuild it); :func:`load_segmenter` refuses, in one line, a file of another architecture
or class count than asked for.
"""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.atomic import write_atomic
from pipeline.segment.labels import NUM_CLASSES, train_to_label

FORMAT, FORMAT_VERSION = "jpdse-segmenter", 1
LABEL_SPACE = "cityscapes-train-ids"
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class SegmenterError(ValueError):
    """A segmenter file or option that cannot be used as asked (architecture, class count, format)."""


def imagenet_normalise(images: Tensor) -> Tensor:
    """``[-1, 1]`` RGB -> ImageNet mean/std normalised, what ImageNet backbones expect."""
    mean = images.new_tensor(_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


class Segmenter(nn.Module, ABC):
    """Semantic segmentation into ``num_classes`` train classes; see the module doc."""

    architecture: ClassVar[str]

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes < 255:
            raise SegmenterError(f"num_classes must be an integer in 1..254, got {num_classes!r}")
        self.num_classes = num_classes

    @abstractmethod
    def forward(self, images: Tensor) -> Tensor:
        """``N x 3 x H x W`` in ``[-1, 1]`` -> logits ``N x num_classes x H x W``."""

    def options(self) -> dict[str, Any]:
        """Constructor options besides ``num_classes`` that rebuild this network (JSON values)."""
        return {}

    def spec(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "label_space": LABEL_SPACE,
            "options": self.options(),
        }

    @torch.no_grad()
    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """Train ids (``uint8`` ``H x W``) of one RGB ``uint8`` image, in eval mode."""
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError("expected an RGB uint8 H x W x 3 image")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        images = torch.from_numpy(rgb.copy()).to(device).permute(2, 0, 1)[None].float()
        logits = self(images / 127.5 - 1)
        self.train(was_training)
        return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()

    def predict_label_ids(self, rgb: np.ndarray) -> np.ndarray:
        """Cityscapes label ids of one RGB image (what shards and the generator use)."""
        return train_to_label(self.predict(rgb))


_REGISTRY: dict[str, type[Segmenter]] = {}
S = TypeVar("S", bound=type[Segmenter])


def register_segmenter(cls: S) -> S:
    """Class decorator: make ``cls`` buildable as ``build_segmenter(cls.architecture, ...)``."""
    if cls.architecture in _REGISTRY:
        raise ValueError(f"segmenter {cls.architecture!r} is already registered")
    _REGISTRY[cls.architecture] = cls
    return cls


def available_segmenters() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


def _import_builtins() -> None:
    import pipeline.segment.segformer  # noqa: F401  (registers segformer)


def build_segmenter(architecture: str, num_classes: int = NUM_CLASSES, **options: Any) -> Segmenter:
    """A new segmenter of ``architecture`` (weights as its constructor makes them)."""
    _import_builtins()
    if architecture not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise SegmenterError(f"unknown segmenter architecture {architecture!r}; known: {known}")
    try:
        return _REGISTRY[architecture](num_classes=num_classes, **options)
    except TypeError as err:
        raise SegmenterError(f"bad options for segmenter {architecture!r}: {err}") from err


def save_segmenter(model: Segmenter, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a segmenter file (atomically); ``extra`` goes into the spec (e.g. training)."""
    from safetensors.torch import save

    spec = {**model.spec(), **(extra or {})}
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "spec": json.dumps(spec, sort_keys=True),
    }
    # safetensors writes the metadata in hash-map order; sorted, the file's bytes (its sha256, the identity
    # compressed files and the registry record) depend on its content alone
    from pipeline.model.export import deterministic_header

    header, data = deterministic_header(save(tensors, metadata=metadata))
    return write_atomic(path, header + data)


def read_spec(path: str | Path) -> dict[str, Any]:
    """The spec of a segmenter file, checked for format and version."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SegmenterError(f"segmenter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as err:
        raise SegmenterError(f"{path} is not a safetensors file: {err}") from err
    if metadata.get("format") != FORMAT or "spec" not in metadata:
        raise SegmenterError(f"{path} is not a segmenter file (no '{FORMAT}' spec in its metadata)")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise SegmenterError(
            f"{path}: segmenter format version {metadata.get('format_version')!r}; "
            f"this code reads {FORMAT_VERSION}"
        )
    return json.loads(metadata["spec"])


def load_segmenter(
    path: str | Path, *, architecture: str | None = None, num_classes: int | None = NUM_CLASSES
) -> Segmenter:
    """The segmenter in ``path``, refused unless it is of ``architecture`` (when given) and has
    ``num_classes`` classes (when given; ``None`` accepts any)."""
    spec = read_spec(path)
    if architecture is not None and spec["architecture"] != architecture:
        raise SegmenterError(f"{path} holds a {spec['architecture']!r} segmenter, not {architecture!r}")
    if num_classes is not None and spec["num_classes"] != num_classes:
        raise SegmenterError(f"{path} predicts {spec['num_classes']} classes, not {num_classes}")
    if spec.get("label_space") != LABEL_SPACE:
        raise SegmenterError(f"{path} predicts label space {spec.get('label_space')!r}, not {LABEL_SPACE!r}")
    with warnings.catch_warnings():  # no pretrained weights wanted: the file's replace them all
        warnings.simplefilter("ignore")
        model = build_segmenter(spec["architecture"], spec["num_classes"], **spec.get("options", {}))
    load_weights(model, path)
    return model.eval()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a weights file: safetensors, or a torch checkpoint read with ``weights_only``."""
    path = Path(path)
    if not path.is_file():
        raise SegmenterError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SegmenterError(f"{path} does not hold a state dict of tensors")
    return state


def load_weights(model: Segmenter, path: str | Path) -> None:
    """Load every weight of ``model`` from ``path`` (a segmenter file or an external state dict); refused
    in one line unless the names and shapes match the architecture exactly."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        first = (
            f"shape of {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}"
            if wrong
            else f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
        )
        raise SegmenterError(
            f"{path} does not fit a {model.architecture} segmenter with {model.num_classes} classes "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped; {first})"
        )
    model.load_state_dict(state)
