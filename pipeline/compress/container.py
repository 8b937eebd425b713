"""The ``.jse`` container: one compressed image (codec bitstream, lossless label map, model reference).

Layout, all integers big-endian; ``str8`` is a one-byte length followed by that many bytes:

======  =========================  ==============================================================
bytes   field                      value
======  =========================  ==============================================================
8       magic                      ``\\x89JSE\\r\\n\\x1a\\n`` (a PNG-style signature: catches text-mode
                                   transfers and truncation at the first bytes)
1       format version             2; 3 with a correction scale; 4 without a label map; 5 with
                                   correction gains (:data:`FORMAT_VERSION`: the newest)
str8    codec                      registered codec name (``hevc``), ASCII ``[a-z0-9_]``
2       quality                    on the codec's own scale (checked against it)
4 + 4   width, height              the image size in pixels, each ``1..MAX_SIDE``, product ``<= MAX_PIXELS``
str8    label coder                ``jxl``, ``webp`` or ``png``; ``none`` for decoder-side label maps and
                                   (version 4) for a frame whose encoder withheld its map
1       label down-sampling        ``1..MAX_DOWNSAMPLE`` (the label map is coded on a 1/k grid)
str8    model name                 registered-model name, UTF-8 (empty: none, or a model file)
str8    model version              registered-model version, ASCII digits (empty: none)
str8    model sha256               0 or 32 bytes: sha256 of the exported generator file
str8    segmenter sha256           (version 2) 0 or 32 bytes: with 32, the label map is the prediction of
                                   the segmenter file of this sha256 on the decoded image (label source
                                   ``decoder``): label coder ``none``, down-sampling 1, no label bitstream
1 + n   correction scale           (version 3 to 5) 0 or 1 bytes: with 1, the code of the encoder's scale
                                   of the generator's correction (:mod:`pipeline.model.correction_scale`);
                                   (version 5) 2 to 255 bytes: the codes of the encoder's gains of the
                                   correction head's parts
4 + 4   codec / label lengths      byte lengths of the two bitstreams
n       codec bitstream            exactly what the codec's ``decode`` takes
n       label bitstream            exactly what :class:`~pipeline.data.codecs.LabelCoder` ``decode`` takes
4       CRC-32                     of every byte before it
======  =========================  ==============================================================

The header is every byte that is not one of the two bitstreams (the trailing CRC included), so a file's
size is always ``header + codec + label`` bytes. The parser takes its input as untrusted: every length is
checked against what is left before anything is sliced, sizes are bounded before anything is allocated,
trailing bytes and checksum mismatches are refused, and every failure is one :class:`ContainerError`.

A version 4 file may carry no label map at all: label coder ``none``, no segmenter, no label stream. Its
encoder chose not to send the map (``compress --send-map rd``, :mod:`pipeline.model.map_choice`), and its
decoder runs the generator on zero semantics. A reader of versions 1-3 refuses such a file by its version.

Version 1 files (no segmenter field: ground-truth label maps, coded) still read. This code writes the
oldest version that holds the content: 5 for a file with correction gains, 4 for one without a label map,
3 for one with a correction scale, else 2 (the bytes it always wrote).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"\x89JSE\r\n\x1a\n"
FORMAT_VERSION = 5  # the newest version this code reads and writes
READ_VERSIONS = (1, 2, 3, 4, 5)
MAX_SIDE = 1 << 16  # pixels per side
MAX_PIXELS = 1 << 28  # 268 Mpixels: about 800 MB as RGB, the most a decoder is asked to allocate
MAX_DOWNSAMPLE = 64
MAX_FILE_BYTES = 1 << 30  # a container larger than this is refused before it is read
CRC_BYTES = 4
LABEL_CODERS = ("jxl", "webp", "png")
NO_LABEL_CODER = "none"  # the label map is not coded: the decoder predicts it (label source decoder)
_CODEC_NAME = re.compile(r"^[a-z0-9_]{1,32}$")
_VERSION = re.compile(r"^[0-9]{0,20}$")


class ContainerError(ValueError):
    """A ``.jse`` file (or the values to write into one) is not a valid container."""


@dataclass(frozen=True)
class ModelRef:
    """The generator a container was made for: a registry model (name and version) and/or the sha256 of
    its exported file. An empty reference names no model."""

    name: str = ""
    version: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        if len(self.name.encode()) > 255:
            raise ContainerError(f"model name longer than 255 bytes: {self.name[:40]!r}...")
        if not _VERSION.match(self.version):
            raise ContainerError(f"model version must be digits, got {self.version!r}")
        if bool(self.version) != bool(self.name):
            raise ContainerError("a registry model reference needs both a name and a version")
        if self.sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ContainerError(f"model sha256 must be 64 lowercase hex digits, got {self.sha256!r}")

    @property
    def uri(self) -> str:
        """``models:/name/version``, or empty when the reference names no registry model."""
        return f"models:/{self.name}/{self.version}" if self.name else ""

    def __bool__(self) -> bool:
        return bool(self.name or self.sha256)

    def describe(self) -> str:
        """One-line description for messages."""
        parts = [self.uri] if self.uri else []
        if self.sha256:
            parts.append(f"sha256 {self.sha256[:12]}")
        return ", ".join(parts) or "no model"


@dataclass(frozen=True)
class Container:
    """The content of one ``.jse`` file (see the module docstring for the bytes)."""

    codec: str
    quality: int
    width: int
    height: int
    label_coder: str
    label_downsample: int
    codec_bitstream: bytes
    label_bitstream: bytes
    model: ModelRef = ModelRef()
    segmenter: str = ""  # sha256 of the segmenter predicting the label map at the decoder; empty: coded map
    correction_scale: int | None = None  # the encoder's scale code (0..255); None: the generator's output
    correction_gains: tuple[int, ...] | None = None  # the encoder's gain codes (2..255 of 0..255 each)

    def __post_init__(self) -> None:
        if not _CODEC_NAME.match(self.codec):
            raise ContainerError(f"codec name must be 1-32 characters of [a-z0-9_], got {self.codec!r}")
        if not 0 <= self.quality <= 0xFFFF:
            raise ContainerError(f"quality {self.quality} does not fit the container (0..65535)")
        if not (0 < self.width <= MAX_SIDE and 0 < self.height <= MAX_SIDE):
            raise ContainerError(
                f"image size {self.width}x{self.height} is outside 1..{MAX_SIDE} pixels per side"
            )
        if self.width * self.height > MAX_PIXELS:
            raise ContainerError(
                f"image size {self.width}x{self.height} exceeds {MAX_PIXELS} pixels; refused as absurd"
            )
        if self.segmenter:
            if not re.fullmatch(r"[0-9a-f]{64}", self.segmenter):
                raise ContainerError(
                    f"segmenter sha256 must be 64 lowercase hex digits, got {self.segmenter!r}"
                )
            if self.label_coder != NO_LABEL_CODER or self.label_downsample != 1 or self.label_bitstream:
                raise ContainerError(
                    f"decoder-side label maps carry no label stream (label coder {NO_LABEL_CODER!r}, "
                    f"down-sampling 1), got {self.label_coder!r}, {self.label_downsample}, "
                    f"{len(self.label_bitstream)} bytes"
                )
        elif self.label_coder == NO_LABEL_CODER:
            if self.label_downsample != 1 or self.label_bitstream:
                raise ContainerError(
                    f"a file without a label map has down-sampling 1 and no label stream, got "
                    f"{self.label_downsample} and {len(self.label_bitstream)} bytes"
                )
        elif self.label_coder not in LABEL_CODERS:
            raise ContainerError(
                f"unknown label coder {self.label_coder!r}; known: {', '.join(LABEL_CODERS)}"
            )
        if not 1 <= self.label_downsample <= MAX_DOWNSAMPLE:
            raise ContainerError(
                f"label down-sampling factor {self.label_downsample} is outside 1..{MAX_DOWNSAMPLE}"
            )
        if self.correction_scale is not None and not 0 <= self.correction_scale <= 0xFF:
            raise ContainerError(f"correction scale code {self.correction_scale} is outside 0..255")
        if self.correction_gains is not None:
            object.__setattr__(self, "correction_gains", tuple(self.correction_gains))
            gains = self.correction_gains
            if self.correction_scale is not None:
                raise ContainerError("a file carries a correction scale or correction gains, not both")
            if not 2 <= len(gains) <= 0xFF or not all(0 <= g <= 0xFF for g in gains):
                raise ContainerError(f"correction gains must be 2 to 255 codes in 0..255, got {len(gains)}")
        if not self.codec_bitstream or not (self.label_bitstream or self.label_coder == NO_LABEL_CODER):
            raise ContainerError("empty codec or label bitstream")

    @property
    def label_source(self) -> str:
        """``decoder`` when the decoder predicts the label map (0 label bits), else ``gt`` (coded map)."""
        return "decoder" if self.segmenter else "gt"

    @property
    def map_withheld(self) -> bool:
        """Whether the file carries no label map at all: its encoder chose to send none, so its decoder runs
        the generator on zero semantics (version 4)."""
        return self.label_coder == NO_LABEL_CODER and not self.segmenter

    @property
    def version(self) -> int:
        """The oldest format version that holds this content (what :func:`pack` writes)."""
        if self.correction_gains is not None:
            return 5
        return 4 if self.map_withheld else 3 if self.correction_scale is not None else 2

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def header_bytes(self) -> int:
        """Bytes of the file that are neither bitstream (magic, fields, CRC)."""
        return len(pack(self)) - len(self.codec_bitstream) - len(self.label_bitstream)

    def bpp(self) -> dict[str, float]:
        """Bits per pixel of each part and of the whole file: ``codec``, ``label``, ``header``, ``total``."""
        header = self.header_bytes()
        parts = {"codec": len(self.codec_bitstream), "label": len(self.label_bitstream), "header": header}
        parts["total"] = sum(parts.values())
        return {k: 8 * v / self.pixels for k, v in parts.items()}


def _str8(text: str, what: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise ContainerError(f"{what} is longer than 255 bytes")
    return bytes([len(data)]) + data


def pack(container: Container) -> bytes:
    """The bytes of ``container``."""
    c, m = container, container.model
    if len(c.codec_bitstream) > 0xFFFFFFFF or len(c.label_bitstream) > 0xFFFFFFFF:
        raise ContainerError("a bitstream larger than 4 GiB does not fit the container")
    sha = bytes.fromhex(m.sha256)
    segmenter = bytes.fromhex(c.segmenter)
    # version 3's field: its length and the codes (one scale, or version 5's gains); version 2 has none
    codes = [c.correction_scale] if c.correction_scale is not None else list(c.correction_gains or ())
    scale = b"" if c.version < 3 else bytes([len(codes), *codes])
    body = b"".join(
        [
            MAGIC,
            bytes([c.version]),
            _str8(c.codec, "codec name"),
            struct.pack(">HII", c.quality, c.width, c.height),
            _str8(c.label_coder, "label coder"),
            bytes([c.label_downsample]),
            _str8(m.name, "model name"),
            _str8(m.version, "model version"),
            bytes([len(sha)]) + sha,
            bytes([len(segmenter)]) + segmenter,
            scale,
            struct.pack(">II", len(c.codec_bitstream), len(c.label_bitstream)),
            c.codec_bitstream,
            c.label_bitstream,
        ]
    )
    return body + struct.pack(">I", zlib.crc32(body))


class _Reader:
    """Bounded reads over untrusted bytes: every read names its field, and running out is an error."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise ContainerError(
                f"truncated container: {what} needs {n} bytes at offset {self.pos}, "
                f"{len(self.data) - self.pos} left"
            )
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def str8(self, what: str, ascii_only: bool = True) -> str:
        raw = self.take(self.uint(">B", what), what)
        try:
            return raw.decode("ascii" if ascii_only else "utf-8")
        except UnicodeDecodeError:
            raise ContainerError(f"{what} is not valid {'ASCII' if ascii_only else 'UTF-8'}") from None


def parse(data: bytes) -> Container:
    """The container in ``data``; anything else raises :class:`ContainerError` (one line)."""
    if len(data) > MAX_FILE_BYTES:
        raise ContainerError(f"container of {len(data)} bytes is larger than {MAX_FILE_BYTES}; refused")
    r = _Reader(data)
    if r.take(min(len(MAGIC), len(data)), "magic") != MAGIC:
        raise ContainerError("not a .jse container (wrong magic bytes)")
    version = r.uint(">B", "format version")
    if version not in READ_VERSIONS:
        newer = " (newer than this pipeline reads; update it)" if version > FORMAT_VERSION else ""
        raise ContainerError(
            f"unknown .jse format version {version}{newer}; this pipeline reads "
            f"{', '.join(map(str, READ_VERSIONS))}"
        )
    codec = r.str8("codec name")
    quality, width, height = (r.uint(">H", "quality"), r.uint(">I", "width"), r.uint(">I", "height"))
    label_coder = r.str8("label coder")
    label_downsample = r.uint(">B", "label down-sampling")
    name = r.str8("model name", ascii_only=False)
    model_version = r.str8("model version")
    sha_len = r.uint(">B", "model sha256 length")
    if sha_len not in (0, 32):
        raise ContainerError(f"model sha256 must be 0 or 32 bytes, got {sha_len}")
    sha = r.take(sha_len, "model sha256").hex()
    segmenter = ""
    if version >= 2:
        seg_len = r.uint(">B", "segmenter sha256 length")
        if seg_len not in (0, 32):
            raise ContainerError(f"segmenter sha256 must be 0 or 32 bytes, got {seg_len}")
        segmenter = r.take(seg_len, "segmenter sha256").hex()
    correction_scale, correction_gains = None, None
    if version >= 3:
        scale_len = r.uint(">B", "correction scale length")
        if scale_len > 1 and version < 5:
            raise ContainerError(f"a version {version} correction scale is 0 or 1 bytes, got {scale_len}")
        codes = r.take(scale_len, "correction scale")
        if scale_len == 1:
            correction_scale = codes[0]
        elif scale_len:
            correction_gains = tuple(codes)
    codec_len, label_len = r.uint(">I", "codec length"), r.uint(">I", "label length")
    codec_bitstream = r.take(codec_len, "codec bitstream")
    label_bitstream = r.take(label_len, "label bitstream")
    end = r.pos
    crc = r.uint(">I", "CRC-32")
    if r.pos != len(data):
        raise ContainerError(f"{len(data) - r.pos} unexpected bytes after the end of the container")
    if zlib.crc32(r.data[:end]) != crc:
        raise ContainerError("corrupt container: CRC-32 mismatch")
    if version < 4 and label_coder == NO_LABEL_CODER and not segmenter:
        raise ContainerError(f"a version {version} file must carry a label map or name its segmenter")
    return Container(
        codec=codec,
        quality=quality,
        width=width,
        height=height,
        label_coder=label_coder,
        label_downsample=label_downsample,
        codec_bitstream=codec_bitstream,
        label_bitstream=label_bitstream,
        model=ModelRef(name, model_version, sha),
        segmenter=segmenter,
        correction_scale=correction_scale,
        correction_gains=correction_gains,
    )


def read_container(path: str | Path) -> Container:
    """The container in the file at ``path`` (its size checked before it is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ContainerError(f"{path}: {size} bytes is larger than a container may be ({MAX_FILE_BYTES})")
        data = path.read_bytes()
    except OSError as err:
        raise ContainerError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return parse(data)
    except ContainerError as err:
        raise ContainerError(f"{path}: {err}") from None
