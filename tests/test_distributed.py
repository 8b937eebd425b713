"""Two ranks under torchrun on CPU (gloo): replicas stay identical, and a SIGKILLed job resumes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil  # a DeepSpeed dependency
import pytest

from pipeline.model.export import load_generator
from pipeline.train.checkpoint import params_digest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Launcher variables of this (pytest) process must not leak into the launched job.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PHASE1_STEPS = 40
# Past the end of every rank's first epoch (10 training samples, 2 ranks, batch 1): the ranks then sit at
# different data positions, which a resume must restore rank by rank.
KILL_AFTER = 14


@pytest.fixture(scope="module")
def shards(small_shards: Path) -> Path:
    return small_shards


def torchrun(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "pipeline", "train", "--phases", "1,2,3",
        f"shards.output={shards}",
        f"train.output_dir={out}",
        "loader.crop=[64, 128]",
        "loader.batch_size=1",
        "loader.shuffle=4",
        f"phase1.steps={PHASE1_STEPS}",
        "phase2.steps=3",
        "phase3.steps=3",
        "phase1.loss.vgg=0",  # no VGG weights needed; feature matching and GAN carry phase 1
        "phase2.loss.vgg=0",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "tracking.enabled=false",
        "validate.every=0",  # exports are the last step: comparable with the checkpoints' digests
        *extra,
    ]  # fmt: skip


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and its workers, as a crashed node would (torchrun puts each worker in a
    session of its own, so killing the launcher's process group alone leaves them running)."""
    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)


def latest(out: Path) -> dict[str, Any] | None:
    pointer = out / "checkpoints" / "latest.json"
    return json.loads(pointer.read_text()) if pointer.is_file() else None


@pytest.fixture(scope="module")
def interrupted_job(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Start the job, SIGKILL every process of it once phase 1 has a checkpoint, then ``--resume``."""
    work = tmp_path_factory.mktemp("job")
    out = work / "run"
    first_log = work / "first.log"
    with first_log.open("w") as log:
        proc = subprocess.Popen(
            torchrun(shards, out), cwd=work, env=job_env(), stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 240
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                pointer = latest(out)
                if pointer is not None and pointer["phase"] == 1 and pointer["step"] >= KILL_AFTER:
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
            proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(
            f"the job was not killed mid-phase (exit {proc.returncode}):\n{first_log.read_text()[-3000:]}"
        )
    killed_at = latest(out)
    assert killed_at is not None and killed_at["phase"] == 1 and killed_at["step"] < PHASE1_STEPS
    # Read now: the resumed job prunes old checkpoints (train.keep_checkpoints).
    killed_state = json.loads((out / "checkpoints" / killed_at["tag"] / "trainer_state.json").read_text())
    resumed = subprocess.run(
        [*torchrun(shards, out), "--resume"],
        cwd=work,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"out": out, "killed_at": killed_at, "killed_state": killed_state, "log": resumed.stdout}


@pytest.fixture(scope="module")
def uninterrupted_job(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same job run through without interruption."""
    work = tmp_path_factory.mktemp("reference")
    done = subprocess.run(
        torchrun(shards, work / "run"), cwd=work, env=job_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work / "run"


def test_resume_continues_from_the_last_checkpoint(interrupted_job: dict[str, Any]) -> None:
    out, step = interrupted_job["out"], interrupted_job["killed_at"]["step"]
    state = interrupted_job["killed_state"]
    assert (state["phase"], state["step"], state["world_size"]) == (1, step, 2)
    assert state["samples_seen"] == 2 * step  # two ranks, batch 1
    log = interrupted_job["log"]
    assert f"resuming phase 1 at step {step} from" in log
    assert log.count("resuming") == 1 and "phase 1 step 1 " not in log
    assert f"phase 1 step {step + 1} " in log and f"phase 1 step {PHASE1_STEPS} " in log
    final = latest(out)
    assert (final["phase"], final["step"]) == (3, 3)
    for phase in (1, 2, 3):
        _, spec = load_generator(out / f"phase{phase}" / "generator.safetensors")
        assert spec.phase == phase


def test_ranks_hold_identical_generators(interrupted_job: dict[str, Any]) -> None:
    out = interrupted_job["out"]
    final = latest(out)
    digests = json.loads((out / "checkpoints" / final["tag"] / "trainer_state.json").read_text())[
        "generator_sha256"
    ]
    assert len(digests) == 2 and digests[0] == digests[1]
    exported, _ = load_generator(out / "phase3" / "generator.safetensors")
    assert params_digest(exported) == digests[0]
    at_kill = interrupted_job["killed_state"]["generator_sha256"]
    assert at_kill[0] == at_kill[1] != digests[0]


def test_resumed_job_matches_an_uninterrupted_one(
    interrupted_job: dict[str, Any], uninterrupted_job: Path
) -> None:
    """Optimizer states, RNG states and data position all come back: the weights are bit-identical."""
    for phase in (1, 3):
        resumed, _ = load_generator(interrupted_job["out"] / f"phase{phase}" / "generator.safetensors")
        reference, _ = load_generator(uninterrupted_job / f"phase{phase}" / "generator.safetensors")
        assert params_digest(resumed) == params_digest(reference), f"phase {phase}"


def test_validation_on_two_ranks(shards: Path, tmp_path: Path) -> None:
    """Rank 0 validates, every rank follows its early-stop decision, the best step is exported once."""
    command = torchrun(shards, tmp_path / "run", "validate.every=1", "validate.patience=1", "phase2.steps=6")
    command[command.index("1,2,3")] = "2"
    done = subprocess.run(command, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout
    assert log.count("phase 2 step 0 validation on 2 valid frames") == 1  # rank 0 only
    assert "starting from the identity generator" in log
    _, spec = load_generator(tmp_path / "run" / "phase2" / "generator.safetensors")
    assert spec.selected["split"] == "valid" and spec.selected["step"] in range(7)
    state = json.loads(
        (
            tmp_path / "run" / "checkpoints" / latest(tmp_path / "run")["tag"] / "trainer_state.json"
        ).read_text()
    )
    assert state["world_size"] == 2 and state["validation"]["step"] == spec.selected["step"]
