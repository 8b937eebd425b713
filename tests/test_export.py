"""Exported generator files: safetensors + spec round trip and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import ModelConfig
from pipeline.export import export_generator, load_generator, make_spec, read_spec
from pipeline.models import Generator, build_models, input_channels

LABEL_NC = 34


def trained_like(norm: str) -> tuple[Generator, dict]:
    """A tiny generator whose weights and (batch norm) running statistics differ from a fresh one's."""
    torch.manual_seed(0)
    cfg = ModelConfig(ngf=8, n_downsample=2, n_blocks=2, norm=norm)
    generator, _ = build_models(cfg, LABEL_NC, use_instance=True)
    with torch.no_grad():
        generator(torch.randn(2, input_channels(LABEL_NC, True), 64, 128))  # updates BN running stats
    spec = make_spec(cfg, LABEL_NC, True, codec="hevc", quality=42, phase=2)
    return generator.eval(), spec


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_round_trip_is_bit_exact(tmp_path: Path, norm: str) -> None:
    generator, spec = trained_like(norm)
    x = torch.randn(1, input_channels(LABEL_NC, True), 64, 128)
    with torch.no_grad():
        expected = generator(x)
    path = export_generator(tmp_path / "models" / "g.safetensors", generator, spec)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["g.safetensors"]  # no temp file left behind

    loaded, loaded_spec = load_generator(path)
    assert loaded_spec == spec
    assert loaded_spec["label_nc"] == LABEL_NC and loaded_spec["phase"] == 2 and loaded_spec["ngf"] == 8
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    for name, tensor in generator.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_export_overwrites_and_unwraps(tmp_path: Path) -> None:
    generator, spec = trained_like("instance")
    path = tmp_path / "g.safetensors"
    export_generator(path, generator, {**spec, "phase": 1})
    wrapper = torch.nn.Module()
    wrapper.module = generator  # like a DeepSpeed engine or DDP
    export_generator(path, wrapper, {**spec, "phase": 3})
    assert read_spec(path)["phase"] == 3


def test_export_refuses_inconsistent_input(tmp_path: Path) -> None:
    generator, spec = trained_like("instance")
    with pytest.raises(ValueError, match="spec describes"):
        export_generator(tmp_path / "g.safetensors", generator, {**spec, "n_blocks": 3})
    with pytest.raises(ValueError, match="lacks"):
        export_generator(tmp_path / "g.safetensors", generator, {"ngf": 8})
    with pytest.raises(ValueError, match="JSON"):
        export_generator(tmp_path / "g.safetensors", generator, {**spec, "extra": object()})
    with pytest.raises(TypeError, match="Generator"):
        export_generator(tmp_path / "g.safetensors", torch.nn.Linear(2, 2), spec)
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_generator(tmp_path / "missing.safetensors")

    (tmp_path / "text.safetensors").write_text("definitely not safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_generator(tmp_path / "text.safetensors")

    generator, spec = trained_like("instance")
    torch.save(generator.state_dict(), tmp_path / "g.pt")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_generator(tmp_path / "g.pt")

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an exported generator"):
        load_generator(tmp_path / "plain.safetensors")

    state = {k: v.contiguous() for k, v in generator.state_dict().items()}
    save_file(state, str(tmp_path / "wrong.safetensors"), metadata={"spec": json.dumps({**spec, "ngf": 16})})
    with pytest.raises(ValueError, match="do not match the spec"):
        load_generator(tmp_path / "wrong.safetensors")
