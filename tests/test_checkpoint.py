"""pipeline.train.checkpoint and pipeline.train.batches: a checkpoint round-trips the engines, the RNG
states, the data position and the loop's progress; one cut short by SIGKILL is never resumed from."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.atomic import temporary_names
from pipeline.config import JobConfig, load_config
from pipeline.data.manifest import dataset_info
from pipeline.model.export import load_generator
from pipeline.tracking import Tracker
from pipeline.train.batches import Batches
from pipeline.train.checkpoint import PhaseCheckpoints, Progress, params_digest, read_latest
from pipeline.train.engine import DistEnv, distributed
from pipeline.train.rng import seed_everything
from pipeline.train.trainer import PhaseRunner, train

REPO = Path(__file__).resolve().parents[1]
PHASE = 2


def overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"shards.output={shards}",
        f"train.output_dir={out}",
        "loader.crop=[64, 128]",
        "loader.batch_size=1",
        "loader.shuffle=4",
        "phase2.loss.vgg=0",
        "phase2.steps=4",
        "train.log_every=1",
        "tracking.enabled=false",
        "validate.every=0",
        *extra,
    ]


def make_cfg(shards: Path, out: Path, *extra: str) -> JobConfig:
    return load_config(None, overrides(shards, out, *extra))


def test_batches_continue_where_they_stopped(small_shards: Path, tmp_path: Path) -> None:
    cfg = make_cfg(small_shards, tmp_path)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = Batches(cfg, env, PHASE)
    for _ in range(12):  # past the first epoch (10 training frames)
        batches.next()
    position = batches.state_dict()
    assert position == {"epoch": 1, "batches_in_epoch": 2, "samples": 12}
    expected = [batches.next()["key"] for _ in range(3)]
    again = Batches(cfg, env, PHASE)
    again.load_state_dict(position)
    assert again.state_dict() == position
    assert [again.next()["key"] for _ in range(3)] == expected


def test_batches_of_every_epoch_share_one_decoded_cache(
    small_shards: Path, tmp_path: Path, png_decodes: list[str]
) -> None:
    """loader.cache_mb: the epochs' loaders decode each frame once, and give the batches they give without."""
    decoded = png_decodes
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    runs = {}
    for cache_mb in (0, 64):
        decoded.clear()
        batches = Batches(make_cfg(small_shards, tmp_path, f"loader.cache_mb={cache_mb}"), env, PHASE)
        runs[cache_mb] = ([batches.next() for _ in range(30)], len(decoded))  # three epochs of 10 frames
    (plain, plain_decodes), (cached, cached_decodes) = runs[0], runs[64]
    assert plain_decodes == 3 * 30 and cached_decodes == 3 * 10  # image, decoded image and label map
    for a, b in zip(plain, cached, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["decoded"], b["decoded"])


def rng_draws() -> tuple[Any, ...]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_a_checkpoint_round_trips(small_shards: Path, tmp_path: Path) -> None:
    """Saved after two steps and loaded into engines trained otherwise: same weights, optimizer states,
    RNG states, data position and progress; old checkpoints beyond keep_checkpoints are deleted."""
    cfg = make_cfg(small_shards, tmp_path, "train.keep_checkpoints=2")
    with distributed() as env:
        first = PhaseRunner(cfg, PHASE, env, Tracker(), dataset_info(cfg), init=None)
        first._build()
        store = PhaseCheckpoints(cfg, env, tmp_path, PHASE, first.engines, first.batches, validating=True)
        best = {"step": 1, "metric": "psnr", "value": 30.5, "scores": {"psnr": 30.5}}
        weights = {"w": torch.arange(4.0)}
        for step in (1, 2):
            first._train_step()
            seed_everything(step)
            progress = Progress(step, best=best, best_weights=weights, bad_validations=step - 1)
            saved = store.save(progress)
        assert read_latest(tmp_path) == saved and saved.step == 2
        expected = (rng_draws(), first.batches.next()["key"], params_digest(first.engines.generator.module))

        second = PhaseRunner(cfg, PHASE, env, Tracker(), dataset_info(cfg), init=None)
        second._build()
        second._train_step()  # other weights, other optimizer states, another data position
        loaded = PhaseCheckpoints(
            cfg, env, tmp_path, PHASE, second.engines, second.batches, validating=True
        ).load(saved)
        assert (loaded.step, loaded.best, loaded.bad_validations, loaded.stopped_early) == (2, best, 1, False)
        assert loaded.best_weights is not None and torch.equal(loaded.best_weights["w"], weights["w"])
        restored = (rng_draws(), second.batches.next()["key"], params_digest(second.engines.generator.module))
        assert restored == expected
        first._train_step()  # the same step from the same optimizer states: the same weights
        second._train_step()
        assert params_digest(first.engines.generator.module) == params_digest(second.engines.generator.module)

        store.save(Progress(3))
    pointer = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert pointer["history"] == ["phase2-step00000002", "phase2-step00000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest.json", "phase2-step00000002", "phase2-step00000003",
    ]  # fmt: skip


# A job that SIGKILLs itself while it writes the `latest` pointer of step KILL_AT: everything of that
# checkpoint is on disk but the pointer, which is half written to its temporary file.
DYING_JOB = """
import json, os, signal, sys
from pathlib import Path

import pipeline.train.checkpoint as checkpoint
from pipeline.atomic import atomic_path, write_atomic
from pipeline.config import load_config
from pipeline.train.trainer import train

overrides, kill_at, resume = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "resume"


def write(path, data):
    if Path(path).name == checkpoint.LATEST and json.loads(data)["step"] == kill_at:
        with atomic_path(path) as tmp:
            tmp.write_text(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return write_atomic(path, data)


checkpoint.write_atomic = write
train(load_config(None, overrides), [2], resume=resume)
"""
KILL_AT = 3


def run_job(cfg_overrides: list[str], kill_at: int, resume: bool, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", DYING_JOB, json.dumps(cfg_overrides), str(kill_at)]
    return subprocess.run(
        [*command, "resume" if resume else "fresh"], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_a_checkpoint_cut_short_by_sigkill_is_not_resumed_from(small_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg_overrides = overrides(small_shards, out, "train.checkpoint_every=1", "train.keep_checkpoints=2")
    killed = run_job(cfg_overrides, KILL_AT, resume=False, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    root = out / "checkpoints"
    latest = read_latest(out)
    assert latest is not None and latest.step == KILL_AT - 1
    assert (root / f"phase2-step{KILL_AT:08d}" / "trainer_state.json").is_file()  # complete but unnamed
    assert len(temporary_names(root, "latest.json")) == 1

    resumed = run_job(cfg_overrides, -1, resume=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming phase 2 at step {KILL_AT - 1} from" in resumed.stdout
    assert temporary_names(root, "latest.json") == []
    names = ["latest.json", "phase2-step00000003", "phase2-step00000004"]
    assert sorted(p.name for p in root.iterdir()) == names

    reference = train(make_cfg(small_shards, tmp_path / "reference"), [2], tracker=Tracker())[2]
    resumed_generator, _ = load_generator(out / "phase2" / "generator.safetensors")
    assert params_digest(resumed_generator) == params_digest(load_generator(reference)[0])
