"""From per-image rows to results: the means per model x quality, the BD-rate report, the files, the printed
summary and the tracked metrics.

Files: ``rpd.csv`` (one row per image x method x quality), ``rpd_mean.csv`` (one row per model x quality:
plain means of the rows, plus set-level FID) and ``bdrate.json`` (BD-rate/BD-PSNR of each codec-SE curve
against the codec, per-quality deltas, the originals' NIQE and the scored frames; under ``references``, the
BD-rates of the codec, codec-SE and the ablation against each reference codec of ``eval.reference_codecs``).
MS-SSIM BD-rates use MS-SSIM in dB, ``-10 log10(1 - MS-SSIM)``. A reference codec's rows carry its own name
as method, model and codec, and its own quality scale.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.atomic import write_atomic
from pipeline.eval.bdrate import MIN_POINTS, bd_psnr, bd_rate
from pipeline.eval.methods import Method
from pipeline.eval.rows import TABLE, MeanRow, Measures, RPDRow, csv_text

ROWS_FILE = "rpd.csv"
MEANS_FILE = "rpd_mean.csv"
BDRATE_FILE = "bdrate.json"
SHOWN_KEYS = 10  # frame keys printed in full; more are abbreviated


def read_means(folder: Path) -> list[dict[str, str]]:
    """The rows of an evaluation folder's ``rpd_mean.csv``, cells as written."""
    with (folder / MEANS_FILE).open(newline="") as f:
        return list(csv.DictReader(f))


def means_by_curve(folder: Path) -> dict[tuple[str, int], dict[str, str]]:
    """:func:`read_means` keyed by ``(method, quality)``: one model per method and quality, as in the main
    job and the benchmarks."""
    return {(row["method"], int(row["quality"])): row for row in read_means(folder)}


def mean_rows(
    rows: Sequence[RPDRow],
    methods: Sequence[Method],
    qualities: Sequence[int],
    fid: Callable[[str, int], tuple[float, str]],
    lpips_note: str = "",
) -> list[MeanRow]:
    """One row per model x quality, in method order: the plain means of that model's rows at that quality,
    with ``fid(model, quality)`` (the value and its note) and ``lpips_note``."""
    out = []
    for method in methods:
        for quality in qualities if method.quality is None else [method.quality]:
            group = [r for r in rows if r.model == method.model and r.quality == quality]
            if not group:
                continue
            fid_value, fid_note = fid(method.model, quality)
            out.append(
                MeanRow(
                    method=method.name,
                    model=method.model,
                    label=method.label,
                    codec=group[0].codec,
                    quality=quality,
                    images=len(group),
                    measures=Measures.mean([r.measures for r in group]),
                    fid=fid_value,
                    lpips_note=lpips_note,
                    fid_note=fid_note,
                    on_training_frames=method.on_training_frames,
                )
            )
    return out


def _ms_ssim_db(value: float) -> float:
    return -10.0 * math.log10(1.0 - value) if value < 1.0 else math.inf


def bdrate_report(
    means: Sequence[MeanRow], codec: str, qualities: Sequence[int], references: Sequence[str] = ()
) -> dict[str, Any]:
    """BD-rate/BD-PSNR of each codec-SE curve against the codec (pchip), plus per-quality deltas; and under
    ``references``, of every curve that is not a reference codec's (the codec's, codec-SE's, the ablation's)
    against each reference codec of ``references``."""
    anchor = {m.quality: m.measures for m in means if m.method == codec}
    report: dict[str, Any] = {
        "anchor": codec,
        "qualities": list(qualities),
        "mode": "pchip",
        "distortion": {"psnr": "dB (capped at 100)", "ms_ssim": "dB: -10 log10(1 - MS-SSIM)"},
        "keys": "bd_rate_pct: % rate change at equal quality; bd_quality_db: quality change at equal rate",
        "methods": {},
        "references": {},
    }
    anchor_points = [anchor[q] for q in sorted(anchor)]
    for name in sorted({m.method for m in means} - {codec, *references}):
        points = sorted((m for m in means if m.method == name), key=lambda m: m.quality)
        entry: dict[str, Any] = {
            "per_quality": [
                {
                    "quality": p.quality,
                    "model": p.model,
                    "on_training_frames": p.on_training_frames,
                    "bpp_codec": p.measures.bpp_codec,
                    "bpp_total": p.measures.bpp_total,
                    "label_overhead_pct": 100.0 * (p.measures.bpp_total / p.measures.bpp_codec - 1.0),
                    "delta_psnr": p.measures.psnr - anchor[p.quality].psnr,
                    "delta_ms_ssim": p.measures.ms_ssim - anchor[p.quality].ms_ssim,
                    "delta_niqe": p.measures.niqe - anchor[p.quality].niqe,
                }
                for p in points
            ]
        }
        entry.update(_bd_entry(anchor_points, [p.measures for p in points], name, codec))
        if not entry["available"]:
            entry["reason"] += " per_quality holds the deltas at equal codec bitstream instead."
        report["methods"][name] = entry
    curves = sorted({m.method for m in means} - set(references), key=lambda n: (n != codec, n))
    for reference in references:
        ref_points = sorted((m for m in means if m.method == reference), key=lambda m: m.quality)
        report["references"][reference] = {
            "qualities": [p.quality for p in ref_points],
            "bpp": [p.measures.bpp_codec for p in ref_points],
            "methods": {
                name: _bd_entry(
                    [p.measures for p in ref_points],
                    [p.measures for p in sorted((m for m in means if m.method == name), key=_by_rate)],
                    name,
                    reference,
                )
                for name in curves
            },
        }
    return report


def _by_rate(mean: MeanRow) -> float:
    return mean.measures.bpp_codec


def _bd_entry(anchor: Sequence[Measures], tests: Sequence[Measures], name: str, anchor_name: str) -> dict:
    """BD-rate and BD-quality of ``tests`` against ``anchor`` (the anchor's codec bits, as it reads no label
    map) on PSNR and MS-SSIM (in dB), each on codec bits and on total bits; or why they are unavailable."""
    if len(tests) < MIN_POINTS or len(anchor) < MIN_POINTS:
        reason = (
            f"BD-rate needs >= {MIN_POINTS} qualities per curve; {name} has {len(tests)} and {anchor_name} "
            f"{len(anchor)}."
        )
        return {"available": False, "reason": reason}
    entry: dict[str, Any] = {"available": True, "bd_rate_pct": {}, "bd_quality_db": {}}
    for metric, convert in (("psnr", float), ("ms_ssim", _ms_ssim_db)):
        d_anchor = [convert(getattr(m, metric)) for m in anchor]
        d_test = [convert(getattr(m, metric)) for m in tests]
        for rate in ("bpp_codec", "bpp_total"):
            r_anchor = [m.bpp_codec for m in anchor]
            r_test = [getattr(m, rate) for m in tests]
            key = f"{metric}/{rate}"
            try:
                entry["bd_rate_pct"][key] = bd_rate(r_anchor, d_anchor, r_test, d_test)
                entry["bd_quality_db"][key] = bd_psnr(r_anchor, d_anchor, r_test, d_test)
            except ValueError as err:
                entry["bd_rate_pct"][key] = entry["bd_quality_db"][key] = None
                entry.setdefault("errors", {})[key] = str(err)
    return entry


def write_results(
    out: Path, rows: Sequence[RPDRow], means: Sequence[MeanRow], report: dict[str, Any]
) -> list[Path]:
    """Write ``rpd.csv``, ``rpd_mean.csv`` and ``bdrate.json`` to ``out`` atomically; return their paths."""
    files = {
        ROWS_FILE: csv_text(RPDRow, rows),
        MEANS_FILE: csv_text(MeanRow, means),
        BDRATE_FILE: json.dumps(report, indent=2),
    }
    return [write_atomic(out / name, text) for name, text in files.items()]


def describe_frames(split: str, keys: Sequence[str]) -> str:
    """Which frames are scored: split, count and keys (the first and last few of a long list)."""
    half = SHOWN_KEYS // 2
    shown = (
        list(keys)
        if len(keys) <= SHOWN_KEYS
        else [*keys[:half], f"... {len(keys) - 2 * half} more ...", *keys[-half:]]
    )
    return f"scored {len(keys)} frames of split {split!r}: {', '.join(shown)}"


def format_table(means: Sequence[MeanRow]) -> str:
    """The R-PD mean table for people: one line per model x quality; ``!`` marks scores on training frames."""
    columns = [name for name in TABLE if any(name in m.values() for m in means)]
    width = max(len("model"), *(len(m.label) for m in means))
    head = " ".join(
        [f"  {'method':<28}", f"{'model':<{width}}", f"{'q':>4}", f"{'n':>4}"]
        + [f"{TABLE[c].title:>{TABLE[c].width}}" for c in columns]
    )
    lines = [head, "-" * len(head)]
    for m in means:
        values = m.values()
        lines.append(
            " ".join(
                [
                    f"{'!' if m.on_training_frames else ' '} {m.method:<28}",
                    f"{m.label:<{width}}",
                    f"{m.quality:>4}",
                    f"{m.images:>4}",
                ]
                + [
                    f"{values[c]:>{TABLE[c].width}.{TABLE[c].precision}f}"
                    if c in values
                    else f"{'-':>{TABLE[c].width}}"  # a measure of some methods only (the correction scale)
                    for c in columns
                ]
            )
        )
    if any(m.on_training_frames for m in means):
        lines.append("! scored on frames the model was trained on (eval.allow_training_frames): not held out")
    return "\n".join(lines)


def format_references(references: Sequence[Method]) -> str:
    """Which reference codecs the table holds, at which qualities (each on its own scale)."""
    ladders: dict[str, list[str]] = {}
    better: dict[str, str] = {}
    for method in references:
        ladders.setdefault(method.name, []).append(f"q{method.quality}")
        higher = method.encoder is None or method.encoder.higher_quality_is_better
        better[method.name] = "higher" if higher else "lower"
    listed = ", ".join(f"{name} {'/'.join(qs)} ({better[name]} is better)" for name, qs in ladders.items())
    return f"reference codecs (no model; q on each codec's own scale): {listed}"


def format_bdrate(report: dict[str, Any]) -> str:
    """The BD-rates of :func:`bdrate_report` for people, one line per curve (and one per failed key)."""
    lines = []
    for name, entry in report["methods"].items():
        result = entry["bd_rate_pct"] if entry["available"] else entry["reason"]
        lines.append(f"BD-rate {name} vs {report['anchor']}: {result}")
        lines += [f"  {key}: not computed: {error}" for key, error in entry.get("errors", {}).items()]
    if report.get("references"):
        lines.append(format_reference_bdrate(report))
    return "\n".join(lines)


BD_KEYS = ("psnr/bpp_codec", "psnr/bpp_total", "ms_ssim/bpp_codec", "ms_ssim/bpp_total")


def format_reference_bdrate(report: dict[str, Any]) -> str:
    """The BD-rates against each reference codec for people: one line per curve x reference codec."""
    width = max(len("curve"), *(len(n) for e in report["references"].values() for n in e["methods"]))
    titles = ("PSNR codec", "PSNR total", "MS-SSIM codec", "MS-SSIM total")
    lines = [
        "BD-rate against the reference codecs (% bits at equal quality; negative: fewer bits than the "
        "reference; codec: the codec's bits, total: with the label map):",
        f"  {'curve':<{width}} {'vs':<6} " + " ".join(f"{t:>13}" for t in titles),
    ]
    for reference, block in report["references"].items():
        for name, entry in block["methods"].items():
            head = f"  {name:<{width}} {reference:<6} "
            if not entry["available"]:
                lines.append(head + entry["reason"])
                continue
            rates = entry["bd_rate_pct"]
            cells = [("n/a" if rates[k] is None else f"{rates[k]:+.2f} %") for k in BD_KEYS]
            lines.append(head + " ".join(f"{c:>13}" for c in cells))
    if any("n/a" in line for line in lines[2:]):
        lines.append("  n/a: not computed; bdrate.json says why (e.g. the curves share no quality interval)")
    return "\n".join(lines)


def slug(text: str) -> str:
    """``text`` as a tracking-safe metric name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _metric_prefix(mean: MeanRow) -> str:
    """``eval.<method>.<model label>.q<quality>``; the codec's label is its method name, not repeated."""
    parts = dict.fromkeys((mean.method, mean.label))
    return ".".join(["eval", *map(slug, parts), f"q{mean.quality}"])


def tracked_metrics(means: Sequence[MeanRow], report: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of every mean row (``eval.<method>.<label>.q<quality>.<measure>``) and the
    BD-rates (``eval.bdrate.<curve>.<distortion>_<rate>``; against a reference codec
    ``eval.bdrate_vs_<reference>.<curve>.<distortion>_<rate>``), and the frame-paired gains
    (``eval.gain.<curve>.vs.<anchor>.q<quality>.<measure>`` and ``...<measure>_ci95``)."""
    scalars = {
        f"{_metric_prefix(m)}.{name}": value
        for m in means
        for name, value in m.values().items()
        if math.isfinite(value)
    }
    for name, entry in report["methods"].items():
        for key, value in (entry.get("bd_rate_pct") or {}).items():
            if value is not None:
                scalars[f"eval.bdrate.{slug(name)}.{slug(key)}"] = float(value)
    for reference, block in report.get("references", {}).items():
        for name, entry in block["methods"].items():
            for key, value in (entry.get("bd_rate_pct") or {}).items():
                if value is not None:
                    scalars[f"eval.bdrate_vs_{slug(reference)}.{slug(name)}.{slug(key)}"] = float(value)
    for gain in report.get("frame_gains", []):
        pair = f"{slug(gain['test'])}.vs.{slug(gain['anchor'])}"
        prefix = f"eval.gain.{pair}.q{gain['quality']}.{gain['measure']}"
        for name, key in ((prefix, "mean"), (f"{prefix}_ci95", "ci95")):
            if gain[key] is not None:  # NaN (a NaN measure, or one frame's interval) is stored as None
                scalars[name] = float(gain[key])
    return scalars
