"""The main job end to end, at a tiny size: shards, shared prior, per-quality phases, evaluation, registry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow


def test_main_job_end_to_end(
    tmp_path: Path, cityscapes_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    overrides = [
        f"data.root={cityscapes_root}",
        "data.width=256",
        "data.height=128",
        "shards.output=shards",
        "shards.workers=1",
        "shards.codecs=[{name: hevc, qualities: [32, 37, 42, 47]}]",
        "loader.crop=[64, 64]",
        "phase1.steps=2",
        "phase2.steps=2",
        "phase3.steps=2",
        "train.checkpoint_every=2",
        "validate.every=1",
        "eval.crops=1",
    ]
    assert main(["run", *overrides]) == 0
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri" in out and "mlruns/mlflow.db" in out

    assert "10 frames of split 'test'" in out
    assert "label map cost on the reported frames" in out
    qualities = (32, 37, 42, 47)
    with open(tmp_path / "runs" / "eval" / "rpd_mean.csv") as f:
        means = list(csv.DictReader(f))
    by_method: dict[str, dict[int, dict[str, str]]] = {}
    for row in means:
        by_method.setdefault(row["method"], {})[int(row["quality"])] = row
    references = {"avif": [0, 15, 30, 50], "jxl": [0, 15, 30, 60]}  # eval.reference_codecs of default.yaml
    assert set(by_method) == {"hevc", "hevc-SE", "hevc-SE (no semantics)", *references}
    for method, rows in by_method.items():
        assert set(rows) == set(references.get(method, qualities)), method
        assert all(int(r["images"]) == 10 for r in rows.values())  # the lindau frames, not the training ones
    for q in qualities:  # held-out frames: codec-SE is never below its codec (step 0 is the codec itself)
        for method in ("hevc-SE", "hevc-SE (no semantics)"):
            assert float(by_method[method][q]["psnr"]) >= float(by_method["hevc"][q]["psnr"]) - 0.02
    report = json.loads((tmp_path / "runs" / "eval" / "bdrate.json").read_text())
    for method in ("hevc-SE", "hevc-SE (no semantics)"):
        entry = report["methods"][method]
        assert entry["available"] and entry["bd_rate_pct"]["psnr/bpp_total"] is not None
    assert report["frames"]["split"] == "test" and report["frames"]["count"] == 10
    for reference in references:  # codec-SE against each reference codec, on total bits, in the printed table
        assert report["references"][reference]["methods"]["hevc-SE"]["available"]
    assert "BD-rate against the reference codecs" in out
    for q in qualities:
        for name in (f"hevc_q{q}", f"hevc_q{q}_nosem"):
            assert (tmp_path / "runs" / "train" / name / "phase3" / "generator.safetensors").is_file()
    assert (tmp_path / "runs" / "train" / "prior" / "phase1" / "generator.safetensors").is_file()

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
    assert main(["run", *overrides]) == 0
    assert "phase 3 already complete" in capsys.readouterr().out
