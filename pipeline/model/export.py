"""Portable generator files: the weights as safetensors, the model spec as JSON in its metadata.

Only safetensors files are supported (no pickled ``.pt`` checkpoints): loading one needs neither
DeepSpeed nor the training config, and cannot run code.

Metadata (all strings): ``format`` (``jpdse-generator``), ``format_version`` (``2``; ``3`` with a
label source), ``spec`` (the JSON object of a :class:`~pipeline.model.spec.GeneratorSpec`) and, when the
trainer says, ``train_frames`` (JSON list of the sorted sample keys trained on). Files without
``format_version`` are version 1 (plain pix2pixHD generators, no ``residual`` key). A file of a newer
version, or whose spec holds a key this code does not know, is refused: guessing would rebuild another
network, or run it with another rule.

An export's bytes depend on its content alone (the metadata is sorted), so their sha256 is the model's
identity (:func:`weights_sha256`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from pipeline.atomic import atomic_path
from pipeline.model.networks import Generator, generator_from_state
from pipeline.model.spec import FORMAT_VERSION, SPEC_KEYS, GeneratorSpec

SPEC_KEY = "spec"
FORMAT_KEY = "format"
VERSION_KEY = "format_version"
TRAIN_FRAMES_KEY = "train_frames"
FORMAT = "jpdse-generator"


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
    path: str | Path, generator: nn.Module, spec: GeneratorSpec, train_frames: Sequence[str] = ()
) -> Path:
    """Write ``generator``'s weights and ``spec`` (as :attr:`GeneratorSpec.format_version`) to ``path``
    atomically; return the path.

    ``generator`` may be wrapped (DeepSpeed engine, DDP): its ``.module`` is used. The spec must describe
    the generator; a mismatch is refused here rather than at load time.
    ``train_frames``: the keys of every sample the weights were trained on (a later phase's export includes
    the frames of the phases it started from); none given: the file does not record them.
    """
    net = generator if isinstance(generator, Generator) else getattr(generator, "module", None)
    if not isinstance(net, Generator):
        raise TypeError(f"expected a pipeline.model.networks.Generator, got {type(generator).__name__}")
    if spec.generator_kwargs != net.hparams:
        raise ValueError(
            f"spec describes generator {spec.generator_kwargs} but the generator is {net.hparams}"
        )
    try:
        metadata = {
            FORMAT_KEY: FORMAT,
            VERSION_KEY: str(spec.format_version),
            SPEC_KEY: json.dumps(spec.to_json(), sort_keys=True),
        }
    except TypeError as err:
        raise ValueError(f"generator spec must be JSON-serialisable: {err}") from err
    if train_frames:
        metadata[TRAIN_FRAMES_KEY] = json.dumps(sorted(set(train_frames)))
    # float32 whatever the training precision (a bf16/fp16 engine's module), so exports are portable
    tensors = {
        k: (v.float() if v.is_floating_point() else v).detach().to("cpu").contiguous()
        for k, v in net.state_dict().items()
    }
    header, data = deterministic_header(save(tensors, metadata=metadata))
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(header)
        f.write(data)
    return Path(path)


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


def _checked_metadata(path: str | Path) -> tuple[dict[str, str], GeneratorSpec]:
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
    try:
        return metadata, GeneratorSpec.from_json(spec, version)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from err


def deterministic_header(blob: bytes) -> tuple[bytes, memoryview]:
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


def read_spec(path: str | Path) -> GeneratorSpec:
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


def check_weights(path: str | Path, spec: GeneratorSpec) -> None:
    """Refuse a file whose tensors (names and shapes, read from its header) are not the spec's generator's,
    before the generator is built; the spec's bounds and memory are checked first."""
    expected = spec.weight_shapes()
    with safe_open(str(path), framework="pt") as f:
        stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    wrong = [
        f"{k} {list(stored[k])} (spec: {list(expected[k])})"
        for k in expected
        if stored.get(k, expected[k]) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if wrong:
        problems.append(f"{len(wrong)} of other shapes, e.g. {wrong[0]}")
    if problems:
        raise ValueError(f"{path}: weights do not match the spec's generator: {'; '.join(problems)}")


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, GeneratorSpec]:
    """Rebuild the exported generator (strict weight load, eval mode) and return it with its spec. The spec's
    bounds, the memory it needs and the weights' shapes are checked before anything is allocated."""
    spec = read_spec(path)
    check_weights(path, spec)
    state = load_file(str(path), device="cpu")
    try:
        generator = generator_from_state(spec.generator_kwargs, state, device)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the spec {spec.to_json()}: {err}") from err
    return generator.eval(), spec
