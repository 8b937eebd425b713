"""Chroma up-sampling of a 4:2:0 picture that its decoder converted to RGB by repeating each chroma sample.

libheif converts a decoded 4:2:0 HEVC picture to RGB with nearest-neighbour chroma: every 2x2 block of
pixels shares one chroma sample. ``bpgdec`` interpolates the chroma instead (with a longer filter than
the bilinear one here), so the in-process ``hevc`` codec re-interpolates it, to stand closer to the
baseline BPG's decoder gives. Up-sampling is linear in the chroma, and with the matrix's luma weights the
RGB minus its luma is a linear function of the chroma alone, constant over each block: the blocks' means
of that difference are the chroma samples, in RGB, which are interpolated bilinearly at their centres
(libheif's encoder averages each 2x2 block, so its chroma sits at the block's centre) and added back to
each pixel's own luma.
"""

from __future__ import annotations

from typing import Literal, get_args

import cv2
import numpy as np

ChromaUpsampling = Literal["linear", "nearest"]
CHROMA_UPSAMPLINGS: tuple[str, ...] = get_args(ChromaUpsampling)
DEFAULT_CHROMA_UPSAMPLING: ChromaUpsampling = "linear"

# libheif's matrix when the file carries no colour profile (the hevc codec writes none): BT.601
BT601_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def interpolate_chroma(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` (``uint8``, H x W x 3, one chroma over each 2x2 block, the blocks starting at the top-left
    pixel) with the chroma interpolated bilinearly between the blocks' centres; every pixel keeps its luma."""
    height, width = rgb.shape[:2]
    even = np.pad(rgb, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    pixels = even.astype(np.float32)
    luma = pixels @ BT601_LUMA
    chroma = pixels - luma[..., None]
    blocks = cv2.resize(chroma, (even.shape[1] // 2, even.shape[0] // 2), interpolation=cv2.INTER_AREA)
    smooth = cv2.resize(blocks, (even.shape[1], even.shape[0]), interpolation=cv2.INTER_LINEAR)
    out = np.clip(np.rint(luma[..., None] + smooth), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out[:height, :width])
