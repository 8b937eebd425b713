"""The main job end to end, at a tiny size: shards, shared prior, per-quality phases, evaluation, registry."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipeline.cli import main


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
        "shards.codecs=[{name: hevc, qualities: [37, 45]}]",
        "loader.crop=[64, 64]",
        "phase1.steps=2",
        "phase2.steps=2",
        "phase3.steps=2",
        "train.checkpoint_every=2",
        "eval.max_images=3",
        "eval.crops=1",
    ]
    assert main(["run", *overrides]) == 0
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri" in out and "mlruns/mlflow.db" in out

    with open(tmp_path / "runs" / "eval" / "rpd_mean.csv") as f:
        means = list(csv.DictReader(f))
    se_rows = {(r["method"], int(r["quality"])) for r in means if r["method"] == "hevc-SE"}
    assert se_rows == {("hevc-SE", 37), ("hevc-SE", 45)}
    for q in (37, 45):
        assert (tmp_path / "runs" / "train" / f"hevc_q{q}" / "phase3" / "generator.safetensors").is_file()
    assert (tmp_path / "runs" / "train" / "prior" / "phase1" / "generator.safetensors").is_file()

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    for q in (37, 45):
        assert client.get_model_version_by_alias(f"hevc-se-q{q}", "champion").version == 1
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    names = {r.info.run_name for r in runs}
    expected = {"cityscapes-hevc", "semantic-prior", "train-q37", "train-q45", "phase1", "phase2", "phase3"}
    assert expected <= names

    # A rerun resumes: every phase is already complete, nothing is trained again.
    assert main(["run", *overrides]) == 0
    assert "phase 3 already complete" in capsys.readouterr().out
