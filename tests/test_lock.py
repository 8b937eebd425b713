"""Folder locks: one writer per output folder; a second writer is refused in one line naming the holder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.manifest import Manifest
from pipeline.lock import LOCK_FILE, LockError, acquire, folder_lock, read_holder, release

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def dead_pid() -> int:
    """A pid that was just used and is gone."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_records_its_holder_and_goes_with_it(tmp_path: Path) -> None:
    with folder_lock(tmp_path / "out", "shard build") as folder:
        holder = read_holder(folder)
        assert holder is not None
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["command"] == "shard build" and holder["started"] <= time.time()
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_a_live_holder_refuses_a_second_writer_in_one_line(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        record = {
            "host": socket.gethostname(),
            "pid": holder.pid,
            "started": time.time(),
            "command": "training",
        }
        (tmp_path / LOCK_FILE).write_text(json.dumps(record))
        with pytest.raises(LockError) as err:
            acquire(tmp_path, "evaluation")
        message = str(err.value)
        assert "\n" not in message
        assert f"training (pid {holder.pid} on {socket.gethostname()}" in message
        assert json.loads((tmp_path / LOCK_FILE).read_text()) == record  # left alone
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_this_host_is_taken_over(tmp_path: Path) -> None:
    record = {"host": socket.gethostname(), "pid": dead_pid(), "started": 0, "command": "shard build"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with folder_lock(tmp_path, "shard build"):
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert not list(tmp_path.iterdir())


def test_a_reused_pid_does_not_keep_a_lock(tmp_path: Path) -> None:
    """The recorded pid now runs another process (its start time differs): the lock is stale."""
    record = {"host": socket.gethostname(), "pid": os.getppid(), "pid_start": "1", "command": "training"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with folder_lock(tmp_path, "training"):
        assert read_holder(tmp_path)["pid"] == os.getpid()


def test_a_lock_of_another_host_is_never_broken(tmp_path: Path) -> None:
    record = {"host": "elsewhere", "pid": dead_pid(), "started": 0, "command": "training"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(LockError, match="on elsewhere.*delete"):
        acquire(tmp_path, "training")


def test_the_holder_may_lock_again_and_keeps_the_lock_until_the_outermost_leaves(tmp_path: Path) -> None:
    outer = acquire(tmp_path, "main job")
    with folder_lock(tmp_path, "training"):
        pass
    assert read_holder(tmp_path)["command"] == "main job"
    release(outer)
    assert not outer.exists()


def shards_cli(root: Path, out: Path, quality: int, width: int) -> list[str]:
    return [
        sys.executable, "-m", "pipeline", "shards",
        f"data.root={root}", f"data.width={width}", f"data.height={width // 2}",
        "data.holdout=[]", "data.splits=[val]", f"shards.output={out}",
        f"shards.codecs=[{{name: hevc, qualities: [{quality}]}}]",
        "shards.samples_per_shard=2", "shards.workers=1",
    ]  # fmt: skip


def wait_for_lock(folder: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (folder / LOCK_FILE).exists():
        assert proc.poll() is None, "the first writer ended before it took the lock"
        assert time.monotonic() < deadline, "the first writer never took the lock"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_concurrent_builds_the_second_is_refused(cityscapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    first = subprocess.Popen(
        shards_cli(cityscapes_root, out, 30, 512),
        cwd=tmp_path,
        env=job_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_for_lock(out, first)
    second = subprocess.run(
        shards_cli(cityscapes_root, out, 42, 256), cwd=tmp_path, env=job_env(), capture_output=True, text=True
    )
    assert first.poll() is None, "the first build must still run while the second is refused"
    stdout, _ = first.communicate(timeout=300)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by shard build (pid" in lines[0] and str(first.pid) in lines[0]
    assert first.returncode == 0, stdout
    manifest = Manifest.read(out)
    assert sorted(manifest.codecs) == ["hevc_q30"] and manifest.dataset.width == 512
    assert manifest.splits["val"].samples == 22 and not (out / LOCK_FILE).exists()


def train_cli(shards: Path, out: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "pipeline", "train", "--phases", "1",
        f"shards.output={shards}", f"train.output_dir={out}",
        "loader.crop=[64, 128]", "loader.batch_size=1", "loader.shuffle=4",
        f"phase1.steps={steps}", "phase1.loss.vgg=0", "train.checkpoint_every=10",
        "tracking.enabled=false", "validate.every=0",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_concurrent_trainings_the_second_is_refused(small_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = subprocess.Popen(
        train_cli(small_shards, out, 80), cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for_lock(out, first)
    second = subprocess.run(
        train_cli(small_shards, out, 2), cwd=tmp_path, env=job_env(), capture_output=True, text=True
    )
    assert first.poll() is None, "the first training must still run while the second is refused"
    log, _ = first.communicate(timeout=600)
    assert second.returncode == 2, second.stderr
    lines = [line for line in second.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"in use by training (pid {first.pid}" in lines[0]
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, log
    assert "phase 1 done" in log and (out / "phase1" / "generator.safetensors").is_file()
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["phase"] == 1 and latest["step"] == 80
    assert not (out / LOCK_FILE).exists()
