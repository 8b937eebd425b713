"""``model.self_ensemble``: with ``hflip`` the decoder averages the generator's outputs on the frame and on
its mirror image (mirrored back), and the encoder fits its gains to the mean of the two passes' correction
parts; the spec records it (format version 11) so every decoder runs the same passes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, JobConfig, ModelConfig, with_overrides
from pipeline.model.correction_scale import GainFit, gain_count, gains_of
from pipeline.model.export import export_generator, load_generator
from pipeline.model.inference import decoder_output, enhance_batch, enhance_image, to_image, to_network
from pipeline.model.inputs import generator_input
from pipeline.model.networks import Generator, build_models
from pipeline.model.spec import SPEC_KEYS, GeneratorSpec

LABEL_NC = 5
TINY = ModelConfig(ngf=4, n_downsample=1, n_blocks=1, norm="none", correction_scale="channels")


def _model(
    self_ensemble: str = "hflip", phase: int = 3, trained: bool = True
) -> tuple[Generator, GeneratorSpec]:
    """A tiny generator whose correction head looks trained (an untrained one is zero), and its spec."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, self_ensemble=self_ensemble)
    generator, _ = build_models(cfg, LABEL_NC, use_instance=False)
    if trained:
        with torch.no_grad():
            generator.correction[-1].weight.normal_(0.0, 0.05)
            generator.correction[-1].bias.fill_(0.02)
    spec = GeneratorSpec.from_config(cfg, LABEL_NC, False, codec="hevc", quality=42, phase=phase)
    return generator.eval(), spec


def _frame(height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Label ids ``1 x H x W`` and a decoded image ``1 x 3 x H x W`` in [-1, 1], neither mirror-symmetric."""
    rng = np.random.default_rng(seed)
    label = torch.from_numpy(rng.integers(0, LABEL_NC, (1, height, width)))
    decoded = torch.from_numpy(rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32))
    return label, decoded


def _input(label: torch.Tensor, decoded: torch.Tensor, visual: bool = True) -> torch.Tensor:
    return generator_input(
        label, None, decoded, label_nc=LABEL_NC, use_instance=False, zero_semantics=False, visual_input=visual
    )


def test_hflip_averages_the_frame_and_its_mirror_and_one_pass_does_not() -> None:
    generator, spec = _model()
    one_pass = dataclasses.replace(spec, self_ensemble="none")
    label, decoded = _frame(16, 24)
    x = _input(label, decoded)
    with torch.no_grad():
        by_hand = (generator(x) + generator(x.flip(-1)).flip(-1)) / 2
        assert torch.equal(enhance_batch(generator, one_pass, label, decoded), generator(x))
    out = enhance_batch(generator, spec, label, decoded)
    torch.testing.assert_close(out, by_hand, rtol=0, atol=1e-6)
    assert (out - enhance_batch(generator, one_pass, label, decoded)).abs().max() > 1e-4
    # the mean of a view and its mirror is mirror-symmetric in the frame; one pass is not
    mirrored = enhance_batch(generator, spec, label.flip(-1), decoded.flip(-1))
    torch.testing.assert_close(mirrored, out.flip(-1), rtol=0, atol=1e-6)
    one_mirrored = enhance_batch(generator, one_pass, label.flip(-1), decoded.flip(-1))
    assert (one_mirrored - enhance_batch(generator, one_pass, label, decoded).flip(-1)).abs().max() > 1e-4


def test_hflip_keeps_the_codec_at_initialisation_and_the_padding_to_the_stride() -> None:
    fresh, spec = _model(trained=False)
    label, decoded = _frame(15, 21)  # neither a multiple of the stride (2)
    assert torch.equal(enhance_batch(fresh, spec, label, decoded), decoded)
    generator, spec = _model()
    out = enhance_batch(generator, spec, label, decoded)
    assert out.shape == (1, 3, 15, 21)
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    # a phase-1 export draws with its synthesis head: the mean of the two drawings
    prior, prior_spec = _model(phase=1)
    x = _input(label[..., :14, :20], decoded[..., :14, :20], visual=False)
    with torch.no_grad():
        drawn = (prior(x, synthesis=True) + prior(x.flip(-1), synthesis=True).flip(-1)) / 2
    got = enhance_batch(prior, prior_spec, label[..., :14, :20], decoded[..., :14, :20])
    torch.testing.assert_close(got, drawn, rtol=0, atol=1e-6)


def test_the_encoder_fits_its_gains_to_the_mean_parts_and_the_decoder_outputs_them() -> None:
    generator, spec = _model()
    rng = np.random.default_rng(1)
    decoded = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    original = np.clip(decoded.astype(int) + rng.integers(-20, 21, decoded.shape), 0, 255).astype(np.uint8)
    label = rng.integers(0, LABEL_NC, (16, 24)).astype(np.uint8)
    made = decoder_output(generator, spec, original, decoded, label, quality=42)
    dec = to_network(decoded)
    x = _input(torch.from_numpy(label.astype(np.int64))[None], dec)
    with torch.no_grad():
        features = generator.trunk(x), generator.trunk(x.flip(-1))
        parts = (
            generator.correction_parts(features[0]) + generator.correction_parts(features[1]).flip(-1)
        ) / 2
        fit = GainFit(gain_count(spec))
        fit.add(parts[0], (to_network(original) - dec)[0])
        assert made.gains == fit.codes() and made.gains != (192,) * gain_count(spec)
        gains = gains_of(made.gains)[None]
        one, other = (
            generator.corrected(x, features[0], gains),
            generator.corrected(x.flip(-1), features[1], gains),
        )
    assert np.array_equal(made.image, to_image(((one + other.flip(-1)) / 2)[0]))
    # and the decoder that is sent those gains makes the same image
    sent = enhance_image(generator, spec, decoded, label, quality=42, gains=made.gains)
    assert np.abs(sent.astype(int) - made.image).max() <= 1


def test_the_spec_records_the_self_ensemble_as_format_version_11(tmp_path: Path) -> None:
    generator, spec = _model()
    assert spec.format_version == 11 and spec.to_json()["self_ensemble"] == "hflip"
    assert "self_ensemble" in SPEC_KEYS[11] and "self_ensemble" not in SPEC_KEYS[10]
    loaded, read = load_generator(export_generator(tmp_path / "g.safetensors", generator, spec))
    assert read == spec
    label, decoded = _frame(16, 24)
    assert torch.equal(
        enhance_batch(loaded, read, label, decoded), enhance_batch(generator, spec, label, decoded)
    )
    _, one_pass = _model("none")
    assert (
        one_pass == dataclasses.replace(spec, self_ensemble=None)
        and "self_ensemble" not in one_pass.to_json()
    )
    assert one_pass.format_version == 6  # correction_scale: one pass is written as before the key
    with pytest.raises(ValueError, match="unknown to generator format version 10"):
        GeneratorSpec.from_json(spec.to_json(), 10)
    with pytest.raises(ValueError, match=r"self_ensemble='vflip' is not one of \['none', 'hflip'\]"):
        dataclasses.replace(spec, self_ensemble="vflip")
    with pytest.raises(ConfigError, match="self_ensemble"):
        with_overrides(JobConfig(), {"model.self_ensemble": "vflip"})
    assert JobConfig().model.self_ensemble == "none"
