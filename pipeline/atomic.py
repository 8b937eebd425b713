"""Atomic file writes, for every file the pipeline writes that another step reads back.

A file written here holds either its old content or its whole new content, never a part, even when
the process is killed mid-write (SIGKILL, out of memory, a lost node): the bytes go to a private
temporary name beside the target (``.<name>.<random>.tmp``), are flushed to disk, and the name is
swapped in with :func:`os.replace`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temporary_names(folder: Path, name: str) -> list[Path]:
    """Temporary files that an interrupted atomic write of ``folder / name`` may have left behind."""
    return sorted(folder.glob(f".{name}.*{TMP_SUFFIX}"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on a clean exit it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. The folder is
    created when missing.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)  # the rename itself survives a power loss
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)
