"""Shard members that need more than an image decoder: the 16-bit instance map, and the source paths.

Every WebDataset image decoder (PIL or OpenCV ``"rgb8"``/``"l8"``/``"torchrgb"`` ...) returns 8 bits per
channel, which cuts instance ids above 255 (Cityscapes' go to 32,000). The instance map is therefore stored
as ``instance.npz``: a NumPy archive, compressed (smaller than the 16-bit PNG: 4.9 vs 9.8 kB on a
512x256 Cityscapes map), holding one ``uint16`` array named ``instance``, which WebDataset's built-in
handlers decode losslessly whatever image decoder is chosen::

    wds.WebDataset(url).decode("rgb8")  ->  sample["instance.npz"]["instance"]  (uint16 H x W)

Its bytes are deterministic (fixed zip timestamps), so a shard's checksums do not depend on when it was
built. Shards written before hold ``instance.png`` (16-bit PNG); the readers take either.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

INSTANCE_MEMBER = "instance.npz"
LEGACY_INSTANCE_MEMBER = "instance.png"  # shards written before instance.npz
INSTANCE_ARRAY = "instance"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


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


def decode_instance(data: bytes) -> np.ndarray:
    """The instance map of an ``instance.npz`` member's bytes (no pickles are loaded)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        if INSTANCE_ARRAY not in archive.files:
            raise ValueError(f"instance member holds {archive.files}, not {INSTANCE_ARRAY!r}")
        return archive[INSTANCE_ARRAY]


def instance_from(sample: Mapping[str, Any]) -> np.ndarray | None:
    """A sample's decoded instance map, from ``instance.npz`` (decoded by WebDataset to a dict of arrays,
    or raw bytes) or a legacy ``instance.png`` already decoded to an array; None when it has neither."""
    if INSTANCE_MEMBER in sample:
        value = sample[INSTANCE_MEMBER]
        if isinstance(value, bytes | bytearray):
            return decode_instance(bytes(value))
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
