"""The lossless label-map coder: JPEG XL (imagecodecs), else lossless WebP, else PNG, on an optional
sub-sampled grid."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import cv2
import numpy as np

from pipeline.data.codecs.base import CodecError, CodecUnavailable
from pipeline.data.codecs.headers import jxl_size, png_size, webp_size

_HEADER_SIZE = {"jxl": jxl_size, "webp": webp_size, "png": png_size}  # each method's header reader


def _jxl_available() -> bool:
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(imagecodecs.JPEGXL.available)


def _jxl_encode(label: np.ndarray) -> bytes:
    import imagecodecs

    # Effort 10 (libjxl's slowest): 4-5 % fewer bits than effort 9 on Cityscapes maps (bench/bench_labels.py).
    return bytes(imagecodecs.jpegxl_encode(label, lossless=True, effort=10, numthreads=1))


def _jxl_decode(data: bytes) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpegxl_decode(data)


def _cv_encode(ext: str, params: list[int]) -> Callable[[np.ndarray], bytes]:
    def encode(label: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(ext, label, params)
        if not ok:
            raise CodecError(f"OpenCV could not encode the label map as {ext}")
        return buf.tobytes()

    return encode


def _cv_decode_gray(data: bytes) -> np.ndarray:
    # Lossless WebP stores grey as equal B, G and R: any one channel is the label map.
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise CodecError("OpenCV could not decode the label bitstream")
    return image if image.ndim == 2 else np.ascontiguousarray(image[:, :, 0])


_LABEL_METHODS: dict[
    str, tuple[Callable[[], bool], Callable[[np.ndarray], bytes], Callable[[bytes], np.ndarray]]
] = {
    "jxl": (_jxl_available, _jxl_encode, _jxl_decode),
    "webp": (
        lambda: cv2.haveImageWriter(".webp"),
        _cv_encode(".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),  # OpenCV: quality > 100 is lossless
        _cv_decode_gray,
    ),
    "png": (lambda: True, _cv_encode(".png", [cv2.IMWRITE_PNG_COMPRESSION, 9]), _cv_decode_gray),
}


class LabelCoder:
    """Lossless coder of ``uint8`` label maps, optionally on a ``downsample``-times sub-sampled grid.

    ``method="auto"`` picks the best available: JPEG XL lossless (``imagecodecs``, effort 10), else
    lossless WebP, else PNG at maximum compression. With ``downsample = k > 1`` every k-th pixel of
    every k-th row is coded (``label[::k, ::k]``) and :meth:`decode` repeats each one over its k x k
    block (nearest neighbour), so ``decode(encode(x), size)`` is exactly :meth:`reconstruct` ``(x)``.
    """

    def __init__(self, method: str = "auto", downsample: int = 1):
        if method != "auto" and method not in _LABEL_METHODS:
            raise ValueError(f"unknown label coder {method!r}; choose auto, {', '.join(_LABEL_METHODS)}")
        if isinstance(downsample, bool) or not isinstance(downsample, numbers.Integral) or downsample < 1:
            raise ValueError(f"downsample must be an integer >= 1, got {downsample!r}")
        if method == "auto":
            method = next(name for name, (available, _, _) in _LABEL_METHODS.items() if available())
        elif not _LABEL_METHODS[method][0]():
            hint = (
                "install imagecodecs (pip install imagecodecs)" if method == "jxl" else "use another method"
            )
            raise CodecUnavailable(f"label coder {method!r} is not available here; {hint}")
        self._method = method
        self.downsample = int(downsample)

    @property
    def method(self) -> str:
        """The resolved method: ``jxl``, ``webp`` or ``png``."""
        return self._method

    @staticmethod
    def _check(label: np.ndarray) -> None:
        if (
            not isinstance(label, np.ndarray)
            or label.dtype != np.uint8
            or label.ndim != 2
            or 0 in label.shape
        ):
            what = (
                f"{label.dtype} array of shape {label.shape}"
                if isinstance(label, np.ndarray)
                else type(label)
            )
            raise ValueError(f"expected a non-empty uint8 H x W label map, got {what}")

    def encode(self, label: np.ndarray) -> bytes:
        """Losslessly code ``label`` (sub-sampled first when ``downsample > 1``)."""
        self._check(label)
        k = self.downsample
        return _LABEL_METHODS[self._method][1](np.ascontiguousarray(label[::k, ::k]))

    def decode(self, data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
        """The label map at ``size = (width, height)``; without ``size``, the coded (sub-sampled) grid."""
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
            raise ValueError("expected a non-empty label bitstream (bytes)")
        coded = _LABEL_METHODS[self._method][2](bytes(data))
        if coded.dtype != np.uint8 or coded.ndim != 2:
            raise CodecError(
                f"{self._method}: decoded a {coded.dtype} array of shape {coded.shape}, not a label map"
            )
        if size is None:
            return coded
        width, height = size
        k = self.downsample
        if coded.shape != (-(-height // k), -(-width // k)):
            raise ValueError(
                f"a {coded.shape[1]}x{coded.shape[0]} coded map does not fit {width}x{height} at 1/{k}"
            )
        return self._upsample(coded, height, width)

    def stream_size(self, data: bytes) -> tuple[int, int]:
        """``(width, height)`` of the coded (sub-sampled) grid as the bitstream's header states it, without
        decoding; :class:`CodecError` when the header is not this method's."""
        return _HEADER_SIZE[self._method](bytes(data))

    def check_size(self, data: bytes, size: tuple[int, int]) -> None:
        """Refuse (:class:`CodecError`) a bitstream whose coded grid does not fit ``size = (width, height)``
        at 1/``downsample`` before it is decoded (the container's recorded size bounds the allocation)."""
        width, height = size
        k = self.downsample
        expected = (-(-width // k), -(-height // k))
        coded = self.stream_size(data)
        if coded != expected:
            raise CodecError(
                f"{self._method} label map: the header says {coded[0]}x{coded[1]}, the container's "
                f"{width}x{height} at 1/{k} needs {expected[0]}x{expected[1]}"
            )

    def reconstruct(self, label: np.ndarray) -> np.ndarray:
        """What ``decode(encode(label), size)`` returns: the nearest-neighbour sub-sampled map."""
        self._check(label)
        k = self.downsample
        return self._upsample(label[::k, ::k], *label.shape)

    def _upsample(self, coded: np.ndarray, height: int, width: int) -> np.ndarray:
        k = self.downsample
        if k == 1:
            return np.ascontiguousarray(coded)
        return np.ascontiguousarray(np.repeat(np.repeat(coded, k, axis=0), k, axis=1)[:height, :width])
