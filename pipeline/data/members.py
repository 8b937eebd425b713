"""Shard members that need more than an image decoder: the 16-bit instance map, and the source paths.

Every WebDataset image decoder (PIL or OpenCV ``"rgb8"``/``"l8"``/``"torchrgb"`` ...) returns 8 bits per
channel, which cuts instance ids above 255 (Cityscapes' go to 32,000). The instance map is therefore stored
as ``instance.npz``: a NumPy archive, compressed (smaller than the 16-bit PNG: 4.9 vs 9.8 kB on a
512x256 Cityscapes map), holding one ``uint16`` array named ``instance``, which WebDataset's built-in
handlers decode losslessly whatever image decoder is chosen::

    wds.WebDataset(url).decode("rgb8")  ->  sample["instance.npz"]["instance"]  (uint16 H x W)

Its bytes are deterministic (fixed zip timestamps), so a shard's checksums do not depend on when it was
built. Shards written before hold ``instance.png`` (16-bit PNG); the readers take either. A member is
untrusted: its array's header (shape, type) is read and checked against the pixel budget
(``shards.max_pixels``) before its data is inflated.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ShardConfig

INSTANCE_MEMBER = "instance.npz"
LEGACY_INSTANCE_MEMBER = "instance.png"  # shards written before instance.npz
INSTANCE_ARRAY = "instance"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
DEFAULT_MAX_PIXELS = ShardConfig.__dataclass_fields__["max_pixels"].default
_MAX_HEADER = 4096  # bytes of a .npy header (numpy writes ~128)


class MemberError(ValueError):
    """A shard member that cannot be read: malformed, or over the pixel budget."""


def encode_instance(instance: np.ndarray) -> bytes:
    """The ``instance.npz`` member of an ``H x W`` instance map (stored as ``uint16``)."""
    if instance.ndim != 2 or (instance.size and (instance.min() < 0 or instance.max() > 0xFFFF)):
        raise ValueError(f"expected an H x W instance map with ids in 0..65535, got shape {instance.shape}")
    array = io.BytesIO()
    np.lib.format.write_array(array, np.ascontiguousarray(instance, dtype=np.uint16), allow_pickle=False)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        info = zipfile.ZipInfo(f"{INSTANCE_ARRAY}.npy", date_time=_ZIP_TIME)
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, array.getvalue())
    return out.getvalue()


def decode_instance(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The instance map of an ``instance.npz`` member's bytes (no pickles are loaded).

    The array's ``.npy`` header is read first: an array that is not ``H x W`` of integers, has more than
    ``max_pixels`` elements, or whose stored size disagrees with its header is refused
    (:class:`MemberError`) before anything is inflated."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            name = f"{INSTANCE_ARRAY}.npy"
            if name not in archive.namelist():
                raise MemberError(f"instance member holds {archive.namelist()}, not {INSTANCE_ARRAY!r}")
            info = archive.getinfo(name)
            with archive.open(info) as member:
                head = member.read(_MAX_HEADER + 16)
                shape, dtype, offset = _npy_header(head)
                pixels = int(np.prod(shape, dtype=np.int64))
                if len(shape) != 2 or dtype.kind not in "iu":
                    raise MemberError(f"instance member is a {dtype} array of shape {shape}, not H x W ids")
                if pixels > max_pixels:
                    raise MemberError(
                        f"instance member is {shape[1]}x{shape[0]}, over shards.max_pixels={max_pixels}"
                    )
                size = pixels * dtype.itemsize
                if info.file_size != offset + size:
                    raise MemberError(
                        f"instance member stores {info.file_size} bytes for a {shape} {dtype} array"
                    )
                body = head[offset:] + member.read(max(0, size - (len(head) - offset)))
                if len(body) > size or member.read(1):  # reading to the end checks the CRC too
                    raise MemberError(f"instance member holds more than its {shape} {dtype} array")
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise MemberError(f"instance member is not a readable .npz: {err}") from err
    if len(body) != size:
        raise MemberError(f"instance member is truncated ({len(body)} of {size} bytes)")
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()


def _npy_header(head: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, type and header length of the ``.npy`` bytes that start with ``head`` (C order only)."""
    stream = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=_MAX_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=_MAX_HEADER)
        else:
            raise MemberError(f"instance member: .npy version {version} is not read")
    except MemberError:
        raise
    except ValueError as err:
        raise MemberError(f"instance member: bad .npy header: {str(err).splitlines()[0]}") from err
    if fortran:
        raise MemberError("instance member: a Fortran-ordered array is not read")
    return tuple(shape), np.dtype(dtype), stream.tell()


def instance_from(sample: Mapping[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """A sample's decoded instance map, from ``instance.npz`` (decoded by WebDataset to a dict of arrays,
    or raw bytes: checked against ``max_pixels`` first) or a legacy ``instance.png`` already decoded to an
    array; None when it has neither."""
    if INSTANCE_MEMBER in sample:
        value = sample[INSTANCE_MEMBER]
        if isinstance(value, bytes | bytearray):
            return decode_instance(bytes(value), max_pixels)
        return np.asarray(value[INSTANCE_ARRAY])
    if LEGACY_INSTANCE_MEMBER in sample:
        return np.asarray(sample[LEGACY_INSTANCE_MEMBER])
    return None


def relative_source(path: str | Path | None, root: str | Path) -> str | None:
    """``path`` relative to the dataset root (POSIX separators), as a sample's metadata records it, so
    that shards do not carry the build machine's folders."""
    if path is None:
        return None
    return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()
