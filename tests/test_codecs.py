"""Codecs and the label-map coder on a real Cityscapes frame and label map."""

from __future__ import annotations

import io
import struct
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data.codecs import (
    Codec,
    CodecError,
    CodecUnavailable,
    LabelCoder,
    available_codecs,
    get_codec,
    register_codec,
)
from pipeline.data.codecs import base as codec_base
from pipeline.data.codecs import label as label_coding

# A quality giving good fidelity, then qualities from worst to best, on each codec's own scale.
GOOD_QUALITY = {"jpeg": 90, "webp": 90, "jpeg2000": 200, "hevc": 27, "bpg": 27}
LADDER = {
    "jpeg": [20, 50, 90],
    "webp": [20, 50, 90],
    "jpeg2000": [20, 100, 400],
    "hevc": [47, 37, 27],
    "bpg": [47, 37, 27],
}
IN_PROCESS = ["jpeg", "webp", "jpeg2000", "hevc"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def label_map(cityscapes_root: Path) -> np.ndarray:
    """A real labelIds map at the default working size 512x256."""
    path = sorted((cityscapes_root / "gtFine").rglob("*_gtFine_labelIds.png"))[0]
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return cv2.resize(label, (512, 256), interpolation=cv2.INTER_NEAREST)


def bpg_or_skip() -> Codec:
    codec = get_codec("bpg")
    if not codec.is_available():
        pytest.skip("bpgenc/bpgdec not found on PATH (install libbpg to run the BPG tests)")
    return codec


def test_registry_lists_every_codec() -> None:
    assert available_codecs() == sorted(["avif", "bpg", "hevc", "jpeg", "jpeg2000", "jxl", "webp"])
    for name in available_codecs():
        codec = get_codec(name)
        assert codec.name == name
        lo, hi = codec.quality_range
        assert lo < hi
    assert get_codec("hevc").higher_quality_is_better is False
    assert get_codec("bpg").higher_quality_is_better is False
    assert get_codec("jpeg").higher_quality_is_better is True


@pytest.mark.parametrize("name", IN_PROCESS)
def test_roundtrip(name: str, sample_image: np.ndarray) -> None:
    result = get_codec(name).roundtrip(sample_image, GOOD_QUALITY[name])
    assert isinstance(result.bitstream, bytes)
    assert result.decoded.shape == sample_image.shape
    assert result.decoded.dtype == np.uint8
    height, width = sample_image.shape[:2]
    assert result.bpp == 8 * len(result.bitstream) / (width * height)
    assert psnr(sample_image, result.decoded) > 25
    assert np.array_equal(get_codec(name).decode(result.bitstream), result.decoded)


@pytest.mark.parametrize("name", IN_PROCESS)
def test_rate_and_distortion_follow_quality(name: str, sample_image: np.ndarray) -> None:
    codec = get_codec(name)
    results = [codec.roundtrip(sample_image, q) for q in LADDER[name]]
    sizes = [len(r.bitstream) for r in results]
    errors = [psnr(sample_image, r.decoded) for r in results]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes
    assert errors == sorted(errors), errors


def test_hevc_is_deterministic_and_matches_libheif(sample_image: np.ndarray) -> None:
    """With ``chroma_upsampling="nearest"`` the picture is libheif's own decode of its own file."""
    import pillow_heif

    codec = get_codec("hevc", chroma_upsampling="nearest")
    bitstream = codec.encode(sample_image, 37)
    assert codec.encode(sample_image, 37) == bitstream
    assert get_codec("hevc").encode(sample_image, 37) == bitstream  # the option is the decoder's only
    decoded = codec.decode(bitstream)
    assert np.array_equal(codec.decode(bitstream), decoded)

    # The same picture decoded from the HEIF file that libheif itself writes.
    height, width = sample_image.shape[:2]
    heif = io.BytesIO()
    pillow_heif.from_bytes("RGB", (width, height), sample_image.tobytes()).save(
        heif, quality=50, enc_params={"x265:qp": "37"}, chroma=420, save_nclx_profile=False
    )
    assert np.array_equal(np.asarray(pillow_heif.open_heif(io.BytesIO(heif.getvalue()))), decoded)
    # Only the raw stream is counted: size header + Annex-B NAL units, smaller than the HEIF file.
    assert struct.unpack_from(">HH", bitstream) == (width, height)
    assert bitstream[4:8] == b"\x00\x00\x00\x01"
    assert len(bitstream) < len(heif.getvalue())


@pytest.mark.parametrize("size", [(250, 126), (251, 127), (33, 17)])
def test_hevc_odd_sizes(size: tuple[int, int], sample_image: np.ndarray) -> None:
    width, height = size
    image = np.ascontiguousarray(sample_image[:height, :width])
    result = get_codec("hevc").roundtrip(image, 27)
    assert result.decoded.shape == (height, width, 3)
    assert psnr(image, result.decoded) > 25


def test_hevc_rejects_foreign_bitstream(sample_image: np.ndarray) -> None:
    jpeg = get_codec("jpeg").encode(sample_image, 50)
    with pytest.raises(CodecError, match="hevc"):
        get_codec("hevc").decode(jpeg)


def test_bpg_roundtrip_and_rate(sample_image: np.ndarray) -> None:
    codec = bpg_or_skip()
    result = codec.roundtrip(sample_image, GOOD_QUALITY["bpg"])
    assert result.decoded.shape == sample_image.shape
    assert psnr(sample_image, result.decoded) > 25
    sizes = [len(codec.encode(sample_image, q)) for q in LADDER["bpg"]]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes


@pytest.mark.parametrize("tool", ["bpgenc", "bpgdec"])
def test_bpg_missing_binary_is_named(tool: str, tmp_path: Path, sample_image: np.ndarray) -> None:
    missing = tmp_path / tool
    codec = get_codec("bpg", **{tool: str(missing)})  # construction is lazy: no error yet
    assert codec.is_available() is False
    with pytest.raises(CodecUnavailable, match=tool) as info:
        if tool == "bpgenc":
            codec.encode(sample_image, 30)
        else:
            codec.decode(b"BPG\xfb not really")
    assert str(missing) in str(info.value)


def write_script(path: Path, body: str) -> str:
    path.write_text(f"#!{sys.executable}\nimport shutil, sys\nargs = sys.argv[1:]\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_bpg_plumbing_with_stand_in_binaries(tmp_path: Path, sample_image: np.ndarray) -> None:
    """Stand-ins that copy the PNG through check the arguments, temp files and read-back."""
    check = 'assert args[:5] == ["-q", "30", "-f", "420", "-o"], args'
    encoder = write_script(tmp_path / "bpgenc", f"{check}\nshutil.copy(args[6], args[5])")
    decoder = write_script(tmp_path / "bpgdec", 'assert args[0] == "-o", args\nshutil.copy(args[2], args[1])')
    result = get_codec("bpg", bpgenc=encoder, bpgdec=decoder).roundtrip(sample_image, 30)
    assert result.bitstream.startswith(b"\x89PNG")
    assert np.array_equal(result.decoded, sample_image)

    failing = write_script(tmp_path / "failing", 'sys.stderr.write("bad input\\n")\nsys.exit(3)')
    with pytest.raises(CodecError, match="bad input"):
        get_codec("bpg", bpgenc=failing, bpgdec=decoder).encode(sample_image, 30)


@pytest.mark.parametrize(
    ("image", "quality", "message"),
    [
        (np.zeros((16, 16, 3), np.float32), 50, "uint8"),
        (np.zeros((16, 16), np.uint8), 50, "H x W x 3"),
        (np.zeros((16, 16, 4), np.uint8), 50, "H x W x 3"),
        (np.zeros((0, 16, 3), np.uint8), 50, "non-empty"),
        (np.zeros((16, 16, 3), np.uint8), 101, r"\[0, 100\]"),
        (np.zeros((16, 16, 3), np.uint8), -1, r"\[0, 100\]"),
        (np.zeros((16, 16, 3), np.uint8), 50.0, "integer"),
        (np.zeros((16, 16, 3), np.uint8), True, "integer"),
    ],
)
def test_bad_input(image: np.ndarray, quality: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_codec("jpeg").encode(image, quality)


def test_bad_names_options_and_sizes(sample_image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="known codecs: avif, bpg, hevc, jpeg, jpeg2000, jxl, webp"):
        get_codec("h266")
    with pytest.raises(ValueError, match="bad options"):
        get_codec("jpeg", speed=3)
    with pytest.raises(ValueError, match=r"\[0, 51\]"):
        get_codec("hevc").encode(sample_image, 52)
    with pytest.raises(ValueError, match="at least 32x32"):
        get_codec("jpeg2000").encode(sample_image[:16, :16].copy(), 100)
    with pytest.raises(ValueError, match="non-empty bitstream"):
        get_codec("webp").decode(b"")


def test_a_new_codec_is_one_small_class(monkeypatch: pytest.MonkeyPatch, sample_image: np.ndarray) -> None:
    monkeypatch.setattr(codec_base, "_REGISTRY", dict(codec_base._REGISTRY))

    @register_codec
    class PNGCodec(Codec):
        name = "png-test"
        quality_range = (0, 9)

        def _encode(self, rgb: np.ndarray, quality: int) -> bytes:
            return cv2.imencode(".png", rgb, [cv2.IMWRITE_PNG_COMPRESSION, quality])[1].tobytes()

        def _decode(self, data: bytes) -> np.ndarray:
            return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)

    assert "png-test" in available_codecs()
    assert np.array_equal(get_codec("png-test").roundtrip(sample_image, 1).decoded, sample_image)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        get_codec("png-test").encode(sample_image, 10)
    with pytest.raises(ValueError, match="already registered"):
        register_codec(PNGCodec)


def available_label_methods() -> list[str]:
    methods = []
    for method in ("jxl", "webp", "png"):
        try:
            LabelCoder(method)
        except CodecUnavailable:
            continue
        methods.append(method)
    return methods


@pytest.mark.parametrize("method", ["jxl", "webp", "png"])
def test_label_coder_is_lossless(method: str, label_map: np.ndarray) -> None:
    if method not in available_label_methods():
        pytest.skip(f"label coder {method} is not available here (jxl needs imagecodecs)")
    coder = LabelCoder(method)
    assert coder.method == method
    data = coder.encode(label_map)
    assert isinstance(data, bytes)
    decoded = coder.decode(data, size=(512, 256))
    assert decoded.dtype == np.uint8
    assert np.array_equal(decoded, label_map)
    assert np.array_equal(coder.decode(data), label_map)
    assert 8 * len(data) / label_map.size < 1.0  # far below the 8 bpp of the raw map


def test_label_coder_downsample_is_nearest_neighbour(label_map: np.ndarray) -> None:
    label = np.ascontiguousarray(label_map[:255, :511])  # odd size: partial blocks at the edges
    coder = LabelCoder("auto", downsample=2)
    data = coder.encode(label)
    ys, xs = np.arange(255) // 2 * 2, np.arange(511) // 2 * 2
    expected = label[np.ix_(ys, xs)]
    decoded = coder.decode(data, size=(511, 255))
    assert np.array_equal(decoded, expected)
    assert np.array_equal(coder.reconstruct(label), expected)
    assert coder.decode(data).shape == (128, 256)
    assert len(data) < len(LabelCoder(coder.method).encode(label))
    with pytest.raises(ValueError, match="does not fit"):
        coder.decode(data, size=(512, 260))


def test_label_coder_auto_falls_back_without_jxl(
    monkeypatch: pytest.MonkeyPatch, label_map: np.ndarray
) -> None:
    _, encode, decode = label_coding._LABEL_METHODS["jxl"]
    monkeypatch.setitem(label_coding._LABEL_METHODS, "jxl", (lambda: False, encode, decode))
    coder = LabelCoder("auto")
    assert coder.method in ("webp", "png")
    assert np.array_equal(coder.decode(coder.encode(label_map)), label_map)
    with pytest.raises(CodecUnavailable, match="imagecodecs"):
        LabelCoder("jxl")


def test_label_coder_bad_input(label_map: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown label coder"):
        LabelCoder("gif")
    with pytest.raises(ValueError, match="downsample"):
        LabelCoder(downsample=0)
    coder = LabelCoder()
    with pytest.raises(ValueError, match="uint8"):
        coder.encode(label_map.astype(np.uint16))
    with pytest.raises(ValueError, match="uint8"):
        coder.encode(np.dstack([label_map] * 3))
    with pytest.raises(ValueError, match="does not fit"):
        coder.decode(coder.encode(label_map), size=(256, 128))


def test_hevc_thread_count_does_not_change_the_bitstream(sample_image: np.ndarray) -> None:
    pooled = get_codec("hevc").encode(sample_image, 40)
    assert get_codec("hevc", single_thread=True).encode(sample_image, 40) == pooled
    assert get_codec("hevc", threads=2).encode(sample_image, 40) == pooled
    with pytest.raises(ValueError, match="threads"):
        get_codec("hevc", threads=-1)
