"""Fidelity to the original: PSNR and MS-SSIM of two images.

Images are RGB ``uint8`` ``H x W x 3`` (numpy arrays or tensors; ``3 x H x W`` tensors are accepted too).

* **PSNR** is per image over all pixels and channels. Identical images give ``inf``; wherever PSNRs are
  stored or averaged (CSV rows, means, BD-rate) they go through :func:`cap_psnr`, i.e. ``min(psnr, 100 dB)``,
  so a mean stays finite and the CSV mean equals the mean of its rows.
* **MS-SSIM** is pytorch-msssim's (``data_range=255``, 11-tap Gaussian window, the five standard weights).
  Five scales need a short side above 160 px; smaller images use the most scales that fit
  (short side > ``10 * 2**(levels - 1)``) with the first ``levels`` standard weights renormalised to sum
  to 1 (:func:`ms_ssim_levels`). Values from different level counts are not comparable with each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim as _library_ms_ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim
from torch import Tensor

PSNR_CAP_DB = 100.0
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_WIN = 11

ImageLike = np.ndarray | Tensor


def as_rgb_uint8(image: ImageLike, name: str = "image") -> np.ndarray:
    """``image`` as a contiguous ``H x W x 3`` uint8 numpy array (tensors may also be ``3 x H x W``)."""
    if isinstance(image, Tensor):
        array = image.detach().cpu()
        if array.dim() == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.permute(1, 2, 0)
        array = array.numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"{name} must be a numpy array or tensor, got {type(image).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{name} must be H x W x 3 RGB, got shape {array.shape}")
    # a read-only array (e.g. decoded from a shard buffer) is copied: torch refuses to share those
    return np.ascontiguousarray(array) if array.flags.writeable else array.copy()


def rgb_pair(a: ImageLike, b: ImageLike) -> tuple[np.ndarray, np.ndarray]:
    """Two images as :func:`as_rgb_uint8` arrays of one shape."""
    x, y = as_rgb_uint8(a, "a"), as_rgb_uint8(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    return x, y


def psnr(a: ImageLike, b: ImageLike) -> float:
    """PSNR in dB of two uint8 RGB images (peak 255); ``inf`` when they are identical."""
    x, y = rgb_pair(a, b)
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def cap_psnr(value: float) -> float:
    """``min(value, PSNR_CAP_DB)``: the form in which PSNRs are stored and averaged."""
    return min(float(value), PSNR_CAP_DB)


def ms_ssim_levels(height: int, width: int) -> int:
    """Scales MS-SSIM can use on an image: 5, or fewer while the short side is <= ``10 * 2**(levels-1)``."""
    short = min(height, width)
    if short < MS_SSIM_WIN:
        raise ValueError(f"MS-SSIM needs both sides >= {MS_SSIM_WIN} px, got {height}x{width}")
    levels = len(MS_SSIM_WEIGHTS)
    while levels > 1 and short <= (MS_SSIM_WIN - 1) * 2 ** (levels - 1):
        levels -= 1
    return levels


def _ms_ssim_tensor(x: Tensor, y: Tensor, weights: Sequence[float]) -> float:
    """pytorch-msssim's MS-SSIM loop with ``len(weights)`` scales (its public function insists on five)."""
    levels = len(weights)
    weight_tensor = torch.tensor(weights, dtype=x.dtype)
    win = _fspecial_gauss_1d(MS_SSIM_WIN, 1.5).repeat(x.shape[1], 1, 1, 1)
    values = []
    for level in range(levels):
        ssim_per_channel, cs = _ssim(x, y, data_range=255, win=win, size_average=False)
        if level < levels - 1:
            values.append(torch.relu(cs))
            padding = [s % 2 for s in x.shape[2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=padding)
            y = F.avg_pool2d(y, kernel_size=2, padding=padding)
    values.append(torch.relu(ssim_per_channel))
    stacked = torch.stack(values, dim=0)
    return float(torch.prod(stacked ** weight_tensor.view(-1, 1, 1), dim=0).mean())


def ms_ssim(a: ImageLike, b: ImageLike) -> float:
    """MS-SSIM in [0, 1] of two uint8 RGB images (fewer scales on small images, see the module doc)."""
    x, y = rgb_pair(a, b)
    tx = torch.from_numpy(x).permute(2, 0, 1)[None].float()
    ty = torch.from_numpy(y).permute(2, 0, 1)[None].float()
    levels = ms_ssim_levels(x.shape[0], x.shape[1])
    if levels == len(MS_SSIM_WEIGHTS):
        return float(_library_ms_ssim(tx, ty, data_range=255, size_average=True))
    weights = MS_SSIM_WEIGHTS[:levels]
    return _ms_ssim_tensor(tx, ty, [w / sum(weights) for w in weights])
