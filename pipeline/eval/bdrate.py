"""Bjontegaard delta rate and delta PSNR (VCEG-M33).

BD-rate: fit log(rate) as a function of distortion (e.g. PSNR) for the anchor and the test curve,
integrate both fits over the distortion interval the two curves share, and turn the mean log-rate
difference into a percentage: ``(exp(mean diff) - 1) * 100``. Negative = the test needs fewer bits
for the same quality.

Two interpolations:

* ``"pchip"`` (default): piecewise cubic Hermite interpolation through the points (scipy's
  ``PchipInterpolator``), as in the later VCEG/JVET BD-rate tools; it does not overshoot between points.
* ``"cubic"``: the original least-squares cubic polynomial of VCEG-M33.

Both need at least 4 points per curve (the Bjontegaard convention) and distinct distortion values
(resp. rates for :func:`bd_psnr`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.interpolate import PchipInterpolator

MODES = ("pchip", "cubic")
MIN_POINTS = 4


def _curve(rate: Sequence[float], dist: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rate, dtype=np.float64).ravel()
    d = np.asarray(dist, dtype=np.float64).ravel()
    if r.size != d.size:
        raise ValueError(f"{name}: {r.size} rates but {d.size} distortion values")
    if r.size < MIN_POINTS:
        raise ValueError(f"{name}: BD needs at least {MIN_POINTS} points, got {r.size}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(d))):
        raise ValueError(f"{name}: rates and distortion values must be finite")
    if np.any(r <= 0):
        raise ValueError(f"{name}: rates must be positive")
    return r, d


def _integral(x: np.ndarray, y: np.ndarray, low: float, high: float, mode: str, name: str) -> float:
    """Integral over [low, high] of the curve y(x) interpolated with ``mode``."""
    if mode == "cubic":
        poly = np.polyint(np.polyfit(x, y, 3))
        return float(np.polyval(poly, high) - np.polyval(poly, low))
    if mode == "pchip":
        order = np.argsort(x)
        xs, ys = x[order], y[order]
        if np.any(np.diff(xs) == 0):
            raise ValueError(f"{name}: pchip needs distinct values on its x axis, got {xs.tolist()}")
        return float(PchipInterpolator(xs, ys).integrate(low, high))
    raise ValueError(f"unknown BD mode {mode!r}; expected one of {MODES}")


def _overlap(a: np.ndarray, b: np.ndarray, what: str) -> tuple[float, float]:
    low, high = max(a.min(), b.min()), min(a.max(), b.max())
    if not high > low:
        raise ValueError(
            f"the two curves share no {what} interval: "
            f"[{a.min():g}, {a.max():g}] vs [{b.min():g}, {b.max():g}]"
        )
    return float(low), float(high)


def bd_rate(
    rate_anchor: Sequence[float],
    dist_anchor: Sequence[float],
    rate_test: Sequence[float],
    dist_test: Sequence[float],
    mode: str = "pchip",
) -> float:
    """Average rate difference (percent) of the test curve against the anchor at equal distortion.

    ``dist`` is a quality where higher is better (PSNR, MS-SSIM in dB, ...).
    """
    ra, da = _curve(rate_anchor, dist_anchor, "anchor")
    rt, dt = _curve(rate_test, dist_test, "test")
    low, high = _overlap(da, dt, "distortion")
    int_anchor = _integral(da, np.log(ra), low, high, mode, "anchor")
    int_test = _integral(dt, np.log(rt), low, high, mode, "test")
    return float((np.exp((int_test - int_anchor) / (high - low)) - 1.0) * 100.0)


def bd_psnr(
    rate_anchor: Sequence[float],
    dist_anchor: Sequence[float],
    rate_test: Sequence[float],
    dist_test: Sequence[float],
    mode: str = "pchip",
) -> float:
    """Average quality difference (units of ``dist``, e.g. dB) of the test curve at equal rate."""
    ra, da = _curve(rate_anchor, dist_anchor, "anchor")
    rt, dt = _curve(rate_test, dist_test, "test")
    la, lt = np.log(ra), np.log(rt)
    low, high = _overlap(la, lt, "log-rate")
    int_anchor = _integral(la, da, low, high, mode, "anchor")
    int_test = _integral(lt, dt, low, high, mode, "test")
    return float((int_test - int_anchor) / (high - low))
