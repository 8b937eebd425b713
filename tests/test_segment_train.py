"""The segmenter on the generator's training machinery: one config section, the DeepSpeed engine,
checkpoints and bit-identical resume (after SIGTERM and after SIGKILL), MLflow tracking and registry, and
one-line refusals of bad settings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from pipeline.cli import main
from pipeline.config import ConfigError, JobConfig, from_dict, load_config
from pipeline.model.export import weights_sha256
from pipeline.segment import base as segment_base
from pipeline.segment.base import Segmenter, read_spec, register_segmenter, save_segmenter
from pipeline.segment.train import REGISTERED_FILE, SEGMENTER_FILE, engine_config, train_segmenter
from pipeline.tracking import Tracker
from pipeline.train.checkpoint import read_latest

TESTS = Path(__file__).resolve().parent
TINY = "tiny-seg-test"


class TinySeg(Segmenter):
    """A two-layer stand-in for a cluster user's network: what the training needs and nothing more."""

    architecture = TINY

    def __init__(self, num_classes: int = 19, width: int = 8) -> None:
        super().__init__(num_classes)
        self.width = width
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.Conv2d(width, num_classes, 1)
        )

    def options(self) -> dict[str, int]:
        return {"width": self.width}

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def register_tiny() -> None:
    """Make :class:`TinySeg` buildable (in a fresh process that runs the command line)."""
    if TINY not in segment_base.available_segmenters():
        register_segmenter(TinySeg)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    segment_base.available_segmenters()  # the built-in ones registered before the registry is copied
    monkeypatch.setattr(segment_base, "_REGISTRY", dict(segment_base._REGISTRY))
    register_segmenter(TinySeg)


def overrides(shards: Path, out: Path, store: str = "", **segment: Any) -> list[str]:
    """Command-line overrides of a tiny segmenter run on the test shards (tracking only with a store)."""
    settings = {
        "architecture": TINY,
        "options": "{width: 4}",
        "steps": 6,
        "warmup": 2,
        "checkpoint_every": 2,
        "log_every": 2,
        "output_dir": str(out),
        **segment,
    }
    return [
        f"shards.output={shards}",
        "loader.crop=[64, 128]",
        "loader.shuffle=4",
        "loader.qualities=[37, 42]",
        f"tracking.enabled={'true' if store else 'false'}",
        f"tracking.uri={store}",
        "tracking.experiment=segment-test",
        *(f"segment.{key}={value}" for key, value in settings.items()),
    ]


def job(shards: Path, out: Path, store: str = "", **segment: Any) -> JobConfig:
    return load_config(None, overrides(shards, out, store, **segment))


def test_settings_are_one_config_section_outside_the_generator_digest(tmp_path: Path) -> None:
    base = from_dict({})
    changed = from_dict({"segment": {"lr": 1e-3, "options": {"variant": "b1"}, "steps": 10, "warmup": 1}})
    assert changed.segment.options == {"variant": "b1"} and changed.segment.lr == 1e-3
    assert changed.training_digest() == base.training_digest()  # the generator's checkpoints still resume
    assert changed.segment_digest() != base.segment_digest()
    # steps, folders, logging and the registered name are not what the weights depend on
    again = from_dict(
        {"segment": {"steps": 5000, "output_dir": str(tmp_path), "log_every": 1, "register_name": "x"}}
    )
    assert again.segment_digest() == base.segment_digest()
    assert from_dict({"loader": {"crop": [32, 64]}}).segment_digest() != base.segment_digest()
    for bad, message in [
        ({"warmup": 10, "steps": 10}, "segment.warmup must be < steps"),
        ({"originals": 1.5}, "segment.originals must lie in"),
        ({"lr": 0}, "segment.lr must be > 0"),
        ({"unknown": 1}, "segment: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            from_dict({"segment": bad})


def test_the_engine_gets_adamw_and_the_warmup_decay_schedule() -> None:
    import torch

    cfg = from_dict({"segment": {"lr": 1e-3, "weight_decay": 0.05, "warmup": 7, "steps": 100}})
    ds = engine_config(cfg, torch.device("cpu"))
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.05, "torch_adam": True},
    }
    assert ds["scheduler"]["type"] == "WarmupDecayLR"
    assert (
        ds["scheduler"]["params"]["total_num_steps"] == 100
        and ds["scheduler"]["params"]["warmup_num_steps"] == 7
    )
    assert ds["train_micro_batch_size_per_gpu"] == cfg.loader.batch_size and ds["gradient_clipping"] == 50.0
    bf16 = from_dict({"segment": {"deepspeed_config": "configs/deepspeed/zero1_bf16.json"}})
    with pytest.raises(ConfigError, match="need a GPU"):
        engine_config(bf16, torch.device("cpu"))


def test_trains_checkpoints_exports_and_registers(
    tiny: None, small_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "seg"
    monkeypatch.chdir(tmp_path)  # MLflow's offline record, should the store fail, stays in the test's folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # for MLflow's own look-ups (list_artifacts, load_model)
    path = train_segmenter(job(small_shards, out, store))
    assert path == out / SEGMENTER_FILE
    spec = read_spec(path)
    assert spec["architecture"] == TINY and spec["options"] == {"width": 4} and spec["training"]["steps"] == 6
    assert (
        spec["training"]["data"]["qualities"] == [37, 42] and spec["training"]["recipe"]["originals"] == 0.5
    )
    # periodic checkpoints, the newest two kept, named by the latest pointer
    latest = read_latest(out)
    assert latest is not None and latest.step == 6 and latest.tag == "segment-step00000006"
    assert sorted(p.name for p in (out / "checkpoints").glob("segment-step*")) == [
        "segment-step00000004",
        "segment-step00000006",
    ]
    # tracked: params, the loss at every log step, the file as an artifact; registered with its sha256
    client = MlflowClient(store, registry_uri=store)
    experiment = client.get_experiment_by_name("segment-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name.endswith("-segment") and run.data.params["segment.architecture"] == TINY
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "segmenter")}
    assert {f"segmenter/{SEGMENTER_FILE}", "segmenter/MLmodel"} <= artifacts  # the file, the logged model
    version = client.get_model_version_by_alias("cityscapes-segmenter", "champion")
    assert version.tags["sha256"] == weights_sha256(path) and version.tags["architecture"] == TINY
    marker = json.loads((out / REGISTERED_FILE).read_text())
    assert marker["uri"] == f"models:/cityscapes-segmenter/{version.version}"
    # the registered pyfunc maps RGB images to train ids
    model = mlflow.pyfunc.load_model(f"models:/cityscapes-segmenter/{version.version}")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    ids = model.predict(images)
    expected = segment_base.load_segmenter(path).predict(images[1])
    assert ids.shape == (2, 32, 48) and ids.dtype == np.uint8 and np.array_equal(ids[1], expected)
    # resuming a finished, registered run trains and registers nothing more
    assert train_segmenter(job(small_shards, out, store), resume=True) == path
    assert len(client.search_model_versions("name='cityscapes-segmenter'")) == 1


def test_a_run_killed_before_registration_registers_on_resume(
    tiny: None, small_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "seg"
    monkeypatch.chdir(tmp_path)
    path = train_segmenter(job(small_shards, out, steps=3, warmup=1), tracker=Tracker())  # nothing registered
    assert not (out / REGISTERED_FILE).exists()
    assert train_segmenter(job(small_shards, out, store, steps=3, warmup=1), resume=True) == path
    client = MlflowClient(store, registry_uri=store)
    (version,) = client.search_model_versions("name='cityscapes-segmenter'")
    assert version.tags["sha256"] == weights_sha256(path)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["segment.architecture=unet"], "unknown segmenter 'unet'"),
        (["segment.warmup=6"], "segment.warmup must be < steps"),
        (["segment.init_from=/nowhere/seg.safetensors"], "segment.init_from: no such file"),
        (["segment.register_name=bad name"], "invalid registered-model name"),
        (["shards.output=/nowhere"], "no shard manifest in /nowhere"),
        (["segment.deepspeed_config=configs/deepspeed/zero1_bf16.json"], "need a GPU"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(
    tiny: None,
    small_shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    settings: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [
        "segment",
        *overrides(small_shards, tmp_path / "seg", f"sqlite:///{tmp_path / 'm.db'}"),
        *settings,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "seg" / SEGMENTER_FILE).exists()


def test_a_weights_file_of_another_network_is_one_line_and_exit_2(
    tiny: None, small_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = save_segmenter(TinySeg(num_classes=7), tmp_path / "seven.safetensors")
    argv = ["segment", *overrides(small_shards, tmp_path / "seg"), f"segment.init_from={wrong}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: segment: ") and "\n" not in err and "19 classes" in err, err


def test_resume_refuses_checkpoints_of_other_settings(tiny: None, small_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg"
    train_segmenter(job(small_shards, out, steps=2, warmup=1), tracker=Tracker())
    with pytest.raises(ConfigError, match="other segment, data or loader settings"):
        train_segmenter(job(small_shards, out, steps=2, warmup=1, lr=1e-3), resume=True, tracker=Tracker())


# ---- in fresh processes: the command line, stop signals and kills ----------------------------------------

STOP_AT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_segment_train import register_tiny
register_tiny()
import pipeline.segment.train as train
step, signum = {step}, {signum}
if step:
    original = train.SegmentRunner._train_step
    def stepped(self):
        loss = original(self)
        if self.progress.step == step:
            os.kill(os.getpid(), signum)
        return loss
    train.SegmentRunner._train_step = stepped
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def segment_process(
    argv: list[str], cwd: Path, step: int = 0, signum: int = 0
) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline segment ARGV`` in a fresh process with the tiny network registered; it sends
    itself ``signum`` right after optimizer step ``step`` (0: never)."""
    script = STOP_AT.format(tests=str(TESTS), step=step, signum=signum)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", script, "segment", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_stopped_or_killed_runs_resume_bit_identically(
    tiny: None, small_shards: Path, tmp_path: Path
) -> None:
    steps = ["segment.steps=8", "segment.checkpoint_every=2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child processes: float sums depend on the thread count
    try:
        whole = train_segmenter(load_config(None, [*overrides(small_shards, tmp_path / "whole"), *steps]))
    finally:
        torch.set_num_threads(threads)
    expected = whole.read_bytes()

    # SIGTERM (preemption, torchrun passing on SLURM's warning) after step 3: step 3 is saved, exit 128+15
    out = tmp_path / "stopped"
    argv = [*overrides(small_shards, out), *steps]
    stopped = segment_process(argv, tmp_path, step=3, signum=signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    latest = read_latest(out)
    assert latest is not None and latest.step == 3 and not (out / SEGMENTER_FILE).exists()
    resumed = segment_process([*argv, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming segment at step 3" in resumed.stdout
    assert "segmenter step 4 loss=" in resumed.stdout  # progress without a progress bar (log_every 2)
    assert (out / SEGMENTER_FILE).read_bytes() == expected

    # SIGKILL after step 5: nothing saved at the kill, the resume starts from step 4's checkpoint
    out = tmp_path / "killed"
    argv = [*overrides(small_shards, out), *steps]
    killed = segment_process(argv, tmp_path, step=5, signum=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    latest = read_latest(out)
    assert latest is not None and latest.step == 4
    resumed = segment_process([*argv, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming segment at step 4" in resumed.stdout
    assert (out / SEGMENTER_FILE).read_bytes() == expected


def test_the_launchers_run_the_segment_command() -> None:
    """``launch/<script> segment ...`` runs ``python -m pipeline segment`` where ``train`` would run."""
    from test_launch import REPO, dry_run

    lines = dry_run("slurm.sbatch", "gpu[07-08]", 2, "segment", "--config", "configs/default.yaml")
    per_node = [line for line in lines if re.match(r"^\S+: torchrun ", line)]
    assert len(per_node) == 2
    assert all(
        line.endswith("-m pipeline segment --resume --config configs/default.yaml") for line in per_node
    )
    env = {**os.environ, "DRY_RUN": "1", "NPROC_PER_NODE": "2", "NUM_GPUS": "2"}
    for script, tail in [
        ("torchrun.sh", "-m pipeline segment segment.steps=3"),
        ("deepspeed.sh", "--module pipeline segment segment.steps=3"),
    ]:
        done = subprocess.run(
            ["bash", str(REPO / "launch" / script), "segment", "segment.steps=3"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert done.stdout.strip().endswith(tail), done.stdout
    plain = dry_run("slurm.sbatch", "gpu01", 1, "--config", "configs/default.yaml")  # train stays the default
    assert any(line.endswith("-m pipeline train --resume --config configs/default.yaml") for line in plain)
