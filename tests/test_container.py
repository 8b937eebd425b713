"""The .jse container: round trip, every corrupt-input class, and a property-based test of the parser."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.compress.container import (
    FORMAT_VERSION,
    MAGIC,
    MAX_PIXELS,
    MAX_SIDE,
    Container,
    ContainerError,
    ModelRef,
    pack,
    parse,
    read_container,
)

SHA = "ab" * 32


def _container(**changes: object) -> Container:
    values: dict[str, object] = {
        "codec": "hevc",
        "quality": 42,
        "width": 256,
        "height": 128,
        "label_coder": "png",
        "label_downsample": 1,
        "codec_bitstream": b"\x01\x00\x00\x80" + bytes(range(50)),
        "label_bitstream": b"label-bits",
        "model": ModelRef("hevc-se-q42", "3", SHA),
    }
    values.update(changes)
    return Container(**values)  # type: ignore[arg-type]


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


def test_round_trip_and_size_accounting() -> None:
    c = _container()
    data = pack(c)
    assert data.startswith(MAGIC) and data[len(MAGIC)] == 2  # no correction scale: the version-2 bytes
    assert parse(data) == c
    assert len(data) == c.header_bytes() + len(c.codec_bitstream) + len(c.label_bitstream)
    bpp = c.bpp()
    assert bpp["total"] == pytest.approx(8 * len(data) / (256 * 128))
    assert bpp["total"] == pytest.approx(bpp["codec"] + bpp["label"] + bpp["header"])


def test_a_correction_scale_is_written_as_version_3_and_read_back() -> None:
    plain = pack(_container())
    for code in (0, 128, 255):
        c = _container(correction_scale=code)
        data = pack(c)
        assert data[len(MAGIC)] == 3
        assert len(data) == len(plain) + 2  # its length byte and the code
        assert parse(data) == c and parse(data).correction_scale == code
    with pytest.raises(ContainerError, match="correction scale code 256"):
        _container(correction_scale=256)
    scaled = pack(_container(correction_scale=7))
    at = len(plain) - 4 - len(_container().codec_bitstream) - len(_container().label_bitstream) - 8
    assert scaled[at : at + 2] == bytes([1, 7])
    two_bytes = scaled[:at] + bytes([2, 7, 7]) + scaled[at + 2 : -4]
    with pytest.raises(ContainerError, match="a version 3 correction scale is 0 or 1 bytes, got 2"):
        parse(_with_crc(two_bytes))


def test_correction_gains_are_written_as_version_5_and_read_back() -> None:
    """model.correction_scale=channels: one code per part of the correction head, in version 3's field."""
    plain = pack(_container())
    gains = (0, 192, 128, 255, 7)
    for withheld in (False, True):
        fields = {"label_coder": "none", "label_bitstream": b""} if withheld else {}
        c = _container(correction_gains=list(gains), **fields)
        data = pack(c)
        assert data[len(MAGIC)] == FORMAT_VERSION == 5 and c.correction_gains == gains
        assert parse(data) == c and parse(data).correction_scale is None and c.map_withheld == withheld
    data = pack(_container(correction_gains=gains))
    assert len(data) == len(plain) + 1 + len(gains)  # its length byte and the codes
    at = len(plain) - 4 - len(_container().codec_bitstream) - len(_container().label_bitstream) - 8
    assert data[at : at + 1 + len(gains)] == bytes([len(gains), *gains])
    with pytest.raises(ContainerError, match="a correction scale or correction gains, not both"):
        _container(correction_scale=3, correction_gains=gains)
    with pytest.raises(ContainerError, match="must be 2 to 255 codes in 0..255, got 1"):
        _container(correction_gains=(3,))
    with pytest.raises(ContainerError, match="must be 2 to 255 codes in 0..255"):
        _container(correction_gains=(3, 256))
    as_four = data[: len(MAGIC)] + bytes([4]) + data[len(MAGIC) + 1 : -4]
    with pytest.raises(ContainerError, match="a version 4 correction scale is 0 or 1 bytes, got 5"):
        parse(_with_crc(as_four))
    with pytest.raises(ContainerError, match="truncated container: correction scale needs 5 bytes"):
        parse(_with_crc(data[: at + 1]))


def test_a_file_without_a_label_map_is_version_4_and_older_versions_refuse_one() -> None:
    """The encoder withheld the map (compress --send-map rd): label coder none, no segmenter, no label
    stream; with or without a correction scale. Versions 1-3 carry a map or a segmenter."""
    for code in (None, 9):
        c = _container(label_coder="none", label_bitstream=b"", correction_scale=code)
        data = pack(c)
        assert data[len(MAGIC)] == 4 and c.map_withheld
        assert parse(data) == c and parse(data).correction_scale == code
        assert c.bpp()["label"] == 0.0
    assert not _container().map_withheld
    assert not _container(label_coder="none", label_bitstream=b"", segmenter=SHA).map_withheld
    with pytest.raises(ContainerError, match="without a label map has down-sampling 1 and no label stream"):
        _container(label_coder="none", label_bitstream=b"x")
    with pytest.raises(ContainerError, match="without a label map has down-sampling 1"):
        _container(label_coder="none", label_bitstream=b"", label_downsample=4)
    data = pack(_container(label_coder="none", label_bitstream=b"", correction_scale=9))
    as_three = data[: len(MAGIC)] + bytes([3]) + data[len(MAGIC) + 1 : -4]
    with pytest.raises(ContainerError, match="a version 3 file must carry a label map or name its segmenter"):
        parse(_with_crc(as_three))


def test_model_reference_variants() -> None:
    for model in (ModelRef(), ModelRef(sha256=SHA), ModelRef("m", "1")):
        assert parse(pack(_container(model=model))).model == model
    assert ModelRef("hevc-se-q42", "3").uri == "models:/hevc-se-q42/3"
    assert not ModelRef()
    with pytest.raises(ContainerError, match="both a name and a version"):
        ModelRef("m", "")
    with pytest.raises(ContainerError, match="sha256"):
        ModelRef(sha256="xyz")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 0}, "outside"),
        ({"height": MAX_SIDE + 1}, "outside"),
        ({"width": MAX_SIDE, "height": MAX_PIXELS // MAX_SIDE + 1}, "absurd"),
        ({"codec": "HEVC!"}, "codec name"),
        ({"label_coder": "gif"}, "label coder"),
        ({"label_downsample": 0}, "down-sampling"),
        ({"codec_bitstream": b""}, "empty"),
    ],
)
def test_bad_values_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ContainerError, match=message):
        _container(**changes)


def _corrupt_cases() -> dict[str, tuple[bytes, str]]:
    good = pack(_container())
    body = good[:-4]
    sizes = len(MAGIC) + 1 + 5 + 2  # magic, version, str8 "hevc", quality: width comes next
    huge = body[:sizes] + struct.pack(">II", 100_000, 100_000) + body[sizes + 8 :]
    tail = struct.pack(">II", len(_container().codec_bitstream), len(_container().label_bitstream))
    at = body.index(tail)
    past_end = body[:at] + struct.pack(">II", 0xFFFFFFF0, 4) + body[at + 8 :]
    return {
        "empty": (b"", "magic"),
        "wrong magic": (b"PK\x03\x04" + good[4:], "magic"),
        "truncated header": (good[:12], "truncated"),
        "truncated payload": (good[: len(good) // 2], "truncated"),
        "no checksum": (good[:-4], "truncated"),
        "newer version": (_with_crc(MAGIC + bytes([FORMAT_VERSION + 1]) + body[len(MAGIC) + 1 :]), "version"),
        "absurd size": (_with_crc(huge), "absurd|outside"),
        "length past end": (_with_crc(past_end), "truncated"),
        "flipped byte": (good[:-10] + bytes([good[-10] ^ 0x40]) + good[-9:], "CRC"),
        "trailing bytes": (good + b"\x00", "unexpected bytes"),
        "bad utf-8 name": (good.replace(b"hevc-se-q42", b"hevc-se-q4\xff"), "UTF-8|CRC"),
    }


@pytest.mark.parametrize("case", list(_corrupt_cases()))
def test_corrupt_containers_give_one_line_errors(case: str) -> None:
    data, message = _corrupt_cases()[case]
    with pytest.raises(ContainerError, match=message) as err:
        parse(data)
    assert "\n" not in str(err.value)


def test_read_container_names_the_file(tmp_path) -> None:
    path = tmp_path / "x.jse"
    path.write_bytes(b"nope")
    with pytest.raises(ContainerError, match=r"x\.jse: not a \.jse container"):
        read_container(path)
    with pytest.raises(ContainerError, match="cannot read"):
        read_container(tmp_path / "missing.jse")


containers = st.builds(
    Container,
    codec=st.from_regex(r"[a-z0-9_]{1,8}", fullmatch=True),
    quality=st.integers(0, 0xFFFF),
    width=st.integers(1, 4096),
    height=st.integers(1, 4096),
    label_coder=st.sampled_from(["jxl", "webp", "png"]),
    label_downsample=st.integers(1, 64),
    codec_bitstream=st.binary(min_size=1, max_size=64),
    label_bitstream=st.binary(min_size=1, max_size=64),
    model=st.builds(ModelRef, sha256=st.sampled_from(["", SHA]))
    | st.builds(
        ModelRef,
        name=st.text(min_size=1, max_size=20),
        version=st.from_regex(r"[0-9]{1,4}", fullmatch=True),
        sha256=st.sampled_from(["", SHA]),
    ),
)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=300))
def test_parser_on_arbitrary_bytes(data: bytes) -> None:
    """Any input either parses or raises ContainerError: never another exception."""
    try:
        parse(data)
    except ContainerError as err:
        assert "\n" not in str(err)


@FAST
@given(containers)
def test_pack_parse_round_trip(container: Container) -> None:
    assert parse(pack(container)) == container


@FAST
@given(containers, st.data())
def test_every_truncation_and_mutation_is_refused(container: Container, data: st.DataObject) -> None:
    blob = pack(container)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(ContainerError):
        parse(blob[:cut])
    at = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.integers(1, 255))
    with pytest.raises(ContainerError):
        parse(blob[:at] + bytes([blob[at] ^ flip]) + blob[at + 1 :])
