"""The main job, end to end: shards -> three phases per quality -> R-PD evaluation, in one tracked run.

The semantic prior (phase 1) does not see the decoded image, so it is trained once and shared;
phases 2 and 3 are trained per codec quality, one model per codec x quality as in the paper
(``job.models: per_quality``), or once for all the job's qualities (``shared``: one model told each
sample's quality, the CPU recipe of ``configs/recipe.yaml``, which trains phase 3 alone: ``job.phases``).
Beside each codec-SE model the zero-semantics ablation is trained with the same phases 2-3 budget (from the
identity generator: a prior drawn from zeroed semantics would be a constant), so the semantics'
contribution is measured, not assumed. Training, checkpoint selection and the reported figures use three
disjoint splits (``loader.split``, ``validate.split``, ``eval.split``; see :mod:`pipeline.data.splits`).
Each registered model's version then gets its held-out figures (:func:`tag_registered_models`).

With ``segment.in_main_job`` the job also trains the segmenter of the ``segment`` section on the training
split (all the job's qualities: ``loader.qualities``, else every built one; a finished run in
``segment.output_dir`` is reused) and, per quality, codec-SE on that segmenter's decoder label maps
(``data.label_source=decoder``: 0 label bits; the maps of every quality are predicted beside the shards
first). That model trains phases 2-3 from the identity generator with the ablation's budget, not from the
semantic prior: the prior learnt ground-truth maps, and a prior of its own would cost another phase 1; and
without instance edges, which a decoder does not have. It is registered as ``<codec>-se-decoder-q<quality>``
(its spec names the segmenter's sha256) and tagged with its own held-out figures. Its folder names the
segmenter (``<codec>_q<quality>_decoder-<sha256[:12]>``),
so another segmenter trains another model. It is evaluated on its own (:func:`decoder_eval_dir`, a nested
tracking run), the segmenter judging downstream accuracy in both evaluations unless ``eval.segmenter`` names
another judge, and :func:`decoder_summary` sets codec-SE on ground-truth maps, on decoder maps and the
ablation side by side.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError, JobConfig
from pipeline.data.codecs import LabelCoder
from pipeline.data.manifest import Manifest
from pipeline.data.predicted_labels import build_predicted_labels
from pipeline.data.shards import build_shards, format_summary
from pipeline.data.sources import label_categories, open_source
from pipeline.data.splits import check_disjoint, plan_splits
from pipeline.eval.evaluate import check_reference_codecs, evaluate
from pipeline.eval.gains import SEMANTICS_SUFFIX
from pipeline.eval.report import BDRATE_FILE, MEANS_FILE, means_by_curve, read_means, slug
from pipeline.lock import folder_lock
from pipeline.model.export import read_spec, weights_sha256
from pipeline.model.inputs import class_map
from pipeline.segment.train import check_settings, train_segmenter
from pipeline.tracking import default_tracking_uri, make_tracker, run_tags
from pipeline.tracking.registry import REGISTERED_FILE, selected_metrics, set_version_evaluation
from pipeline.train.trainer import train

# rpd_mean.csv column -> the model version's figure (eval_<name>); dPSNR and the other deltas are against the
# codec's own row at the same quality
EVAL_FIGURES = {
    "psnr": "psnr",
    "ms_ssim": "ms_ssim",
    "niqe": "niqe",
    "bpp_total": "bpp",
    "bpp_codec": "bpp_codec",
}
EVAL_DELTAS = {"psnr": "delta_psnr", "ms_ssim": "delta_ms_ssim", "niqe": "delta_niqe"}


def job_qualities(cfg: JobConfig, manifest: Manifest) -> list[int]:
    """``eval.qualities``, else every quality built for ``loader.codec``."""
    return manifest.qualities(cfg.loader.codec, cfg.eval.qualities, setting="eval.qualities")


def model_groups(cfg: JobConfig, qualities: list[int]) -> list[list[int]]:
    """The qualities of each codec-SE model the job trains (``job.models``): one model per quality, or one
    for all of them (``loader.qualities`` when set, which must cover the job's)."""
    if cfg.job.models == "per_quality":
        return [[q] for q in qualities]
    trained = sorted(set(cfg.loader.qualities)) or list(qualities)
    missing = sorted(set(qualities) - set(trained))
    if missing:
        raise ConfigError(
            f"job.models=shared trains one model on loader.qualities {trained}, which lacks the job's "
            f"qualities {missing} (eval.qualities, else every built one): add them, or leave it empty"
        )
    return [trained]


def model_tag(qualities: list[int]) -> str:
    """``q42`` for a model of one quality, ``q32-37-42-47`` for one of several (folder and run names)."""
    return "q" + "-".join(str(q) for q in qualities)


def _for_qualities(
    cfg: JobConfig, qualities: list[int], prior: Path | None, ablation: bool, segmenter: Path | None = None
) -> JobConfig:
    """The config of one model of the job (see :func:`model_groups`) after phase 1; with ``segmenter``:
    codec-SE on its decoder maps."""
    name = f"{cfg.loader.codec}_{model_tag(qualities)}" + ("_nosem" if ablation else "")
    data, model = cfg.data, replace(cfg.model, zero_semantics=ablation)
    if segmenter is not None:  # a decoder has no instance maps either
        name += f"_decoder-{weights_sha256(segmenter)[:12]}"
        data = replace(cfg.data, label_source="decoder", segmenter=str(segmenter))
        model = replace(model, use_instance=False)
    if len(qualities) == 1:
        loader = replace(cfg.loader, quality=qualities[0])
    else:  # loader.quality then only names the model (its spec's quality): kept when trained
        nominal = cfg.loader.quality if cfg.loader.quality in qualities else qualities[0]
        loader = replace(cfg.loader, quality=nominal, qualities=list(qualities))
    return replace(
        cfg,
        data=data,
        loader=loader,
        model=model,
        train=replace(
            cfg.train, output_dir=str(Path(cfg.train.output_dir) / name), init_from=str(prior or "")
        ),
    )


def check_decoder_variant(cfg: JobConfig) -> None:
    """Refuse, before any work, ``segment.in_main_job`` settings the job cannot honour."""
    if not cfg.segment.in_main_job:
        return
    if cfg.data.label_source != "gt":
        raise ConfigError(
            "segment.in_main_job trains codec-SE on gt maps and on the decoder maps of the segmenter it "
            f"trains: data.label_source must be gt, got {cfg.data.label_source}"
        )
    check_settings(cfg)


def segmenter_config(cfg: JobConfig, qualities: list[int]) -> JobConfig:
    """The segmenter's training config: the training split's originals and decoded images of every job
    quality (``loader.qualities`` when set)."""
    loader = replace(cfg.loader, quality=qualities[0], qualities=cfg.loader.qualities or list(qualities))
    return replace(cfg, loader=loader)


def decoder_eval_dir(cfg: JobConfig) -> Path:
    """The evaluation of codec-SE on decoder maps: ``eval.output_dir`` with ``-decoder`` appended."""
    out = Path(cfg.eval.output_dir).resolve()
    return out.with_name(out.name + "-decoder")


def _decoder_eval_config(cfg: JobConfig, segmenter: Path) -> JobConfig:
    data = replace(cfg.data, label_source="decoder", segmenter=str(segmenter))
    return replace(cfg, data=data, eval=replace(cfg.eval, output_dir=str(decoder_eval_dir(cfg))))


def _number(row: dict[str, str], column: str) -> float:
    """A cell of ``rpd_mean.csv``; NaN when empty or absent."""
    try:
        return float(row.get(column) or "nan")
    except ValueError:
        return math.nan


def _bd_rate(report: dict[str, Any], method: str, reference: str | None) -> float | None:
    """The PSNR BD-rate on total bits of ``method`` in ``report`` (its ``bdrate.json``): against the codec,
    or against ``reference``; None when it was not computed."""
    if reference is None:
        entry = report["methods"].get(method)
    else:
        entry = report.get("references", {}).get(reference, {}).get("methods", {}).get(method)
    if not entry or not entry.get("available"):
        return None
    return entry["bd_rate_pct"].get("psnr/bpp_total")


def decoder_summary(codec: str, gt: Path, decoder: Path, segmenter: Path) -> tuple[str, dict[str, float]]:
    """Codec-SE on ground-truth maps (evaluation folder ``gt``), on the decoder maps of ``segmenter``
    (folder ``decoder``) and the ablation, per quality: bpp, PSNR gain over the codec and mIoU (when judged);
    then the PSNR BD-rate of each on total bits against the codec and each reference codec. Returns the table
    and its BD-rates as metrics (``job.bdrate_psnr_total[_vs_<reference>].<curve>``)."""
    means = {gt: means_by_curve(gt), decoder: means_by_curve(decoder)}
    reports = {folder: json.loads((folder / BDRATE_FILE).read_text()) for folder in (gt, decoder)}
    se = f"{codec}-SE"
    ablation = se + SEMANTICS_SUFFIX
    # (name, folder, method): the curves compared, each from its own evaluation
    curves = [(f"{se} (gt maps)", gt, se), (f"{se} (decoder maps)", decoder, se), (ablation, gt, ablation)]
    judged = (gt / "segmentation.json").is_file()
    frames = reports[gt]["frames"]
    head = (
        f"codec-SE on ground-truth label maps and on decoder label maps (0 label bits), {frames['count']} "
        f"{frames['split']} frames\n  decoder maps: {segmenter} on the decoded image"
    )
    if judged:
        head += f"; mIoU judged by {json.loads((gt / 'segmentation.json').read_text())['judge']['name']}"
    columns = (
        f"  {'quality':>7} {'bpp codec':>9} {'total gt':>9} {'total dec':>9} | {'dPSNR gt':>8} {'dec':>7}"
    )
    columns += f" {'no sem':>7}" + (
        f" | {'mIoU codec':>10} {'gt':>7} {'dec':>7} {'no sem':>7}" if judged else ""
    )
    lines = [head, columns]
    for q in sorted(quality for method, quality in means[gt] if method == codec):
        codec_row = means[gt][(codec, q)]
        rows = [means[folder][(method, q)] for _, folder, method in curves]
        # each gain against the codec row of its own evaluation (the same frames and bitstreams)
        gains = [
            _number(row, "psnr") - _number(means[folder][(codec, q)], "psnr")
            for row, (_, folder, _) in zip(rows, curves, strict=True)
        ]
        line = f"  {q:>7} {_number(codec_row, 'bpp_codec'):>9.4f} "
        line += f"{_number(rows[0], 'bpp_total'):>9.4f} {_number(rows[1], 'bpp_total'):>9.4f} | "
        line += f"{gains[0]:>+8.3f} {gains[1]:>+7.3f} {gains[2]:>+7.3f}"
        if judged:
            mious = [_number(row, "miou") for row in (codec_row, *rows)]
            line += f" | {mious[0]:>10.4f} " + " ".join(f"{m:>7.4f}" for m in mious[1:])
        lines.append(line)

    references = list(reports[gt].get("references", {}))
    anchors: list[str | None] = [None, *references]  # None: the codec
    width = max(len(name) for name, _, _ in curves)
    lines.append("PSNR BD-rate on total bits (codec + label map; % bits at equal PSNR, negative: fewer):")
    lines.append(f"  {'curve':<{width}} " + " ".join(f"{'vs ' + (a or codec):>12}" for a in anchors))
    metrics: dict[str, float] = {}
    for name, folder, method in [*curves, (codec, gt, codec)]:
        cells = []
        for anchor in anchors:
            if method == codec and anchor is None:
                cells.append("-")
                continue
            rate = _bd_rate(reports[folder], method, anchor)
            cells.append("n/a" if rate is None else f"{rate:+.2f} %")
            if rate is not None:
                suffix = "" if anchor is None else f"_vs_{slug(anchor)}"
                metrics[f"job.bdrate_psnr_total{suffix}.{slug(name)}"] = float(rate)
        lines.append(f"  {name:<{width}} " + " ".join(f"{c:>12}" for c in cells))
    if any("n/a" in line for line in lines[-len(curves) - 1 :]):
        lines.append(f"  n/a: not computed; bdrate.json in {gt} and {decoder} says why")
    return "\n".join(lines), metrics


def label_costs(cfg: JobConfig, factors: tuple[int, ...] = (1, 2)) -> dict[int, float]:
    """Mean lossless bpp of the ``eval.split`` label maps per down-sampling factor (shards.label_coder); with
    ``model.semantic_classes: categories``, of the class maps codec-SE is sent (:func:`class_map`)."""
    source = open_source(cfg.data)
    frames = plan_splits(cfg.data, source)[cfg.eval.split]
    pixels = cfg.data.width * cfg.data.height
    labels = [source.load(s, cfg.data.width, cfg.data.height)[1] for s in frames]
    if cfg.model.semantic_classes == "categories":
        classes = label_categories(source.name, source.label_nc)
        labels = [class_map(label, classes) for label in labels]
    costs = {}
    for factor in factors:
        coder = LabelCoder(cfg.shards.label_coder, factor)
        costs[factor] = float(np.mean([8 * len(coder.encode(label)) / pixels for label in labels]))
    return costs


def format_label_costs(
    costs: dict[int, float], codec_bpp: dict[int, float], used: int, maps: str = "label map"
) -> str:
    """The label map's (``maps``') cost beside the codec's, per quality, with and without down-sampling."""
    lines = [f"{maps} cost on the reported frames (lossless; bpp and share of the codec's bits):"]
    head = f"  {'quality':>7} {'codec bpp':>9} " + " ".join(f"{f'/{f} bpp':>9} {'share':>6}" for f in costs)
    lines.append(head)
    for quality, bpp in sorted(codec_bpp.items()):
        cells = " ".join(f"{c:>9.4f} {100 * c / bpp:>5.0f}%" for c in costs.values())
        lines.append(f"  {quality:>7} {bpp:>9.4f} {cells}")
    lines.append(f"  (the shards and bpp_total use down-sampling /{used}: shards.label_downsample)")
    return "\n".join(lines)


def evaluation_figures(
    means: list[dict[str, str]],
    model: str,
    codec: str,
    quality: int,
    frame_gains: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """The held-out figures of ``model`` (its identity in ``rpd_mean.csv``) at ``quality``: mean PSNR,
    MS-SSIM, NIQE and bpp (codec + label map; ``eval_bpp_codec`` the codec alone), and their deltas
    against the codec, with, from ``frame_gains`` (``bdrate.json``), the half widths of the PSNR and NIQE
    deltas' 95 % intervals over the frames and how many frames gained PSNR; empty when the table has no row
    of it."""

    def row(match: str, column: str) -> dict[str, str] | None:
        return next((r for r in means if r[column] == match and int(r["quality"]) == quality), None)

    own, anchor = row(model, "model"), row(codec, "method")
    if own is None:
        return {}
    figures = {f"eval_{name}": float(own[column]) for column, name in EVAL_FIGURES.items()}
    figures.update({"eval_quality": float(quality), "eval_images": float(own["images"])})
    if anchor is not None:
        figures.update({f"eval_{name}": float(own[c]) - float(anchor[c]) for c, name in EVAL_DELTAS.items()})
    for gain in frame_gains or []:
        if (gain["test"], gain["anchor"], gain["quality"]) != (own["method"], codec, quality):
            continue
        if gain["ci95"] is not None:
            figures[f"eval_delta_{gain['measure']}_ci95"] = float(gain["ci95"])
        if gain["measure"] == "psnr":
            figures["eval_frames_improved"] = float(gain["improved"])
    return {k: v for k, v in figures.items() if not math.isnan(v)}


def codec_step_note(cfg: JobConfig, exports: list[Path]) -> str | None:
    """A note when models exported step 0, the codec's own image (no validation step beat it by
    ``validate.min_delta``): their rows equal the codec's, which a user should not read as a result."""
    unmoved = [e for e in exports if selected_metrics(read_spec(e)).get("selected_step") == 0]
    if not unmoved:
        return None
    return (
        f"[job] NOTE: {len(unmoved)} of {len(exports)} models exported step 0, the codec itself: no "
        f"validation step beat it by validate.min_delta ({cfg.validate.min_delta:g} dB) on the "
        f"{cfg.validate.split!r} frames, so their rows are the codec's. Train more steps (phase2.steps, "
        "phase3.steps; the default's small preset trains tens, a smoke run), or run the measured CPU recipe: "
        "make recipe (configs/recipe.yaml; README: 'Does codec-SE beat its codec?')."
    )


def tag_registered_models(
    cfg: JobConfig, exports: list[Path], results: Path, run_id: str | None
) -> list[str]:
    """Put the held-out R-PD figures of each registered export (:func:`evaluation_figures`, at its
    quality; a model of several qualities gets each one's, ``eval_psnr_q32``, ...) on its model version,
    beside the validation figures it was registered with; returns the versions so tagged. An export counts
    as registered when its ``registered.json`` marker names these weights."""
    means = read_means(results)
    try:
        gains = json.loads((results / BDRATE_FILE).read_text()).get("frame_gains", [])
    except (OSError, ValueError):
        gains = []
    tagged = []
    for export in exports:
        try:
            marker = json.loads((export.parent / REGISTERED_FILE).read_text())
        except (OSError, ValueError):
            continue
        sha = weights_sha256(export)
        if not isinstance(marker, dict) or marker.get("sha256") != sha or not marker.get("uri"):
            continue
        spec = read_spec(export)
        if spec.quality is None:
            continue
        model, trained = f"{export}#{sha[:12]}", spec.trained_qualities
        if len(trained) == 1:
            figures = evaluation_figures(means, model, cfg.loader.codec, trained[0], gains)
        else:  # one model of several qualities: each quality's figures, suffixed with it
            figures = {
                f"{name}_q{q}": value
                for q in trained
                for name, value in evaluation_figures(means, model, cfg.loader.codec, q, gains).items()
                if name != "eval_quality"
            }
        if not figures:
            print(f"[job] WARNING: {export} has no row in {results / MEANS_FILE}; {marker['uri']} not tagged")
            continue
        notes = {"eval_split": cfg.eval.split, "eval_results": str(results.resolve())}
        tagged.append(
            set_version_evaluation(
                marker["uri"], figures, notes, tracking_uri=cfg.tracking.uri, run_id=run_id
            )
        )
    return tagged


def run(cfg: JobConfig) -> Path:
    """Run the whole pipeline on ``cfg``; return the evaluation folder.

    Training resumes from its newest complete checkpoints, so a rerun after a crash (or of a
    finished job) picks up where the last one stopped instead of starting over. The job holds the lock of
    ``train.output_dir`` throughout, so a second job (or a training) into the same folder is refused.
    """
    with folder_lock(cfg.train.output_dir, "main job"):
        return _run(cfg)


def _run(cfg: JobConfig) -> Path:
    check_reference_codecs(cfg)  # before any work: a missing one would fail only at the end
    check_decoder_variant(cfg)
    manifest = build_shards(cfg)
    print(format_summary(manifest), flush=True)
    for warning in check_disjoint(manifest, cfg):
        print(f"[job] WARNING: {warning}", flush=True)
    qualities = job_qualities(cfg, manifest)
    groups = model_groups(cfg, qualities)
    tracker = make_tracker(cfg)
    with tracker.start_run(cfg.name, params=cfg.flat(), tags={**run_tags(cfg), "job": "main"}):
        segmenter = None
        if cfg.segment.in_main_job:
            segmenter = train_segmenter(segmenter_config(cfg, qualities), resume=True, tracker=tracker)
            # the same judge for both evaluations: eval.segmenter, else the segmenter of the decoder maps
            cfg = replace(cfg, eval=replace(cfg.eval, segmenter=cfg.eval.segmenter or str(segmenter)))
        later = [phase for phase in cfg.job.phases if phase != 1]
        prior = None
        if 1 in cfg.job.phases:
            prior_dir = str(Path(cfg.train.output_dir) / "prior")
            # Phase 1 zeroes the decoded image; any built quality satisfies the loader.
            loader = replace(cfg.loader, quality=qualities[0])
            prior_cfg = replace(cfg, loader=loader, train=replace(cfg.train, output_dir=prior_dir))
            prior = train(prior_cfg, [1], resume=True, tracker=tracker, run_name="semantic-prior")[1]
        exports, decoder_exports = [], []
        if segmenter is not None:  # every quality's maps in one pass, not a redo of the shards per quality
            all_members = replace(cfg.loader, qualities=list(qualities))
            build_predicted_labels(
                replace(_for_qualities(cfg, qualities[:1], None, False, segmenter), loader=all_members)
            )
        for group in groups:
            run_name = f"train-{model_tag(group)}"
            qcfg = _for_qualities(cfg, group, prior, ablation=False)
            exports.append(train(qcfg, later, resume=True, tracker=tracker, run_name=run_name)[3])
            acfg = _for_qualities(cfg, group, None, ablation=True)
            exports.append(train(acfg, later, resume=True, tracker=tracker, run_name=f"{run_name}-nosem")[3])
            if segmenter is not None:
                dcfg = _for_qualities(cfg, group, None, ablation=False, segmenter=segmenter)
                decoder_exports.append(
                    train(dcfg, later, resume=True, tracker=tracker, run_name=f"{run_name}-decoder")[3]
                )
        results = evaluate(cfg, models=[str(e) for e in exports], tracker=tracker)
        codec_bpp = {
            quality: float(row["bpp_codec"])
            for (method, quality), row in means_by_curve(results).items()
            if method == cfg.loader.codec
        }
        maps = "class map" if cfg.model.semantic_classes == "categories" else "label map"
        factors = tuple(sorted({1, 2, cfg.shards.label_downsample}))
        print(format_label_costs(label_costs(cfg, factors), codec_bpp, cfg.shards.label_downsample, maps))
        note = codec_step_note(cfg, [*exports, *decoder_exports])
        if note is not None:
            print(note, flush=True)
        decoder_results = None
        if segmenter is not None:
            dec_cfg = _decoder_eval_config(cfg, segmenter)
            tags = {**run_tags(cfg), "label_source": "decoder"}
            with tracker.start_run("evaluate-decoder-maps", params=dec_cfg.flat(), tags=tags):
                decoder_results = evaluate(dec_cfg, models=[str(e) for e in decoder_exports], tracker=tracker)
            summary, metrics = decoder_summary(cfg.loader.codec, results, decoder_results, segmenter)
            print(summary)
            tracker.log_metrics(metrics)
        if cfg.tracking.enabled:
            tagged = tag_registered_models(cfg, exports, results, tracker.active_run_id)
            if decoder_results is not None:
                tagged += tag_registered_models(cfg, decoder_exports, decoder_results, tracker.active_run_id)
            for version in tagged:
                print(f"[job] held-out figures set on {version}")
    print(f"\nR-PD results: {results.resolve()} (rpd_mean.csv, rpd_*.png, bdrate.json, crops/)")
    if decoder_results is not None:
        print(f"Decoder maps: {decoder_results} (codec-SE on the segmenter's maps, 0 label bits)")
        print(f"Segmenter:    {segmenter}")
    print(f"Generators:   {', '.join(str(e) for e in [*exports, *decoder_exports])}")
    if cfg.tracking.enabled:
        uri = default_tracking_uri(cfg.tracking.uri)
        print(f"MLflow:       {sys.executable} -m mlflow ui --backend-store-uri {shlex.quote(uri)}")
    return results
