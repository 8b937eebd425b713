"""Exclusive folder locks: one writer per output folder (shards, training, tuning, evaluation).

A command that writes a folder first creates ``<folder>/.pipeline.lock`` with ``O_CREAT | O_EXCL`` (atomic
on local and network file systems) holding the holder's host, pid, the pid's start time and the command.
A second writer finds the file and stops with a one-line :class:`LockError` naming the holder. A lock whose
holder ran on this host and is gone (no such pid, or the pid now belongs to a newer process) is stale: it is
taken over (renamed aside first, so that of two processes taking it over only one wins). A lock held on
another host cannot be checked from here; the error says which file to delete once that holder is known
to be gone. The same process may take a lock it already holds (nested commands: the main job builds the
shards it trains on); it is released when the outermost holder leaves.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

LOCK_FILE = ".pipeline.lock"

_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth


class LockError(ConfigError):
    """The folder is being written by another process (or its lock file cannot be used)."""


def pid_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc``), to tell a reused pid from its
    holder; None where ``/proc`` is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now = pid_start(pid)
    return started is None or now is None or now == started


def _holder_text(info: dict[str, Any]) -> str:
    since = info.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, int | float) else "?"
    )
    return (
        f"{info.get('command', '?')!s} (pid {info.get('pid', '?')} on {info.get('host', '?')}, since {when})"
    )


def read_holder(folder: str | Path) -> dict[str, Any] | None:
    """The lock record of ``folder`` (None when it is not locked or the record is unreadable)."""
    try:
        info = json.loads((Path(folder) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _stale(info: dict[str, Any] | None) -> bool:
    """Whether the recorded holder ran on this host and is gone."""
    if info is None or info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    return isinstance(pid, int) and not process_alive(pid, info.get("pid_start"))


def _try_create(path: Path, record: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, record)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def acquire(folder: str | Path, command: str) -> Path:
    """Lock ``folder`` (made when missing) for ``command``; returns the lock file."""
    folder = Path(folder).expanduser().resolve()
    path = folder / LOCK_FILE
    if path in _held:
        _held[path] += 1
        return path
    folder.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    info = {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": pid_start(pid),
        "started": time.time(),
        "command": command,
    }
    record = json.dumps(info, sort_keys=True).encode()
    for _ in range(5):
        if _try_create(path, record):
            _held[path] = 1
            return path
        holder = read_holder(folder)
        if holder is None and path.exists() and time.time() - path.stat().st_mtime < 5:
            time.sleep(0.1)  # a holder between creating the file and writing its record
            continue
        if holder is not None and not _stale(holder):
            raise LockError(
                f"{folder} is in use by {_holder_text(holder)}; wait for it to finish, or, if that process "
                f"is gone, delete {path}"
            )
        aside = path.with_name(f"{LOCK_FILE}.{uuid.uuid4().hex}.stale")
        with contextlib.suppress(FileNotFoundError):  # another process took the stale lock over first
            os.rename(path, aside)
            aside.unlink()
    raise LockError(f"cannot lock {folder}: {path} keeps changing; is another process starting there?")


def release(path: Path) -> None:
    """Drop one hold of the lock file ``path``; the file goes with the last one."""
    depth = _held.get(path, 0)
    if depth > 1:
        _held[path] = depth - 1
        return
    _held.pop(path, None)
    holder = read_holder(path.parent)
    if holder is not None and holder.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` for the block (see the module docstring); yields the folder."""
    path = acquire(folder, command)
    try:
        yield path.parent
    finally:
        release(path)


@contextlib.contextmanager
def rank0_lock(folder: str | Path, command: str, is_main: bool) -> Iterator[None]:
    """:func:`folder_lock` taken by rank 0 of a ``torch.distributed`` job; every rank stops alike when it is
    refused (the outcome is broadcast, so no rank waits at a barrier for a refused one)."""
    import torch.distributed as dist

    path, error = None, ""
    if is_main:
        try:
            path = acquire(folder, command)
        except LockError as err:
            error = str(err)
    if dist.is_available() and dist.is_initialized():
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        error = outcome[0]
    if error:
        raise LockError(error)
    try:
        yield
    finally:
        if path is not None:
            release(path)
