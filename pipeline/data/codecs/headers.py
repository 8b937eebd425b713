"""Image sizes read from a bitstream's own header, without decoding a pixel: what a decoder will allocate.

Each function takes the bytes a codec's decoder gets and returns ``(width, height)`` as the format's header
states it, or raises :class:`CodecError` when the header is missing, truncated or malformed. They read a
few dozen bytes at most (JPEG: the markers up to its frame header), so an untrusted stream can be checked
against the size its container records before it is decoded (:meth:`Codec.check_size`).
"""

from __future__ import annotations

import struct

from pipeline.data.codecs.base import CodecError
from pipeline.data.codecs.heif import _BitReader

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI: markers without a segment length
JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}


def png_size(data: bytes) -> tuple[int, int]:
    """A PNG's ``IHDR`` size."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise CodecError("not a PNG (signature and IHDR expected)")
    return struct.unpack_from(">II", data, 16)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """A JPEG's size from its frame header (the first SOFn marker segment)."""
    if not data.startswith(b"\xff\xd8"):
        raise CodecError("not a JPEG (SOI marker expected)")
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            raise CodecError(f"JPEG: no marker at byte {offset}")
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in JPEG_NO_LENGTH:
            offset += 2
            continue
        if marker == 0xDA:
            break  # start of scan before any frame header
        (length,) = struct.unpack_from(">H", data, offset + 2)
        if marker in JPEG_SOF:
            if length < 8 or offset + 9 > len(data):
                raise CodecError("JPEG: truncated frame header")
            height, width = struct.unpack_from(">HH", data, offset + 5)
            if height == 0:
                raise CodecError("JPEG: the height is given later (DNL marker), which is not supported")
            return width, height
        if length < 2:
            raise CodecError(f"JPEG: bad segment length {length} at byte {offset}")
        offset += 2 + length
    raise CodecError("JPEG: no frame header (SOFn) before the scan")


def webp_size(data: bytes) -> tuple[int, int]:
    """A WebP's canvas size: ``VP8X``'s canvas, else the ``VP8`` (lossy) or ``VP8L`` (lossless) frame's."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise CodecError("not a WebP (RIFF/WEBP header expected)")
    chunk, body = data[12:16], 20
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[body + 4 : body + 7], "little")
        height = 1 + int.from_bytes(data[body + 7 : body + 10], "little")
        return width, height
    if chunk == b"VP8 ":
        if data[body + 3 : body + 6] != b"\x9d\x01\x2a":
            raise CodecError("WebP: bad VP8 start code")
        width, height = struct.unpack_from("<HH", data, body + 6)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        if data[body] != 0x2F:
            raise CodecError("WebP: bad VP8L signature")
        (bits,) = struct.unpack_from("<I", data, body + 1)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise CodecError(f"WebP: unknown first chunk {chunk!r}")


def j2k_size(data: bytes) -> tuple[int, int]:
    """A bare JPEG 2000 codestream's image size (``SIZ``: reference grid less its offset)."""
    if len(data) < 4 + 2 + 2 + 16 or data[:4] != b"\xff\x4f\xff\x51":
        raise CodecError("not a J2K codestream (SOC and SIZ markers expected)")
    xsiz, ysiz, x0, y0 = struct.unpack_from(">IIII", data, 8)
    if x0 >= xsiz or y0 >= ysiz:
        raise CodecError("J2K: the image offset is outside the reference grid")
    return xsiz - x0, ysiz - y0


class _LSBReader:
    """LSB-first bit reader (JPEG XL's bit order)."""

    def __init__(self, data: bytes, bit: int = 0) -> None:
        self.data, self.bit = data, bit

    def u(self, n: int) -> int:
        value = 0
        for i in range(n):
            if self.bit >= 8 * len(self.data):
                raise CodecError("JPEG XL: truncated size header")
            value |= ((self.data[self.bit >> 3] >> (self.bit & 7)) & 1) << i
            self.bit += 1
        return value

    def size(self, small: bool) -> int:
        """One dimension: ``(u(5) + 1) * 8`` in the small form, else ``U32(1 + u(9|13|18|30))``."""
        if small:
            return (self.u(5) + 1) * 8
        return 1 + self.u((9, 13, 18, 30)[self.u(2)])


def jxl_size(data: bytes) -> tuple[int, int]:
    """A bare JPEG XL codestream's ``SizeHeader`` (the image's size before any orientation)."""
    if not data.startswith(b"\xff\x0a"):
        raise CodecError("not a bare JPEG XL codestream (FF 0A expected)")
    reader = _LSBReader(data, 16)
    small = bool(reader.u(1))
    height = reader.size(small)
    ratio = reader.u(3)
    if ratio == 0:
        width = reader.size(small)
    else:
        num, den = JXL_RATIOS[ratio]
        width = height * num // den
    return width, height


def _ue7(data: bytes, offset: int) -> tuple[int, int]:
    """BPG's ``ue7(32)``: big-endian 7-bit groups, the high bit set on every byte but the last."""
    value = 0
    for i in range(5):
        if offset + i >= len(data):
            raise CodecError("BPG: truncated header")
        byte = data[offset + i]
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, offset + i + 1
    raise CodecError("BPG: bad ue7 number in the header")


def bpg_size(data: bytes) -> tuple[int, int]:
    """A BPG file's picture size."""
    if not data.startswith(b"BPG\xfb") or len(data) < 7:
        raise CodecError("not a BPG file (BPG\\xfb magic expected)")
    width, offset = _ue7(data, 6)
    height, _ = _ue7(data, offset)
    return width, height


def _leb128(data: bytes, offset: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        if offset + i >= len(data):
            raise CodecError("AV1: truncated OBU size")
        byte = data[offset + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, offset + i + 1
    raise CodecError("AV1: bad OBU size")


def av1_size(obus: bytes) -> tuple[int, int]:
    """The maximum frame size of the AV1 sequence header among ``obus`` (OBUs with size fields)."""
    offset = 0
    while offset < len(obus):
        header = obus[offset]
        kind, extension, has_size = (header >> 3) & 0xF, (header >> 2) & 1, (header >> 1) & 1
        offset += 1 + extension
        if not has_size:
            raise CodecError("AV1: OBU without a size field")
        size, offset = _leb128(obus, offset)
        if offset + size > len(obus):
            raise CodecError("AV1: OBU longer than the stream")
        if kind == 1:  # OBU_SEQUENCE_HEADER
            return _sequence_size(obus[offset : offset + size])
        offset += size
    raise CodecError("AV1: no sequence header")


def _sequence_size(payload: bytes) -> tuple[int, int]:
    """``max_frame_width_minus_1 + 1``, ``max_frame_height_minus_1 + 1`` of an AV1 sequence header (5.5)."""
    r = _BitReader(payload, what="AV1 sequence header")
    r.u(3)  # seq_profile
    r.u(1)  # still_picture
    if r.u(1):  # reduced_still_picture_header
        r.u(5)  # seq_level_idx[0]
    else:
        decoder_model, delay_bits = False, 0
        if r.u(1):  # timing_info_present_flag
            r.u(64)  # num_units_in_display_tick, time_scale
            if r.u(1):  # equal_picture_interval: num_ticks_per_picture_minus_1, uvlc()
                zeros = 0
                while not r.u(1):
                    zeros += 1
                    if zeros >= 32:
                        raise CodecError("AV1: bad uvlc in the timing info")
                r.u(zeros)
            decoder_model = bool(r.u(1))
            if decoder_model:
                delay_bits = r.u(5) + 1  # buffer_delay_length_minus_1
                r.u(32 + 5 + 5)  # num_units_in_decoding_tick, two length fields
        initial_display_delay = r.u(1)
        for _ in range(r.u(5) + 1):  # operating points
            r.u(12)  # operating_point_idc
            if r.u(5) > 7:  # seq_level_idx
                r.u(1)  # seq_tier
            if decoder_model and r.u(1):
                r.u(2 * delay_bits + 1)
            if initial_display_delay and r.u(1):
                r.u(4)
    width_bits, height_bits = r.u(4) + 1, r.u(4) + 1
    return r.u(width_bits) + 1, r.u(height_bits) + 1
