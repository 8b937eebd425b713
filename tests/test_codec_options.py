"""The codec options that decide a decoded picture (hevc's chroma up-sampling) travel from the shard build
(tests/test_manifest.py) to the generator's spec, and evaluation says when a generator is scored on pictures
decoded another way (compress and decompress decode as it was trained: tests/test_compress.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.data.codecs import decode_options
from pipeline.eval.methods import load_methods
from pipeline.model.export import export_generator, load_generator
from pipeline.model.spec import SPEC_KEYS, GeneratorSpec

LINEAR, NEAREST = {"chroma_upsampling": "linear"}, {"chroma_upsampling": "nearest"}


def _spec(**changes: Any) -> GeneratorSpec:
    values: dict[str, Any] = {
        "ngf": 4,
        "n_downsample": 1,
        "n_blocks": 1,
        "norm": "none",
        "label_nc": 34,
        "use_instance": False,
        "residual": True,
        "codec": "hevc",
        "quality": 42,
        "phase": 3,
    }
    return GeneratorSpec(**{**values, **changes})


def test_a_record_without_an_option_has_its_legacy_value() -> None:
    assert decode_options("hevc", LINEAR) == LINEAR
    assert decode_options("hevc", NEAREST) == NEAREST
    assert decode_options("hevc", {"threads": 1}) == NEAREST  # recorded before the option existed
    assert decode_options("hevc", None) == NEAREST
    assert decode_options("jpeg", {"anything": 1}) == {}  # a codec whose picture has no options


def test_the_spec_records_the_options_as_format_version_8(tmp_path: Path) -> None:
    spec = _spec(codec_options=LINEAR)
    assert spec.format_version == 8 and spec.to_json()["codec_options"] == LINEAR
    assert "codec_options" in SPEC_KEYS[8] and "codec_options" not in SPEC_KEYS[7]
    path = export_generator(tmp_path / "g.safetensors", spec.build_generator(), spec)
    assert load_generator(path)[1] == spec
    with pytest.raises(ValueError, match="unknown to generator format version 7"):
        GeneratorSpec.from_json(spec.to_json(), 7)
    older = _spec()
    assert older.codec_options is None and older.format_version < 8 and _spec(codec_options={}) == older
    # the generator's input is decoded as it was trained on; an export without options had the legacy picture
    assert (
        spec.decode_options("hevc") == LINEAR
        and _spec(codec_options=NEAREST).decode_options("hevc") == NEAREST
    )
    assert older.decode_options("hevc") == NEAREST
    assert spec.decode_options("jpeg") == {}  # another codec (a forced run): that codec's defaults
    with pytest.raises(ValueError, match="codec_options needs the codec"):
        _spec(codec=None, codec_options=LINEAR)
    with pytest.raises(ValueError, match="codec_options must map names to plain values"):
        _spec(codec_options={"chroma_upsampling": ["linear"]})
    with pytest.raises(ValueError, match="key 'codec_options' must be an object"):
        GeneratorSpec.from_json({**spec.to_json(), "codec_options": "linear"}, 8)


def test_evaluation_warns_of_a_model_trained_on_pictures_decoded_otherwise(tmp_path: Path, capsys) -> None:
    spec = _spec(codec_options=NEAREST)
    torch.manual_seed(0)
    path = export_generator(tmp_path / "g.safetensors", spec.build_generator(), spec)

    def load(options: dict[str, Any]) -> str:
        load_methods([str(path)], "hevc", [42], 34, torch.device("cpu"), decode_options=options)
        return capsys.readouterr().out

    assert "WARNING" not in load(NEAREST)
    printed = load(LINEAR)
    assert "WARNING: model" in printed and "'nearest'" in printed and "'linear'" in printed
