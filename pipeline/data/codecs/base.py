"""The codec interface, its errors and the registry that maps a codec's name to its class.

Every codec counts only the bytes its decoder needs: ``bpp = 8 * len(bitstream) / (width * height)``.
A new codec is one small :class:`Codec` subclass decorated with :func:`register_codec`; it implements
``_encode`` and ``_decode`` and inherits the input validation of :meth:`Codec.encode` / :meth:`Codec.decode`.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np


class CodecError(RuntimeError):
    """An encoder or decoder failed on data that passed input validation."""


class CodecUnavailable(RuntimeError):
    """A codec's external binary or library is missing on this machine."""


@dataclass(frozen=True)
class CodecResult:
    """One round trip: the exact bitstream, its decoded RGB image and its rate in bits per pixel."""

    bitstream: bytes
    decoded: np.ndarray
    bpp: float


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"expected an RGB numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 array, got dtype {rgb.dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB array of shape H x W x 3, got shape {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got shape {rgb.shape}")


class Codec(ABC):
    """An image codec at one quality setting per call.

    ``quality`` is on the codec's own scale (``quality_range``, inclusive); for QP codecs
    (``higher_quality_is_better = False``) a larger value means fewer bits and more distortion.
    """

    name: ClassVar[str]
    quality_range: ClassVar[tuple[int, int]]
    higher_quality_is_better: ClassVar[bool] = True
    min_size: ClassVar[int] = 1  # smallest width and height the codec accepts
    single_thread_options: ClassVar[dict[str, object]] = {}  # options that keep it on one core
    # options that change the decoded picture, at their defaults: a shard build records them even when
    # its config leaves them out, so that shards decoded another way are never taken for its own
    output_options: ClassVar[dict[str, object]] = {}
    # what each of those options was, in effect, before it existed (an option the codec had from the start
    # needs no entry): the picture of shards and generators that record no value for it
    legacy_output_options: ClassVar[dict[str, object]] = {}

    def encode(self, rgb: np.ndarray, quality: int) -> bytes:
        """Compress an RGB ``uint8`` ``H x W x 3`` image to its exact bitstream."""
        _check_rgb(rgb)
        lo, hi = self.quality_range
        if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not lo <= quality <= hi:
            raise ValueError(f"{self.name}: quality must be an integer in [{lo}, {hi}], got {quality!r}")
        height, width = rgb.shape[:2]
        if min(height, width) < self.min_size:
            raise ValueError(
                f"{self.name}: images must be at least {self.min_size}x{self.min_size}, got {width}x{height}"
            )
        data = self._encode(np.ascontiguousarray(rgb), int(quality))
        if not data:
            raise CodecError(f"{self.name}: the encoder returned no data")
        return data

    def decode(self, data: bytes) -> np.ndarray:
        """Decompress a bitstream made by :meth:`encode` to an RGB ``uint8`` image."""
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
            raise ValueError(f"{self.name}: expected a non-empty bitstream (bytes)")
        rgb = self._decode(bytes(data))
        _check_rgb(rgb)
        return rgb

    def roundtrip(self, rgb: np.ndarray, quality: int) -> CodecResult:
        """Encode and decode ``rgb``; the decoded image always has the input's size."""
        bitstream = self.encode(rgb, quality)
        decoded = self.decode(bitstream)
        if decoded.shape != rgb.shape:
            raise CodecError(f"{self.name}: decoded shape {decoded.shape} differs from input {rgb.shape}")
        height, width = rgb.shape[:2]
        return CodecResult(bitstream, decoded, 8 * len(bitstream) / (width * height))

    def is_available(self) -> bool:
        """Whether this machine has what the codec needs (external binaries, libraries)."""
        return True

    def stream_size(self, data: bytes) -> tuple[int, int] | None:
        """``(width, height)`` of the image :meth:`decode` returns, read from the bitstream's own header
        without decoding (a few bytes: :mod:`pipeline.data.codecs.headers`); None for a codec that cannot
        tell cheaply. A missing or malformed header raises :class:`CodecError`."""
        return None

    def check_size(self, data: bytes, width: int, height: int) -> None:
        """Refuse (:class:`CodecError`) a bitstream whose header states another size than ``width x height``
        (what its container records) before it is decoded, so that an untrusted stream cannot make the
        decoder allocate more than the container's bounded size."""
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
            raise CodecError(f"{self.name}: expected a non-empty bitstream (bytes)")
        size = self.stream_size(bytes(data))
        if size is not None and tuple(size) != (width, height):
            raise CodecError(
                f"{self.name}: the bitstream's header says {size[0]}x{size[1]}, "
                f"the container {width}x{height}"
            )

    @abstractmethod
    def _encode(self, rgb: np.ndarray, quality: int) -> bytes: ...

    @abstractmethod
    def _decode(self, data: bytes) -> np.ndarray: ...


_REGISTRY: dict[str, type[Codec]] = {}
C = TypeVar("C", bound=type[Codec])


def register_codec(cls: C) -> C:
    """Class decorator: make ``cls`` reachable as ``get_codec(cls.name)``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"codec {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_codecs() -> list[str]:
    """Names that :func:`get_codec` accepts (a codec may still need binaries: see ``is_available``)."""
    return sorted(_REGISTRY)


def codec_class(name: str) -> type[Codec]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(available_codecs())}") from None


def with_output_defaults(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` of codec ``name`` with its :attr:`Codec.output_options` defaults filled in: what a codec
    built from them decodes with, and what a shard build records."""
    return {**codec_class(name).output_options, **options}


def decode_options(name: str, recorded: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options that decide codec ``name``'s decoded picture (its :attr:`Codec.output_options`), as
    ``recorded`` by a shard build or a generator's spec: each option's recorded value, else its legacy
    value (a record without it was decoded before the option existed). ``None``: nothing was recorded."""
    cls = codec_class(name)
    recorded = recorded or {}
    return {
        key: recorded.get(key, cls.legacy_output_options.get(key, default))
        for key, default in cls.output_options.items()
    }


def get_codec(name: str, *, single_thread: bool = False, **options: object) -> Codec:
    """The codec registered as ``name``, built with its ``options`` (e.g. ``bpgenc="/opt/bpg/bpgenc"``).

    ``single_thread`` adds the codec's options that keep it on one core (options given win), for
    callers that parallelise over processes instead.
    """
    cls = codec_class(name)
    if single_thread:
        options = {**cls.single_thread_options, **options}
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"bad options for codec {name!r}: {err}") from err
