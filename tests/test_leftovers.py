"""What a killed process leaves behind is cleaned up: orphaned shard-builder workers exit, temporary files
of an export cut short are removed by the next training in that folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train.trainer import remove_export_temporaries

POOL_SCRIPT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from pipeline.data.shards import exit_with_parent

if __name__ == "__main__":
    pool = ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent, initargs=(0.1,)
    )
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 120)
    time.sleep(120)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_pool_workers_exit_when_the_builder_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "builder.py"
    script.write_text(POOL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        assert _running(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker), "the pool worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def test_export_temporaries_are_removed(tmp_path: Path) -> None:
    left = [
        tmp_path / "phase1" / ".generator.safetensors.k1ll3d.tmp",
        tmp_path / "phase2" / ".discriminator.safetensors.a8c.tmp",
        tmp_path / "phase3" / ".registered.json.x.tmp",
    ]
    kept = [tmp_path / "phase1" / "generator.safetensors", tmp_path / "phase2" / ".other.tmp"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    assert sorted(remove_export_temporaries(tmp_path)) == sorted(left)
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
    assert remove_export_temporaries(tmp_path / "no-such-run") == []
