"""The checkpoint pointer is ``checkpoints/latest.json``: DeepSpeed's own plain-text ``latest`` tag-file name
stays free, and run folders written with the old name still resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import JobConfig
from pipeline.train.checkpoint import (
    LATEST,
    LEGACY_LATEST,
    STATE_FILE,
    PhaseCheckpoints,
    discard_checkpoints,
    read_latest,
)


def _checkpoint(out: Path, tag: str) -> None:
    folder = out / "checkpoints" / tag
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"step": 3}))


def test_old_pointer_is_read_then_superseded(tmp_path: Path) -> None:
    assert LATEST == "latest.json" and LEGACY_LATEST == "latest"
    _checkpoint(tmp_path, "phase2-step00000003")
    root = tmp_path / "checkpoints"
    entry = {"tag": "phase2-step00000003", "phase": 2, "step": 3, "history": ["phase2-step00000003"]}
    (root / LEGACY_LATEST).write_text(json.dumps(entry))
    latest = read_latest(tmp_path)
    assert latest is not None and (latest.tag, latest.phase, latest.step) == ("phase2-step00000003", 2, 3)

    # the next save writes latest.json (history carried over) and drops the old pointer
    _checkpoint(tmp_path, "phase2-step00000004")
    store = SimpleNamespace(root=root, phase=2, cfg=JobConfig())
    PhaseCheckpoints._point_latest(store, "phase2-step00000004", 4)  # type: ignore[arg-type]
    assert not (root / LEGACY_LATEST).exists()
    pointer = json.loads((root / LATEST).read_text())
    assert pointer["history"] == ["phase2-step00000003", "phase2-step00000004"]
    assert read_latest(tmp_path).step == 4  # type: ignore[union-attr]
    discard_checkpoints(tmp_path)
    assert read_latest(tmp_path) is None and list(root.iterdir()) == []


def test_a_deepspeed_tag_file_is_not_taken_for_the_pointer(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / LEGACY_LATEST).write_text("global_step3")  # what DeepSpeed writes under that name
    with pytest.raises(RuntimeError, match="not a checkpoint pointer"):
        read_latest(tmp_path)
    _checkpoint(tmp_path, "phase1-step00000001")
    (root / LATEST).write_text(json.dumps({"tag": "phase1-step00000001", "phase": 1, "step": 1}))
    assert read_latest(tmp_path).tag == "phase1-step00000001"  # type: ignore[union-attr]
