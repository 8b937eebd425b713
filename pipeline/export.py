"""Portable generator files: the weights as safetensors, the model spec as JSON in its metadata.

Only safetensors files are supported (no pickled ``.pt`` checkpoints): loading one needs neither
DeepSpeed nor the training config, and cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.models import IMAGE_CHANNELS, Generator, input_channels

SPEC_KEY = "spec"
REQUIRED_SPEC_KEYS = ("ngf", "n_downsample", "n_blocks", "norm", "label_nc", "use_instance")


def make_spec(model_cfg: ModelConfig, label_nc: int, use_instance: bool, **extra: Any) -> dict[str, Any]:
    """The ``ModelConfig`` fields with the resolved ``label_nc``/``use_instance``, plus ``extra``
    (e.g. ``codec``, ``quality``, ``phase``)."""
    return {**dataclasses.asdict(model_cfg), "label_nc": label_nc, "use_instance": use_instance, **extra}


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


def export_generator(path: str | Path, generator: nn.Module, spec: dict[str, Any]) -> Path:
    """Write ``generator``'s weights and ``spec`` to ``path`` atomically; return the path.

    ``generator`` may be wrapped (DeepSpeed engine, DDP): its ``.module`` is used. The spec must describe
    the generator (see :func:`make_spec`); a mismatch is refused here rather than at load time.
    """
    net = generator if isinstance(generator, Generator) else getattr(generator, "module", None)
    if not isinstance(net, Generator):
        raise TypeError(f"expected a pipeline.models.Generator, got {type(generator).__name__}")
    kwargs = _generator_kwargs(spec)
    if kwargs != net.hparams:
        raise ValueError(f"spec describes generator {kwargs} but the generator is {net.hparams}")
    try:
        metadata = {SPEC_KEY: json.dumps(spec, sort_keys=True)}
    except TypeError as err:
        raise ValueError(f"generator spec must be JSON-serialisable: {err}") from err
    # float32 whatever the training precision (a bf16/fp16 engine's module), so exports are portable
    tensors = {
        k: (v.float() if v.is_floating_point() else v).detach().to("cpu").contiguous()
        for k, v in net.state_dict().items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_spec(path: str | Path) -> dict[str, Any]:
    """The spec stored in an exported generator file, without loading the weights."""
    path = Path(path)
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
    try:
        spec = json.loads(metadata[SPEC_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the '{SPEC_KEY}' metadata is not valid JSON: {err}") from err
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: the '{SPEC_KEY}' metadata is not a JSON object")
    return spec


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
