"""The main job end to end, at a tiny size: shards, shared prior, per-quality phases, evaluation, registry;
with segment.in_main_job also the segmenter and codec-SE on its decoder label maps beside the gt maps' one;
and the recipe's job (configs/recipe.yaml), one model for every quality."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from torch import Tensor, nn

from pipeline.cli import main
from pipeline.config import REPO_ROOT
from pipeline.model.export import read_spec, weights_sha256
from pipeline.segment import base as segment_base
from pipeline.segment.base import Segmenter, register_segmenter

pytestmark = pytest.mark.slow


# The job scores the first SCORED of the 10 held-out lindau frames (eval.max_images): every curve at every
# quality is scored frame by frame, and three frames exercise the evaluation as ten do (this file took
# 137 s with three against 205 s with ten, one machine).
SCORED = 3
# test_main_job_end_to_end's job; the decoder-map test starts from its shards (the same shard settings)
MAIN_JOB = [
    "data.width=256",
    "data.height=128",
    "shards.output=shards",
    "shards.workers=1",
    "shards.codecs=[{name: hevc, qualities: [32, 37, 42, 47]}]",
    "loader.crop=[64, 64]",
    "phase1.steps=1",
    "phase2.steps=1",
    "phase3.steps=1",
    "train.checkpoint_every=1",
    "validate.every=1",
    "eval.crops=1",
    f"eval.max_images={SCORED}",
]


def job_environment(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Run the job in ``folder`` with its MLflow store there (the default ``mlruns/mlflow.db``)."""
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def main_job(tmp_path_factory: pytest.TempPathFactory, cityscapes_root: Path) -> dict[str, Any]:
    """The main job run once, in its own folder, for both tests of this module (shards, models, store)."""
    folder = tmp_path_factory.mktemp("main-job")
    overrides = [f"data.root={cityscapes_root}", *MAIN_JOB]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, redirect_stdout(printed):
        job_environment(monkeypatch, folder)
        code = main(["run", *overrides])
    return {"folder": folder, "overrides": overrides, "code": code, "out": printed.getvalue()}


def test_main_job_end_to_end(
    main_job: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path, overrides = main_job["folder"], main_job["overrides"]
    assert main_job["code"] == 0
    out = main_job["out"]
    assert "mlflow ui --backend-store-uri" in out and "mlruns/mlflow.db" in out

    assert f"{SCORED} frames of split 'test'" in out
    assert "label map cost on the reported frames" in out
    qualities = (32, 37, 42, 47)
    with open(tmp_path / "runs" / "eval" / "rpd_mean.csv") as f:
        means = list(csv.DictReader(f))
    by_method: dict[str, dict[int, dict[str, str]]] = {}
    for row in means:
        by_method.setdefault(row["method"], {})[int(row["quality"])] = row
    references = {"avif": [0, 15, 30, 50], "jxl": [0, 15, 30, 60]}  # eval.reference_codecs of default.yaml
    chosen = "hevc-SE (map chosen)"  # eval.map_choice of default.yaml
    assert set(by_method) == {"hevc", "hevc-SE", "hevc-SE (no semantics)", chosen, *references}
    assert all(0.0 <= float(r["map_sent"]) <= 1.0 for r in by_method[chosen].values())
    for method, rows in by_method.items():
        assert set(rows) == set(references.get(method, qualities)), method
        assert all(int(r["images"]) == SCORED for r in rows.values())  # lindau frames, not training ones
    for q in qualities:  # held-out frames: codec-SE is never below its codec (step 0 is the codec itself)
        for method in ("hevc-SE", "hevc-SE (no semantics)"):
            assert float(by_method[method][q]["psnr"]) >= float(by_method["hevc"][q]["psnr"]) - 0.02
    report = json.loads((tmp_path / "runs" / "eval" / "bdrate.json").read_text())
    for method in ("hevc-SE", "hevc-SE (no semantics)", chosen):
        entry = report["methods"][method]
        assert entry["available"] and entry["bd_rate_pct"]["psnr/bpp_total"] is not None
    assert report["frames"]["split"] == "test" and report["frames"]["count"] == SCORED
    for reference in references:  # codec-SE against each reference codec, on total bits, in the printed table
        assert report["references"][reference]["methods"]["hevc-SE"]["available"]
    assert "BD-rate against the reference codecs" in out
    names = [name for q in qualities for name in (f"hevc_q{q}", f"hevc_q{q}_nosem")]
    for name in names:
        assert (tmp_path / "runs" / "train" / name / "phase3" / "generator.safetensors").is_file()
    assert (tmp_path / "runs" / "train" / "prior" / "phase1" / "generator.safetensors").is_file()
    # models that kept the codec's image are named as such, not left to read as a result
    exports = [tmp_path / "runs" / "train" / n / "phase3" / "generator.safetensors" for n in names]
    unmoved = sum((read_spec(e).selected or {}).get("step") == 0 for e in exports)
    if unmoved:
        assert f"[job] NOTE: {unmoved} of {len(exports)} models exported step 0, the codec itself" in out
    else:
        assert "[job] NOTE:" not in out

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    for q in qualities:
        version = client.get_model_version_by_alias(f"hevc-se-q{q}", "champion")
        assert version.version == 1
        # the held-out figures of the job's evaluation, beside the validation ones
        assert float(version.tags["eval_quality"]) == q and version.tags["eval_split"] == "test"
        psnr = float(by_method["hevc-SE"][q]["psnr"])
        assert float(version.tags["eval_psnr"]) == pytest.approx(psnr)
        delta = psnr - float(by_method["hevc"][q]["psnr"])
        assert float(version.tags["eval_delta_psnr"]) == pytest.approx(delta)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    names = {r.info.run_name for r in runs}
    expected = {
        "cityscapes-hevc",
        "semantic-prior",
        "train-q37",
        "train-q47-nosem",
        "phase1",
        "phase2",
        "phase3",
    }
    assert expected <= names

    # A rerun resumes: every phase is already complete, nothing is trained again.
    job_environment(monkeypatch, tmp_path)
    assert main(["run", *overrides]) == 0
    assert "phase 3 already complete" in capsys.readouterr().out


@pytest.mark.parametrize("phases", [[3], [1, 2, 3]], ids=["recipe", "three-phases"])
def test_the_recipe_job_trains_one_model_for_every_quality(
    phases: list[int],
    main_job: dict[str, Any],
    tmp_path: Path,
    cityscapes_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """configs/recipe.yaml (make recipe): job.models=shared trains one codec-SE model and one ablation for the
    four QPs, each scored and registered at every QP; with job.phases=[3] (the recipe) phase 3 alone, with
    [1, 2, 3] the paper's phases, the prior shared and the adversarial phase 2 on all four QPs."""
    job_environment(monkeypatch, tmp_path)
    shutil.copytree(main_job["folder"] / "shards", tmp_path / "shards")  # the shards of MAIN_JOB's settings
    overrides = [
        "--config",
        str(REPO_ROOT / "configs" / "recipe.yaml"),
        f"data.root={cityscapes_root}",
        *MAIN_JOB,
        "shards.label_downsample=1",  # the recipe's is 4: the copied shards are at 1
        "phase3.warmup_steps=0",
        "eval.reference_codecs=[]",
        f"job.phases={phases}",
    ]
    assert main(["run", *overrides]) == 0
    out = capsys.readouterr().out
    qualities = (32, 37, 42, 47)
    train = tmp_path / "runs" / "recipe" / "train"
    models = ["hevc_q32-37-42-47", "hevc_q32-37-42-47_nosem"]
    assert sorted(p.name for p in train.iterdir()) == sorted([*models, *(["prior"] if 1 in phases else [])])
    se, nosem = (train / name / "phase3" / "generator.safetensors" for name in models)
    for export in (se, nosem):
        for phase in (2, 3):
            path = export.parents[1] / f"phase{phase}" / "generator.safetensors"
            assert path.is_file() == (phase in phases)
            if path.is_file():
                spec = read_spec(path)
                assert spec.trained_qualities == qualities and spec.quality_input
    with open(tmp_path / "runs" / "recipe" / "eval" / "rpd_mean.csv") as f:
        means = {(r["method"], int(r["quality"])): r for r in csv.DictReader(f)}
    for method, export in (("hevc-SE", se), ("hevc-SE (no semantics)", nosem)):
        models = {means[(method, q)]["model"] for q in qualities}  # one model, a point at each QP
        assert models == {f"{export}#{weights_sha256(export)[:12]}"}

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    names = {m.name for m in client.search_registered_models()}
    assert names == {"hevc-se-q32-37-42-47", "hevc-nosem-q32-37-42-47"}
    version = client.get_model_version_by_alias("hevc-se-q32-37-42-47", "champion")
    for q in qualities:  # each QP's held-out figures on the one version
        assert float(version.tags[f"eval_psnr_q{q}"]) == pytest.approx(float(means[("hevc-SE", q)]["psnr"]))
        delta = float(means[("hevc-SE", q)]["psnr"]) - float(means[("hevc", q)]["psnr"])
        assert float(version.tags[f"eval_delta_psnr_q{q}"]) == pytest.approx(delta)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run_names = {r.info.run_name for r in runs}
    assert {"cityscapes-hevc-recipe", "train-q32-37-42-47", "train-q32-37-42-47-nosem"} <= run_names
    assert ("semantic-prior" in run_names) == ("phase1" in run_names) == (1 in phases)
    assert ("phase2" in run_names) == (2 in phases)
    assert "R-PD results: " in out and f"{SCORED} frames of split 'test'" in out


class TinyJobSegmenter(Segmenter):
    """A one-layer segmenter: the decoder-map variant of the job at test speed."""

    architecture = "tiny-job-segmenter"

    def __init__(self, num_classes: int = 19) -> None:
        super().__init__(num_classes)
        self.net = nn.Conv2d(3, num_classes, 3, padding=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def test_main_job_sets_decoder_label_maps_beside_gt_maps(
    main_job: dict[str, Any],
    tmp_path: Path,
    cityscapes_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """segment.in_main_job: the job trains the segmenter and per quality codec-SE on its decoder maps,
    evaluates them (0 label bits, mIoU) beside the gt maps' model and prints both total-bit BD-rates."""
    segment_base.available_segmenters()  # the built-in ones registered before the registry is copied
    monkeypatch.setattr(segment_base, "_REGISTRY", dict(segment_base._REGISTRY))
    register_segmenter(TinyJobSegmenter)
    job_environment(monkeypatch, tmp_path)
    qualities = (32, 37, 42, 47)
    overrides = [
        f"data.root={cityscapes_root}",
        *MAIN_JOB,  # its shards settings, so that the shards are reused
        "eval.crops=0",
        "eval.reference_codecs=[jxl]",  # one reference codec keeps the test short
        "segment.in_main_job=true",
        f"segment.architecture={TinyJobSegmenter.architecture}",
        "segment.steps=2",
        "segment.warmup=1",
        "segment.checkpoint_every=0",
        "segment.log_every=0",
    ]
    # the job trains its own gt and decoder variants: another label source in the job config is refused
    assert main(["run", *overrides, "data.label_source=decoder", "data.segmenter=seg.safetensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: segment.in_main_job trains codec-SE on gt maps and on the decoder maps of the segmenter it "
        "trains: data.label_source must be gt, got decoder"
    )
    assert not (tmp_path / "shards").exists()

    # the shards of the same settings, already built by the other test's job: this job finds them complete
    shutil.copytree(main_job["folder"] / "shards", tmp_path / "shards")
    assert main(["run", *overrides]) == 0
    out = capsys.readouterr().out
    segmenter = tmp_path / "runs" / "segment" / "segmenter.safetensors"
    assert "segmenter done:" in out and segmenter.is_file()
    sha = weights_sha256(segmenter)

    def means(folder: str) -> dict[tuple[str, int], dict[str, str]]:
        with open(tmp_path / "runs" / folder / "rpd_mean.csv") as f:
            return {(r["method"], int(r["quality"])): r for r in csv.DictReader(f)}

    gt, decoder = means("eval"), means("eval-decoder")
    for q in qualities:
        export = (
            tmp_path / "runs" / "train" / f"hevc_q{q}_decoder-{sha[:12]}" / "phase3" / "generator.safetensors"
        )
        spec = read_spec(export)
        assert spec.trained_label_source == "decoder" and spec.segmenter == sha
        dec = decoder[("hevc-SE", q)]
        assert float(dec["bpp_total"]) == float(dec["bpp_codec"])  # decoder maps: 0 label bits
        assert float(gt[("hevc-SE", q)]["bpp_total"]) > float(gt[("hevc-SE", q)]["bpp_codec"])
        assert float(dec["bpp_codec"]) == pytest.approx(float(gt[("hevc", q)]["bpp_codec"]))
        for row in (dec, gt[("hevc-SE", q)], gt[("hevc-SE (no semantics)", q)], gt[("hevc", q)]):
            assert 0 <= float(row["miou"]) <= 1  # the segmenter judges both evaluations
    assert {m for m, _ in decoder} == {"hevc", "hevc-SE", "jxl"}
    judge = json.loads((tmp_path / "runs" / "eval" / "segmentation.json").read_text())["judge"]
    assert judge["sha256"] == sha

    summary = out[out.index("codec-SE on ground-truth label maps and on decoder label maps") :]
    assert f"(0 label bits), {SCORED} test frames\n  decoder maps: " in summary
    assert f"{segmenter} on the decoded image; mIoU judged by {TinyJobSegmenter.architecture}" in summary
    for q in qualities:
        assert re.search(rf"^\s+{q}\s+\d\.\d{{4}}\s", summary, flags=re.M), q
    report = json.loads((tmp_path / "runs" / "eval" / "bdrate.json").read_text())
    report_dec = json.loads((tmp_path / "runs" / "eval-decoder" / "bdrate.json").read_text())
    for curve, entry in (("hevc-SE (gt maps)", report), ("hevc-SE (decoder maps)", report_dec)):
        rate = entry["methods"]["hevc-SE"]["bd_rate_pct"]["psnr/bpp_total"]
        line = re.search(rf"^  {re.escape(curve)}\s+(\S+ %)\s+(\S+ %)$", summary, flags=re.M)
        assert line and line.group(1) == f"{rate:+.2f} %", curve  # against hevc and jxl
        jxl = entry["references"]["jxl"]["methods"]["hevc-SE"]["bd_rate_pct"]["psnr/bpp_total"]
        assert line.group(2) == f"{jxl:+.2f} %"

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    # the decoder models have names of their own: hevc-se-q<QP> holds the gt model alone
    names = {m.name for m in client.search_registered_models()}
    assert {f"hevc-se-q{q}" for q in qualities} <= names and "cityscapes-segmenter" in names
    for q in qualities:
        assert [int(v.version) for v in client.search_model_versions(f"name='hevc-se-q{q}'")] == [1]
        (decoder,) = client.search_model_versions(f"name='hevc-se-decoder-q{q}'")
        assert "eval_psnr" in decoder.tags  # its own held-out figures
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_name = {r.info.run_name: r for r in runs}
    assert {"cityscapes-hevc-segment", "train-q42-decoder", "evaluate-decoder-maps"} <= set(by_name)
    job = by_name["cityscapes-hevc"].data.metrics
    assert (
        "job.bdrate_psnr_total.hevc-SE_gt_maps" in job and "job.bdrate_psnr_total.hevc-SE_decoder_maps" in job
    )

    # A rerun resumes: the segmenter and every phase are reused, nothing is trained again.
    assert main(["run", *overrides]) == 0
    out = capsys.readouterr().out
    assert "segmenter already trained (2 steps)" in out and "segmenter done:" not in out
    assert out.count("phase 3 already complete") == 3 * len(qualities)
    assert "codec-SE on ground-truth label maps and on decoder label maps" in out
