"""The encoder's choice, frame by frame, of sending the label map (``compress --send-map rd``,
``eval.map_choice``).

The label map is side information, and at low rates it is a large one: the class map a quarter of the size
on each side costs a third of HEVC QP 47's bits on the Cityscapes sample at 512x256, while a model on it gains
a few hundredths of a dB over the same weights without it. The encoder holds the original, so it enhances
its decoded image both ways, with the map and on zero semantics (the same weights: a model trained with
``train.semantic_dropout`` learnt both inputs), and sends the map only where the squared error it removes
is worth more than its bits spent on the codec itself would remove. That price is the codec's own slope on
this frame, at this quality: the squared error one more bit buys between the frame's quality and a finer one
:data:`SLOPE_SPAN` of the codec's scale away (one more round trip; a coarser one at the end of the scale;
HEVC: 3 QP; a single QP step was not monotone on a 256x128 test frame). It is the Lagrangian
rate-distortion decision of a codec's mode choice, at the codec's own operating point, with no weight to tune.

A frame without its map is enhanced on zero semantics. The ``.jse`` file says so by carrying no label stream
(:mod:`pipeline.compress.container`); the evaluation charges every frame :data:`FLAG_BITS` for the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.data.codecs import Codec

FLAG_BITS = 1  # map sent or not
SLOPE_SPAN = 1 / 20  # of the codec's quality scale, at least one step: the other point of the slope


def squared_error(original: np.ndarray, image: np.ndarray) -> float:
    """The sum of squared differences of two uint8 images of one shape."""
    if original.shape != image.shape:
        raise ValueError(f"images differ in shape: {original.shape} vs {image.shape}")
    return float(np.square(original.astype(np.float64) - image).sum())


def codec_slope(codec: Codec, original: np.ndarray, quality: int, decoded: np.ndarray, bits: float) -> float:
    """The squared error one bit buys, on ``original`` coded by ``codec`` at ``quality`` (``decoded`` at
    ``bits``), towards a finer quality :data:`SLOPE_SPAN` of the scale away (a coarser one at the end of the
    codec's scale): one more round trip. 0 where the other quality buys nothing (a map then costs nothing)."""
    lo, hi = codec.quality_range
    step = max(1, round((hi - lo) * SLOPE_SPAN))
    finer = step if codec.higher_quality_is_better else -step
    other = quality + finer if lo <= quality + finer <= hi else quality - finer
    result = codec.roundtrip(original, other)
    other_bits = 8 * len(result.bitstream)
    if other_bits == bits:
        return 0.0
    slope = (squared_error(original, decoded) - squared_error(original, result.decoded)) / (other_bits - bits)
    return max(slope, 0.0)


@dataclass(frozen=True)
class MapChoice:
    """One frame's choice: ``sent`` when the map removes more squared error (``saved``) than its bits buy on
    the codec (``price``: slope times the map's bits)."""

    sent: bool
    saved: float
    price: float


def choose_map(
    original: np.ndarray, with_map: np.ndarray, without_map: np.ndarray, map_bits: float, slope: float
) -> MapChoice:
    """Whether the encoder sends the map of a frame whose decoder outputs ``with_map`` given the map and
    ``without_map`` without it; ``slope`` from :func:`codec_slope`."""
    saved = squared_error(original, without_map) - squared_error(original, with_map)
    price = slope * map_bits
    return MapChoice(saved > price, saved, price)
