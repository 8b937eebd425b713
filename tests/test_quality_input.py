"""model.quality_input: the generator sees the codec quality it enhances, one constant channel placed on the
codec's scale, in training, validation, evaluation, compression and the registry's pyfunc alike."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig, from_dict
from pipeline.model.export import export_generator, load_generator, read_spec
from pipeline.model.inference import enhance_image
from pipeline.model.inputs import generator_input, input_channels, quality_level, semantic_channels
from pipeline.model.networks import build_models
from pipeline.model.spec import SPEC_KEYS, GeneratorSpec
from pipeline.tracking.registry import example_input, generator_signature, predict

LABEL_NC = 5
TINY = ModelConfig(ngf=4, n_downsample=1, n_blocks=1, norm="none", quality_input=True)
H, W = 16, 24


def tiny(trained: bool = True) -> tuple[torch.nn.Module, GeneratorSpec]:
    """A residual generator that sees the quality; ``trained``: its correction head is no longer zero."""
    torch.manual_seed(0)
    generator, _ = build_models(TINY, LABEL_NC, use_instance=False)
    if trained:
        with torch.no_grad():
            generator.correction[-1].weight.normal_(0.0, 0.05)
    spec = GeneratorSpec.from_config(TINY, LABEL_NC, False, codec="hevc", qualities=(37, 47), phase=3)
    return generator.eval(), spec


def frame(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8), rng.integers(0, LABEL_NC, (H, W), dtype=np.uint8)


def test_quality_level_is_the_place_on_the_codec_scale() -> None:
    assert quality_level("hevc", 42).item() == pytest.approx(42 / 51)
    assert torch.allclose(quality_level("hevc", torch.tensor([0, 51])), torch.tensor([0.0, 1.0]))
    assert quality_level("jpeg", 100).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"hevc quality must lie in \[0, 51\], got \[52\]"):
        quality_level("hevc", torch.tensor([52]))
    with pytest.raises(ValueError, match="unknown codec"):
        quality_level("vvc", 30)


def test_the_quality_channel_sits_before_the_decoded_image() -> None:
    label = torch.randint(0, LABEL_NC, (2, H, W))
    decoded = torch.rand(2, 3, H, W) * 2 - 1
    levels = torch.tensor([0.25, 0.75])
    kwargs = {"label_nc": LABEL_NC, "use_instance": False, "zero_semantics": False, "visual_input": True}
    x = generator_input(label, None, decoded, quality=levels, **kwargs)
    sem = semantic_channels(LABEL_NC, False)
    assert x.shape[1] == input_channels(LABEL_NC, False, quality_input=True) == sem + 4
    assert torch.equal(x[:, sem], levels.view(2, 1, 1).expand(2, H, W))
    assert torch.equal(x[:, -3:], decoded)
    assert torch.equal(x[:, :sem], generator_input(label, None, decoded, **kwargs)[:, :sem])
    # the ablation keeps the quality (it is not semantics); phase 1 has no decoded image, so no quality
    plain = generator_input(label, None, decoded, quality=levels, **{**kwargs, "zero_semantics": True})
    assert plain[:, :sem].abs().sum() == 0 and torch.equal(plain[:, sem:], x[:, sem:])
    prior = generator_input(label, None, decoded, quality=levels, **{**kwargs, "visual_input": False})
    assert prior[:, sem:].abs().sum() == 0
    one = generator_input(label, None, decoded, quality=torch.tensor(0.5), **kwargs)
    assert one[:, sem].eq(0.5).all()
    with pytest.raises(ValueError, match="quality must hold 1 or 2 values, got 3"):
        generator_input(label, None, decoded, quality=torch.ones(3), **kwargs)


def test_enhancing_needs_the_quality_and_follows_it() -> None:
    decoded, label = frame()
    identity, spec = tiny(trained=False)
    assert np.array_equal(enhance_image(identity, spec, decoded, label, quality=42), decoded)
    generator, spec = tiny()
    with pytest.raises(ValueError, match="sees the hevc quality .* give that quality"):
        enhance_image(generator, spec, decoded, label)
    low, high = (enhance_image(generator, spec, decoded, label, quality=q) for q in (32, 47))
    assert not np.array_equal(low, high)
    # a generator without the channel ignores a quality given to it
    plain_cfg = dataclasses.replace(TINY, quality_input=False)
    torch.manual_seed(0)
    plain, _ = build_models(plain_cfg, LABEL_NC, use_instance=False)
    plain_spec = GeneratorSpec.from_config(plain_cfg, LABEL_NC, False, codec="hevc", phase=3)
    assert np.array_equal(
        enhance_image(plain, plain_spec, decoded, label, quality=32),
        enhance_image(plain, plain_spec, decoded, label),
    )


def test_the_spec_records_it_as_format_version_4(tmp_path: Path) -> None:
    generator, spec = tiny()
    assert spec.quality_input is True and spec.format_version == 4
    assert "quality_input" in SPEC_KEYS[4] and "quality_input" not in SPEC_KEYS[3]
    path = export_generator(tmp_path / "q.safetensors", generator, spec)
    loaded, loaded_spec = load_generator(path)
    assert loaded_spec == spec == read_spec(path)
    decoded, label = frame(1)
    assert np.array_equal(
        enhance_image(loaded, loaded_spec, decoded, label, quality=37),
        enhance_image(generator, spec, decoded, label, quality=37),
    )
    # off, the key is not written: the spec (and an export's bytes) are what they were before it existed
    off = GeneratorSpec.from_config(
        dataclasses.replace(TINY, quality_input=False), LABEL_NC, False, codec="hevc"
    )
    assert off.quality_input is None and "quality_input" not in off.to_json() and off.format_version == 2
    with pytest.raises(ValueError, match="unknown to generator format version 3"):
        GeneratorSpec.from_json(spec.to_json(), 3)
    with pytest.raises(ValueError, match="needs the codec"):
        dataclasses.replace(spec, codec=None)


def test_the_registry_pyfunc_takes_the_quality_per_frame(tmp_path: Path) -> None:
    generator, spec = tiny()
    inputs = example_input(spec, batch=2)
    assert inputs["quality"].dtype == np.int64 and inputs["quality"].shape == (2,)
    signature = generator_signature(export_generator(tmp_path / "q.safetensors", generator, spec))
    shapes = {s.name: s.shape for s in signature.inputs.inputs}
    assert shapes == {"label": (-1, -1, -1), "decoded": (-1, 3, -1, -1), "quality": (-1,)}
    decoded, label = frame(2)
    batch = {
        "label": np.stack([label, label]).astype(np.int64),
        "decoded": np.stack([decoded, decoded]).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1,
        "quality": np.array([32, 47]),
    }
    out = predict(generator, spec, batch)
    for i, q in enumerate((32, 47)):
        expected = enhance_image(generator, spec, decoded, label, quality=q)
        got = np.round((np.clip(out[i], -1, 1) + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)
        assert np.array_equal(got, expected)
    with pytest.raises(ValueError, match=r"lacks \['quality'\]"):
        predict(generator, spec, {k: v for k, v in batch.items() if k != "quality"})


def test_the_option_changes_the_training_digest_only_when_on() -> None:
    assert from_dict({"model": {"quality_input": False}}).training_digest() == from_dict({}).training_digest()
    assert from_dict({"model": {"quality_input": True}}).training_digest() != from_dict({}).training_digest()


def test_evaluation_and_tiled_compression_pass_the_quality() -> None:
    from pipeline.compress.tiling import enhance_tiled
    from pipeline.eval.inputs import EvalSample
    from pipeline.eval.methods import Method, reconstruct

    generator, spec = tiny()
    decoded, label = frame(3)
    sample = EvalSample("k", decoded, label, None, decoded={37: decoded, 47: decoded}, bpp={37: 0.2, 47: 0.1})
    method = Method("hevc-SE", None, generator, spec)
    for q in (37, 47):
        expected = enhance_image(generator, spec, decoded, label, quality=q)
        assert np.array_equal(reconstruct(method, sample, q)[0], expected)
        assert np.array_equal(enhance_tiled(generator, spec, decoded, label, q, tile=64, overlap=8), expected)
    tiled = enhance_tiled(generator, spec, decoded, label, 37, tile=16, overlap=4)  # several tiles
    assert tiled.shape == decoded.shape
    assert not np.array_equal(tiled, enhance_tiled(generator, spec, decoded, label, 47, tile=16, overlap=4))


def test_training_feeds_each_sample_its_own_quality(small_shards: Path, tmp_path: Path) -> None:
    """A short phase 3 on two qualities: the generator input carries each sample's drawn quality, the run
    starts at the codec exactly, validates (the validator passes the quality too) and exports the option."""
    from pipeline.config import load_config
    from pipeline.data.loader import make_loader
    from pipeline.data.manifest import dataset_info
    from pipeline.tracking import Tracker
    from pipeline.train import trainer
    from pipeline.train.gan_step import step_inputs

    cfg = load_config(
        None,
        [
            f"shards.output={small_shards}",
            f"train.output_dir={tmp_path}",
            "model.ngf=4", "model.n_downsample=1", "model.n_blocks=1", "model.norm=none",
            "model.quality_input=true", "loader.qualities=[37, 42]", "loader.crop=[32, 64]",
            "loader.batch_size=4", "loader.shuffle=4", "loss.distortion=mse", "train.semantic_dropout=0.5",
            "phase3.steps=3", "train.checkpoint_every=0", "validate.every=3", "validate.images=1",
        ],
    )  # fmt: skip
    batch = next(iter(make_loader(cfg, rank=0, world_size=1, train=True, seed=0)))
    x = step_inputs(cfg, cfg.phase3, dataset_info(cfg), batch, torch.device("cpu"), torch.float32)
    sem = x.semantics.shape[1]
    assert torch.equal(x.g_in[:, sem, 0, 0], quality_level("hevc", batch["quality"]))
    assert set(batch["quality"].tolist()) <= {37, 42}
    torch.manual_seed(0)
    identity, _ = build_models(cfg.model, dataset_info(cfg).label_nc, False)
    with torch.no_grad():
        assert torch.equal(identity(x.g_in), batch["decoded"])

    export = trainer.train(cfg, [3], tracker=Tracker())[3]
    spec = read_spec(export)
    assert spec.quality_input is True and spec.trained_qualities == (37, 42)
    assert spec.format_version == 8 and spec.codec_options == {"chroma_upsampling": "linear"}  # hevc shards
    assert spec.selected is not None  # validated on held-out frames at both qualities
