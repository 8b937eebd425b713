"""Pictures of an R-PD evaluation: the rate-quality curves and side-by-side crops.

Files: ``rpd_psnr.png``, ``rpd_msssim.png`` and ``rpd_niqe.png`` (one curve per method, with the originals'
NIQE as a reference line), with a judging segmenter ``rate_miou.png`` and ``rate_pixel_accuracy.png``
(:func:`plot_rate_accuracy`), and ``crops/<key>_<codec>_q<quality>.png`` (the original, every method's image
and the label map, centre crops side by side; ``crops/<key>_<reference>.png``: a reference codec's images at
each of its qualities). The reference codecs (``eval.reference_codecs``) are curves of their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pipeline.eval.rows import MeanRow

CROP_SIZE = 256
CROPS_DIR = "crops"
# file, measure, axis label
PLOTS = (
    ("rpd_psnr.png", "psnr", "PSNR (dB)"),
    ("rpd_msssim.png", "ms_ssim", "MS-SSIM"),
    ("rpd_niqe.png", "niqe", "NIQE (lower = more natural)"),
)


def plot_curves(
    path: Path,
    means: Sequence[MeanRow],
    metric: str,
    label: str,
    codec: str,
    reference: float | None = None,
    references: Sequence[str] = (),
) -> None:
    """R-PD curves of ``metric`` (axis ``label``) over bits per pixel, one per method (the codec's
    first, then the reference codecs', dash-dotted), against the total rate (solid) and, where it differs,
    the codec rate alone (dashed); ``reference``: a horizontal line for the original images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name in sorted({m.method for m in means}, key=lambda n: (n != codec, n not in references, n)):
        pts = sorted((m for m in means if m.method == name), key=lambda m: m.measures.bpp_codec)
        plain = name == codec or name in references  # a codec's curve, without models
        legend = name if name not in references else f"{name} (reference codec)"
        for p in pts if not plain else []:  # a model curve lists its models, one per quality
            legend += f"\n  q{p.quality}: {p.label}" + (" (TRAINING FRAMES)" if p.on_training_frames else "")
        values = [getattr(p.measures, metric) for p in pts]
        style = {"marker": "s", "linestyle": "-."} if name in references else {"marker": "o"}
        line = ax.plot([p.measures.bpp_total for p in pts], values, label=legend, **style)[0]
        if any(p.measures.bpp_total != p.measures.bpp_codec for p in pts):
            ax.plot(
                [p.measures.bpp_codec for p in pts],
                values,
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"{name}, codec bits only",
            )
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="grey", linestyle=":", label="original images")
    ax.set_xlabel("bits per pixel (solid: codec + label map; dashed: codec only)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_rpd(
    out: Path, means: Sequence[MeanRow], codec: str, original_niqe: float, references: Sequence[str] = ()
) -> list[Path]:
    """Write the R-PD plots into ``out`` (``references``: the reference codecs); return their paths."""
    paths = []
    for name, metric, label in PLOTS:
        niqe = original_niqe if metric == "niqe" else None
        plot_curves(out / name, means, metric, label, codec, niqe, references)
        paths.append(out / name)
    return paths


ACCURACY_PLOTS = (
    ("rate_miou.png", "miou", "mIoU of the judging segmenter"),
    ("rate_pixel_accuracy.png", "pixel_accuracy", "pixel accuracy of the judging segmenter"),
)


def plot_rate_accuracy(
    out: Path,
    means: Sequence[MeanRow],
    codec: str,
    judge: str,
    original: dict[str, float],
    references: Sequence[str] = (),
) -> list[Path]:
    """Write the rate-accuracy plots (downstream accuracy over bits per pixel, one curve per method, the
    accuracy on the originals as a reference line) into ``out``; ``judge`` names the segmenter."""
    paths = []
    for name, metric, label in ACCURACY_PLOTS:
        plot_curves(out / name, means, metric, f"{label}\n({judge})", codec, original[metric], references)
        paths.append(out / name)
    return paths


def label_palette(source_name: str) -> np.ndarray:
    """256 x 3 uint8 colours: Cityscapes' own for its label ids, else a fixed VOC-style bit palette."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    if source_name == "cityscapes":
        from cityscapesscripts.helpers.labels import labels

        for lab in labels:
            if 0 <= lab.id < 256:
                palette[lab.id] = lab.color
    return palette


def _panel(image: np.ndarray, title: str, box: tuple[int, int, int, int]) -> np.ndarray:
    top, left, h, w = box
    crop = np.ascontiguousarray(image[top : top + h, left : left + w])
    bar = np.full((22, w, 3), 255, dtype=np.uint8)
    cv2.putText(
        bar, title[: max(1, w // 8)], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA
    )
    return np.concatenate([bar, crop], axis=0)


def write_crop(path: Path, panels: list[tuple[str, np.ndarray]]) -> None:
    """Centre crops (at most 256 x 256) of the panels side by side, each under its title."""
    height, width = panels[0][1].shape[:2]
    h, w = min(height, CROP_SIZE), min(width, CROP_SIZE)
    box = ((height - h) // 2, (width - w) // 2, h, w)
    gap = np.full((h + 22, 4, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for title, image in panels:
        parts += [_panel(image, title, box), gap]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(parts[:-1], axis=1), cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def write_comparison(
    path: Path,
    original: np.ndarray,
    label: np.ndarray,
    outputs: Sequence[tuple[str, np.ndarray]],
    palette: np.ndarray,
) -> None:
    """The crop of ``original``, each titled output and the label map (coloured by ``palette``)."""
    write_crop(path, [("original", original), *outputs, ("label map", palette[label])])
