"""The hevc decoder's chroma: libheif repeats each 4:2:0 chroma sample, the codec interpolates it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.codecs import get_codec
from pipeline.data.codecs.chroma import interpolate_chroma

# BT.601 full range, written out here rather than taken from the module under test
TO_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
TO_RGB = np.linalg.inv(TO_YCBCR)


def rgb_of(luma: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """The float RGB image of a full-size luma plane and full-size (Cb, Cr) planes (H x W x 2)."""
    return np.concatenate([luma[..., None], chroma], axis=-1) @ TO_RGB.T


def random_picture(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A luma plane and half-size chroma planes, smooth enough to stay inside [0, 255] in RGB."""
    rng = np.random.default_rng(0)
    luma = 128 + 40 * rng.standard_normal((height, width)).clip(-1.5, 1.5)
    half = 20 * rng.standard_normal((height // 2, width // 2, 2)).clip(-1.5, 1.5)
    return luma, half


def test_the_chroma_is_interpolated_and_the_luma_kept() -> None:
    luma, half = random_picture(32, 48)
    nearest = half.repeat(2, axis=0).repeat(2, axis=1)
    decoded = np.rint(rgb_of(luma, nearest)).astype(np.uint8)
    assert decoded.min() > 0 and decoded.max() < 255  # no clipping: the test is about interpolation
    planes = torch.from_numpy(half).permute(2, 0, 1)[None]
    bilinear = F.interpolate(planes, scale_factor=2, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    expected = rgb_of(luma, bilinear.numpy())

    out = interpolate_chroma(decoded)
    assert out.dtype == np.uint8 and out.shape == decoded.shape
    assert np.abs(out - expected).max() <= 1.5  # the input's and the output's rounding
    assert np.abs(decoded - expected).mean() > 3  # the repeated chroma is far from it
    ycbcr = out.astype(np.float64) @ TO_YCBCR.T
    assert np.abs(ycbcr[..., 0] - luma).max() <= 1.0


def test_an_odd_picture_is_interpolated_as_its_even_extension() -> None:
    luma, half = random_picture(18, 34)
    decoded = np.rint(rgb_of(luma, half.repeat(2, axis=0).repeat(2, axis=1))).astype(np.uint8)
    odd = np.ascontiguousarray(decoded[:17, :33])
    out = interpolate_chroma(odd)
    assert out.shape == (17, 33, 3)
    extended = np.pad(odd, ((0, 1), (0, 1), (0, 0)), mode="edge")
    assert np.array_equal(out, interpolate_chroma(extended)[:17, :33])


@pytest.mark.parametrize("qp", [32, 42])
def test_hevc_decodes_closer_to_the_original_than_libheif(sample_image: np.ndarray, qp: int) -> None:
    linear, nearest = get_codec("hevc"), get_codec("hevc", chroma_upsampling="nearest")
    stream = linear.encode(sample_image, qp)
    smooth, repeated = linear.decode(stream), nearest.decode(stream)
    original = sample_image.astype(np.float64)

    def mse(image: np.ndarray) -> float:
        return float(np.mean((image.astype(np.float64) - original) ** 2))

    assert mse(smooth) < mse(repeated)
    # libheif's picture has one chroma per 2x2 block (R - G is the same over it), the codec's does not
    blocks = (repeated[..., 0].astype(int) - repeated[..., 1]).reshape(64, 2, 128, 2)
    assert np.mean(blocks.max(axis=(1, 3)) == blocks.min(axis=(1, 3))) > 0.99
    blocks = (smooth[..., 0].astype(int) - smooth[..., 1]).reshape(64, 2, 128, 2)
    assert np.mean(blocks.max(axis=(1, 3)) == blocks.min(axis=(1, 3))) < 0.9


def test_an_unknown_chroma_upsampling_is_refused() -> None:
    with pytest.raises(ValueError, match=r"chroma_upsampling must be one of linear, nearest, got 'cubic'"):
        get_codec("hevc", chroma_upsampling="cubic")
