"""The checkpoint pointer is ``checkpoints/latest.json``: DeepSpeed's own plain-text ``latest`` tag-file name
stays free, and run folders written with the old name still resume. Each engine's checkpoint is a DeepSpeed
checkpoint folder of its own, which DeepSpeed's own ``load_checkpoint(folder)`` loads; checkpoints of the
layout before (both engines as tags of one folder, no tag file) still resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import JobConfig, load_config
from pipeline.data.manifest import dataset_info
from pipeline.tracking import Tracker
from pipeline.train.checkpoint import (
    DEEPSPEED_LATEST,
    DISCRIMINATOR_DIR,
    GENERATOR_DIR,
    LATEST,
    LEGACY_LATEST,
    STATE_FILE,
    PhaseCheckpoints,
    Progress,
    discard_checkpoints,
    params_digest,
    read_latest,
)
from pipeline.train.engine import distributed
from pipeline.train.trainer import PhaseRunner

PHASE = 2


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


def _runner_cfg(shards: Path, out: Path) -> JobConfig:
    return load_config(
        None,
        [
            f"shards.output={shards}",
            f"train.output_dir={out}",
            "loader.crop=[64, 128]",
            "loader.batch_size=1",
            "loader.shuffle=4",
            "phase2.loss.vgg=0",
            "phase2.steps=4",
            "tracking.enabled=false",
            "validate.every=0",
        ],
    )


def test_each_engine_folder_loads_with_deepspeeds_own_call_and_old_layouts_resume(
    small_shards: Path, tmp_path: Path
) -> None:
    cfg = _runner_cfg(small_shards, tmp_path)
    with distributed() as env:

        def runner() -> PhaseRunner:
            built = PhaseRunner(cfg, PHASE, env, Tracker(), dataset_info(cfg), init=None)
            built._build()
            return built

        def digests(r: PhaseRunner) -> tuple[str, str]:
            assert r.engines.discriminator is not None
            return params_digest(r.engines.generator.module), params_digest(r.engines.discriminator.module)

        first = runner()
        first._train_step()
        saved = PhaseCheckpoints(cfg, env, tmp_path, PHASE, first.engines, first.batches, False).save(
            Progress(1)
        )
        expected = digests(first)
        for name in (GENERATOR_DIR, DISCRIMINATOR_DIR):
            assert (saved.path / name / DEEPSPEED_LATEST).read_text().strip() == saved.tag
            assert (saved.path / name / saved.tag).is_dir()

        # DeepSpeed's own call, on each engine's folder, with no tag
        second = runner()
        second._train_step()
        second._train_step()
        assert digests(second) != expected
        assert second.engines.generator.load_checkpoint(str(saved.path / GENERATOR_DIR))[0] is not None
        assert second.engines.discriminator is not None
        assert (
            second.engines.discriminator.load_checkpoint(str(saved.path / DISCRIMINATOR_DIR))[0] is not None
        )
        assert digests(second) == expected

        # the layout before: both engines as tags of the checkpoint folder, no tag files, the old pointer
        old_out = tmp_path / "old"
        old = old_out / "checkpoints" / saved.tag
        old.mkdir(parents=True)
        first.engines.generator.save_checkpoint(str(old), tag=GENERATOR_DIR, save_latest=False)
        first.engines.discriminator.save_checkpoint(str(old), tag=DISCRIMINATOR_DIR, save_latest=False)
        for part in (STATE_FILE, "rng_rank0.pt"):
            shutil.copy2(saved.path / part, old / part)
        pointer = {"tag": saved.tag, "phase": PHASE, "step": 1, "history": [saved.tag]}
        (old_out / "checkpoints" / LEGACY_LATEST).write_text(json.dumps(pointer))
        assert not (old / GENERATOR_DIR / DEEPSPEED_LATEST).exists()
        third = runner()
        third._train_step()
        third._train_step()
        latest = read_latest(old_out)
        assert latest is not None
        progress = PhaseCheckpoints(cfg, env, old_out, PHASE, third.engines, third.batches, False).load(
            latest
        )
        assert progress.step == 1 and digests(third) == expected

        # and the new layout through the trainer's resume
        fourth = runner()
        fourth._train_step()
        fourth._train_step()
        store = PhaseCheckpoints(cfg, env, tmp_path, PHASE, fourth.engines, fourth.batches, False)
        assert store.load(saved).step == 1 and digests(fourth) == expected

        # an engine folder without its checkpoint is named, not silently skipped
        shutil.rmtree(saved.path / DISCRIMINATOR_DIR)
        with pytest.raises(RuntimeError, match="no DeepSpeed checkpoint of the discriminator"):
            store.load(saved)
