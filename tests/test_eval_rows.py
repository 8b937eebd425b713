"""Typed R-PD rows: the CSV columns, means, table and tracked metrics all follow the fields of Measures;
the per-image scores that evaluation and validation share."""

from __future__ import annotations

import csv
import dataclasses
import io
import math

import numpy as np
import pytest

from pipeline.eval.report import format_table, tracked_metrics
from pipeline.eval.rows import (
    MEAN_COLUMNS,
    ROW_COLUMNS,
    TABLE,
    MeanRow,
    Measures,
    RPDRow,
    csv_columns,
    csv_text,
)
from pipeline.eval.scoring import Scores, mean_scores, score_image

MEASURES = ["bpp_codec", "bpp_total", "psnr", "ms_ssim", "niqe", "lpips"]


def _measures(psnr: float = 30.0, **values: float) -> Measures:
    defaults = {"bpp_codec": 0.5, "bpp_total": 0.6, "ms_ssim": 0.95, "niqe": 4.0, "lpips": math.nan}
    return Measures(psnr=psnr, **{**defaults, **values})


def _row(key: str, measures: Measures) -> RPDRow:
    return RPDRow(key, "hevc-SE", "m.safetensors#0123456789ab", "hevc", 37, measures, False)


def _mean(measures: Measures, fid: float = math.nan) -> MeanRow:
    return MeanRow(
        "hevc-SE", "m#0123456789ab", "run/m#0123456789ab", "hevc", 37, 2, measures, fid, "", "", True
    )


def test_the_file_columns_are_those_of_the_previous_version() -> None:
    """rpd.csv and rpd_mean.csv keep their columns, in order; niqe_fitted follows niqe where measured."""
    assert csv_columns(RPDRow) == [
        "key",
        "method",
        "model",
        "codec",
        "quality",
        *MEASURES,
        "on_training_frames",
    ]
    assert csv_columns(MeanRow) == [
        *("method", "model", "label", "codec", "quality", "images"),
        *MEASURES,
        *("fid", "lpips_note", "fid_note", "on_training_frames"),
    ]
    assert csv_columns(RPDRow) == ROW_COLUMNS and csv_columns(MeanRow) == MEAN_COLUMNS
    fitted = csv_columns(RPDRow, ["niqe_fitted"])
    assert fitted[fitted.index("niqe") + 1] == "niqe_fitted" and len(fitted) == len(ROW_COLUMNS) + 1


def test_every_measure_is_a_column_a_table_entry_and_a_tracked_metric() -> None:
    """What "adding a measure is one field" rests on: nothing lists the measures by hand."""
    names = [f.name for f in dataclasses.fields(Measures)]
    assert Measures.optional() == ["niqe_fitted", "miou", "pixel_accuracy", "correction_scale", "map_sent"]
    assert set(csv_columns(RPDRow, names)) >= set(names) and set(csv_columns(MeanRow, names)) >= set(names)
    assert list(TABLE) == [*names, "fid"]
    values = dict.fromkeys(names, 1.0)
    mean = _mean(Measures(**values), fid=2.0)
    assert list(mean.values()) == [*names, "fid"]
    tracked = tracked_metrics([mean], {"methods": {}})
    assert sorted(tracked) == sorted(f"eval.hevc-SE.run_m_0123456789ab.q37.{n}" for n in [*names, "fid"])
    table = format_table([mean])
    assert all(TABLE[n].title in table.splitlines()[0] for n in [*names, "fid"])
    assert table.splitlines()[-1].startswith("! scored on frames the model was trained on")


def test_means_are_plain_and_optional_measures_stay_absent() -> None:
    rows = [_measures(30.0, niqe=math.nan), _measures(34.0)]
    mean = Measures.mean(rows)
    assert mean.psnr == 32.0 and math.isnan(mean.niqe) and mean.niqe_fitted is None
    assert "niqe_fitted" not in mean.as_dict() and list(mean.as_dict()) == MEASURES
    fitted = Measures.mean([_measures(niqe_fitted=2.0), _measures(niqe_fitted=4.0)])
    assert fitted.niqe_fitted == 3.0


def test_csv_text_round_trips_the_rows() -> None:
    rows = [_row("a", _measures(31.123456789012345)), _row("b", _measures(100.0, bpp_total=0.625))]
    records = list(csv.DictReader(io.StringIO(csv_text(RPDRow, rows))))
    assert list(records[0]) == ROW_COLUMNS
    assert [float(r["psnr"]) for r in records] == [31.123456789012345, 100.0]  # repr: exact round trip
    assert [r["on_training_frames"] for r in records] == ["False", "False"]
    assert records[1]["quality"] == "37" and math.isnan(float(records[1]["lpips"]))
    fitted = [_row("a", _measures(niqe_fitted=3.5))]
    assert list(next(csv.DictReader(io.StringIO(csv_text(RPDRow, fitted))))) == csv_columns(
        RPDRow, ["niqe_fitted"]
    )
    means = list(csv.DictReader(io.StringIO(csv_text(MeanRow, [_mean(_measures(), fid=12.5)]))))
    assert list(means[0]) == MEAN_COLUMNS and means[0]["fid"] == "12.5" and means[0]["images"] == "2"


def test_mean_scores_are_the_means_of_the_per_image_scores(sample_image: np.ndarray) -> None:
    """Validation's means are of evaluation's per-image scores; NIQE where it is defined."""
    rng = np.random.default_rng(0)
    noisy = np.clip(sample_image + rng.normal(0, 6, sample_image.shape), 0, 255).astype(np.uint8)
    flat = np.full_like(sample_image, 90)  # NIQE is undefined on a flat image
    pairs = [(sample_image, noisy), (sample_image, sample_image), (sample_image, flat)]
    each = [score_image(a, b) for a, b in pairs]
    assert each[1].psnr == 100.0 and each[1].ms_ssim == pytest.approx(1.0)
    assert math.isnan(each[2].niqe) and math.isfinite(each[0].niqe)
    mean = mean_scores(pairs)
    assert mean.psnr == pytest.approx(np.mean([s.psnr for s in each]), rel=1e-12)
    assert mean.ms_ssim == pytest.approx(np.mean([s.ms_ssim for s in each]), rel=1e-12)
    assert mean.niqe == pytest.approx((each[0].niqe + each[1].niqe) / 2, rel=1e-12)
    assert math.isnan(mean_scores([(sample_image, flat)]).niqe)
    assert mean.as_dict("codec_") == {
        "codec_psnr": mean.psnr,
        "codec_ms_ssim": mean.ms_ssim,
        "codec_niqe": mean.niqe,
    }
    assert set(dataclasses.asdict(Scores(1.0, 2.0, 3.0))) <= set(Measures.names())
