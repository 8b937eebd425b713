"""Exported generator files: safetensors + spec round trip and clear refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from pipeline.config import ModelConfig
from pipeline.model.export import (
    FORMAT,
    FORMAT_VERSION,
    export_generator,
    load_generator,
    read_spec,
    read_train_frames,
    weights_sha256,
)
from pipeline.model.inputs import input_channels
from pipeline.model.networks import Generator, build_models
from pipeline.model.spec import REQUIRED_SPEC_KEYS, SPEC_KEYS, GeneratorSpec

LABEL_NC = 34
V2 = {"format": FORMAT, "format_version": "2"}


def write_raw(path: Path, generator: Generator, spec: dict[str, Any], **metadata: str) -> Path:
    """A generator file with hand-made metadata (``spec`` plus ``metadata``), as another writer made it."""
    state = {k: v.contiguous() for k, v in generator.state_dict().items()}
    save_file(state, str(path), metadata={"spec": json.dumps(spec), **metadata})
    return path


def trained_like(norm: str) -> tuple[Generator, GeneratorSpec]:
    """A tiny generator whose weights and (batch norm) running statistics differ from a fresh one's."""
    torch.manual_seed(0)
    cfg = ModelConfig(ngf=8, n_downsample=2, n_blocks=2, norm=norm)
    generator, _ = build_models(cfg, LABEL_NC, use_instance=True)
    with torch.no_grad():
        generator(torch.randn(2, input_channels(LABEL_NC, True), 64, 128))  # updates BN running stats
    spec = GeneratorSpec.from_config(cfg, LABEL_NC, True, codec="hevc", quality=42, phase=2)
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
    assert loaded_spec.label_nc == LABEL_NC and loaded_spec.phase == 2 and loaded_spec.ngf == 8
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    for name, tensor in generator.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_export_overwrites_and_unwraps(tmp_path: Path) -> None:
    generator, spec = trained_like("instance")
    path = tmp_path / "g.safetensors"
    export_generator(path, generator, dataclasses.replace(spec, phase=1))
    wrapper = torch.nn.Module()
    wrapper.module = generator  # like a DeepSpeed engine or DDP
    export_generator(path, wrapper, dataclasses.replace(spec, phase=3))
    assert read_spec(path).phase == 3


def test_export_refuses_inconsistent_input(tmp_path: Path) -> None:
    generator, spec = trained_like("instance")
    with pytest.raises(ValueError, match="spec describes"):
        export_generator(tmp_path / "g.safetensors", generator, dataclasses.replace(spec, n_blocks=3))
    with pytest.raises(ValueError, match="lacks"):
        GeneratorSpec.from_json({"ngf": 8}, FORMAT_VERSION)
    with pytest.raises(ValueError, match="JSON"):
        export_generator(
            tmp_path / "g.safetensors", generator, dataclasses.replace(spec, selected={"extra": object()})
        )
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

    write_raw(tmp_path / "wrong.safetensors", generator, {**spec.to_json(), "ngf": 16}, **V2)
    with pytest.raises(ValueError, match="do not match the spec"):
        load_generator(tmp_path / "wrong.safetensors")


def test_metadata_holds_format_version_and_training_frames(tmp_path: Path) -> None:
    generator, spec = trained_like("instance")
    path = export_generator(
        tmp_path / "g.safetensors", generator, spec, train_frames=["b_01", "a_02", "b_01"]
    )
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert {k: metadata[k] for k in V2} == {"format": "jpdse-generator", "format_version": "2"}
    assert read_train_frames(path) == ["a_02", "b_01"]
    assert weights_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()

    # safetensors writes metadata in hash-map order; exports sort it, so equal content gives equal bytes
    hashes = {
        weights_sha256(export_generator(tmp_path / f"same{i}.safetensors", generator, spec, ["a", "b"]))
        for i in range(6)
    }
    assert len(hashes) == 1
    assert load_generator(tmp_path / "same0.safetensors")[1] == spec

    export_generator(path, generator, spec)
    assert read_train_frames(path) is None  # the file does not say
    with pytest.raises(ValueError, match="not a JSON list of strings"):
        read_train_frames(
            write_raw(tmp_path / "bad.safetensors", generator, spec.to_json(), **V2, train_frames='"a"')
        )


def test_unknown_spec_keys_and_newer_versions_are_refused(tmp_path: Path) -> None:
    generator, typed = trained_like("instance")
    spec = typed.to_json()
    with pytest.raises(ValueError, match=r"\['attention'\] are unknown to generator format version 2"):
        GeneratorSpec.from_json({**spec, "attention": True}, 2)
    with pytest.raises(TypeError, match="attention"):
        GeneratorSpec(**{**spec, "attention": True})

    unknown = write_raw(tmp_path / "unknown.safetensors", generator, {**spec, "attention": 1}, **V2)
    with pytest.raises(
        ValueError, match=r"spec keys \['attention'\] are unknown to generator format version 2"
    ):
        load_generator(unknown)
    with pytest.raises(ValueError, match="attention"):
        read_train_frames(unknown)
    version = FORMAT_VERSION + 1
    newer = write_raw(
        tmp_path / "newer.safetensors", generator, spec, format=FORMAT, format_version=f"{version}"
    )
    with pytest.raises(ValueError, match=f"format_version {version} is newer than this pipeline reads"):
        load_generator(newer)
    foreign = write_raw(tmp_path / "foreign.safetensors", generator, spec, format="other", format_version="2")
    with pytest.raises(ValueError, match="'format' is 'other'"):
        read_spec(foreign)
    garbled = write_raw(tmp_path / "garbled.safetensors", generator, spec, format=FORMAT, format_version="2a")
    with pytest.raises(ValueError, match="unrecognised generator format_version '2a'"):
        read_spec(garbled)
    # every message is one line
    for path in (unknown, newer, foreign, garbled):
        with pytest.raises(ValueError) as caught:
            load_generator(path)
        assert "\n" not in str(caught.value)


def test_unversioned_files_load_as_version_1(tmp_path: Path) -> None:
    """Exports written before the format was versioned: only ``spec`` metadata, a plain generator, no
    ``residual`` key; they keep loading as what they are."""
    torch.manual_seed(0)
    plain_cfg = ModelConfig(ngf=8, n_downsample=2, n_blocks=2, residual=False)
    generator, _ = build_models(plain_cfg, LABEL_NC, use_instance=True)
    spec = GeneratorSpec.from_config(plain_cfg, LABEL_NC, True, codec="hevc", quality=42, phase=3, steps=10)
    spec = {k: v for k, v in spec.to_json().items() if k != "residual"}
    assert set(spec) == SPEC_KEYS[1]
    path = write_raw(tmp_path / "v1.safetensors", generator, spec)

    loaded, loaded_spec = load_generator(path)
    assert loaded_spec == GeneratorSpec.from_json(spec, 1) and not loaded.residual
    assert loaded_spec.to_json() == {**spec, "residual": False}
    x = torch.randn(1, input_channels(LABEL_NC, True), 64, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x), generator.eval()(x))
    assert read_train_frames(path) is None
    # version 1 knows neither the residual generator nor the keys added with version 2
    for key, value in (("residual", True), ("train_split", "train"), ("selected", {"step": 3})):
        bad = write_raw(tmp_path / f"v1-{key}.safetensors", generator, {**spec, key: value})
        with pytest.raises(ValueError, match=rf"\['{key}'\] are unknown to generator format version 1"):
            read_spec(bad)


def test_version_2_spec_keys_follow_model_config(tmp_path: Path) -> None:
    generator, spec = trained_like("instance")
    # versions 4-12, each written only when set
    added_later = {"quality_input", "semantic_classes", "correction_scale", "padding", "end_kernel"}
    added_later |= {"activation", "self_ensemble", "semantic_modulation"}
    assert set(f.name for f in dataclasses.fields(ModelConfig)) - added_later <= set(spec.to_json())
    selected = {"step": 40, "metric": "psnr", "value": 31.2}
    path = export_generator(
        tmp_path / "g.safetensors",
        generator,
        dataclasses.replace(spec, train_split="train", selected=selected),
    )
    assert read_spec(path).selected == selected


@pytest.mark.parametrize(("phase", "synthesis"), [(1, True), (2, False), (3, False)])
def test_which_head_follows_the_phase(phase: int, synthesis: bool) -> None:
    spec = dataclasses.replace(trained_like("instance")[1], phase=phase)
    assert spec.uses_synthesis is synthesis and spec.visual_input is not synthesis


# The spec of an export as the previous version wrote it (a dict, json.dumps(sort_keys=True)).
PREVIOUS_SPEC = {
    "ngf": 8,
    "n_downsample": 2,
    "n_blocks": 2,
    "norm": "instance",
    "ndf": 64,
    "n_layers_d": 3,
    "num_d": 2,
    "label_nc": LABEL_NC,
    "use_instance": True,
    "zero_semantics": False,
    "residual": True,
    "codec": "hevc",
    "quality": 42,
    "qualities": [37, 42],
    "phase": 2,
    "steps": 10,
    "train_split": "train",
    "selected": {"step": 6, "metric": "psnr", "value": 31.2, "split": "valid"},
}


def write_previous_version(path: Path, generator: Generator, spec: dict[str, Any]) -> Path:
    """An export written the previous version's way: float32 safetensors whose header metadata
    (``format``, ``format_version`` "2", ``spec``, ``train_frames``) is sorted."""
    tensors = {k: v.float().contiguous() for k, v in generator.state_dict().items()}
    metadata = {**V2, "spec": json.dumps(spec, sort_keys=True), "train_frames": json.dumps(["a_01", "b_02"])}
    blob = save(tensors, metadata=metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + size :])
    return path


def test_exports_of_the_previous_version_load_and_keep_their_identity(tmp_path: Path) -> None:
    generator, _ = trained_like("instance")
    old = write_previous_version(tmp_path / "old.safetensors", generator, PREVIOUS_SPEC)
    loaded, spec = load_generator(old)
    assert spec == GeneratorSpec.from_config(
        ModelConfig(ngf=8, n_downsample=2, n_blocks=2),
        LABEL_NC,
        True,
        codec="hevc",
        quality=42,
        qualities=[37, 42],
        phase=2,
        steps=10,
        train_split="train",
        selected=PREVIOUS_SPEC["selected"],
    )
    assert spec.to_json() == PREVIOUS_SPEC and spec.qualities == (37, 42)
    x = torch.randn(1, input_channels(LABEL_NC, True), 64, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x), generator(x))
    # the same content exported now is the same file, byte for byte: a model's identity survives
    again = export_generator(tmp_path / "new.safetensors", loaded, spec, train_frames=read_train_frames(old))
    assert again.read_bytes() == old.read_bytes()


def test_spec_json_round_trip() -> None:
    spec = GeneratorSpec.from_json(PREVIOUS_SPEC, FORMAT_VERSION)
    assert GeneratorSpec.from_json(json.loads(json.dumps(spec.to_json())), FORMAT_VERSION) == spec
    # optional keys the file does not hold are None, and stay out of the JSON
    bare = {k: v for k, v in PREVIOUS_SPEC.items() if k not in ("qualities", "train_split", "selected")}
    minimal = GeneratorSpec.from_json(bare, FORMAT_VERSION)
    assert (minimal.qualities, minimal.train_split, minimal.selected) == (None, None, None)
    assert minimal.to_json() == bare
    assert GeneratorSpec.from_json({**bare, "selected": None}, FORMAT_VERSION) == minimal
    assert SPEC_KEYS[2] == set(PREVIOUS_SPEC)  # changing the keys is a new format version
    required = {k: PREVIOUS_SPEC[k] for k in REQUIRED_SPEC_KEYS}
    assert GeneratorSpec.from_json(required, 1).to_json() == {
        **required,
        "zero_semantics": False,
        "residual": False,
    }


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("ngf", "8", "an integer"),
        ("label_nc", True, "an integer"),
        ("use_instance", 1, "true or false"),
        ("norm", None, "lacks"),
        ("codec", 3, "a string"),
        ("qualities", [37, "42"], "a list of integers"),
        ("selected", [6], "an object"),
    ],
)
def test_spec_values_of_the_wrong_type_are_refused(key: str, value: Any, kind: str) -> None:
    with pytest.raises(ValueError, match=kind) as caught:
        GeneratorSpec.from_json({**PREVIOUS_SPEC, key: value}, FORMAT_VERSION)
    assert key in str(caught.value) and "\n" not in str(caught.value)


def test_spec_properties() -> None:
    spec = GeneratorSpec.from_json(PREVIOUS_SPEC, FORMAT_VERSION)
    assert spec.trained_qualities == (37, 42)
    assert dataclasses.replace(spec, qualities=(42, 37, 42)).trained_qualities == (37, 42)
    assert dataclasses.replace(spec, qualities=None).trained_qualities == (42,)
    assert dataclasses.replace(spec, qualities=None, quality=None).trained_qualities == ()
    generator, _ = build_models(ModelConfig(ngf=8, n_downsample=2, n_blocks=2), LABEL_NC, use_instance=True)
    assert spec.generator_kwargs == generator.hparams == spec.build_generator().hparams
    plain = dataclasses.replace(spec, residual=False, use_instance=False)
    assert not plain.build_generator().residual
    assert plain.generator_kwargs["input_nc"] == input_channels(LABEL_NC, False)
