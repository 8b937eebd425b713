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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.atomic import write_atomic
from pipeline.config import JobConfig
from pipeline.data.manifest import key_file_name
from pipeline.eval.fid import load_fid_inception
from pipeline.eval.inputs import EvalInput, open_input
from pipeline.eval.lpips import load_lpips
from pipeline.eval.methods import Method, check_training_frames, load_methods, reconstruct
from pipeline.eval.plots import CROPS_DIR, label_palette, plot_rpd, write_comparison
from pipeline.eval.report import (
    bdrate_report,
    describe_frames,
    format_bdrate,
    format_table,
    mean_rows,
    tracked_metrics,
    write_results,
)
from pipeline.eval.scoring import Scorer, fit_niqe
from pipeline.lock import folder_lock
from pipeline.tracking import Tracker

NIQE_MODEL_FILE = "niqe_model.json"


def evaluate(cfg: JobConfig, models: list[str], tracker: Tracker | None = None) -> Path:
    """Evaluate the codec and every model on ``eval.split``; write the results; return their folder."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = open_input(cfg)
    if data.count == 0:
        raise ValueError(f"no images to evaluate ({data.description})")
    methods = load_methods(models, data.codec, data.qualities, data.label_nc, device, cfg.tracking.uri)
    keys = data.keys()
    check_training_frames(methods, keys, cfg.eval.allow_training_frames)
    out = Path(cfg.eval.output_dir)
    with folder_lock(out, "evaluation"):
        return _evaluate_locked(cfg, data, methods, keys, out, tracker)


def _evaluate_locked(
    cfg: JobConfig,
    data: EvalInput,
    methods: list[Method],
    keys: list[str],
    out: Path,
    tracker: Tracker | None,
) -> Path:
    """:func:`evaluate` once it holds the lock of ``eval.output_dir``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fitted = fit_niqe(data, f"{cfg.data.width}x{cfg.data.height}") if cfg.eval.niqe_fitted else None
    if fitted is not None:
        write_atomic(out / NIQE_MODEL_FILE, json.dumps(fitted.model.to_dict()))
    scorer = Scorer(
        data.codec,
        load_lpips(cfg.eval.lpips_weights, device),
        load_fid_inception(cfg.eval.fid_weights, device),
        fitted.model if fitted is not None else None,
    )
    _score(data, methods, scorer, out / CROPS_DIR, cfg.eval.crops)

    means = mean_rows(scorer.rows, methods, data.qualities, scorer.fid, scorer.lpips_note)
    report = bdrate_report(means, data.codec, data.qualities)
    report["original_niqe"] = scorer.original_niqe
    if fitted is not None:
        report["original_niqe_fitted"] = fitted.original_niqe
    report["frames"] = {"split": cfg.eval.split, "count": len(keys), "keys": keys}
    files = write_results(out, scorer.rows, means, report)
    files += plot_rpd(out, means, data.codec, scorer.original_niqe)
    if fitted is not None:
        files.append(out / NIQE_MODEL_FILE)

    print(f"R-PD evaluation of {data.description}; standard NIQE of the originals {scorer.original_niqe:.3f}")
    print(describe_frames(cfg.eval.split, keys))
    print(format_table(means))
    if report["methods"]:
        print(format_bdrate(report))
    if tracker is not None:
        _log(tracker, files, out / CROPS_DIR, tracked_metrics(means, report))
    return out


def _score(data: EvalInput, methods: Sequence[Method], scorer: Scorer, crops: Path, n_crops: int) -> None:
    """Score every method's image of every sample at every quality; write the crops of the first
    ``n_crops`` samples (where a model's image stands beside the codec's, or the codec is alone)."""
    palette = label_palette(data.source_name)
    for index, sample in enumerate(tqdm(data.samples(), total=data.count, desc="R-PD evaluation")):
        scorer.add_original(sample.image)
        for quality in data.qualities:
            outputs = []
            for method in methods:
                if method.quality not in (None, quality):
                    continue
                result = reconstruct(method, sample, quality)
                scorer.add(sample, quality, method, result)
                outputs.append((f"{method.name} q{quality}", result))
            if index < n_crops and (len(outputs) > 1 or len(methods) == 1):
                path = crops / key_file_name(sample.key, f"_{data.codec}_q{quality}.png")
                write_comparison(path, sample.image, sample.label, outputs, palette)


def _log(tracker: Tracker, files: Sequence[Path], crops: Path, metrics: dict[str, float]) -> None:
    """Log the result files (under ``eval``), the crops (``eval/crops``) and the metrics."""
    for path in files:
        tracker.log_artifact(path, "eval")
    if crops.is_dir():
        tracker.log_artifact(crops, f"eval/{crops.name}")
    tracker.log_metrics(metrics)
