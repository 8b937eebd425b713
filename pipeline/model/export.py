"""Portable generator files: the weights as safetensors, the model spec as JSON in its metadata.

Only safetensors files are supported (no pickled ``.pt`` checkpoints): loading one needs neither
DeepSpeed nor the training config, and cannot run code.

Metadata (all strings): ``format`` (``jpdse-generator``), ``format_version`` (``2``), ``spec`` (JSON object)
and, when the trainer says, ``train_frames`` (JSON list of the sorted sample keys trained on). Files without
``format_version`` are version 1 (plain pix2pixHD generators, no ``residual`` key). A file of a newer
version, or whose spec holds a key this code does not know, is refused: guessing would rebuild another
network, or run it with another rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.model.networks import IMAGE_CHANNELS, Generator, input_channels

SPEC_KEY = "spec"
FORMAT_KEY = "format"
VERSION_KEY = "format_version"
TRAIN_FRAMES_KEY = "train_frames"
FORMAT = "jpdse-generator"
FORMAT_VERSION = 2
REQUIRED_SPEC_KEYS = ("ngf", "n_downsample", "n_blocks", "norm", "label_nc", "use_instance")
# Spec keys by format version. Version 1 (files without a version) is closed: ModelConfig as it was then,
# so a field added to ModelConfig later is never taken for part of a version-1 file. Version 2 follows
# ModelConfig; ``qualities`` lists the qualities of a model trained on several (loader.qualities),
# ``selected`` describes the best-checkpoint selection (free-form).
SPEC_KEYS: dict[int, frozenset[str]] = {
    1: frozenset(
        {
            *("ngf", "n_downsample", "n_blocks", "norm", "ndf", "n_layers_d", "num_d", "label_nc"),
            *("use_instance", "zero_semantics", "codec", "quality", "phase", "steps"),
        }
    ),
    2: frozenset(f.name for f in dataclasses.fields(ModelConfig))
    | {
        "label_nc",
        "use_instance",
        "codec",
        "quality",
        "qualities",
        "phase",
        "steps",
        "train_split",
        "selected",
    },
}


def make_spec(model_cfg: ModelConfig, label_nc: int, use_instance: bool, **extra: Any) -> dict[str, Any]:
    """The ``ModelConfig`` fields with the resolved ``label_nc``/``use_instance``, plus ``extra``
    (e.g. ``codec``, ``quality``, ``phase``)."""
    return {**dataclasses.asdict(model_cfg), "label_nc": label_nc, "use_instance": use_instance, **extra}


def uses_synthesis(spec: Mapping[str, Any]) -> bool:
    """Whether to run the generator with ``synthesis=True``: phase-1 exports (the semantic prior) draw
    the image with the synthesis head; every later phase outputs through the correction head."""
    return spec.get("phase") == 1


def visual_input(spec: Mapping[str, Any]) -> bool:
    """Whether the generator sees the decoded image: every export but phase 1's (it is zeroed there)."""
    return not uses_synthesis(spec)


def _unknown_keys(spec: Mapping[str, Any], version: int) -> list[str]:
    return sorted(set(spec) - SPEC_KEYS[version])


def _generator_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in REQUIRED_SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"generator spec lacks {missing}; it needs {list(REQUIRED_SPEC_KEYS)}")
    return {
        "input_nc": input_channels(int(spec["label_nc"]), bool(spec["use_instance"])),
        "output_nc": IMAGE_CHANNELS,
        "ngf": int(spec["ngf"]),
        "n_downsample": int(spec["n_downsample"]),
        "n_blocks": int(spec["n_blocks"]),
        "norm": str(spec["norm"]),
        # files written before the residual generator existed hold plain pix2pixHD generators
        "residual": bool(spec.get("residual", False)),
    }


def read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """A state dict from a ``.pth``/``.pt`` file a user hands over (``weights_only``: no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read {what} from {path}: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict ({what}), got {type(state).__name__}")
    return state


def export_generator(
    path: str | Path, generator: nn.Module, spec: dict[str, Any], train_frames: Sequence[str] = ()
) -> Path:
    """Write ``generator``'s weights and ``spec`` (format version 2) to ``path`` atomically; return the path.

    ``generator`` may be wrapped (DeepSpeed engine, DDP): its ``.module`` is used. The spec must describe
    the generator (see :func:`make_spec`); a mismatch is refused here rather than at load time.
    ``train_frames``: the keys of every sample the weights were trained on (a later phase's export includes
    the frames of the phases it started from); none given: the file does not record them.
    """
    net = generator if isinstance(generator, Generator) else getattr(generator, "module", None)
    if not isinstance(net, Generator):
        raise TypeError(f"expected a pipeline.model.networks.Generator, got {type(generator).__name__}")
    kwargs = _generator_kwargs(spec)
    if kwargs != net.hparams:
        raise ValueError(f"spec describes generator {kwargs} but the generator is {net.hparams}")
    try:
        metadata = {
            FORMAT_KEY: FORMAT,
            VERSION_KEY: str(FORMAT_VERSION),
            SPEC_KEY: json.dumps(spec, sort_keys=True),
        }
    except TypeError as err:
        raise ValueError(f"generator spec must be JSON-serialisable: {err}") from err
    unknown = _unknown_keys(spec, FORMAT_VERSION)
    if unknown:
        raise ValueError(f"generator spec keys {unknown} are not part of format version {FORMAT_VERSION}")
    if train_frames:
        metadata[TRAIN_FRAMES_KEY] = json.dumps(sorted(set(train_frames)))
    # float32 whatever the training precision (a bf16/fp16 engine's module), so exports are portable
    tensors = {
        k: (v.float() if v.is_floating_point() else v).detach().to("cpu").contiguous()
        for k, v in net.state_dict().items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header, data = _deterministic_header(save(tensors, metadata=metadata))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"exported generator not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} is not a safetensors file (exported generators are safetensors): {err}"
        ) from err
    if SPEC_KEY not in metadata:
        raise ValueError(
            f"{path} is a safetensors file but not an exported generator (no '{SPEC_KEY}' metadata)"
        )
    return metadata


def _format_version(path: Path, metadata: Mapping[str, str]) -> int:
    """The file's format version (1 when unversioned); newer or foreign formats are refused."""
    if VERSION_KEY not in metadata:
        return 1
    if metadata.get(FORMAT_KEY) != FORMAT:
        raise ValueError(f"{path}: metadata '{FORMAT_KEY}' is {metadata.get(FORMAT_KEY)!r}, not {FORMAT!r}")
    text = metadata[VERSION_KEY]
    version = int(text) if text.isdigit() else 0
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: generator format_version {version} is newer than this pipeline reads "
            f"(up to {FORMAT_VERSION}); update the pipeline"
        )
    if version not in SPEC_KEYS:
        raise ValueError(f"{path}: unrecognised generator format_version {text!r}")
    return version


def _checked_metadata(path: str | Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The file's metadata and its spec, checked against the file's format version."""
    path = Path(path)
    metadata = _read_metadata(path)
    version = _format_version(path, metadata)
    try:
        spec = json.loads(metadata[SPEC_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the '{SPEC_KEY}' metadata is not valid JSON: {err}") from err
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: the '{SPEC_KEY}' metadata is not a JSON object")
    unknown = _unknown_keys(spec, version)
    if unknown:
        raise ValueError(
            f"{path}: spec keys {unknown} are unknown to generator format version {version}; "
            "written by a newer pipeline?"
        )
    return metadata, spec


def _deterministic_header(blob: bytes) -> tuple[bytes, memoryview]:
    """A safetensors file's bytes split into its header, with the metadata sorted, and its data.

    safetensors writes the metadata in hash-map order, which changes from process to process; sorted, the
    bytes of an export (and so :func:`weights_sha256`) depend on its content alone.
    """
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text, memoryview(blob)[8 + size :]


def read_spec(path: str | Path) -> dict[str, Any]:
    """The spec stored in an exported generator file, without loading the weights."""
    return _checked_metadata(path)[1]


def read_train_frames(path: str | Path) -> list[str] | None:
    """The sorted keys of the samples the exported generator was trained on; None: the file does not say
    (version 1, or exported without them)."""
    metadata, _ = _checked_metadata(path)
    if TRAIN_FRAMES_KEY not in metadata:
        return None
    try:
        frames = json.loads(metadata[TRAIN_FRAMES_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the '{TRAIN_FRAMES_KEY}' metadata is not valid JSON: {err}") from err
    if not isinstance(frames, list) or not all(isinstance(k, str) for k in frames):
        raise ValueError(f"{path}: the '{TRAIN_FRAMES_KEY}' metadata is not a JSON list of strings")
    return frames


def weights_sha256(path: str | Path) -> str:
    """sha256 of the file's bytes (weights and metadata): the identity of an exported generator."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, dict[str, Any]]:
    """Rebuild the exported generator (strict weight load, eval mode) and return it with its spec."""
    spec = read_spec(path)
    generator = Generator(**_generator_kwargs(spec))
    state = load_file(str(path), device="cpu")
    try:
        generator.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the spec {spec}: {err}") from err
    return generator.to(device).eval(), spec
