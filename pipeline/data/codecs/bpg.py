"""BPG (HEVC intra in a compact container) through the reference ``bpgenc`` / ``bpgdec`` binaries."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np

from pipeline.data.codecs.base import Codec, CodecError, CodecUnavailable, register_codec
from pipeline.data.codecs.headers import bpg_size
from pipeline.data.codecs.opencv import rgb_to_bgr

logger = logging.getLogger(__name__)


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

    def stream_size(self, data: bytes) -> tuple[int, int]:
        return bpg_size(data)

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
            if not cv2.imwrite(str(src), rgb_to_bgr(rgb)):
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
