"""The HEVC codec's container code: ISO base-media boxes, HEVC NAL units and SPS fields, ``hvcC``.

libheif reads and writes HEVC pictures only inside a HEIF file, yet the codec counts only the bare
Annex-B stream; these helpers take the stream out of the file libheif writes and rebuild a minimal
HEIF around it for decoding. JPEG 2000's JP2 file uses the same box syntax (:func:`find_box`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.data.codecs.base import CodecError

NAL_VPS, NAL_SPS, NAL_PPS = 32, 33, 34
NAL_SEI = (39, 40)
START_CODE = b"\x00\x00\x00\x01"


def _iter_boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """ISO base-media boxes of ``data[start:end]`` as ``(type, payload_start, box_end)``."""
    end = len(data) if end is None else end
    offset = start
    while offset < end:
        if offset + 8 > end:
            raise CodecError("truncated box header")
        size, kind = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, offset + 8)
            header = 16
        elif size == 0:
            size = end - offset
        if size < header or offset + size > end:
            raise CodecError(f"bad size {size} for box {kind!r}")
        yield kind, offset + header, offset + size
        offset += size


def find_box(data: bytes, path: list[bytes], start: int = 0, end: int | None = None) -> bytes:
    """Payload of the box at ``path`` (``meta`` is a full box: its version/flags word is skipped)."""
    for kind, payload, box_end in _iter_boxes(data, start, end):
        if kind != path[0]:
            continue
        if kind == b"meta":
            payload += 4
        if len(path) == 1:
            return data[payload:box_end]
        return find_box(data, path[1:], payload, box_end)
    raise CodecError(f"no {b'/'.join(path).decode()} box in the container")


class _BitReader:
    """MSB-first reader of an HEVC RBSP (emulation-prevention bytes already removed)."""

    def __init__(self, data: bytes, bit: int = 0, what: str = "HEVC parameter set"):
        self.data, self.bit, self.what = data, bit, what

    def u(self, n: int) -> int:
        value = 0
        for _ in range(n):
            if self.bit >= 8 * len(self.data):
                raise CodecError(f"truncated {self.what}")
            value = (value << 1) | ((self.data[self.bit >> 3] >> (7 - (self.bit & 7))) & 1)
            self.bit += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise CodecError(f"bad Exp-Golomb code in {self.what}")
        return (1 << zeros) - 1 + self.u(zeros)


def _rbsp(nal: bytes) -> bytes:
    """NAL payload without its 2-byte header and emulation-prevention bytes (00 00 03 -> 00 00)."""
    out = bytearray()
    zeros = 0
    for byte in nal[2:]:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


@dataclass(frozen=True)
class _SPSInfo:
    ptl: bytes  # general profile/tier/level, 12 bytes, as copied into hvcC
    max_sub_layers: int
    temporal_id_nesting: int
    chroma_format_idc: int
    bit_depth_luma: int
    bit_depth_chroma: int
    width: int  # after the conformance window
    height: int


def sps_size(stream: bytes) -> tuple[int, int]:
    """The picture size (after the conformance window) of the one SPS of an Annex-B HEVC stream."""
    nals = [nal.rstrip(b"\x00") for nal in stream.split(b"\x00\x00\x01")[1:]]
    sps = [nal for nal in nals if len(nal) > 2 and nal_type(nal) == NAL_SPS]
    if len(sps) != 1:
        raise CodecError(f"the HEVC stream has {len(sps)} SPS, expected one")
    info = _parse_sps(sps[0])
    return info.width, info.height


def _parse_sps(nal: bytes) -> _SPSInfo:
    """The few SPS fields an ``hvcC`` box and ``ispe`` need (H.265 7.3.2.2)."""
    rbsp = _rbsp(nal)
    if len(rbsp) < 13:
        raise CodecError("truncated HEVC SPS")
    max_sub_layers_minus1 = (rbsp[0] >> 1) & 7
    reader = _BitReader(rbsp, 8 * 13)
    if max_sub_layers_minus1:
        present = [(reader.u(1), reader.u(1)) for _ in range(max_sub_layers_minus1)]
        reader.u(2 * (8 - max_sub_layers_minus1))
        for profile_present, level_present in present:
            reader.u(88 * profile_present + 8 * level_present)
    reader.ue()  # sps_seq_parameter_set_id
    chroma = reader.ue()
    if chroma == 3:
        reader.u(1)  # separate_colour_plane_flag
    width, height = reader.ue(), reader.ue()
    if reader.u(1):  # conformance_window_flag
        left, right, top, bottom = reader.ue(), reader.ue(), reader.ue(), reader.ue()
        sub_w = 2 if chroma in (1, 2) else 1
        sub_h = 2 if chroma == 1 else 1
        width -= sub_w * (left + right)
        height -= sub_h * (top + bottom)
    return _SPSInfo(
        ptl=rbsp[1:13],
        max_sub_layers=max_sub_layers_minus1 + 1,
        temporal_id_nesting=rbsp[0] & 1,
        chroma_format_idc=chroma,
        bit_depth_luma=reader.ue() + 8,
        bit_depth_chroma=reader.ue() + 8,
        width=width,
        height=height,
    )


def nal_type(nal: bytes) -> int:
    return (nal[0] >> 1) & 0x3F


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def _hvcc(parameter_sets: list[bytes], sps: _SPSInfo) -> bytes:
    """``hvcC`` decoder configuration (ISO/IEC 14496-15 8.3.3) rebuilt from the parameter sets."""
    arrays = b""
    kinds = [NAL_VPS, NAL_SPS, NAL_PPS]
    for kind in kinds:
        nals = [nal for nal in parameter_sets if nal_type(nal) == kind]
        arrays += struct.pack(">BH", 0x80 | kind, len(nals))
        arrays += b"".join(struct.pack(">H", len(nal)) + nal for nal in nals)
    return _box(
        b"hvcC",
        b"\x01",
        sps.ptl,
        struct.pack(
            ">HBBBBHBB",
            0xF000,  # min_spatial_segmentation_idc = 0
            0xFC,  # parallelismType = 0 (unknown)
            0xFC | sps.chroma_format_idc,
            0xF8 | (sps.bit_depth_luma - 8),
            0xF8 | (sps.bit_depth_chroma - 8),
            0,  # avgFrameRate
            (sps.max_sub_layers << 3) | (sps.temporal_id_nesting << 2) | 3,  # 4-byte NAL lengths
            len(kinds),
        ),
        arrays,
    )


def heif_file(parameter_sets: list[bytes], slices: list[bytes]) -> bytes:
    """A minimal single-image HEIF file around an HEVC intra picture, for libheif to decode."""
    sps_nals = [nal for nal in parameter_sets if nal_type(nal) == NAL_SPS]
    if len(sps_nals) != 1 or not any(nal_type(nal) == NAL_PPS for nal in parameter_sets):
        raise CodecError("the HEVC stream needs exactly one SPS and a PPS")
    sps = _parse_sps(sps_nals[0])
    if sps.chroma_format_idc != 1 or sps.bit_depth_luma != 8 or sps.bit_depth_chroma != 8:
        raise CodecError("only 8-bit 4:2:0 HEVC streams are supported")
    item_data = b"".join(struct.pack(">I", len(nal)) + nal for nal in slices)
    properties = [
        _hvcc(parameter_sets, sps),
        _full_box(b"ispe", 0, 0, struct.pack(">II", sps.width, sps.height)),
    ]
    # item 1: hvcC (essential), ispe
    return single_image_file(b"heic", b"mif1heic", b"hvc1", properties, bytes([0x81, 0x02]), item_data)


def single_image_file(
    brand: bytes,
    compatible: bytes,
    item_type: bytes,
    properties: list[bytes],
    associations: bytes,
    data: bytes,
) -> bytes:
    """An ISO base-media image file (HEIF, AVIF) of one coded image item: ``ftyp``, ``meta`` (handler,
    primary item, location, info, the item's ``properties`` and their ``associations``: one byte per
    property, its 1-based index with 0x80 set when essential) and ``mdat`` holding ``data``."""
    ftyp = _box(b"ftyp", brand, struct.pack(">I", 0), compatible)

    def meta(data_offset: int) -> bytes:
        return _full_box(
            b"meta",
            0,
            0,
            _full_box(b"hdlr", 0, 0, struct.pack(">I", 0), b"pict", bytes(12), b"\x00"),
            _full_box(b"pitm", 0, 0, struct.pack(">H", 1)),
            _full_box(b"iloc", 0, 0, struct.pack(">BBHHHHII", 0x44, 0, 1, 1, 0, 1, data_offset, len(data))),
            _full_box(
                b"iinf",
                0,
                0,
                struct.pack(">H", 1),
                _full_box(b"infe", 2, 0, struct.pack(">HH", 1, 0), item_type + b"\x00"),
            ),
            _box(
                b"iprp",
                _box(b"ipco", *properties),
                _full_box(b"ipma", 0, 0, struct.pack(">IHB", 1, 1, len(associations)), associations),
            ),
        )

    data_offset = len(ftyp) + len(meta(0)) + 8
    return ftyp + meta(data_offset) + _box(b"mdat", data)


def hvcc_nals(hvcc: bytes) -> list[bytes]:
    """Parameter-set NAL units listed in an ``hvcC`` payload."""
    nals, offset = [], 23
    for _ in range(hvcc[22]):
        (count,) = struct.unpack_from(">H", hvcc, offset + 1)
        offset += 3
        for _ in range(count):
            (size,) = struct.unpack_from(">H", hvcc, offset)
            nals.append(hvcc[offset + 2 : offset + 2 + size])
            offset += 2 + size
    return nals


def length_prefixed_nals(data: bytes, length_size: int) -> list[bytes]:
    """NAL units of an ``mdat`` item; fails unless they tile it exactly (one image, nothing else)."""
    nals, offset = [], 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + length_size], "big")
        offset += length_size
        if size == 0 or offset + size > len(data):
            raise CodecError("unexpected HEIF layout: mdat is not one length-prefixed HEVC picture")
        nals.append(data[offset : offset + size])
        offset += size
    return nals
