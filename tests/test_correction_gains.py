"""model.correction_scale: channels. The encoder sends, per frame, the least-squares gain of each part of
the correction head (each trunk channel's contribution and the bias, one byte each); validation, evaluation,
the registry's pyfunc and compress decode alike (validation: tests/test_correction_scale.py; compress and
the container: tests/test_compress.py, tests/test_container.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, ModelConfig
from pipeline.model.correction_scale import (
    CODE_BITS,
    GAIN_UNIT,
    GAIN_ZERO,
    GainFit,
    gain_count,
    gains_of,
    side_bits,
)
from pipeline.model.export import export_generator, load_generator
from pipeline.model.inference import decoder_output, enhance_image, fit_gains
from pipeline.model.networks import Generator, build_models
from pipeline.model.spec import GeneratorSpec
from pipeline.tracking.registry import example_input, generator_signature, predict

TINY = ModelConfig(ngf=4, n_downsample=1, n_blocks=1, norm="none", correction_scale="channels")
LABEL_NC = 5
UNIT = GAIN_ZERO + GAIN_UNIT  # the code of gain 1


def _spec(phase: int = 3, **changes: object) -> GeneratorSpec:
    model = dataclasses.replace(TINY, **changes)  # type: ignore[arg-type]
    return GeneratorSpec.from_config(model, LABEL_NC, False, codec="hevc", quality=42, phase=phase)


def _generator(seed: int = 0, bias: float = 0.0) -> Generator:
    torch.manual_seed(seed)
    generator, _ = build_models(TINY, LABEL_NC, use_instance=False)
    with torch.no_grad():
        generator.correction[-1].weight.normal_(0.0, 0.05)
        generator.correction[-1].bias.fill_(bias)
    return generator.eval()


def _images(seed: int, size: tuple[int, int] = (24, 32)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    original = rng.integers(40, 216, (*size, 3)).astype(np.uint8)
    decoded = np.clip(original + rng.normal(0, 6, original.shape), 0, 255).astype(np.uint8)
    return original, decoded


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b) ** 2))


def test_the_parts_sum_to_the_correction_and_gains_scale_each() -> None:
    generator = _generator(bias=0.03)
    x = torch.randn(2, generator.hparams["input_nc"], 16, 16)
    features = generator.trunk(x)
    parts = generator.correction_parts(features)
    assert parts.shape == (2, 5, 3, 16, 16)
    torch.testing.assert_close(parts.sum(1), generator.correction(features), atol=1e-6, rtol=0)
    torch.testing.assert_close(generator(x, gains=torch.ones(2, 5)), generator(x), atol=1e-6, rtol=0)
    gains = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5], [1.0, 1.0, 1.0, 1.0, 0.0]])
    expected = (x[:, -3:] + (parts * gains.view(2, 5, 1, 1, 1)).sum(1)).clamp(-1, 1)
    torch.testing.assert_close(generator(x, gains=gains), expected, atol=1e-6, rtol=0)
    zero = generator(x, gains=torch.zeros(2, 5))
    torch.testing.assert_close(zero, x[:, -3:].clamp(-1, 1), atol=0, rtol=0)  # every part off: the codec
    with pytest.raises(ValueError, match=r"correction gains must be 2 x 5, got \(2, 4\)"):
        generator(x, gains=torch.ones(2, 4))
    with pytest.raises(ValueError, match="not synthesis"):
        generator(x, synthesis=True, gains=torch.ones(2, 5))


def test_the_fit_recovers_known_gains_and_weights_count_as_repeats() -> None:
    rng = np.random.default_rng(0)
    parts = torch.from_numpy(rng.normal(0, 0.05, (5, 3, 20, 20)))
    truth = np.array([0.5, 1.25, -0.75, 1.0, 0.0])
    residual = (parts * torch.from_numpy(truth).view(5, 1, 1, 1)).sum(0)
    fit = GainFit(5)
    fit.add(parts, residual + torch.from_numpy(rng.normal(0, 1e-4, residual.shape)))
    assert fit.codes() == tuple(int(g * GAIN_UNIT + GAIN_ZERO) for g in truth)
    # a pixel of weight 2 counts as that pixel twice
    weight = torch.ones(20, 20)
    weight[:10] = 2.0
    weighted, repeated = GainFit(5), GainFit(5)
    weighted.add(parts, residual * 0.7, weight)
    repeated.add(parts, residual * 0.7)
    repeated.add(parts[..., :10, :], residual[:, :10] * 0.7)
    np.testing.assert_allclose(weighted.gram, repeated.gram)
    np.testing.assert_allclose(weighted.cross, repeated.cross)
    assert weighted.power == pytest.approx(repeated.power)
    with pytest.raises(ValueError, match="do not match residual"):
        fit.add(parts[:4], residual)


def test_clipped_gains_are_sent_only_where_they_beat_the_generator_and_the_codec() -> None:
    """Gains beyond [-2, 2) are clipped; what is sent is never worse, in the fit's error, than the
    generator's output (all ones) or the codec's image (all zeros)."""
    rng = np.random.default_rng(1)
    parts = torch.from_numpy(rng.normal(0, 0.05, (3, 3, 16, 16)))
    parts[1] = parts[0] * 1.001  # two nearly equal parts that together need a gain of 5
    residual = 5.0 * parts[0] + torch.from_numpy(rng.normal(0, 0.01, (3, 16, 16)))
    fit = GainFit(3)
    fit.add(parts, residual)
    codes = np.array(fit.codes())
    assert codes[:2].tolist() == [255, 255]  # clipped: a real test of the comparison
    gains = (codes - GAIN_ZERO) / GAIN_UNIT
    assert fit.error(gains) <= min(fit.error(np.ones(3)), fit.error(np.zeros(3)))
    assert gains_of(codes).tolist() == gains.tolist()
    # a generator that changes nothing (a zero head): the singular fit keeps the generator's own gains
    idle = GainFit(3)
    idle.add(parts * 0, residual)
    assert idle.codes() == (UNIT,) * 3


def test_the_spec_config_and_rate_know_the_gains(tmp_path: Path) -> None:
    spec = _spec()
    assert spec.correction_scale == "channels" and gain_count(spec) == 5
    assert side_bits(spec) == 5 * CODE_BITS
    _, read = load_generator(export_generator(tmp_path / "g.safetensors", _generator(), spec))
    assert read == spec and side_bits(read) == 5 * CODE_BITS
    assert gain_count(_spec(phase=1)) == 0 and side_bits(_spec(phase=1)) == 0  # the prior draws its image
    with pytest.raises(ValueError, match="needs a residual generator"):
        dataclasses.replace(spec, residual=False)
    with pytest.raises(ConfigError, match="needs model.residual=true"):
        dataclasses.replace(TINY, residual=False)


@pytest.mark.parametrize("seed", range(3))
def test_the_decoder_output_is_no_worse_than_the_codec_or_the_generator(seed: int) -> None:
    generator, spec = _generator(seed, bias=0.02), _spec()
    original, decoded = _images(seed)
    label = np.zeros(decoded.shape[:2], np.uint8)
    made = decoder_output(generator, spec, original, decoded, label, quality=42)
    assert made.scale is None and made.gains == fit_gains(
        generator, spec, original, decoded, label, quality=42
    )
    assert np.array_equal(
        made.image, enhance_image(generator, spec, decoded, label, quality=42, gains=made.gains)
    )
    plain = enhance_image(generator, spec, decoded, label, quality=42)
    assert _mse(plain, original) > _mse(decoded, original) + 1  # the generator alone hurts: a real test
    assert _mse(made.image, original) <= min(_mse(decoded, original), _mse(plain, original)) + 0.1
    with pytest.raises(ValueError, match="5 integer codes per frame"):
        enhance_image(generator, spec, decoded, label, quality=42, gains=(UNIT,) * 4)


def test_the_registry_pyfunc_takes_each_frames_gains(tmp_path: Path) -> None:
    generator, spec = _generator(), _spec()
    assert example_input(spec, batch=2)["correction_gains"].tolist() == [[UNIT] * 5] * 2
    signature = generator_signature(export_generator(tmp_path / "s.safetensors", generator, spec))
    assert {s.name: s.shape for s in signature.inputs.inputs}["correction_gains"] == (-1, 5)
    _, decoded = _images(0)
    label = np.zeros(decoded.shape[:2], np.uint8)
    codes = np.array([[UNIT] * 5, [100, 200, 128, 150, 255]])
    batch = {
        "label": np.stack([label, label]).astype(np.int64),
        "decoded": np.stack([decoded, decoded]).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1,
        "correction_gains": codes,
    }
    out = predict(generator, spec, batch)
    for i in range(2):
        got = np.round((out[i] + 1) * 127.5).astype(np.int16).transpose(1, 2, 0)
        expected = enhance_image(generator, spec, decoded, label, gains=tuple(codes[i]))
        assert np.abs(got - expected).max() <= 1  # float here, uint8 there
    assert not np.array_equal(out[0], out[1])
    with pytest.raises(ValueError, match=r"lacks \['correction_gains'\]"):
        predict(generator, spec, {k: v for k, v in batch.items() if k != "correction_gains"})
    with pytest.raises(ValueError, match=r"correction_gains must be 2 x 5, got \(1, 5\)"):
        predict(generator, spec, {**batch, "correction_gains": codes[:1]})
    with pytest.raises(ValueError, match=r"must lie in \[0, 255\]"):
        predict(generator, spec, {**batch, "correction_gains": codes + 200})
