"""pipeline.atomic: a write replaces the file whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.atomic import atomic_path, temporary_names, write_atomic


def test_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    write_atomic(target, "old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert temporary_names(target.parent, target.name) == []


def test_failed_write_keeps_old_content_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        assert temporary_names(tmp_path, target.name) == [tmp]
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert temporary_names(tmp_path, target.name) == []
