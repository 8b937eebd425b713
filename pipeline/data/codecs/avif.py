"""AVIF (AV1 intra) in process through Pillow (libavif); the bare AV1 stream is counted, not the file."""

from __future__ import annotations

import io
import struct

import numpy as np

from pipeline.data.codecs.base import Codec, CodecError, CodecUnavailable, register_codec
from pipeline.data.codecs.headers import av1_size
from pipeline.data.codecs.heif import _box, _full_box, find_box, single_image_file

# What every file of this codec carries and its decoder can take as given: three 8-bit channels
# (``pixi``) and the colour description libavif writes for an RGB image (``colr`` nclx: BT.709
# primaries, sRGB transfer, BT.601 matrix, full range). The encoder checks both.
_PIXI = struct.pack(">BBBB", 3, 8, 8, 8)
_NCLX = b"nclx" + struct.pack(">HHHB", 1, 13, 6, 0x80)
_HEADER = struct.Struct(">HH4s")  # width, height, the 4-byte av1C (AV1 codec configuration)


def _avif_file(width: int, height: int, av1c: bytes, obus: bytes) -> bytes:
    """A minimal single-image AVIF file around an AV1 intra frame, for libavif to decode."""
    properties = [
        _full_box(b"ispe", 0, 0, struct.pack(">II", width, height)),
        _full_box(b"pixi", 0, 0, _PIXI),
        _box(b"av1C", av1c),
        _box(b"colr", _NCLX),
    ]
    # item 1: ispe, pixi, av1C (essential), colr
    return single_image_file(
        b"avif", b"avifmif1miaf", b"av01", properties, bytes([0x01, 0x02, 0x83, 0x04]), obus
    )


@register_codec
class AVIFCodec(Codec):
    """AVIF: AV1 intra through Pillow's libavif (libaom encoder, dav1d or libaom decoder), 4:2:0, 8 bit.

    ``quality`` is Pillow's AVIF quality, 0-100, higher is better (libavif maps it to AV1's quantiser;
    100 is not lossless). ``speed`` is libavif's encoder speed (0 slowest and best, 10 fastest;
    Pillow's default 6). ``threads`` is the encoder's thread count: libaom's bitstream depends on it,
    so the default 1 keeps the bytes the same on every machine.

    The bitstream is an 8-byte header (width, height: big-endian uint16; the 4-byte ``av1C`` codec
    configuration record) followed by the AV1 OBUs of the image item (sequence header and frame), i.e.
    what a decoder needs. The AVIF file Pillow writes is 267 bytes larger (measured at 512x256, quality
    50: 10224 vs 9957 bytes; its boxes ftyp, meta with hdlr, pitm, iloc, iinf, ispe, pixi, av1C, colr and
    ipma); :meth:`decode` rebuilds a minimal
    AVIF around the stream, and its output equals the decode of Pillow's own file.
    """

    name = "avif"
    quality_range = (0, 100)

    def __init__(self, speed: int = 6, threads: int = 1) -> None:
        if not 0 <= speed <= 10:
            raise ValueError(f"avif: speed must be in [0, 10], got {speed}")
        if threads < 1:
            raise ValueError(f"avif: threads must be >= 1, got {threads}")
        from PIL import features

        if not features.check("avif"):
            raise CodecUnavailable(
                "the avif codec needs Pillow built with libavif (pip install 'pillow>=11.3')"
            )
        self.speed, self.threads = speed, threads

    def _encode(self, rgb: np.ndarray, quality: int) -> bytes:
        from PIL import Image

        height, width = rgb.shape[:2]
        if max(height, width) > 0xFFFF:
            raise ValueError(
                f"avif: images larger than 65535 pixels per side are not supported, got {width}x{height}"
            )
        buf = io.BytesIO()
        Image.fromarray(rgb).save(
            buf,
            format="AVIF",
            quality=quality,
            speed=self.speed,
            max_threads=self.threads,
            subsampling="4:2:0",
        )
        avif = buf.getvalue()
        ipco = [b"meta", b"iprp", b"ipco"]
        av1c = find_box(avif, [*ipco, b"av1C"])
        if len(av1c) != 4:
            raise CodecError(
                f"avif: unexpected av1C of {len(av1c)} bytes (configuration OBUs are not supported)"
            )
        if find_box(avif, [*ipco, b"pixi"])[4:] != _PIXI or find_box(avif, [*ipco, b"colr"]) != _NCLX:
            raise CodecError(
                "avif: libavif wrote a pixel format or colour description this codec does not expect"
            )
        iloc = find_box(avif, [b"meta", b"iloc"])
        if struct.unpack_from(">H", iloc, 6)[0] != 1:
            raise CodecError("avif: unexpected AVIF layout: more than one item")
        return _HEADER.pack(width, height, av1c) + find_box(avif, [b"mdat"])

    def stream_size(self, data: bytes) -> tuple[int, int]:
        """The size header's ``(width, height)``, once the AV1 sequence header's maximum frame size (what the
        decoder allocates) is checked to be the same."""
        if len(data) <= _HEADER.size or data[4] != 0x81:
            raise CodecError("avif: not a bitstream of this codec (size header + av1C + AV1 OBUs expected)")
        width, height, _ = _HEADER.unpack_from(data)
        coded = av1_size(data[_HEADER.size :])
        if coded != (width, height):
            raise CodecError(
                f"avif: the AV1 sequence codes {coded[0]}x{coded[1]} for a {width}x{height} image"
            )
        return width, height

    def _decode(self, data: bytes) -> np.ndarray:
        from PIL import Image

        if len(data) <= _HEADER.size or data[4] != 0x81:
            raise CodecError("avif: not a bitstream of this codec (size header + av1C + AV1 OBUs expected)")
        width, height, av1c = _HEADER.unpack_from(data)
        try:
            with Image.open(io.BytesIO(_avif_file(width, height, av1c, data[_HEADER.size :]))) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, RuntimeError) as err:
            raise CodecError(f"avif: libavif could not decode the stream: {err}") from err
        if rgb.shape[:2] != (height, width):
            raise CodecError(f"avif: decoded {rgb.shape[1]}x{rgb.shape[0]}, the header says {width}x{height}")
        return np.ascontiguousarray(rgb)
