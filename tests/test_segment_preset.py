"""The segmenter's cluster preset (``configs/presets/full.yaml``): it loads, alone and under the full job,
with SegFormer-B0's Cityscapes recipe, and the README's "Segmenter" section states the same values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT, load_config

PRESET = REPO_ROOT / "configs" / "presets" / "full.yaml"
FULL_JOB = REPO_ROOT / "configs" / "cityscapes_full.yaml"
# segment key -> (value, how the README writes it)
RECIPE = {
    "architecture": ("segformer", "segformer"),
    "options": ({"variant": "b0"}, "{variant: b0}"),
    "steps": (160_000, "160000"),
    "lr": (6e-5, "6.0e-5"),
    "weight_decay": (0.01, "0.01"),
    "warmup": (1500, "1500"),
    "checkpoint_every": (2000, "2000"),
    "log_every": (50, "50"),
}


def segmenter_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"^## Segmenter.*?(?=^## )", readme, flags=re.M | re.S)
    assert match, "README has no Segmenter section"
    return re.sub(r"\s+", " ", match.group(0))  # the README wraps lines anywhere


@pytest.mark.parametrize("path", [PRESET, FULL_JOB], ids=["preset", "cityscapes_full"])
def test_the_full_preset_carries_segformer_b0s_recipe(path: Path) -> None:
    cfg = load_config(path)
    for key, (value, _) in RECIPE.items():
        assert getattr(cfg.segment, key) == value, key
    # the published batch of 8 is one image per GPU on 8 GPUs; the frames are the generator's 1024x512
    assert cfg.loader.batch_size == 1 and cfg.loader.crop == [512, 1024]
    assert (cfg.data.width, cfg.data.height) == (1024, 512)


def test_the_readme_states_the_presets_values_and_targets() -> None:
    section = segmenter_section()
    for key, (_, written) in RECIPE.items():
        assert f"`segment.{key}: {written}`" in section, key
    assert "`loader.batch_size: 1`" in section
    assert "76.2 % mIoU on Cityscapes val" in section and "71.9 % at 512x1024" in section
