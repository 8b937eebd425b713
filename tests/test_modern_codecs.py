"""AVIF (AV1 intra) and lossy JPEG XL as codecs of their own: round trip, rate, bitstream, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.codecs import CodecError, CodecUnavailable, get_codec
from pipeline.data.codecs import jxl as jxl_module

LADDER = {"avif": [10, 40, 70], "jxl": [10, 40, 70]}
GOOD_QUALITY = {"avif": 70, "jxl": 80}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("name", ["avif", "jxl"])
def test_roundtrip(name: str, sample_image: np.ndarray) -> None:
    codec = get_codec(name)
    assert codec.quality_range == (0, 100) and codec.higher_quality_is_better
    result = codec.roundtrip(sample_image, GOOD_QUALITY[name])
    assert result.decoded.shape == sample_image.shape and result.decoded.dtype == np.uint8
    height, width = sample_image.shape[:2]
    assert result.bpp == 8 * len(result.bitstream) / (width * height)
    assert psnr(sample_image, result.decoded) > 30
    assert np.array_equal(codec.decode(result.bitstream), result.decoded)
    assert codec.encode(sample_image, GOOD_QUALITY[name]) == result.bitstream  # deterministic


@pytest.mark.parametrize("name", ["avif", "jxl"])
def test_rate_and_distortion_follow_quality(name: str, sample_image: np.ndarray) -> None:
    codec = get_codec(name)
    results = [codec.roundtrip(sample_image, q) for q in LADDER[name]]
    sizes = [len(r.bitstream) for r in results]
    errors = [psnr(sample_image, r.decoded) for r in results]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes
    assert errors == sorted(errors), errors


@pytest.mark.parametrize("name", ["avif", "jxl"])
@pytest.mark.parametrize("size", [(251, 127), (33, 17)])
def test_odd_sizes(name: str, size: tuple[int, int], sample_image: np.ndarray) -> None:
    width, height = size
    image = np.ascontiguousarray(sample_image[:height, :width])
    result = get_codec(name).roundtrip(image, GOOD_QUALITY[name])
    assert result.decoded.shape == (height, width, 3)
    assert psnr(image, result.decoded) > 25


def test_avif_counts_the_av1_stream_and_decodes_as_libavif(sample_image: np.ndarray) -> None:
    codec = get_codec("avif")
    bitstream = codec.encode(sample_image, 50)
    buf = io.BytesIO()
    Image.fromarray(sample_image).save(
        buf, format="AVIF", quality=50, speed=6, max_threads=1, subsampling="4:2:0"
    )
    with Image.open(io.BytesIO(buf.getvalue())) as image:
        reference = np.asarray(image.convert("RGB"))
    assert np.array_equal(codec.decode(bitstream), reference)
    height, width = sample_image.shape[:2]
    assert bitstream[:4] == bytes([width >> 8, width & 255, height >> 8, height & 255])
    assert bitstream[4] == 0x81  # av1C marker and version
    assert (bitstream[8] >> 3) & 15 in (1, 2)  # AV1 OBUs: a temporal delimiter or sequence header first
    assert len(bitstream) < len(buf.getvalue()) - 200  # the container is not counted


def test_jxl_is_the_bare_codestream(sample_image: np.ndarray) -> None:
    import imagecodecs

    codec = get_codec("jxl")
    bitstream = codec.encode(sample_image, 60)
    assert bitstream.startswith(b"\xff\x0a")
    assert np.array_equal(codec.decode(bitstream), imagecodecs.jpegxl_decode(bitstream))
    assert get_codec("jxl", single_thread=True).encode(sample_image, 60) == bitstream
    assert get_codec("jxl", threads=2).encode(sample_image, 60) == bitstream


def test_foreign_bitstreams_and_bad_options(sample_image: np.ndarray) -> None:
    jpeg = get_codec("jpeg").encode(sample_image, 50)
    for name in ("avif", "jxl"):
        with pytest.raises(CodecError, match=name):
            get_codec(name).decode(jpeg)
        with pytest.raises(ValueError, match=r"\[0, 100\]"):
            get_codec(name).encode(sample_image, 101)
    broken = get_codec("avif").encode(sample_image, 50)
    with pytest.raises(CodecError, match="avif"):
        get_codec("avif").decode(broken[:40])
    with pytest.raises(ValueError, match="speed"):
        get_codec("avif", speed=11)
    with pytest.raises(ValueError, match="effort"):
        get_codec("jxl", effort=0)


def test_missing_library_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import imagecodecs

    class NoJxl:
        available = False

    monkeypatch.setattr(imagecodecs, "JPEGXL", NoJxl)
    with pytest.raises(CodecUnavailable, match="without JPEG XL"):
        jxl_module.JPEGXLCodec()
    from PIL import features

    monkeypatch.setattr(features, "check", lambda name: False)
    with pytest.raises(CodecUnavailable, match="libavif"):
        get_codec("avif")
