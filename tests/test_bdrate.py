"""Bjontegaard delta rate / PSNR on analytic curves and against an independent numeric integration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.eval.bdrate import MODES, bd_psnr, bd_rate

RATES = [0.10, 0.18, 0.33, 0.61]
PSNRS = [30.1, 32.4, 34.9, 37.2]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factor", [0.9, 1.25])
def test_constant_rate_ratio(mode: str, factor: float) -> None:
    result = bd_rate(RATES, PSNRS, [r * factor for r in RATES], PSNRS, mode=mode)
    assert result == pytest.approx((factor - 1) * 100, abs=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_distortion_shift_on_exponential_curve(mode: str) -> None:
    """rate = exp(D / 10): a curve 1 dB better at every rate needs exp(-0.1) of the rate."""
    d_anchor = np.array([30.0, 33.0, 36.0, 39.0, 42.0])
    d_test = d_anchor + 1.0
    rates = np.exp(d_anchor / 10)
    assert bd_rate(rates, d_anchor, rates, d_test, mode=mode) == pytest.approx(
        (math.exp(-0.1) - 1) * 100, abs=1e-9
    )
    assert bd_psnr(rates, d_anchor, rates, d_test, mode=mode) == pytest.approx(1.0, abs=1e-9)


def test_cubic_matches_dense_numeric_integration() -> None:
    rate_t = [0.09, 0.17, 0.35, 0.58]
    psnr_t = [30.6, 32.6, 35.6, 37.3]
    low, high = max(min(PSNRS), min(psnr_t)), min(max(PSNRS), max(psnr_t))
    grid = np.linspace(low, high, 200001)
    fit_a = np.polyval(np.polyfit(PSNRS, np.log(RATES), 3), grid)
    fit_t = np.polyval(np.polyfit(psnr_t, np.log(rate_t), 3), grid)
    expected = (math.exp(np.trapezoid(fit_t - fit_a, grid) / (high - low)) - 1) * 100
    assert bd_rate(RATES, PSNRS, rate_t, psnr_t, mode="cubic") == pytest.approx(expected, abs=1e-6)
    assert bd_rate(RATES, PSNRS, rate_t, psnr_t, mode="pchip") == pytest.approx(expected, abs=2.0)


def test_pchip_ignores_point_order() -> None:
    rate_t, psnr_t = [0.09, 0.17, 0.35, 0.58], [30.6, 32.6, 35.6, 37.3]
    ordered = bd_rate(RATES, PSNRS, rate_t, psnr_t)
    assert bd_rate(RATES[::-1], PSNRS[::-1], rate_t[::-1], psnr_t[::-1]) == pytest.approx(ordered)


def test_errors() -> None:
    with pytest.raises(ValueError, match="at least 4 points"):
        bd_rate(RATES[:3], PSNRS[:3], RATES[:3], PSNRS[:3])
    with pytest.raises(ValueError, match="share no distortion interval"):
        bd_rate(RATES, PSNRS, RATES, [p + 10 for p in PSNRS])
    with pytest.raises(ValueError, match="share no log-rate interval"):
        bd_psnr(RATES, PSNRS, [r * 10 for r in RATES], PSNRS)
    with pytest.raises(ValueError, match="3 distortion values"):
        bd_rate(RATES, PSNRS[:3], RATES, PSNRS)
    with pytest.raises(ValueError, match="positive"):
        bd_rate([0.0, *RATES[1:]], PSNRS, RATES, PSNRS)
    with pytest.raises(ValueError, match="distinct"):
        bd_rate(RATES, [30.0, 30.0, 33.0, 36.0], RATES, PSNRS)
    with pytest.raises(ValueError, match="unknown BD mode"):
        bd_rate(RATES, PSNRS, RATES, PSNRS, mode="linear")
