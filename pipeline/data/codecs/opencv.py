"""The codecs OpenCV carries: JPEG (libjpeg-turbo), WebP (libwebp) and JPEG 2000 (OpenJPEG)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import numpy as np

from pipeline.data.codecs.base import Codec, CodecError, register_codec
from pipeline.data.codecs.headers import j2k_size, jpeg_size, webp_size
from pipeline.data.codecs.heif import find_box


def rgb_to_bgr(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def _imencode(ext: str, rgb: np.ndarray, params: list[int]) -> bytes:
    try:
        ok, buf = cv2.imencode(ext, rgb_to_bgr(rgb), params)
    except cv2.error as err:
        raise CodecError(f"OpenCV could not encode {ext}: {err}") from err
    if not ok:
        raise CodecError(f"OpenCV could not encode {ext}")
    return buf.tobytes()


def _imdecode_rgb(data: bytes, what: str) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise CodecError(f"OpenCV could not decode the {what} bitstream")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@register_codec
class JPEGCodec(Codec):
    """Baseline JPEG through OpenCV (libjpeg-turbo), quality 0-100, default 4:2:0 chroma subsampling."""

    name = "jpeg"
    quality_range = (0, 100)

    def _encode(self, rgb: np.ndarray, quality: int) -> bytes:
        return _imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, quality])

    def _decode(self, data: bytes) -> np.ndarray:
        return _imdecode_rgb(data, "JPEG")

    def stream_size(self, data: bytes) -> tuple[int, int]:
        return jpeg_size(data)


@register_codec
class WebPCodec(Codec):
    """Lossy WebP through OpenCV (libwebp), quality 0-100."""

    name = "webp"
    quality_range = (0, 100)

    def _encode(self, rgb: np.ndarray, quality: int) -> bytes:
        return _imencode(".webp", rgb, [cv2.IMWRITE_WEBP_QUALITY, quality])

    def _decode(self, data: bytes) -> np.ndarray:
        return _imdecode_rgb(data, "WebP")

    def stream_size(self, data: bytes) -> tuple[int, int]:
        return webp_size(data)


@contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's log while it reads a bare J2K codestream (it warns that no colour space is given)."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


@register_codec
class JPEG2000Codec(Codec):
    """JPEG 2000 through OpenCV (OpenJPEG); the bitstream is the bare J2K codestream.

    ``quality`` is OpenCV's ``IMWRITE_JPEG2000_COMPRESSION_X1000`` (1-1000; 1000 is lossless).
    OpenCV writes a JP2 file; its boxes (85 bytes) are stripped and only the ``jp2c`` codestream,
    which OpenCV decodes as is, is kept. OpenJPEG's default 6 resolution levels need images of
    at least 32x32 pixels (smaller ones fail to encode), hence ``min_size``.
    """

    name = "jpeg2000"
    quality_range = (1, 1000)
    min_size = 32

    def _encode(self, rgb: np.ndarray, quality: int) -> bytes:
        jp2 = _imencode(".jp2", rgb, [cv2.IMWRITE_JPEG2000_COMPRESSION_X1000, quality])
        return find_box(jp2, [b"jp2c"])

    def _decode(self, data: bytes) -> np.ndarray:
        with _quiet_opencv():
            return _imdecode_rgb(data, "J2K")

    def stream_size(self, data: bytes) -> tuple[int, int]:
        return j2k_size(data)
