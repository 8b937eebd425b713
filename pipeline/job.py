"""The main job, end to end: shards -> three phases per quality -> R-PD evaluation, in one tracked run.

The semantic prior (phase 1) does not see the decoded image, so it is trained once and shared;
phases 2 and 3 are trained per codec quality, one model per codec x quality as in the paper. Beside each
codec-SE model the zero-semantics ablation is trained with the same phases 2-3 budget (from the identity
generator: a prior drawn from zeroed semantics would be a constant), so the semantics' contribution is
measured, not assumed. Training, checkpoint selection and the reported figures use three disjoint splits
(``loader.split``, ``validate.split``, ``eval.split``; see :mod:`pipeline.data.splits`). Each registered
model's version then gets its held-out figures (:func:`tag_registered_models`).
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.config import JobConfig
from pipeline.data.codecs import LabelCoder
from pipeline.data.manifest import Manifest
from pipeline.data.shards import build_shards, format_summary
from pipeline.data.sources import open_source
from pipeline.data.splits import check_disjoint, plan_splits
from pipeline.eval.evaluate import check_reference_codecs, evaluate
from pipeline.eval.report import MEANS_FILE
from pipeline.lock import folder_lock
from pipeline.model.export import read_spec, weights_sha256
from pipeline.tracking import default_tracking_uri, make_tracker, run_tags
from pipeline.tracking.registry import set_version_evaluation
from pipeline.train.trainer import REGISTERED_FILE, train

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


def _for_quality(cfg: JobConfig, quality: int, prior: Path | None, ablation: bool) -> JobConfig:
    name = f"{cfg.loader.codec}_q{quality}" + ("_nosem" if ablation else "")
    return replace(
        cfg,
        loader=replace(cfg.loader, quality=quality),
        model=replace(cfg.model, zero_semantics=ablation),
        train=replace(
            cfg.train, output_dir=str(Path(cfg.train.output_dir) / name), init_from=str(prior or "")
        ),
    )


def label_costs(cfg: JobConfig, factors: tuple[int, ...] = (1, 2)) -> dict[int, float]:
    """Mean lossless bpp of the ``eval.split`` label maps per down-sampling factor (shards.label_coder)."""
    source = open_source(cfg.data)
    frames = plan_splits(cfg.data, source)[cfg.eval.split]
    pixels = cfg.data.width * cfg.data.height
    costs = {}
    for factor in factors:
        coder = LabelCoder(cfg.shards.label_coder, factor)
        bits = [
            8 * len(coder.encode(source.load(s, cfg.data.width, cfg.data.height)[1])) / pixels for s in frames
        ]
        costs[factor] = float(np.mean(bits))
    return costs


def format_label_costs(costs: dict[int, float], codec_bpp: dict[int, float], used: int) -> str:
    """The label map's cost beside the codec's, per quality, with and without down-sampling."""
    lines = ["label map cost on the reported frames (lossless; bpp and share of the codec's bits):"]
    head = f"  {'quality':>7} {'codec bpp':>9} " + " ".join(f"{f'/{f} bpp':>9} {'share':>6}" for f in costs)
    lines.append(head)
    for quality, bpp in sorted(codec_bpp.items()):
        cells = " ".join(f"{c:>9.4f} {100 * c / bpp:>5.0f}%" for c in costs.values())
        lines.append(f"  {quality:>7} {bpp:>9.4f} {cells}")
    lines.append(f"  (the shards and bpp_total use down-sampling /{used}: shards.label_downsample)")
    return "\n".join(lines)


def evaluation_figures(means: list[dict[str, str]], model: str, codec: str, quality: int) -> dict[str, float]:
    """The held-out figures of ``model`` (its identity in ``rpd_mean.csv``) at ``quality``: mean PSNR,
    MS-SSIM, NIQE and bpp (codec + label map; ``eval_bpp_codec`` the codec alone), and their deltas
    against the codec; empty when the table has no row of it."""

    def row(match: str, column: str) -> dict[str, str] | None:
        return next((r for r in means if r[column] == match and int(r["quality"]) == quality), None)

    own, anchor = row(model, "model"), row(codec, "method")
    if own is None:
        return {}
    figures = {f"eval_{name}": float(own[column]) for column, name in EVAL_FIGURES.items()}
    figures.update({"eval_quality": float(quality), "eval_images": float(own["images"])})
    if anchor is not None:
        figures.update({f"eval_{name}": float(own[c]) - float(anchor[c]) for c, name in EVAL_DELTAS.items()})
    return {k: v for k, v in figures.items() if not math.isnan(v)}


def tag_registered_models(
    cfg: JobConfig, exports: list[Path], results: Path, run_id: str | None
) -> list[str]:
    """Put the held-out R-PD figures of each registered export (:func:`evaluation_figures`, at its
    quality) on its model version, beside the validation figures it was registered with; returns the
    versions so tagged. An export counts as registered when its ``registered.json`` marker names these
    weights."""
    with (results / MEANS_FILE).open() as f:
        means = list(csv.DictReader(f))
    tagged = []
    for export in exports:
        try:
            marker = json.loads((export.parent / REGISTERED_FILE).read_text())
        except (OSError, ValueError):
            continue
        sha = weights_sha256(export)
        if not isinstance(marker, dict) or marker.get("sha256") != sha or not marker.get("uri"):
            continue
        quality = read_spec(export).quality
        if quality is None:
            continue
        figures = evaluation_figures(means, f"{export}#{sha[:12]}", cfg.loader.codec, quality)
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
    manifest = build_shards(cfg)
    print(format_summary(manifest), flush=True)
    for warning in check_disjoint(manifest, cfg):
        print(f"[job] WARNING: {warning}", flush=True)
    qualities = job_qualities(cfg, manifest)
    tracker = make_tracker(cfg)
    with tracker.start_run(cfg.name, params=cfg.flat(), tags={**run_tags(cfg), "job": "main"}):
        prior_dir = str(Path(cfg.train.output_dir) / "prior")
        # Phase 1 zeroes the decoded image; any built quality satisfies the loader.
        loader = replace(cfg.loader, quality=qualities[0])
        prior_cfg = replace(cfg, loader=loader, train=replace(cfg.train, output_dir=prior_dir))
        prior = train(prior_cfg, [1], resume=True, tracker=tracker, run_name="semantic-prior")[1]
        exports = []
        for q in qualities:
            qcfg = _for_quality(cfg, q, prior, ablation=False)
            exports.append(train(qcfg, [2, 3], resume=True, tracker=tracker, run_name=f"train-q{q}")[3])
            acfg = _for_quality(cfg, q, None, ablation=True)
            run_name = f"train-q{q}-nosem"
            exports.append(train(acfg, [2, 3], resume=True, tracker=tracker, run_name=run_name)[3])
        results = evaluate(cfg, models=[str(e) for e in exports], tracker=tracker)
        with (results / "rpd_mean.csv").open() as f:
            codec_bpp = {
                int(row["quality"]): float(row["bpp_codec"])
                for row in csv.DictReader(f)
                if row["method"] == cfg.loader.codec
            }
        print(format_label_costs(label_costs(cfg), codec_bpp, cfg.shards.label_downsample))
        if cfg.tracking.enabled:
            for version in tag_registered_models(cfg, exports, results, tracker.active_run_id):
                print(f"[job] held-out figures set on {version}")
    print(f"\nR-PD results: {results.resolve()} (rpd_mean.csv, rpd_*.png, bdrate.json, crops/)")
    print(f"Generators:   {', '.join(str(e) for e in exports)}")
    if cfg.tracking.enabled:
        uri = default_tracking_uri(cfg.tracking.uri)
        print(f"MLflow:       {sys.executable} -m mlflow ui --backend-store-uri {shlex.quote(uri)}")
    return results
