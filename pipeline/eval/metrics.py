"""Image quality measures for R-PD evaluation: PSNR, MS-SSIM, NIQE, LPIPS and FID.

Images are RGB ``uint8`` ``H x W x 3`` (numpy arrays or tensors; ``3 x H x W`` tensors are accepted too).

* **PSNR** is per image over all pixels and channels. Identical images give ``inf``; wherever PSNRs are
  stored or averaged (CSV rows, means, BD-rate) they go through :func:`cap_psnr`, i.e. ``min(psnr, 100 dB)``,
  so a mean stays finite and the CSV mean equals the mean of its rows.
* **MS-SSIM** is pytorch-msssim's (``data_range=255``, 11-tap Gaussian window, the five standard weights).
  Five scales need a short side above 160 px; smaller images use the most scales that fit
  (short side > ``10 * 2**(levels - 1)``) with the first ``levels`` standard weights renormalised to sum
  to 1 (:func:`ms_ssim_levels`). Values from different level counts are not comparable with each other.
* **NIQE** (Mittal, Soundararajan, Bovik 2013) is the standard one: a port of the release's MATLAB
  ``computequality.m`` (rounded ``rgb2gray``, 96x96 patches, half scale by MATLAB's antialiased bicubic
  ``imresize``, 18 AGGD features per scale) scored against the release's published pristine model, shipped
  as ``pipeline/eval/assets/niqe_pristine.mat`` with its notice in ``pipeline/eval/assets/NIQE_NOTICE.txt``
  (:func:`published_niqe_model`, the default of :func:`niqe`). It reproduces the release's MATLAB scores of
  its test images to the printed four decimals. Optionally, a *dataset-fitted* pristine model can be fitted on
  a dataset's own uncompressed images (:func:`fit_niqe_model`); its scores are not standard NIQE and are
  comparable only with scores against the same fitted model. Lower is more natural.
* **LPIPS** (v0.1, AlexNet or VGG16 backbone) and **FID** (pytorch-fid's Inception-v3 pool3 features)
  need network weights that no installed package ships. They are read from local files only; when a file
  is missing the loaders return :class:`Unavailable` with the reason, never a number.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim as _library_ms_ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim
from scipy import linalg, ndimage
from scipy.io import loadmat
from scipy.special import gamma as gamma_fn
from torch import Tensor, nn

from pipeline.model.export import read_state_dict

PSNR_CAP_DB = 100.0
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_WIN = 11

ImageLike = np.ndarray | Tensor


@dataclass(frozen=True)
class Unavailable:
    """A metric that could not be computed, and why (written as NaN plus the reason in CSVs)."""

    reason: str


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


def _pair(a: ImageLike, b: ImageLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_rgb_uint8(a, "a"), as_rgb_uint8(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    return x, y


def psnr(a: ImageLike, b: ImageLike) -> float:
    """PSNR in dB of two uint8 RGB images (peak 255); ``inf`` when they are identical."""
    x, y = _pair(a, b)
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
    x, y = _pair(a, b)
    tx = torch.from_numpy(x).permute(2, 0, 1)[None].float()
    ty = torch.from_numpy(y).permute(2, 0, 1)[None].float()
    levels = ms_ssim_levels(x.shape[0], x.shape[1])
    if levels == len(MS_SSIM_WEIGHTS):
        return float(_library_ms_ssim(tx, ty, data_range=255, size_average=True))
    weights = MS_SSIM_WEIGHTS[:levels]
    return _ms_ssim_tensor(tx, ty, [w / sum(weights) for w in weights])


# --------------------------------------------------------------------------------------------- NIQE

NIQE_PATCH = 96
NIQE_SHARPNESS_THRESHOLD = 0.75
NIQE_FEATURES = 36
NIQE_PUBLISHED_FITTED_ON = (
    "published pristine model (Mittal et al. 2013, modelparameters.mat: 125 pristine images, 96x96 patches)"
)
# MATLAB rgb2gray's coefficients (first row of the inverse NTSC transform), to 15 digits
_RGB2GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
# MATLAB's gam = 0.2:0.001:10 and estimateaggdparam's r_gam on it
_SHAPE_GRID = 0.2 + 0.001 * np.arange(9801)
_AGGD_RATIO = gamma_fn(2 / _SHAPE_GRID) ** 2 / (gamma_fn(1 / _SHAPE_GRID) * gamma_fn(3 / _SHAPE_GRID))
# computefeature.m's circshift shifts; np.roll(a, s, axis=(0, 1)) == circshift(a, s)
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


def _mscn_window() -> np.ndarray:
    """1-D factor of ``fspecial('gaussian', 7, 7/6)`` (the normalised 2-D window is its outer product)."""
    x = np.arange(-3, 4, dtype=np.float64)
    g = np.exp(-(x**2) / (2 * (7 / 6) ** 2))
    return g / g.sum()


_MSCN_WINDOW = _mscn_window()


@dataclass(frozen=True)
class NIQEModel:
    """The pristine multivariate Gaussian of NIQE features, and what it was fitted on
    (``n_patches`` 0: not recorded, as for the published model)."""

    mu: np.ndarray
    cov: np.ndarray
    fitted_on: str
    patch_size: int = NIQE_PATCH
    n_patches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mu": self.mu.tolist(),
            "cov": self.cov.tolist(),
            "fitted_on": self.fitted_on,
            "patch_size": self.patch_size,
            "n_patches": self.n_patches,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NIQEModel:
        return cls(
            mu=np.asarray(data["mu"], dtype=np.float64),
            cov=np.asarray(data["cov"], dtype=np.float64),
            fitted_on=str(data["fitted_on"]),
            patch_size=int(data["patch_size"]),
            n_patches=int(data["n_patches"]),
        )


@functools.cache
def published_niqe_model() -> NIQEModel:
    """The NIQE release's pristine model (``pipeline/eval/assets/niqe_pristine.mat``, a copy of its
    ``modelparameters.mat``; licence and provenance in ``pipeline/eval/assets/NIQE_NOTICE.txt``)."""
    with importlib.resources.files("pipeline").joinpath("eval/assets/niqe_pristine.mat").open("rb") as handle:
        params = loadmat(handle)
    return NIQEModel(
        mu=np.asarray(params["mu_prisparam"], dtype=np.float64).reshape(NIQE_FEATURES),
        cov=np.asarray(params["cov_prisparam"], dtype=np.float64).reshape(NIQE_FEATURES, NIQE_FEATURES),
        fitted_on=NIQE_PUBLISHED_FITTED_ON,
        patch_size=NIQE_PATCH,
    )


def _cubic(x: np.ndarray) -> np.ndarray:
    """MATLAB imresize's bicubic kernel (a = -0.5)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * (
        (ax > 1) & (ax <= 2)
    )


def _resize_weights(in_length: int, out_length: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB imresize's ``contributions``: 0-based source indices and weights (``out x taps``)."""
    kernel_width = 4.0
    antialias = scale < 1
    if antialias:
        kernel_width /= scale
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]  # 1-based, may fall outside the image
    distance = u[:, None] - indices
    weights = scale * _cubic(scale * distance) if antialias else _cubic(distance)
    weights = weights / weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])  # symmetric
    indices = mirror[np.mod(indices.astype(np.int64) - 1, mirror.size)]
    keep = np.any(weights != 0, axis=0)
    return indices[:, keep], weights[:, keep]


def matlab_imresize(image: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(image, scale)`` (bicubic, antialiased when shrinking) of a float image, computed in
    float64 without rounding: output sides ``ceil(side * scale)``, rows resized first, then columns."""
    out = np.asarray(image, dtype=np.float64)
    for axis in (0, 1):
        in_length = out.shape[axis]
        indices, weights = _resize_weights(in_length, int(math.ceil(in_length * scale)), scale)
        moved = np.moveaxis(out, axis, 0)
        gathered = moved[indices]  # out_length x taps x rest
        resized = np.einsum("ot,ot...->o...", weights, gathered)
        out = np.moveaxis(resized, 0, axis)
    return out


def matlab_rgb2gray(image: ImageLike) -> np.ndarray:
    """MATLAB ``rgb2gray`` of a uint8 RGB image: its coefficients, rounded half away from zero to uint8."""
    rgb = as_rgb_uint8(image).astype(np.float64)
    gray = rgb[..., 0] * _RGB2GRAY[0] + rgb[..., 1] * _RGB2GRAY[1] + rgb[..., 2] * _RGB2GRAY[2]
    return np.clip(np.floor(gray + 0.5), 0, 255).astype(np.uint8)


def _mscn(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MSCN coefficients ``(im - mu) / (sigma + 1)`` and local deviation ``sigma`` (replicate borders)."""

    def blur(x: np.ndarray) -> np.ndarray:
        return ndimage.correlate1d(
            ndimage.correlate1d(x, _MSCN_WINDOW, axis=0, mode="nearest"), _MSCN_WINDOW, axis=1, mode="nearest"
        )

    mu = blur(image)
    sigma = np.sqrt(np.abs(blur(image * image) - mu * mu))
    return (image - mu) / (sigma + 1.0), sigma


def _aggd_params(x: np.ndarray) -> tuple[float, float, float]:
    """``estimateaggdparam.m``: AGGD shape alpha, left and right scales (NaN where one side is empty)."""
    left, right = x[x < 0], x[x > 0]
    if left.size == 0 or right.size == 0:
        return math.nan, math.nan, math.nan
    left_std, right_std = math.sqrt(float(np.mean(left**2))), math.sqrt(float(np.mean(right**2)))
    gamma_hat = left_std / right_std
    r_hat = float(np.mean(np.abs(x))) ** 2 / float(np.mean(x**2))
    r_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    alpha = float(_SHAPE_GRID[np.argmin((_AGGD_RATIO - r_norm) ** 2)])
    const = math.sqrt(gamma_fn(1 / alpha) / gamma_fn(3 / alpha))
    return alpha, left_std * const, right_std * const


def _block_features(block: np.ndarray) -> list[float]:
    """``computefeature.m``: the 18 features of one MSCN block."""
    alpha, beta_l, beta_r = _aggd_params(block.ravel())
    feats = [alpha, (beta_l + beta_r) / 2]
    for shift in _SHIFTS:
        alpha, beta_l, beta_r = _aggd_params((block * np.roll(block, shift, axis=(0, 1))).ravel())
        mean = (beta_r - beta_l) * gamma_fn(2 / alpha) / gamma_fn(1 / alpha)
        feats.extend([alpha, mean, beta_l, beta_r])
    return feats


def _blocks(image: np.ndarray, size: int) -> list[np.ndarray]:
    """Non-overlapping ``size x size`` blocks, column by column as MATLAB's blkproc + reshape order them."""
    rows, cols = image.shape[0] // size, image.shape[1] // size
    return [
        image[r * size : (r + 1) * size, c * size : (c + 1) * size] for c in range(cols) for r in range(rows)
    ]


def niqe_features(image: ImageLike, patch_size: int = NIQE_PATCH) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch NIQE features (``n x 36``: 18 at full and 18 at half scale) and patch sharpness (``n``),
    as the reference ``computequality.m`` computes them.

    Grey is MATLAB's rounded ``rgb2gray``, cut to whole ``patch_size`` patches; the half scale is MATLAB's
    antialiased bicubic ``imresize(im, 0.5)``; features are AGGD fits of the MSCN coefficients (7x7
    Gaussian, sigma 7/6) and of their four neighbour products. Sharpness is a patch's mean local deviation
    at full scale (used only to select patches for a pristine fit).
    """
    gray = matlab_rgb2gray(image).astype(np.float64)
    rows, cols = gray.shape[0] // patch_size, gray.shape[1] // patch_size
    if rows == 0 or cols == 0:
        raise ValueError(f"NIQE needs images of at least {patch_size}x{patch_size} px, got {gray.shape}")
    gray = gray[: rows * patch_size, : cols * patch_size]
    per_scale, sharpness = [], np.zeros(0)
    for scale in (1, 2):
        mscn, sigma = _mscn(gray)
        size = patch_size // scale
        per_scale.append(np.asarray([_block_features(b) for b in _blocks(mscn, size)], dtype=np.float64))
        if scale == 1:
            sharpness = np.asarray([b.mean() for b in _blocks(sigma, size)])
            gray = matlab_imresize(gray, 0.5)
    return np.concatenate(per_scale, axis=1), sharpness


def select_sharp_patches(
    features: np.ndarray, sharpness: np.ndarray, threshold: float = NIQE_SHARPNESS_THRESHOLD
) -> np.ndarray:
    """The patches of one image whose sharpness exceeds ``threshold`` x the image's sharpest patch."""
    return features[sharpness > threshold * sharpness.max()]


def fit_niqe_model_from_features(
    patches: Sequence[np.ndarray], fitted_on: str, patch_size: int = NIQE_PATCH
) -> NIQEModel:
    """Fit a pristine Gaussian on already selected patch features (rows with NaN are dropped): the
    dataset-fitted alternative to :func:`published_niqe_model`."""
    stacked = (
        np.concatenate([p.reshape(-1, NIQE_FEATURES) for p in patches], axis=0)
        if patches
        else np.zeros((0, NIQE_FEATURES))
    )
    stacked = stacked[np.all(np.isfinite(stacked), axis=1)]
    if stacked.shape[0] < 2:
        raise ValueError(f"NIQE pristine fit needs at least 2 usable patches, got {stacked.shape[0]}")
    return NIQEModel(
        mu=stacked.mean(axis=0),
        cov=np.cov(stacked, rowvar=False),
        fitted_on=fitted_on,
        patch_size=patch_size,
        n_patches=int(stacked.shape[0]),
    )


def fit_niqe_model(
    images: Iterable[ImageLike],
    fitted_on: str = "",
    patch_size: int = NIQE_PATCH,
    sharpness_threshold: float = NIQE_SHARPNESS_THRESHOLD,
) -> NIQEModel:
    """Fit a dataset's own pristine model on uncompressed images (sharpness-selected patches of each)."""
    patches = []
    for image in images:
        feats, sharp = niqe_features(image, patch_size)
        patches.append(select_sharp_patches(feats, sharp, sharpness_threshold))
    return fit_niqe_model_from_features(patches, fitted_on or f"{len(patches)} images", patch_size)


def niqe_from_features(features: np.ndarray, model: NIQEModel) -> float:
    """NIQE distance of an image's patch features to the pristine model, as ``computequality.m``: nanmean
    over patches, covariance over the patches without NaN, pseudo-inverse (NaN if no patch is usable)."""
    complete = features[np.all(np.isfinite(features), axis=1)]
    if complete.shape[0] == 0:
        return math.nan
    mu = np.nanmean(features, axis=0)
    cov = np.cov(complete, rowvar=False) if complete.shape[0] > 1 else np.zeros_like(model.cov)
    diff = model.mu - mu
    pooled = (model.cov + cov) / 2
    # computequality.m uses pinv, with MATLAB's tolerance max(size) * eps * largest singular value; a plain
    # inverse would give meaningless values when the pooled covariance is (numerically) singular, as it is
    # with a pristine model fitted on fewer patches than features
    inverse = np.linalg.pinv(pooled, rcond=max(pooled.shape) * np.finfo(np.float64).eps)
    return float(math.sqrt(max(float(diff @ inverse @ diff), 0.0)))


def niqe(image: ImageLike, model: NIQEModel | None = None) -> float:
    """NIQE of one image (lower = more natural) against ``model``; ``None``: the published pristine model."""
    model = published_niqe_model() if model is None else model
    return niqe_from_features(niqe_features(image, model.patch_size)[0], model)


# -------------------------------------------------------------------------------------------- LPIPS


def _vgg16_layout() -> tuple[Any, ...]:
    layout: list[Any] = []
    for spec in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        layout += [("M", 2)] if spec == "M" else [("C", spec, 3, 1, 1), "R"]
    return tuple(layout)


# name: (torchvision state dict file, ``features`` layout, indices of the tapped ReLUs); layout items are
# "R" (ReLU), ("M", kernel) (max pool, stride 2) and ("C", out, kernel, stride, padding) (conv).
LPIPS_BACKBONES: dict[str, tuple[str, tuple[Any, ...], tuple[int, ...]]] = {
    "alex": (
        "alexnet-owt-7be5be79.pth",
        (
            ("C", 64, 11, 4, 2),
            "R",
            ("M", 3),
            ("C", 192, 5, 1, 2),
            "R",
            ("M", 3),
            ("C", 384, 3, 1, 1),
            "R",
            ("C", 256, 3, 1, 1),
            "R",
            ("C", 256, 3, 1, 1),
            "R",
        ),
        (1, 4, 7, 9, 11),
    ),
    "vgg": ("vgg16-397923af.pth", _vgg16_layout(), (3, 8, 15, 22, 29)),
}
_LPIPS_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


def _backbone_layers(layout: tuple[Any, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in layout:
        if item == "R":
            layers.append(nn.ReLU())
        elif item[0] == "M":
            layers.append(nn.MaxPool2d(kernel_size=item[1], stride=2))
        else:
            _, out, kernel, stride, pad = item
            layers.append(nn.Conv2d(channels, out, kernel, stride=stride, padding=pad))
            channels = out
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018): unit-normalised backbone features, squared differences, learned
    1x1 channel weights, spatial mean, summed over five layers."""

    def __init__(self, net: str) -> None:
        super().__init__()
        if net not in LPIPS_BACKBONES:
            raise ValueError(f"LPIPS backbone must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
        self.net = net
        self.features = _backbone_layers(LPIPS_BACKBONES[net][1])
        self.taps = LPIPS_BACKBONES[net][2]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS[net])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        x = (x - self.shift) / self.scale
        for index, layer in enumerate(self.features[: self.taps[-1] + 1]):
            x = layer(x)
            if index in self.taps:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    @torch.no_grad()
    def forward(self, a: ImageLike, b: ImageLike) -> float:
        """LPIPS distance of two uint8 RGB images (lower = more similar)."""
        x, y = _pair(a, b)
        param = next(self.parameters())
        tx, ty = (torch.from_numpy(v).permute(2, 0, 1)[None].to(param) / 127.5 - 1 for v in (x, y))
        total = sum(
            lin((fx - fy) ** 2).mean(dim=(2, 3))
            for lin, fx, fy in zip(self.lins, self._taps(tx), self._taps(ty), strict=True)
        )
        return float(total)


def _hub_checkpoint(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def load_lpips(weights: str = "", device: str | torch.device = "cpu") -> LPIPS | Unavailable:
    """LPIPS from local files: the linear layers (``weights``: the lpips package's ``v0.1/alex.pth`` or
    ``vgg.pth``; empty: that file from the installed ``lpips`` package, if any) and the torchvision
    backbone (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``) beside it or in the torch hub cache.
    """
    if not weights:
        spec = importlib.util.find_spec("lpips")
        if spec is None or not spec.origin:
            return Unavailable(
                "LPIPS weights absent: the lpips package is not installed and eval.lpips_weights is empty "
                "(set it to lpips' weights/v0.1/alex.pth and put alexnet-owt-7be5be79.pth beside it or in "
                "the torch hub cache)"
            )
        weights = str(Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth")
    lin_path = Path(weights).expanduser()
    if not lin_path.is_file():
        return Unavailable(f"LPIPS linear-layer weights not found at {lin_path}")
    try:
        lin_state = read_state_dict(lin_path, "LPIPS linear layers")
        lins = {
            int(m.group(1)): v
            for k, v in lin_state.items()
            if (m := re.fullmatch(r"lin(\d)\.model\.\d\.weight", k))
        }
        widths = tuple(int(lins[i].shape[1]) for i in sorted(lins))
        net = next((n for n, c in _LPIPS_CHANNELS.items() if c == widths), None)
        if net is None:
            return Unavailable(
                f"{lin_path} is not an LPIPS v0.1 alex/vgg linear-layer file (widths {widths})"
            )
        backbone_name = LPIPS_BACKBONES[net][0]
        candidates = [lin_path.parent / backbone_name, _hub_checkpoint(backbone_name)]
        backbone = next((p for p in candidates if p.is_file()), None)
        if backbone is None:
            return Unavailable(
                f"LPIPS-{net} backbone weights {backbone_name} not found in {[str(p) for p in candidates]}"
            )
        model = LPIPS(net)
        features = {
            k[len("features.") :]: v
            for k, v in read_state_dict(backbone, "LPIPS backbone").items()
            if k.startswith("features.")
        }
        model.features.load_state_dict(features, strict=True)
        for i, lin in enumerate(model.lins):
            lin.weight.data.copy_(lins[i])
    except (ValueError, RuntimeError, KeyError) as err:
        return Unavailable(f"LPIPS weights unusable: {err}")
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- FID

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class _Conv(nn.Module):
    """Inception's BasicConv2d: conv (no bias), batch norm (eps 1e-3), ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg3(x)),
            ],
            1,
        )


class _InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class _InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _Conv(cin, c7, 1), _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _Conv(cin, c7, 1), _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                self.branch_pool(_avg3(x)),
            ],
            1,
        )


class _InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = _Conv(cin, 192, 1), _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionE(nn.Module):
    """pytorch-fid's FIDInceptionE_1 (average pool without padding counts) or _2 (max pool)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(dbl),
                self.branch3x3dbl_3b(dbl),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInception(nn.Module):
    """pytorch-fid's Inception-v3 up to pool3 (2048 features); state dict keys match its weights file."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (
            _InceptionA(192, 32),
            _InceptionA(256, 64),
            _InceptionA(288, 64),
        )
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = _InceptionC(768, 128), _InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _InceptionC(768, 160), _InceptionC(768, 192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = _InceptionE(1280, max_pool=False), _InceptionE(2048, max_pool=True)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """``B x 3 x H x W`` uint8 RGB -> ``B x 2048`` pool3 (bilinear to 299x299, scaled to [-1, 1])."""
        x = images.to(next(self.parameters())) / 127.5 - 1
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def features(self, image: ImageLike) -> np.ndarray:
        """Pool3 features (2048,) of one uint8 RGB image."""
        array = as_rgb_uint8(image)
        return self(torch.from_numpy(array).permute(2, 0, 1)[None])[0].double().cpu().numpy()


def load_fid_inception(weights: str = "", device: str | torch.device = "cpu") -> FIDInception | Unavailable:
    """pytorch-fid's Inception from ``weights`` (empty: ``pt_inception-2015-12-05-6726825d.pth`` in the torch
    hub cache); :class:`Unavailable` when absent or unusable."""
    path = Path(weights).expanduser() if weights else _hub_checkpoint(FID_WEIGHTS_FILE)
    if not path.is_file():
        return Unavailable(
            f"FID Inception weights not found at {path} "
            f"(set eval.fid_weights to pytorch-fid's {FID_WEIGHTS_FILE})"
        )
    model = FIDInception()
    try:
        state = read_state_dict(path, "FID Inception weights")
        own = model.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        if missing:
            return Unavailable(f"{path} is not pytorch-fid's Inception: missing {missing[:3]}...")
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    except (ValueError, RuntimeError) as err:
        return Unavailable(f"FID Inception weights unusable: {err}")
    return model.to(device).eval().requires_grad_(False)


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets (``n x d``, n >= 2), as pytorch-fid computes it."""
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {real.shape[0]} and {fake.shape[0]}")
    mu1, mu2 = real.mean(axis=0), fake.mean(axis=0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
