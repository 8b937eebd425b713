"""Frame-paired gains: how sure a mean gain is, from the frames it was measured on.

A mean dPSNR of +0.02 dB over 10 frames says nothing until one knows whether every frame gained a little
or a few gained and others lost. Each gain here pairs two curves frame by frame (same key, same quality):
codec-SE and its ablation against the codec, and codec-SE against its zero-semantics ablation and, with
``eval.withheld_maps``, against itself with its map withheld (do the semantics help?). Per quality it
gives the mean difference, a 95 % interval of that mean (Student's t over
the frames), the worst and best frame and how many frames gained.

The interval covers which frames were scored, not how the model was trained: two training seeds can differ
by as much again (the README's quality benchmark shows it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from pipeline.eval.rows import RPDRow

MEASURES = ("psnr", "niqe")  # dPSNR: higher is better; dNIQE: lower is better
SEMANTICS_SUFFIX = " (no semantics)"
WITHHELD_SUFFIX = " (map withheld)"  # the curves of eval.withheld_maps (pipeline.eval.methods)


@dataclass(frozen=True)
class Gain:
    """``test`` minus ``anchor`` on one measure at one quality, over the frames both were scored on."""

    test: str
    anchor: str
    quality: int
    measure: str
    frames: int
    mean: float
    ci95: float  # half width of the 95 % interval of the mean; NaN with one frame
    worst: float  # the frame that fared worst (lowest dPSNR, highest dNIQE)
    best: float
    improved: int  # frames where test is better than anchor

    def as_dict(self) -> dict[str, Any]:
        """The fields, NaN as ``None`` (``bdrate.json`` stays strict JSON)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> Gain:
        """The inverse of :meth:`as_dict` (an entry of ``bdrate.json``'s ``frame_gains``)."""
        return cls(**{k: math.nan if v is None else v for k, v in entry.items()})


def ci95_half_width(values: Sequence[float] | np.ndarray) -> float:
    """The half-width of the 95 % Student-t interval of the mean of ``values`` (``nan`` for one value)."""
    n = len(values)
    return float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def paired(rows: Sequence[RPDRow], test: str, anchor: str, quality: int, measure: str) -> Gain:
    """``test`` minus ``anchor`` (curve names, :attr:`RPDRow.method`), frame by frame; every frame of one
    must be a frame of the other."""
    values = {
        name: {r.key: getattr(r.measures, measure) for r in rows if r.method == name and r.quality == quality}
        for name in (test, anchor)
    }
    if not values[test] or values[test].keys() != values[anchor].keys():
        raise ValueError(
            f"cannot pair {test!r} with {anchor!r} at quality {quality}: frames {sorted(values[test])} "
            f"against {sorted(values[anchor])}"
        )
    diff = np.array([values[test][key] - values[anchor][key] for key in sorted(values[test])])
    n = len(diff)
    ci95 = ci95_half_width(diff)
    sign = 1.0 if measure == "psnr" else -1.0  # +1 where higher is better
    return Gain(
        test=test,
        anchor=anchor,
        quality=quality,
        measure=measure,
        frames=n,
        mean=float(diff.mean()),
        ci95=ci95,
        worst=float(sign * np.min(sign * diff)),
        best=float(sign * np.max(sign * diff)),
        improved=int(np.sum(sign * diff > 0)),
    )


def pairs(rows: Sequence[RPDRow], codec: str) -> list[tuple[str, str]]:
    """The (test, anchor) curves to compare: every model curve against ``codec``, then each codec-SE curve
    against its zero-semantics ablation and against itself with its map withheld (``eval.withheld_maps``),
    where both were scored. Reference codecs are left out (their qualities are not the codec's)."""
    curves = list(dict.fromkeys(r.method for r in rows if r.codec == codec and r.method != codec))
    out = [(curve, codec) for curve in curves]
    for suffix in (SEMANTICS_SUFFIX, WITHHELD_SUFFIX):
        out += [
            (curve, curve + suffix)
            for curve in curves
            if not curve.endswith((SEMANTICS_SUFFIX, WITHHELD_SUFFIX)) and curve + suffix in curves
        ]
    return out


def frame_gains(rows: Sequence[RPDRow], codec: str, qualities: Sequence[int]) -> list[Gain]:
    """:func:`paired` for every pair of :func:`pairs`, measure of :data:`MEASURES` and quality both were
    scored at."""
    gains = []
    for test, anchor in pairs(rows, codec):
        scored = set.intersection(*({r.quality for r in rows if r.method == name} for name in (test, anchor)))
        for quality in [q for q in qualities if q in scored]:
            gains += [paired(rows, test, anchor, quality, measure) for measure in MEASURES]
    return gains


def format_gains(gains: Sequence[Gain]) -> str:
    """The gains for people: one line per pair x quality, dPSNR and dNIQE side by side."""
    if not gains:
        return "no frame-paired gains (no model curve beside the codec)"
    by_key = {(g.test, g.anchor, g.quality, g.measure): g for g in gains}
    width = max(len(f"{g.test} - {g.anchor}") for g in gains)
    head = (
        f"  {'frame-paired gain':<{width}} {'q':>4} {'n':>3} | {'dPSNR':>7} {'95% CI':>7} {'worst':>7} "
        f"{'better':>6} | {'dNIQE':>7} {'95% CI':>7}"
    )
    lines = [head, "-" * len(head)]
    for (test, anchor, quality, measure), g in by_key.items():
        if measure != "psnr":
            continue
        niqe = by_key.get((test, anchor, quality, "niqe"))
        niqe_text = f"{niqe.mean:>+7.3f} {_pm(niqe.ci95):>7}" if niqe is not None else ""
        pair, better = f"{test} - {anchor}", f"{g.improved}/{g.frames}"
        lines.append(
            f"  {pair:<{width}} {quality:>4} {g.frames:>3} | {g.mean:>+7.3f} {_pm(g.ci95):>7} "
            f"{g.worst:>+7.3f} {better:>6} | {niqe_text}"
        )
    lines.append(
        "  95% CI: Student's t over the frames (which frames were scored, not training noise); "
        "better: frames with a higher PSNR"
    )
    return "\n".join(lines)


def _pm(value: float) -> str:
    return "n/a" if math.isnan(value) else f"±{value:.3f}"
