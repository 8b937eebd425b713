"""Image codecs (RGB ``uint8`` in, exact bitstream bytes out, and back) and the lossless label-map coder.

Every codec counts only the bytes its decoder needs: ``bpp = 8 * len(bitstream) / (width * height)``.
A new codec is one small :class:`Codec` subclass decorated with :func:`register_codec`; it implements
``_encode`` and ``_decode`` and inherits the input validation of :meth:`Codec.encode` / :meth:`Codec.decode`.
"""

from __future__ import annotations

import io
import logging
import numbers
import os
import shutil
import struct
import subprocess
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import cv2
import numpy as np

logger = logging.getLogger(__name__)


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


def _codec_class(name: str) -> type[Codec]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(available_codecs())}") from None


def get_codec(name: str, *, single_thread: bool = False, **options: object) -> Codec:
    """The codec registered as ``name``, built with its ``options`` (e.g. ``bpgenc="/opt/bpg/bpgenc"``).

    ``single_thread`` adds the codec's options that keep it on one core (options given win), for
    callers that parallelise over processes instead.
    """
    cls = _codec_class(name)
    if single_thread:
        options = {**cls.single_thread_options, **options}
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"bad options for codec {name!r}: {err}") from err


def _rgb_to_bgr(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def _imencode(ext: str, rgb: np.ndarray, params: list[int]) -> bytes:
    try:
        ok, buf = cv2.imencode(ext, _rgb_to_bgr(rgb), params)
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


@register_codec
class WebPCodec(Codec):
    """Lossy WebP through OpenCV (libwebp), quality 0-100."""

    name = "webp"
    quality_range = (0, 100)

    def _encode(self, rgb: np.ndarray, quality: int) -> bytes:
        return _imencode(".webp", rgb, [cv2.IMWRITE_WEBP_QUALITY, quality])

    def _decode(self, data: bytes) -> np.ndarray:
        return _imdecode_rgb(data, "WebP")


@contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's log while it reads a bare J2K codestream (it warns that no colour space is given)."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


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


def _find_box(data: bytes, path: list[bytes], start: int = 0, end: int | None = None) -> bytes:
    """Payload of the box at ``path`` (``meta`` is a full box: its version/flags word is skipped)."""
    for kind, payload, box_end in _iter_boxes(data, start, end):
        if kind != path[0]:
            continue
        if kind == b"meta":
            payload += 4
        if len(path) == 1:
            return data[payload:box_end]
        return _find_box(data, path[1:], payload, box_end)
    raise CodecError(f"no {b'/'.join(path).decode()} box in the container")


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
        return _find_box(jp2, [b"jp2c"])

    def _decode(self, data: bytes) -> np.ndarray:
        with _quiet_opencv():
            return _imdecode_rgb(data, "J2K")


@register_codec
class BPGCodec(Codec):
    """BPG (HEVC intra in a compact container) with the reference ``bpgenc`` / ``bpgdec`` binaries.

    ``quality`` is ``bpgenc -q`` (QP, 0-51, lower is better), always 4:2:0. The binaries are looked
    up when first used: on ``PATH``, or at the paths given as ``get_codec("bpg", bpgenc=..., bpgdec=...)``.
    """

    name = "bpg"
    quality_range = (0, 51)
    higher_quality_is_better = False

    def __init__(
        self, bpgenc: str | os.PathLike[str] | None = None, bpgdec: str | os.PathLike[str] | None = None
    ):
        self._configured = {"bpgenc": bpgenc, "bpgdec": bpgdec}

    def binary(self, tool: str) -> str:
        """Path of ``bpgenc`` or ``bpgdec``; raises :class:`CodecUnavailable` saying how to provide it."""
        configured = self._configured[tool]
        if configured is not None:
            path = Path(configured)
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
            raise CodecUnavailable(
                f"{tool} not found or not executable at the configured path {path}; "
                f"pass get_codec('bpg', {tool}='/path/to/{tool}') with a working binary"
            )
        found = shutil.which(tool)
        if found is None:
            raise CodecUnavailable(
                f"{tool} not found on PATH; install libbpg (https://bellard.org/bpg/) to put it on PATH, "
                f"or pass get_codec('bpg', {tool}='/path/to/{tool}'), e.g. as codec options in the config"
            )
        return found

    def is_available(self) -> bool:
        try:
            self.binary("bpgenc")
            self.binary("bpgdec")
        except CodecUnavailable:
            return False
        return True

    @staticmethod
    def _run(args: list[str]) -> None:
        logger.debug("running %s", args)
        try:
            subprocess.run(args, check=True, capture_output=True)
        except subprocess.CalledProcessError as err:
            stderr = err.stderr.decode(errors="replace").strip()
            raise CodecError(f"{Path(args[0]).name} failed (exit {err.returncode}): {stderr}") from err

    def _encode(self, rgb: np.ndarray, quality: int) -> bytes:
        bpgenc = self.binary("bpgenc")
        with tempfile.TemporaryDirectory(prefix="bpg-") as tmp:
            src, dst = Path(tmp) / "in.png", Path(tmp) / "out.bpg"
            if not cv2.imwrite(str(src), _rgb_to_bgr(rgb)):
                raise CodecError(f"could not write {src}")
            self._run([bpgenc, "-q", str(quality), "-f", "420", "-o", str(dst), str(src)])
            return dst.read_bytes()

    def _decode(self, data: bytes) -> np.ndarray:
        bpgdec = self.binary("bpgdec")
        with tempfile.TemporaryDirectory(prefix="bpg-") as tmp:
            src, dst = Path(tmp) / "in.bpg", Path(tmp) / "out.png"
            src.write_bytes(data)
            self._run([bpgdec, "-o", str(dst), str(src)])
            bgr = cv2.imread(str(dst), cv2.IMREAD_COLOR)
            if bgr is None:
                raise CodecError(f"bpgdec wrote no readable PNG at {dst}")
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class _BitReader:
    """MSB-first reader of an HEVC RBSP (emulation-prevention bytes already removed)."""

    def __init__(self, data: bytes, bit: int = 0):
        self.data, self.bit = data, bit

    def u(self, n: int) -> int:
        value = 0
        for _ in range(n):
            if self.bit >= 8 * len(self.data):
                raise CodecError("truncated HEVC parameter set")
            value = (value << 1) | ((self.data[self.bit >> 3] >> (7 - (self.bit & 7))) & 1)
            self.bit += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise CodecError("bad Exp-Golomb code in HEVC parameter set")
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


_NAL_VPS, _NAL_SPS, _NAL_PPS = 32, 33, 34
_NAL_SEI = (39, 40)
_START_CODE = b"\x00\x00\x00\x01"


def _nal_type(nal: bytes) -> int:
    return (nal[0] >> 1) & 0x3F


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def _hvcc(parameter_sets: list[bytes], sps: _SPSInfo) -> bytes:
    """``hvcC`` decoder configuration (ISO/IEC 14496-15 8.3.3) rebuilt from the parameter sets."""
    arrays = b""
    kinds = [_NAL_VPS, _NAL_SPS, _NAL_PPS]
    for kind in kinds:
        nals = [nal for nal in parameter_sets if _nal_type(nal) == kind]
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


def _heif_file(parameter_sets: list[bytes], slices: list[bytes]) -> bytes:
    """A minimal single-image HEIF file around an HEVC intra picture, for libheif to decode."""
    sps_nals = [nal for nal in parameter_sets if _nal_type(nal) == _NAL_SPS]
    if len(sps_nals) != 1 or not any(_nal_type(nal) == _NAL_PPS for nal in parameter_sets):
        raise CodecError("the HEVC stream needs exactly one SPS and a PPS")
    sps = _parse_sps(sps_nals[0])
    if sps.chroma_format_idc != 1 or sps.bit_depth_luma != 8 or sps.bit_depth_chroma != 8:
        raise CodecError("only 8-bit 4:2:0 HEVC streams are supported")
    item_data = b"".join(struct.pack(">I", len(nal)) + nal for nal in slices)
    ftyp = _box(b"ftyp", b"heic", struct.pack(">I", 0), b"mif1heic")

    def meta(data_offset: int) -> bytes:
        return _full_box(
            b"meta",
            0,
            0,
            _full_box(b"hdlr", 0, 0, struct.pack(">I", 0), b"pict", bytes(12), b"\x00"),
            _full_box(b"pitm", 0, 0, struct.pack(">H", 1)),
            _full_box(
                b"iloc", 0, 0, struct.pack(">BBHHHHII", 0x44, 0, 1, 1, 0, 1, data_offset, len(item_data))
            ),
            _full_box(
                b"iinf",
                0,
                0,
                struct.pack(">H", 1),
                _full_box(b"infe", 2, 0, struct.pack(">HH", 1, 0), b"hvc1\x00"),
            ),
            _box(
                b"iprp",
                _box(
                    b"ipco",
                    _hvcc(parameter_sets, sps),
                    _full_box(b"ispe", 0, 0, struct.pack(">II", sps.width, sps.height)),
                ),
                _full_box(b"ipma", 0, 0, struct.pack(">IHBBB", 1, 1, 2, 0x81, 0x02)),
            ),
        )

    data_offset = len(ftyp) + len(meta(0)) + 8
    return ftyp + meta(data_offset) + _box(b"mdat", item_data)


@register_codec
class HEVCCodec(Codec):
    """HEVC intra at a fixed QP (0-51, the scale of BPG's ``-q``), 4:2:0, in process via pillow-heif.

    This is the HEVC core that BPG wraps (x265 encoder, libde265 decoder) on the same QP scale, but not
    BPG's exact encoder settings: at equal QP it spends more bits (reference 2048x1024 Cityscapes frame:
    BPG q42 0.062 bpp, x265 QP42 via libheif 0.073 bpp, +18 %; measured here on frankfurt_000000_005898:
    HEIF file 0.0729 bpp, this bitstream 0.0719 bpp), so compare codecs by rate, not by QP.
    ``enc_params={"x265:qp": ...}`` switches x265 to constant QP;
    libheif's ``quality`` is then ignored (the same bytes at quality 0, 50 and 100), it is set to 50 only
    to stay clear of its lossless mode. RGB <-> YCbCr is libheif's own conversion.

    The bitstream is not the HEIF file: it is a 4-byte header (width, height: two big-endian uint16,
    since 4:2:0 HEVC cannot code odd sizes and libheif pads small or odd images) followed by the raw
    HEVC elementary stream in Annex-B form (VPS, SPS, PPS and slice NAL units with 4-byte start codes;
    no SEI), i.e. what a decoder needs. The HEIF file that libheif writes is 268 bytes larger (measured:
    1411 vs 1143 bytes at 256x128 QP42, 19104 vs 18836 at 2048x1024; 305 more with the ``clap`` box of
    odd sizes), a 23 % overhead on small images. :meth:`decode` rebuilds a minimal HEIF around the stream
    for libde265 (its output equals libde265's decode of libheif's own file) and crops to the header's size.

    ``threads`` sizes x265's thread pool (0: x265's default, every core); the bitstream does not depend
    on it. The shard builder uses one thread per worker process, so that one worker is one core.
    """

    name = "hevc"
    quality_range = (0, 51)
    higher_quality_is_better = False
    single_thread_options = {"threads": 1}

    def __init__(self, threads: int = 0) -> None:
        if threads < 0:
            raise ValueError(f"hevc: threads must be >= 0 (0: x265's default pool), got {threads}")
        self._enc_params = {"x265:pools": str(threads)} if threads else {}
        try:
            import pillow_heif  # imported here so that the other codecs work without it
        except ImportError as err:
            raise CodecUnavailable("the hevc codec needs pillow-heif (pip install pillow-heif)") from err
        if not pillow_heif.libheif_info().get("HEIF"):
            raise CodecUnavailable("pillow-heif was built without an HEVC encoder (x265)")
        self._heif = pillow_heif

    def _encode(self, rgb: np.ndarray, quality: int) -> bytes:
        height, width = rgb.shape[:2]
        if max(height, width) > 0xFFFF:
            raise ValueError(
                f"hevc: images larger than 65535 pixels per side are not supported, got {width}x{height}"
            )
        buf = io.BytesIO()
        self._heif.from_bytes("RGB", (width, height), rgb.tobytes()).save(
            buf,
            quality=50,
            enc_params={"x265:qp": str(quality), **self._enc_params},
            chroma=420,
            save_nclx_profile=False,
        )
        heif = buf.getvalue()
        hvcc, mdat = _find_box(heif, [b"meta", b"iprp", b"ipco", b"hvcC"]), _find_box(heif, [b"mdat"])
        nals = _hvcc_nals(hvcc) + _length_prefixed_nals(mdat, (hvcc[21] & 3) + 1)
        stream = b"".join(_START_CODE + nal for nal in nals if _nal_type(nal) not in _NAL_SEI)
        return struct.pack(">HH", width, height) + stream

    def _decode(self, data: bytes) -> np.ndarray:
        if len(data) < 4 + len(_START_CODE) or not data[4:].startswith(_START_CODE):
            raise CodecError("hevc: not a bitstream of this codec (size header + Annex-B stream expected)")
        width, height = struct.unpack_from(">HH", data)
        nals = [nal.rstrip(b"\x00") for nal in data[4:].split(b"\x00\x00\x01")[1:]]
        parameter_sets = [nal for nal in nals if _nal_type(nal) in (_NAL_VPS, _NAL_SPS, _NAL_PPS)]
        slices = [nal for nal in nals if _nal_type(nal) not in (_NAL_VPS, _NAL_SPS, _NAL_PPS)]
        try:
            image = self._heif.open_heif(
                io.BytesIO(_heif_file(parameter_sets, slices)), convert_hdr_to_8bit=True
            )
            rgb = np.asarray(image)
        except (RuntimeError, ValueError) as err:
            raise CodecError(f"hevc: libheif could not decode the stream: {err}") from err
        if rgb.ndim != 3 or rgb.shape[0] < height or rgb.shape[1] < width:
            raise CodecError(f"hevc: decoded {rgb.shape} is smaller than the coded size {width}x{height}")
        return np.ascontiguousarray(rgb[:height, :width, :3])


def _hvcc_nals(hvcc: bytes) -> list[bytes]:
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


def _length_prefixed_nals(data: bytes, length_size: int) -> list[bytes]:
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


def _jxl_available() -> bool:
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(imagecodecs.JPEGXL.available)


def _jxl_encode(label: np.ndarray) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpegxl_encode(label, lossless=True, effort=9, numthreads=1))


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

    ``method="auto"`` picks the best available: JPEG XL lossless (``imagecodecs``, effort 9), else
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
