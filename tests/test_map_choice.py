"""The encoder's choice of sending the label map (pipeline.model.map_choice): the codec's slope from one more
round trip, and the Lagrangian rule that prices the map's bits on it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data.codecs import Codec, get_codec
from pipeline.model.map_choice import SLOPE_SPAN, choose_map, codec_slope, squared_error


def _frame(cityscapes_root: Path) -> np.ndarray:
    """A real frame of the sample at 256x128."""
    path = sorted((cityscapes_root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))[0]
    bgr = cv2.resize(cv2.imread(str(path)), (256, 128), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(bgr[..., ::-1])


def _slope(codec: Codec, frame: np.ndarray, quality: int, other: int) -> float:
    a, b = codec.roundtrip(frame, quality), codec.roundtrip(frame, other)
    saved = squared_error(frame, a.decoded) - squared_error(frame, b.decoded)
    return saved / (8 * len(b.bitstream) - 8 * len(a.bitstream))


def test_the_slope_is_the_squared_error_a_bit_buys_towards_a_finer_quality(cityscapes_root: Path) -> None:
    codec, frame = get_codec("hevc"), _frame(cityscapes_root)
    step = round(51 * SLOPE_SPAN)  # HEVC's QP 0..51: 3 QP
    assert step == 3
    coarse = codec.roundtrip(frame, 42)
    slope = codec_slope(codec, frame, 42, coarse.decoded, 8 * len(coarse.bitstream))
    assert slope == pytest.approx(_slope(codec, frame, 42, 42 - step)) and slope > 0
    avif = get_codec("avif")  # 0..100, higher is better: 5 steps; at the finest end the other is coarser
    finest = avif.roundtrip(frame, 98)
    end = codec_slope(avif, frame, 98, finest.decoded, 8 * len(finest.bitstream))
    assert end == pytest.approx(_slope(avif, frame, 98, 93)) and end > 0


def test_the_map_is_sent_only_when_it_saves_more_than_its_bits_buy_on_the_codec() -> None:
    original = np.full((4, 4, 3), 100, np.uint8)
    with_map = original + np.uint8(1)  # squared error 48
    without = original + np.uint8(2)  # squared error 192: the map saves 144
    assert choose_map(original, with_map, without, map_bits=100, slope=1.0).sent
    priced_out = choose_map(original, with_map, without, map_bits=100, slope=1.5)
    assert not priced_out.sent and priced_out.saved == 144 and priced_out.price == 150
    assert not choose_map(original, without, with_map, map_bits=0, slope=0.0).sent  # a map that hurts
    with pytest.raises(ValueError, match="differ in shape"):
        choose_map(original, with_map[:2], without, map_bits=1, slope=1.0)
