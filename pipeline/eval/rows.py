"""Typed R-PD results: one :class:`RPDRow` per image x method x quality (``rpd.csv``) and one
:class:`MeanRow` per model x quality (``rpd_mean.csv``).

Everything per measure is derived from the fields of :class:`Measures`: the columns of both CSVs, the
means, the columns of the printed table and the tracked metrics. Adding a measure is adding a field there
(and computing it in :class:`pipeline.eval.scoring.Scorer`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

MEASURES_FIELD = "measures"  # the field of a row that holds its Measures, spelled out as columns


class Shown(NamedTuple):
    """How the printed table shows a number: its title, right-aligned in ``width``, ``precision`` decimals."""

    title: str
    width: int
    precision: int


def shown(title: str, width: int, precision: int, **kwargs: Any) -> Any:
    """A dataclass field shown in the printed table (see :data:`TABLE`)."""
    return field(metadata={"shown": Shown(title, width, precision)}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class Measures:
    """What is measured of one reconstruction (a per-image row), or the means of those (a mean row).

    Rates in bits per pixel: ``bpp_codec`` the codec bitstream alone, ``bpp_total`` what the decoder must
    receive (codec + the lossless label map for methods that read labels). PSNR is capped at 100 dB; NIQE is
    the standard one; LPIPS is NaN when its weights are unavailable. An optional measure (default ``None``)
    is a column only where it was measured: ``niqe_fitted`` (NIQE against a pristine model fitted on the
    evaluated split's originals) with ``eval.niqe_fitted``; ``miou`` and ``pixel_accuracy`` (downstream
    accuracy of the ``eval.segmenter`` network's prediction on the reconstruction, against the ground truth in
    Cityscapes train ids, :mod:`pipeline.eval.segmentation`) with ``eval.segmenter``: of the one image in a
    per-image row, pooled over the set (one confusion matrix, as cityscapesscripts does) in a mean row;
    ``correction_scale``, the factor the encoder scaled the generator's correction by (``code / 128``,
    :mod:`pipeline.model.correction_scale`), for a model with ``model.correction_scale: frame``: below 1
    where the model over-corrects the evaluated frames; ``map_sent``, 1 where the encoder sent the label map
    and 0 where it did not, for the curves of ``eval.map_choice`` (:mod:`pipeline.model.map_choice`): in a
    mean row, the share of frames that received their map.
    """

    bpp_codec: float = shown("bpp_codec", 9, 4)
    bpp_total: float = shown("bpp_total", 9, 4)
    psnr: float = shown("PSNR", 7, 3)
    ms_ssim: float = shown("MS-SSIM", 8, 5)
    niqe: float = shown("NIQE", 7, 3)
    niqe_fitted: float | None = shown("NIQE-fit", 8, 3, default=None)
    lpips: float = shown("LPIPS", 7, 4)
    miou: float | None = shown("mIoU", 7, 4, default=None)
    pixel_accuracy: float | None = shown("PixAcc", 7, 4, default=None)
    correction_scale: float | None = shown("scale", 6, 3, default=None)
    map_sent: float | None = shown("map", 5, 2, default=None)

    @classmethod
    def names(cls, optional: Sequence[str] = ()) -> list[str]:
        """The measures in column order: the required ones and those of ``optional``."""
        return [
            f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING or f.name in optional
        ]

    @classmethod
    def optional(cls) -> list[str]:
        """The measures that may be absent."""
        return [f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING]

    def as_dict(self) -> dict[str, float]:
        """The measured values by name, in column order (absent optional measures left out)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: value for name, value in values.items() if value is not None}

    @classmethod
    def mean(cls, items: Sequence[Measures]) -> Measures:
        """Plain means, measure by measure (a NaN makes its mean NaN), of the measures the items have."""
        return cls(**{name: float(np.mean([getattr(m, name) for m in items])) for name in items[0].as_dict()})


@dataclass(frozen=True)
class RPDRow:
    """One image x method x quality: a row of ``rpd.csv``."""

    key: str
    method: str  # the curve
    model: str  # the model's identity (see pipeline.eval.methods)
    codec: str
    quality: int
    measures: Measures
    on_training_frames: bool


@dataclass(frozen=True)
class MeanRow:
    """One model x quality: the plain means of its rows, plus the set-level FID; a row of
    ``rpd_mean.csv``. The notes say why LPIPS or FID is NaN, or what the FID was computed over."""

    method: str
    model: str
    label: str  # short unique name of the model, for tables and legends
    codec: str
    quality: int
    images: int
    measures: Measures
    fid: float = shown("FID", 7, 2)
    lpips_note: str
    fid_note: str
    on_training_frames: bool

    def values(self) -> dict[str, float]:
        """Every number of the row by name, in table order: the measures, then FID."""
        return {**self.measures.as_dict(), "fid": self.fid}


Row = RPDRow | MeanRow


def csv_columns(row_type: type[Row], optional: Sequence[str] = ()) -> list[str]:
    """The CSV columns of ``row_type``: its fields in order, its measures spelled out (the optional ones
    named in ``optional`` only)."""
    columns: list[str] = []
    for f in dataclasses.fields(row_type):
        columns += Measures.names(optional) if f.name == MEASURES_FIELD else [f.name]
    return columns


def csv_record(row: Row) -> dict[str, Any]:
    """``row`` as a CSV record: column -> value (written with ``str``)."""
    record: dict[str, Any] = {}
    for f in dataclasses.fields(row):
        value = getattr(row, f.name)
        if f.name == MEASURES_FIELD:
            record.update(value.as_dict())
        else:
            record[f.name] = value
    return record


def csv_text(row_type: type[Row], rows: Sequence[Row]) -> str:
    """``rows`` as CSV text with a header: the columns of ``row_type``, with each optional measure that
    the rows have."""
    present = {name for row in rows for name in row.measures.as_dict()}
    optional = [name for name in Measures.optional() if name in present]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(row_type, optional))
    writer.writeheader()
    writer.writerows(csv_record(row) for row in rows)
    return buffer.getvalue()


# the printed table's numbers, in order: the measures, then FID (the keys of MeanRow.values)
TABLE: dict[str, Shown] = {
    f.name: f.metadata["shown"]
    for f in (*dataclasses.fields(Measures), *dataclasses.fields(MeanRow))
    if "shown" in f.metadata
}
ROW_COLUMNS = csv_columns(RPDRow)
MEAN_COLUMNS = csv_columns(MeanRow)
