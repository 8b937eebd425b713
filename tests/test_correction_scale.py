"""model.correction_scale: frame. The encoder sends, per frame, the least-squares scale of the generator's
change to the decoded image (one byte); validation, evaluation and compress apply it alike, and the spec
records it (format version 6)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import JobConfig, ModelConfig
from pipeline.data.manifest import DatasetInfo
from pipeline.eval.inputs import EvalSample
from pipeline.eval.report import format_table
from pipeline.eval.rows import MeanRow, Measures, csv_text
from pipeline.model.correction_scale import CODE_BITS, SCALE_UNIT, apply_code, fit_code, scaled, side_bits
from pipeline.model.export import export_generator, load_generator
from pipeline.model.inference import enhance_image
from pipeline.model.networks import build_models
from pipeline.model.spec import SPEC_KEYS, GeneratorSpec
from pipeline.tracking.registry import example_input, generator_signature, predict
from pipeline.train.validation import Validator

TINY = ModelConfig(ngf=4, n_downsample=1, n_blocks=1, norm="none")
LABEL_NC = 5


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b) ** 2))


def _images(seed: int, size: tuple[int, int] = (24, 32)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    original = rng.integers(40, 216, (*size, 3)).astype(np.uint8)
    decoded = np.clip(original + rng.normal(0, 6, original.shape), 0, 255).astype(np.uint8)
    return original, decoded


def test_the_code_is_the_least_squares_scale() -> None:
    original, decoded = _images(0)
    change = original.astype(np.int16) - decoded
    # a generator that goes twice as far as it should: scale 1/2
    doubled = np.clip(decoded + 2 * change, 0, 255).astype(np.uint8)
    exact = fit_code(original, decoded, doubled)
    assert abs(exact - SCALE_UNIT // 2) <= 2  # clipping at 0 and 255 moves it a little
    assert fit_code(original, decoded, original) == SCALE_UNIT  # the right change: kept as it is
    assert fit_code(original, decoded, decoded) == SCALE_UNIT  # no change: nothing to scale
    wrong = np.clip(decoded - change, 0, 255).astype(np.uint8)  # the wrong way: turned off
    assert fit_code(original, decoded, wrong) == 0
    assert np.array_equal(apply_code(decoded, wrong, 0), decoded)
    assert np.array_equal(apply_code(decoded, doubled, SCALE_UNIT), doubled)
    timid = np.clip(decoded + np.round(0.6 * change), 0, 255).astype(np.uint8)
    assert 190 < fit_code(original, decoded, timid) < 240  # too short: turned up by about 1 / 0.6
    far_too_timid = np.clip(decoded + np.round(0.25 * change), 0, 255).astype(np.uint8)
    assert fit_code(original, decoded, far_too_timid) == 255  # scale 4 wanted: the byte stops below 2


@pytest.mark.parametrize("seed", range(5))
def test_a_scaled_frame_is_no_worse_than_the_codec_or_the_generator(seed: int) -> None:
    original, decoded = _images(seed)
    rng = np.random.default_rng(100 + seed)
    # some truth in the change, some noise, at a random strength
    truth = original.astype(np.float64) - decoded
    change = rng.uniform(0.6, 2.5) * truth + rng.normal(0, 4, original.shape)
    enhanced = np.clip(np.rint(decoded + change), 0, 255).astype(np.uint8)
    out = apply_code(decoded, enhanced, fit_code(original, decoded, enhanced))
    # rounding the scale to 1/128 and the output to integers costs at most a little
    assert _mse(out, original) <= min(_mse(decoded, original), _mse(enhanced, original)) + 0.1


def test_bad_inputs_are_refused() -> None:
    original, decoded = _images(0)
    with pytest.raises(ValueError, match="enhanced must be uint8 of shape"):
        fit_code(original, decoded, decoded[:-1])
    with pytest.raises(ValueError, match="original must be uint8"):
        fit_code(original.astype(np.float32), decoded, decoded)
    with pytest.raises(ValueError, match=r"code must lie in \[0, 255\], got 256"):
        apply_code(decoded, decoded, 256)


def _spec(**changes: object) -> GeneratorSpec:
    model = dataclasses.replace(TINY, **changes)  # type: ignore[arg-type]
    return GeneratorSpec.from_config(model, LABEL_NC, False, codec="hevc", quality=42, phase=3)


def test_the_spec_records_the_scale_as_format_version_6(tmp_path: Path) -> None:
    spec = _spec(correction_scale="frame")
    assert spec.format_version == 6 and spec.to_json()["correction_scale"] == "frame"
    assert "correction_scale" in SPEC_KEYS[6] and "correction_scale" not in SPEC_KEYS[5]
    generator, _ = build_models(TINY, LABEL_NC, use_instance=False)
    _, read = load_generator(export_generator(tmp_path / "g.safetensors", generator, spec))
    assert read == spec and side_bits(read) == CODE_BITS
    plain = _spec()
    assert plain.correction_scale is None and "correction_scale" not in plain.to_json()
    assert plain.format_version == 2 and side_bits(plain) == 0  # as before the option existed
    with pytest.raises(ValueError, match="unknown to generator format version 5"):
        GeneratorSpec.from_json(spec.to_json(), 5)
    with pytest.raises(ValueError, match="correction_scale='block' is not one of"):
        dataclasses.replace(spec, correction_scale="block")


def test_scaled_follows_the_spec() -> None:
    original, decoded = _images(1)
    enhanced = np.clip(decoded.astype(np.int16) + 9, 0, 255).astype(np.uint8)  # a change that hurts
    out, code = scaled(_spec(), original, decoded, enhanced)
    assert out is enhanced and code is None
    out, code = scaled(_spec(correction_scale="frame"), original, decoded, enhanced)
    assert code == fit_code(original, decoded, enhanced)
    assert np.array_equal(out, apply_code(decoded, enhanced, code))
    assert _mse(out, original) < _mse(enhanced, original)


def test_validation_scores_what_the_decoder_outputs() -> None:
    """A generator that over-corrects loses to the codec unscaled; scaled or gained per frame, it does not."""
    torch.manual_seed(0)
    generator, _ = build_models(TINY, LABEL_NC, use_instance=False)
    with torch.no_grad():
        generator.correction[-1].bias.fill_(0.08)  # +10 grey levels everywhere
    samples = []
    for seed in range(2):
        original, decoded = _images(seed, (96, 128))  # NIQE's smallest
        label = np.zeros(original.shape[:2], np.uint8)
        samples.append(EvalSample(f"k{seed}", original, label, None, decoded={42: decoded}))
    data = DatasetInfo(label_nc=LABEL_NC, use_instance=False)
    deltas = {}
    for scale in ("none", "frame", "channels"):  # channels: tests/test_correction_gains.py
        cfg = JobConfig()
        cfg.model, cfg.loader.quality = dataclasses.replace(TINY, correction_scale=scale), 42  # type: ignore[arg-type]
        deltas[scale] = Validator(cfg, data, samples)(generator)["delta_psnr"]
    assert deltas["none"] < -1.0 and deltas["frame"] > -0.05 and deltas["channels"] > -0.05


def test_the_registry_pyfunc_takes_each_frames_code(tmp_path: Path) -> None:
    torch.manual_seed(0)
    generator, _ = build_models(TINY, LABEL_NC, use_instance=False)
    with torch.no_grad():
        generator.correction[-1].weight.normal_(0.0, 0.05)
    generator.eval()
    spec = _spec(correction_scale="frame")
    assert example_input(spec, batch=2)["correction_scale"].tolist() == [SCALE_UNIT, SCALE_UNIT]
    signature = generator_signature(export_generator(tmp_path / "s.safetensors", generator, spec))
    assert {s.name: s.shape for s in signature.inputs.inputs}["correction_scale"] == (-1,)
    original, decoded = _images(0)
    label = np.zeros(decoded.shape[:2], np.uint8)
    batch = {
        "label": np.stack([label, label]).astype(np.int64),
        "decoded": np.stack([decoded, decoded]).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1,
        "correction_scale": np.array([40, 200]),
    }
    out = predict(generator, spec, batch)
    enhanced = enhance_image(generator, spec, decoded, label)
    for i, code in enumerate((40, 200)):
        got = np.round((out[i] + 1) * 127.5).astype(np.int16).transpose(1, 2, 0)
        assert np.abs(got - apply_code(decoded, enhanced, code)).max() <= 1  # float here, uint8 there
    with pytest.raises(ValueError, match=r"lacks \['correction_scale'\]"):
        predict(generator, spec, {k: v for k, v in batch.items() if k != "correction_scale"})
    with pytest.raises(ValueError, match="correction_scale must hold 1 or 2 codes"):
        predict(generator, spec, {**batch, "correction_scale": np.array([1, 2, 3])})


def test_the_scale_is_a_column_of_the_methods_that_send_one() -> None:
    base = {"bpp_codec": 0.1, "bpp_total": 0.12, "psnr": 30.0, "ms_ssim": 0.9, "niqe": 5.0, "lpips": 0.1}
    notes = {"codec": "hevc", "quality": 42, "images": 2, "fid": 1.0, "lpips_note": "", "fid_note": ""}
    rows = [
        MeanRow("hevc", "hevc", "hevc", measures=Measures(**base), on_training_frames=False, **notes),
        MeanRow(
            "hevc-SE",
            "se",
            "se",
            measures=Measures(**base, correction_scale=0.625),
            on_training_frames=False,
            **notes,
        ),
    ]
    table = format_table(rows).splitlines()
    assert table[0].split()[-2] == "scale"  # before FID
    assert table[2].split()[-2] == "-" and table[3].split()[-2] == "0.625"
    header, codec_row, se_row = csv_text(MeanRow, rows).splitlines()
    at = header.split(",").index("correction_scale")
    assert codec_row.split(",")[at] == "" and se_row.split(",")[at] == "0.625"
