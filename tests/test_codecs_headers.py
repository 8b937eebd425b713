"""Bitstream headers: every codec reads its stream's image size without decoding, and a stream whose header
disagrees with the size its container records is refused before it is decoded."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.codecs import CodecError, CodecUnavailable, LabelCoder, get_codec
from pipeline.data.codecs.headers import av1_size, bpg_size, jpeg_size, jxl_size, png_size, webp_size

CODECS = [("jpeg", 50), ("webp", 50), ("jpeg2000", 100), ("hevc", 42), ("avif", 50), ("jxl", 80)]
SIZES = [(1, 1), (17, 9), (65, 33), (130, 7), (256, 128), (300, 200)]


def codec_or_skip(name: str):
    try:
        return get_codec(name)
    except CodecUnavailable as err:
        pytest.skip(str(err))


def image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def streams() -> dict[str, list[tuple[tuple[int, int], bytes]]]:
    """Each available codec's bitstreams of :data:`SIZES` (those it accepts)."""
    out: dict[str, list[tuple[tuple[int, int], bytes]]] = {}
    for name, quality in CODECS:
        try:
            codec = get_codec(name)
        except CodecUnavailable:
            continue
        out[name] = [
            ((w, h), codec.encode(image(w, h), quality)) for w, h in SIZES if min(w, h) >= codec.min_size
        ]
    return out


@pytest.mark.parametrize("name", [name for name, _ in CODECS])
def test_stream_size_is_the_decoded_size(name: str, streams: dict) -> None:
    codec = codec_or_skip(name)
    for (width, height), data in streams[name]:
        assert codec.stream_size(data) == (width, height)
        assert codec.decode(data).shape[:2] == (height, width)
        codec.check_size(data, width, height)
        with pytest.raises(CodecError, match=rf"header says {width}x{height}, the container {width + 1}x"):
            codec.check_size(data, width + 1, height)


@pytest.mark.parametrize("name", [name for name, _ in CODECS])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 400), junk=st.binary(max_size=64), flip=st.integers(0, 63))
def test_a_damaged_header_is_a_codec_error(
    name: str, streams: dict, cut: int, junk: bytes, flip: int
) -> None:
    """Truncated, garbled or random streams: a size or a CodecError, never another exception."""
    codec = codec_or_skip(name)
    data = streams[name][-1][1]
    flipped = bytearray(data)
    flipped[flip % len(data)] ^= 0xFF
    for candidate in (data[:cut], junk, bytes(flipped), data[: min(cut, 40)] + junk):
        if not candidate:
            continue
        try:
            size = codec.stream_size(candidate)
        except CodecError:
            continue
        assert isinstance(size, tuple) and all(isinstance(v, int) and v >= 0 for v in size)


def test_forged_sizes_are_refused_before_decoding() -> None:
    """Headers that claim a huge image: read as claimed, refused against the container's size."""
    jpeg = get_codec("jpeg")
    data = bytearray(jpeg.encode(image(64, 48), 80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    assert jpeg_size(bytes(data)) == (60000, 60000)
    with pytest.raises(CodecError, match="60000x60000, the container 64x48"):
        jpeg.check_size(bytes(data), 64, 48)

    hevc = codec_or_skip("hevc")
    stream = hevc.encode(image(256, 128), 42)
    forged = struct.pack(">HH", 4096, 4096) + stream[4:]  # the size header disagrees with the SPS
    with pytest.raises(CodecError, match="SPS codes a 256x128 picture for a 4096x4096 image"):
        hevc.stream_size(forged)
    small = struct.pack(">HH", 16, 16) + stream[4:]  # the SPS is far larger than the size header
    with pytest.raises(CodecError, match="256x128 picture for a 16x16"):
        hevc.check_size(small, 16, 16)

    avif = codec_or_skip("avif")
    stream = avif.encode(image(64, 32), 50)
    with pytest.raises(CodecError, match="AV1 sequence codes 64x32 for a 640x32 image"):
        avif.stream_size(struct.pack(">HH", 640, 32) + stream[4:])


def test_format_headers() -> None:
    # BPG: magic, two format bytes, ue7 width and height (no binaries needed to read them)
    assert bpg_size(b"BPG\xfb\x00\x00" + bytes([0x90, 0x00]) + bytes([0x81, 0x80, 0x00])) == (2048, 16384)
    with pytest.raises(CodecError, match="truncated"):
        bpg_size(b"BPG\xfb\x00\x00\x90")
    with pytest.raises(CodecError, match="not a BPG"):
        get_codec("bpg").check_size(b"\x89PNG....", 1, 1)
    assert png_size(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + struct.pack(">II", 7, 9)) == (7, 9)
    with pytest.raises(CodecError, match="JPEG: no frame header"):
        jpeg_size(b"\xff\xd8\xff\xda\x00\x02")
    with pytest.raises(CodecError, match="not a WebP"):
        webp_size(b"RIFF\x00\x00\x00\x00WAVE" + bytes(20))
    # JPEG XL, LSB first: small form (1), height (1 + 1) * 8 (00001), ratio 3:2 (100): 24 x 16
    assert jxl_size(b"\xff\x0a\x03\x01") == (24, 16)
    with pytest.raises(CodecError, match="truncated size header"):
        jxl_size(b"\xff\x0a\x03")


def av1_sequence_header(width: int, height: int, timing: bool) -> bytes:
    """A full (not reduced) AV1 sequence header OBU with one operating point, optionally with timing info
    and a decoder model (the branches libavif's still images do not take)."""
    bits: list[int] = []

    def put(value: int, n: int) -> None:
        bits.extend((value >> (n - 1 - i)) & 1 for i in range(n))

    put(0, 3)  # seq_profile
    put(0, 1)  # still_picture
    put(0, 1)  # reduced_still_picture_header
    put(int(timing), 1)  # timing_info_present_flag
    if timing:
        put(1, 32)  # num_units_in_display_tick
        put(30, 32)  # time_scale
        put(1, 1)  # equal_picture_interval
        put(0b00101, 5)  # uvlc: two leading zeros, then 1, then 2 bits -> 4
        put(1, 1)  # decoder_model_info_present_flag
        put(9, 5)  # buffer_delay_length_minus_1 -> 10 bits
        put(1, 32)  # num_units_in_decoding_tick
        put(0, 10)  # buffer_removal_time_length_minus_1, frame_presentation_time_length_minus_1
    put(1, 1)  # initial_display_delay_present_flag
    put(0, 5)  # operating_points_cnt_minus_1
    put(0, 12)  # operating_point_idc
    put(8, 5)  # seq_level_idx (> 7: a tier bit follows)
    put(0, 1)  # seq_tier
    if timing:
        put(1, 1)  # decoder_model_present_for_this_op
        put(0, 10 + 10 + 1)  # decoder/encoder buffer delay, low_delay_mode_flag
    put(1, 1)  # initial_display_delay_present_for_this_op
    put(3, 4)  # initial_display_delay_minus_1
    put(15, 4)  # frame_width_bits_minus_1
    put(15, 4)  # frame_height_bits_minus_1
    put(width - 1, 16)
    put(height - 1, 16)
    bits.extend([0] * (-len(bits) % 8))
    payload = bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))
    temporal_delimiter = b"\x12\x00"
    return temporal_delimiter + bytes([0x0A, len(payload)]) + payload


@pytest.mark.parametrize("timing", [False, True])
def test_full_av1_sequence_headers(timing: bool) -> None:
    assert av1_size(av1_sequence_header(1920, 1080, timing)) == (1920, 1080)
    payload = av1_sequence_header(1920, 1080, timing)[4:]
    with pytest.raises(CodecError, match="truncated AV1 sequence header"):
        av1_size(bytes([0x0A, 3]) + payload[:3])  # the OBU ends inside the header
    with pytest.raises(CodecError, match="OBU longer than the stream"):
        av1_size(bytes([0x0A, len(payload) + 1]) + payload)
    with pytest.raises(CodecError, match="no sequence header"):
        av1_size(b"\x12\x00")


@pytest.mark.parametrize("method", ["jxl", "webp", "png"])
@pytest.mark.parametrize("downsample", [1, 4])
def test_label_coder_headers(method: str, downsample: int) -> None:
    try:
        coder = LabelCoder(method, downsample)
    except CodecUnavailable as err:
        pytest.skip(str(err))
    label = np.random.default_rng(1).integers(0, 30, (77, 131), dtype=np.uint8)
    data = coder.encode(label)
    coded = (-(-131 // downsample), -(-77 // downsample))
    assert coder.stream_size(data) == coded
    coder.check_size(data, (131, 77))
    with pytest.raises(CodecError, match=f"header says {coded[0]}x{coded[1]}"):
        coder.check_size(data, (262, 77))
