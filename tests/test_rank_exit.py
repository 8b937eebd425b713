"""A launched rank leaves through :func:`pipeline.rank_exit.leave`: the ``atexit`` handlers run, buffered
output reaches the pipe, and the exit status is the command's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.rank_exit import launched_rank

REPO = Path(__file__).resolve().parents[1]


def python(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("world_size", "expected"), [(None, False), ("1", False), ("2", True), ("16", True), ("", False)]
)
def test_a_launched_rank_is_one_of_several(
    monkeypatch: pytest.MonkeyPatch, world_size: str | None, expected: bool
) -> None:
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    assert launched_rank() is expected


def test_leave_runs_the_exit_handlers_flushes_and_keeps_the_status(tmp_path: Path) -> None:
    marker = tmp_path / "handler-ran"
    script = textwrap.dedent(
        f"""
        import atexit, pathlib, sys
        from pipeline.rank_exit import leave
        atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text("ran"))
        print("buffered on stdout")
        sys.stderr.write("buffered on stderr")
        leave(3)
        print("after leave")
        """
    )
    done = python("-c", script, cwd=REPO)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered on stdout\n"
    assert done.stderr == "buffered on stderr"
    assert marker.read_text() == "ran"


# ``python -m pipeline`` run as __main__; a SystemExit that reaches the wrapper is the ordinary exit
RUN_CLI = """
import runpy
try:
    runpy.run_module("pipeline", run_name="__main__")
except SystemExit as exit:
    print(f"ordinary exit {exit.code}")
    raise
"""


@pytest.mark.parametrize(("world_size", "ordinary"), [("2", False), ("1", True)])
def test_only_a_launched_rank_of_the_cli_leaves_through_leave_with_its_status(
    tmp_path: Path, world_size: str, ordinary: bool
) -> None:
    env = {"WORLD_SIZE": world_size, "RANK": "0", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = python("-c", RUN_CLI, "train", "--config", str(tmp_path / "absent.yaml"), cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "absent.yaml" in done.stderr
    assert ("ordinary exit 2" in done.stdout) is ordinary, done.stdout
