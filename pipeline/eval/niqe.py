"""NIQE (Mittal, Soundararajan, Bovik 2013), the standard one: lower = more natural.

A port of the release's MATLAB ``computequality.m`` (rounded ``rgb2gray``, 96x96 patches, half scale by
MATLAB's antialiased bicubic ``imresize``, 18 AGGD features per scale) scored against the release's
published pristine model, shipped as ``pipeline/eval/assets/niqe_pristine.mat`` with its notice in
``pipeline/eval/assets/NIQE_NOTICE.txt`` (:func:`published_niqe_model`, the default of :func:`niqe`). It
reproduces the release's MATLAB scores of its test images to the printed four decimals.

Optionally, a *dataset-fitted* pristine model can be fitted on a dataset's own uncompressed images
(:func:`fit_niqe_model`); its scores are not standard NIQE and are comparable only with scores against the
same fitted model.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.io import loadmat
from scipy.special import gamma as gamma_fn

from pipeline.eval.fidelity import ImageLike, as_rgb_uint8

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
