"""A stop signal to one rank of a 2-rank torchrun job (CPU, gloo): every rank checkpoints the same step and
stops (the ranks agree every POLL_EVERY steps), and ``--resume`` continues from that step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # a DeepSpeed dependency
import pytest

from pipeline.model.export import load_generator
from pipeline.train.preempt import POLL_EVERY

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STEPS = 3 * POLL_EVERY


def torchrun(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "pipeline", "train", "--phases", "1",
        f"shards.output={shards}",
        f"train.output_dir={out}",
        "loader.crop=[64, 128]",
        "loader.batch_size=1",
        "loader.shuffle=4",
        f"phase1.steps={STEPS}",
        "phase1.loss.vgg=0",
        "train.checkpoint_every=0",  # the only checkpoint is the one the signal asks for
        "train.log_every=1",
        "tracking.enabled=false",
        "validate.every=0",
        *extra,
    ]  # fmt: skip


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def rank_process(launcher: int, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise LookupError(f"no rank {rank} under process {launcher}")


def test_sigterm_to_one_rank_stops_every_rank_at_one_step(small_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    log_file = tmp_path / "first.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            torchrun(small_shards, out), cwd=tmp_path, env=job_env(), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 240
            while "phase 1 step 2 " not in log_file.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
                time.sleep(0.05)
            rank_process(proc.pid, 1).send_signal(signal.SIGTERM)
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    first = log_file.read_text()
    assert proc.returncode != 0, first[-3000:]  # the ranks stopped with Preempted (128 + SIGTERM)
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    step = pointer["step"]
    assert pointer["phase"] == 1 and step % POLL_EVERY == 0 and 0 < step < STEPS, pointer
    assert f"phase 1: stop signal {int(signal.SIGTERM)}, saved step {step}" in first
    assert f"phase 1 step {step + 1} " not in first  # no rank went on past the agreed step
    folder = out / "checkpoints" / pointer["tag"]
    state = json.loads((folder / "trainer_state.json").read_text())
    # both ranks took part in the save of that step (it gathers each rank's generator digest)
    assert (state["step"], state["world_size"]) == (step, 2)
    assert len(state["generator_sha256"]) == 2 and len(set(state["generator_sha256"])) == 1
    assert sorted(p.name for p in folder.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]

    resumed = subprocess.run(
        [*torchrun(small_shards, out), "--resume"],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming phase 1 at step {step} from" in resumed.stdout
    assert f"phase 1 step {step + 1} " in resumed.stdout and "phase 1 step 1 " not in resumed.stdout
    _, spec = load_generator(out / "phase1" / "generator.safetensors")
    assert (spec.phase, spec.steps) == (1, STEPS)
