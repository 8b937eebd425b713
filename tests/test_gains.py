"""Frame-paired gains (pipeline.eval.gains): pairing by frame, the interval, the pairs chosen, the report."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats

from pipeline.eval.gains import Gain, format_gains, frame_gains, paired, pairs
from pipeline.eval.report import tracked_metrics
from pipeline.eval.rows import Measures, RPDRow


def row(key: str, method: str, quality: int, psnr: float, niqe: float = 5.0, codec: str = "hevc") -> RPDRow:
    measures = Measures(bpp_codec=0.1, bpp_total=0.1, psnr=psnr, ms_ssim=0.9, niqe=niqe, lpips=math.nan)
    return RPDRow(key, method, method, codec, quality, measures, False)


def test_pairs_frames_by_key_whatever_the_row_order() -> None:
    codec = {"a": 30.0, "b": 31.0, "c": 32.0, "d": 29.0}
    gain = {"a": 0.3, "b": -0.1, "c": 0.2, "d": 0.0}
    rows = [row(k, "hevc", 42, v) for k, v in codec.items()]
    rows += [row(k, "hevc-SE", 42, codec[k] + gain[k], niqe=5.0 - gain[k]) for k in codec]
    random.Random(0).shuffle(rows)

    result = paired(rows, "hevc-SE", "hevc", 42, "psnr")
    diffs = np.array([gain[k] for k in sorted(gain)])
    assert result.frames == 4 and result.mean == pytest.approx(diffs.mean())
    half = stats.t.ppf(0.975, 3) * diffs.std(ddof=1) / 2  # t quantile x standard error, sqrt(4) frames
    assert result.ci95 == pytest.approx(half)
    assert (result.worst, result.best, result.improved) == (pytest.approx(-0.1), pytest.approx(0.3), 2)

    niqe = paired(rows, "hevc-SE", "hevc", 42, "niqe")  # lower is better: worst is the largest rise
    assert niqe.mean == pytest.approx(-diffs.mean())
    assert (niqe.worst, niqe.best, niqe.improved) == (pytest.approx(0.1), pytest.approx(-0.3), 2)


def test_one_frame_has_no_interval_and_mismatched_frames_are_refused() -> None:
    rows = [row("a", "hevc", 37, 30.0), row("a", "hevc-SE", 37, 30.5)]
    gain = paired(rows, "hevc-SE", "hevc", 37, "psnr")
    assert gain.mean == pytest.approx(0.5) and math.isnan(gain.ci95)
    assert gain.as_dict()["ci95"] is None and Gain.from_dict(gain.as_dict()).mean == gain.mean
    assert "n/a" in format_gains([gain])
    with pytest.raises(ValueError, match="cannot pair"):
        paired([*rows, row("b", "hevc", 37, 31.0)], "hevc-SE", "hevc", 37, "psnr")


def test_pairs_each_curve_with_the_codec_and_codec_se_with_its_ablation_and_withheld_map() -> None:
    rows = [
        row("a", name, 42, 30.0, codec=codec)
        for name, codec in [
            ("hevc", "hevc"),
            ("hevc-SE", "hevc"),
            ("hevc-SE (no semantics)", "hevc"),
            ("hevc-SE [other]", "hevc"),  # a second model's curve: no ablation of its own
            ("hevc-SE (map withheld)", "hevc"),  # eval.withheld_maps: the first model without its map
            ("avif", "avif"),  # a reference codec: another quality scale, never paired
        ]
    ]
    assert pairs(rows, "hevc") == [
        ("hevc-SE", "hevc"),
        ("hevc-SE (no semantics)", "hevc"),
        ("hevc-SE [other]", "hevc"),
        ("hevc-SE (map withheld)", "hevc"),
        ("hevc-SE", "hevc-SE (no semantics)"),
        ("hevc-SE", "hevc-SE (map withheld)"),
    ]


def test_frame_gains_keep_the_qualities_both_curves_have() -> None:
    rows = [row(k, "hevc", q, 30.0) for k in "ab" for q in (37, 42)]
    rows += [row(k, "hevc-SE", 42, 30.2) for k in "ab"]
    gains = frame_gains(rows, "hevc", [37, 42])
    assert {(g.quality, g.measure) for g in gains} == {(42, "psnr"), (42, "niqe")}
    text = format_gains(gains)
    assert "hevc-SE - hevc" in text and "+0.200" in text and "2/2" in text
    assert frame_gains([r for r in rows if r.method == "hevc"], "hevc", [37, 42]) == []


def test_tracked_gains_leave_out_what_is_not_a_number() -> None:
    rows = [row("a", "hevc", 37, 30.0, niqe=math.nan), row("a", "hevc-SE", 37, 30.5)]
    report = {"methods": {}, "frame_gains": [g.as_dict() for g in frame_gains(rows, "hevc", [37])]}
    assert tracked_metrics([], report) == {"eval.gain.hevc-SE.vs.hevc.q37.psnr": pytest.approx(0.5)}
