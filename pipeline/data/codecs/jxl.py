"""Lossy JPEG XL in process through imagecodecs (libjxl); the bitstream is the bare codestream."""

from __future__ import annotations

import numpy as np

from pipeline.data.codecs.base import Codec, CodecError, CodecUnavailable, register_codec
from pipeline.data.codecs.headers import jxl_size


@register_codec
class JPEGXLCodec(Codec):
    """Lossy JPEG XL (VarDCT) through imagecodecs' libjxl binding.

    ``quality`` is libjxl's quality, 0-100, higher is better (``JxlEncoderDistanceFromQuality``: 90 is
    Butteraugli distance 1, visually lossless; 100 is distance 0 but still lossy, lossless mode is not
    used). ``effort`` is libjxl's encoder effort (1 fastest to 9; libjxl's default 7). The bitstream is
    the bare JPEG XL codestream (starts ``FF 0A``, no ISO BMFF container): what the decoder needs. The
    bytes do not depend on ``threads``.
    """

    name = "jxl"
    quality_range = (0, 100)
    single_thread_options = {"threads": 1}

    def __init__(self, effort: int = 7, threads: int = 0) -> None:
        if not 1 <= effort <= 9:
            raise ValueError(f"jxl: effort must be in [1, 9], got {effort}")
        if threads < 0:
            raise ValueError(f"jxl: threads must be >= 0 (0: libjxl's default), got {threads}")
        try:
            import imagecodecs
        except ImportError as err:
            raise CodecUnavailable("the jxl codec needs imagecodecs (pip install imagecodecs)") from err
        if not imagecodecs.JPEGXL.available:
            raise CodecUnavailable("imagecodecs was built without JPEG XL (libjxl)")
        self._imagecodecs = imagecodecs
        self.effort, self.threads = effort, threads

    def _encode(self, rgb: np.ndarray, quality: int) -> bytes:
        threads = {"numthreads": self.threads} if self.threads else {}
        try:
            data = self._imagecodecs.jpegxl_encode(
                rgb, level=quality, effort=self.effort, usecontainer=False, **threads
            )
        except self._imagecodecs.JpegxlError as err:
            raise CodecError(f"jxl: libjxl could not encode: {err}") from err
        return bytes(data)

    def _decode(self, data: bytes) -> np.ndarray:
        if not data.startswith(b"\xff\x0a"):
            raise CodecError("jxl: not a bare JPEG XL codestream (FF 0A expected)")
        try:
            rgb = self._imagecodecs.jpegxl_decode(data)
        except self._imagecodecs.JpegxlError as err:
            raise CodecError(f"jxl: libjxl could not decode the stream: {err}") from err
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise CodecError(f"jxl: decoded a {rgb.dtype} array of shape {rgb.shape}, not 8-bit RGB")
        return np.ascontiguousarray(rgb)

    def stream_size(self, data: bytes) -> tuple[int, int]:
        """The codestream's ``SizeHeader`` (this codec writes no orientation, so it is the decoded size)."""
        return jxl_size(data)
