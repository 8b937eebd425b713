"""The main job's note on models that exported step 0, the codec's own image."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ModelConfig, load_config
from pipeline.job import codec_step_note
from pipeline.model.export import export_generator
from pipeline.model.networks import build_models
from pipeline.model.spec import GeneratorSpec

TINY = ModelConfig(ngf=4, n_downsample=1, n_blocks=1, ndf=4, n_layers_d=1, num_d=1)


def _export(path: Path, selected: dict | None) -> Path:
    generator, _ = build_models(TINY, 3, False)
    spec = GeneratorSpec.from_config(TINY, 3, False, codec="hevc", quality=42, phase=3, selected=selected)
    return export_generator(path, generator, spec)


def test_the_note_counts_the_models_that_kept_the_codec(tmp_path: Path) -> None:
    cfg = load_config(None, ["validate.min_delta=0.05"])
    codec = _export(tmp_path / "codec.safetensors", {"step": 0, "metric": "psnr", "value": 0.0})
    trained = _export(tmp_path / "trained.safetensors", {"step": 300, "metric": "psnr", "value": 0.2})
    unvalidated = _export(tmp_path / "unvalidated.safetensors", None)

    note = codec_step_note(cfg, [codec, trained, unvalidated])
    assert note is not None
    assert note.startswith("[job] NOTE: 1 of 3 models exported step 0, the codec itself")
    assert "validate.min_delta (0.05 dB) on the 'valid' frames" in note
    assert "make recipe (configs/recipe.yaml" in note
    assert codec_step_note(cfg, [trained, unvalidated]) is None
