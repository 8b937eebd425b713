"""R-PD evaluation: the base codec against codec-SE (and the no-semantics ablation) at every quality.

One pass: inputs (:mod:`pipeline.eval.inputs`: the shards of ``eval.split``, or the dataset encoded on the
fly) -> methods (:mod:`pipeline.eval.methods`: the codec and one method per exported generator x quality,
each with its model identity and curve) -> score (:mod:`pipeline.eval.scoring`: one typed row per
image x method x quality, :mod:`pipeline.eval.rows`) -> aggregate and write (:mod:`pipeline.eval.report`)
-> plot (:mod:`pipeline.eval.plots`) -> print and log.

Frames: a model that records its training frames is never scored on them unless
``eval.allow_training_frames`` (then its results are flagged ``on_training_frames``).

Rates, both in every row: ``bpp_codec`` (the codec bitstream alone) and ``bpp_total`` (what the decoder
must receive: codec + the lossless label map for methods that read labels; equal to ``bpp_codec`` for the
base codec and the no-semantics model).

Outputs in ``eval.output_dir``: ``rpd.csv``, ``rpd_mean.csv``, ``bdrate.json``, ``niqe_model.json``
(``eval.niqe_fitted`` only), ``rpd_psnr.png`` / ``rpd_msssim.png`` / ``rpd_niqe.png`` and ``crops/`` (the
first ``eval.crops`` images). PSNRs are capped at 100 dB (:func:`pipeline.eval.fidelity.cap_psnr`).

NIQE (column ``niqe``) is the standard one, against the published pristine model. With ``eval.niqe_fitted``
a pristine model is also fitted on the split's own originals (``niqe_model.json``) and scored as the extra
column ``niqe_fitted``.

Downstream accuracy (``eval.segmenter``, a segmenter file): the judging network segments the originals and
every method's image at every quality; ``miou`` and ``pixel_accuracy`` join the measures (per image in
``rpd.csv``, pooled over the set in ``rpd_mean.csv`` and the table), the per-class IoUs go to
``segmentation.json`` (with the judge's name and sha256 and its accuracy on the originals), and
``rate_miou.png`` / ``rate_pixel_accuracy.png`` beside the R-PD plots. The judge may differ from the
segmenter that makes the decoder's label maps (``data.label_source=decoder``); the table says which judged.

Label source: every model must have been trained on the maps ``data.label_source`` gives it (its spec's
``label_source``; ``gt`` when absent); another is refused in one line.

The map withheld and the map chosen: ``eval.withheld_maps`` scores every model that receives a label map
again on zero semantics with no label bits (``<curve> (map withheld)``), and ``eval.map_choice`` with its
encoder sending the map only on frames where it pays (``<curve> (map chosen)``,
:mod:`pipeline.model.map_choice`; each frame also pays the choice's flag bit, and the column ``map`` is the
share of frames sent their map).

Reference codecs (``eval.reference_codecs``, each at the qualities of ``eval.reference_qualities``): other
codecs encode the same originals, without a model, and are scored with the same measures (accuracy
included). Their rows (method, model and codec: the codec's name; quality on its own scale) join ``rpd.csv``
and ``rpd_mean.csv``, each is a curve of its own on every plot, and ``bdrate.json`` (``references``) and the
printed table give the BD-rate of the codec, codec-SE and the ablation against each, on codec and on total
bits. A reference codec this machine lacks, or the evaluated codec named as one, is refused before any work.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.atomic import write_atomic
from pipeline.config import JobConfig
from pipeline.data.manifest import key_file_name
from pipeline.eval.fid import load_fid_inception
from pipeline.eval.gains import format_gains, frame_gains
from pipeline.eval.inputs import EvalInput, EvalSample, open_input
from pipeline.eval.label_rate import LabelRates
from pipeline.eval.lpips import load_lpips
from pipeline.eval.methods import (
    MapChooser,
    Method,
    Reconstruction,
    check_training_frames,
    encode_reference,
    load_methods,
    map_choice_methods,
    reconstruct,
    reference_methods,
    withheld_map_methods,
)
from pipeline.eval.plots import CROPS_DIR, label_palette, plot_rate_accuracy, plot_rpd, write_comparison
from pipeline.eval.report import (
    bdrate_report,
    describe_frames,
    format_bdrate,
    format_references,
    format_table,
    mean_rows,
    tracked_metrics,
    write_results,
)
from pipeline.eval.rows import MeanRow
from pipeline.eval.scoring import Scorer, fit_niqe
from pipeline.eval.segmentation import SegmentationScores
from pipeline.lock import folder_lock
from pipeline.segment.judge import LoadedSegmenter, open_segmenter
from pipeline.tracking import Tracker

NIQE_MODEL_FILE = "niqe_model.json"
SEGMENTATION_FILE = "segmentation.json"


def evaluate(cfg: JobConfig, models: list[str], tracker: Tracker | None = None) -> Path:
    """Evaluate the codec and every model on ``eval.split``; write the results; return their folder."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = open_input(cfg)
    if data.count == 0:
        raise ValueError(f"no images to evaluate ({data.description})")
    references = reference_methods(cfg.eval.reference_codecs, cfg.eval.reference_qualities, data.codec)
    judge = _open_judge(cfg.eval.segmenter, data.source_name)
    methods = load_methods(
        models, data.codec, data.qualities, data.label_nc, device, cfg.tracking.uri, data.decode_options
    )
    check_label_source(methods, cfg.data.label_source)
    chosen = map_choice_methods(methods, data.codec) if cfg.eval.map_choice else []
    if cfg.eval.withheld_maps:
        methods += withheld_map_methods(methods)
    methods += chosen
    keys = data.keys()
    check_training_frames(methods, keys, cfg.eval.allow_training_frames)
    out = Path(cfg.eval.output_dir)
    with folder_lock(out, "evaluation"):
        return _evaluate_locked(cfg, data, methods, keys, out, tracker, judge, references)


def check_reference_codecs(cfg: JobConfig) -> None:
    """Refuse, before any work, reference codecs that this machine lacks or that are ``loader.codec``."""
    reference_methods(cfg.eval.reference_codecs, cfg.eval.reference_qualities, cfg.loader.codec)


def _open_judge(path: str, source_name: str) -> LoadedSegmenter | None:
    """The judging segmenter of ``eval.segmenter`` (none when unset); refused for non-Cityscapes labels."""
    if not path:
        return None
    if source_name != "cityscapes":
        raise ValueError(f"eval.segmenter judges Cityscapes labels (train ids); the data is {source_name}")
    return open_segmenter(path)


def check_label_source(methods: Sequence[Method], source: str) -> None:
    """Refuse a model trained on other label maps than ``data.label_source`` gives it."""
    for method in methods:
        if method.spec is not None and not method.spec.zero_semantics:
            trained = method.spec.trained_label_source
            if trained != source:
                raise ValueError(
                    f"model {method.origin} was trained on {trained} label maps, but data.label_source is "
                    f"{source}: evaluate it with data.label_source={trained}"
                )


def _evaluate_locked(
    cfg: JobConfig,
    data: EvalInput,
    methods: list[Method],
    keys: list[str],
    out: Path,
    tracker: Tracker | None,
    judge: LoadedSegmenter | None = None,
    references: Sequence[Method] = (),
) -> Path:
    """:func:`evaluate` once it holds the lock of ``eval.output_dir``; ``references``: the reference
    codecs' methods (:func:`pipeline.eval.methods.reference_methods`)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fitted = fit_niqe(data, f"{cfg.data.width}x{cfg.data.height}") if cfg.eval.niqe_fitted else None
    if fitted is not None:
        write_atomic(out / NIQE_MODEL_FILE, json.dumps(fitted.model.to_dict()))
    scorer = Scorer(
        data.codec,
        load_lpips(cfg.eval.lpips_weights, device),
        load_fid_inception(cfg.eval.fid_weights, device),
        fitted.model if fitted is not None else None,
        judge,
    )
    _score(data, methods, scorer, out / CROPS_DIR, cfg.eval.crops, references)

    means = mean_rows(scorer.rows, [*methods, *references], data.qualities, scorer.fid, scorer.lpips_note)
    if judge is not None:
        means = [_pooled_accuracy(m, scorer.accuracy(m.model, m.quality)) for m in means]
    names = list(dict.fromkeys(m.name for m in references))
    report = bdrate_report(means, data.codec, data.qualities, names)
    report["original_niqe"] = scorer.original_niqe
    if fitted is not None:
        report["original_niqe_fitted"] = fitted.original_niqe
    report["frames"] = {"split": cfg.eval.split, "count": len(keys), "keys": keys}
    gains = frame_gains(scorer.rows, data.codec, data.qualities)
    report["frame_gains"] = [g.as_dict() for g in gains]
    files = write_results(out, scorer.rows, means, report)
    files += plot_rpd(out, means, data.codec, scorer.original_niqe, names)
    if fitted is not None:
        files.append(out / NIQE_MODEL_FILE)
    accuracy: dict[str, Any] = {}
    if judge is not None:
        original = scorer.original_accuracy.scores()
        accuracy = _accuracy_report(judge, original, means, scorer)
        files.append(write_atomic(out / SEGMENTATION_FILE, json.dumps(accuracy, indent=2)))
        files += plot_rate_accuracy(out, means, data.codec, judge.name, _as_measures(original), names)

    print(f"R-PD evaluation of {data.description}; standard NIQE of the originals {scorer.original_niqe:.3f}")
    print(describe_frames(cfg.eval.split, keys))
    print(format_table(means))
    if gains:
        print(format_gains(gains))
    if references:
        print(format_references(references))
    metrics = tracked_metrics(means, report)
    if accuracy:
        original = accuracy["original"]
        print(
            f"downstream accuracy judged by {judge.name if judge else ''} (mIoU, PixAcc; 19 Cityscapes "
            f"classes, void ignored); on the originals: mIoU {_shown(original['miou'])}, "
            f"PixAcc {_shown(original['pixel_accuracy'])}"
        )
        metrics.update(
            {f"eval.original.{k}": original[k] for k in ("miou", "pixel_accuracy") if original[k] is not None}
        )
    if report["methods"] or report["references"]:
        print(format_bdrate(report))
    if tracker is not None:
        _log(tracker, files, out / CROPS_DIR, metrics)
    return out


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _as_measures(scores: SegmentationScores) -> dict[str, float]:
    return {"miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy}


def _pooled_accuracy(mean: MeanRow, scores: SegmentationScores) -> MeanRow:
    """``mean`` with its accuracy pooled over the set (one confusion matrix), not a mean of images'."""
    measures = dataclasses.replace(mean.measures, **_as_measures(scores))
    return dataclasses.replace(mean, measures=measures)


def _accuracy_report(
    judge: LoadedSegmenter, original: SegmentationScores, means: Sequence[MeanRow], scorer: Scorer
) -> dict[str, Any]:
    """``segmentation.json``: the judge, its accuracy on the originals and per model x quality (per class)."""

    def entry(scores: SegmentationScores) -> dict[str, Any]:
        values = {**_as_measures(scores), **{f"iou.{k}": v for k, v in scores.class_iou.items()}}
        finite = {k: (v if math.isfinite(v) else None) for k, v in values.items()}  # JSON has no NaN
        return {
            "miou": finite["miou"],
            "pixel_accuracy": finite["pixel_accuracy"],
            "pixels": scores.pixels,
            "class_iou": {k: finite[f"iou.{k}"] for k in scores.class_iou},
        }

    return {
        "judge": {"name": judge.name, "path": str(judge.path), "sha256": judge.sha256},
        "conventions": "cityscapesscripts: 19 train classes, void ignored, pooled over the set",
        "original": entry(original),
        "methods": [
            {
                "method": m.method,
                "model": m.model,
                "label": m.label,
                "quality": m.quality,
                **entry(scorer.accuracy(m.model, m.quality)),
            }
            for m in means
        ],
    }


def _score(
    data: EvalInput,
    methods: Sequence[Method],
    scorer: Scorer,
    crops: Path,
    n_crops: int,
    references: Sequence[Method] = (),
) -> None:
    """Score every method's image of every sample at every quality, and every reference codec's at each of
    its own; write the crops of the first ``n_crops`` samples (where a model's image stands beside the
    codec's, or the codec is alone; a reference codec's images at its qualities side by side)."""
    palette = label_palette(data.source_name)
    label_rates = LabelRates(data)
    chooser = MapChooser(data.codec, data.decode_options) if any(m.map_choice for m in methods) else None
    for index, sample in enumerate(tqdm(data.samples(), total=data.count, desc="R-PD evaluation")):
        scorer.add_original(sample.image, sample.label)
        for quality in data.qualities:
            outputs = []
            rebuild = _Reconstructions(sample, quality)
            for method in methods:
                if method.quality not in (None, quality):
                    continue
                label_bpp = label_rates(sample, quality, method)
                if chooser is not None and method.map_choice:
                    made, label_bpp = chooser(method, sample, quality, label_bpp, rebuild)
                else:
                    made = rebuild(method)
                extra = {"scale": made.scale, "map_sent": made.map_sent}
                scorer.add(sample, quality, method, made.image, made.bpp, label_bpp, **extra)
                outputs.append((f"{method.name} q{quality}", made.image))
            if index < n_crops and (len(outputs) > 1 or len(methods) == 1):
                path = crops / key_file_name(sample.key, f"_{data.codec}_q{quality}.png")
                write_comparison(path, sample.image, sample.label, outputs, palette)
        encoded: dict[str, list[tuple[str, np.ndarray]]] = {}
        for method in references:
            quality, result = encode_reference(method, sample)
            scorer.add(sample, quality, method, result.decoded, bpp=result.bpp)
            title = f"{method.name} q{quality} {result.bpp:.3f} bpp"
            encoded.setdefault(method.name, []).append((title, result.decoded))
        for name, outputs in encoded.items() if index < n_crops else ():
            path = crops / key_file_name(sample.key, f"_{name}.png")
            write_comparison(path, sample.image, sample.label, outputs, palette)


class _Reconstructions:
    """:func:`pipeline.eval.methods.reconstruct` of one sample at one quality, made once per generator and
    input: a model's curve, its withheld map (``eval.withheld_maps``) and its chosen map (``eval.map_choice``)
    share the same two images."""

    def __init__(self, sample: EvalSample, quality: int) -> None:
        self.sample, self.quality = sample, quality
        self._made: dict[tuple[int, bool], Reconstruction] = {}

    def __call__(self, method: Method) -> Reconstruction:
        key = (id(method.generator), method.spec is not None and method.spec.zero_semantics)
        if key not in self._made:
            self._made[key] = reconstruct(method, self.sample, self.quality)
        return self._made[key]


def _log(tracker: Tracker, files: Sequence[Path], crops: Path, metrics: dict[str, float]) -> None:
    """Log the result files (under ``eval``), the crops (``eval/crops``) and the metrics."""
    for path in files:
        tracker.log_artifact(path, "eval")
    if crops.is_dir():
        tracker.log_artifact(crops, f"eval/{crops.name}")
    tracker.log_metrics(metrics)
