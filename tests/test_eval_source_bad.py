"""eval.input=source over a dataset with a bad image (undecodable, or over shards.max_pixels): one line that
names the image, as the shard builder's reject does, never a traceback or an out-of-memory."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from test_sources import copy_frames, image_file

from pipeline.config import ConfigError, JobConfig, from_dict
from pipeline.eval.inputs import SourceInput


def png_claiming(width: int, height: int) -> bytes:
    """A PNG signature and IHDR that claim ``width x height``, with no pixel data after them."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def config(root: Path, tmp_path: Path, **shards: object) -> JobConfig:
    return from_dict(
        {
            "data": {"root": str(root), "splits": ["val"], "width": 128, "height": 64, "holdout": []},
            "shards": {"output": str(tmp_path / "no-shards"), "codecs": [{"name": "hevc", "qualities": [42]}]}
            | shards,
            "loader": {"codec": "hevc", "quality": 42},
            "eval": {"input": "source", "output_dir": str(tmp_path / "eval")},
        }
    )


@pytest.fixture
def frames(cityscapes_root: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "data"
    return root, sorted(copy_frames(cityscapes_root, root, 2))


def scored(cfg: JobConfig) -> list[str]:
    return [sample.key for sample in SourceInput(cfg).samples()]


def test_good_frames_are_scored(frames: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, keys = frames
    assert scored(config(root, tmp_path)) == keys


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not an image at all", "unreadable image"),
        (png_claiming(100_000, 100_000), r"100000x100000 \(10000.0 Mpixel\), over the budget"),
    ],
    ids=["undecodable", "over-budget-header"],
)
def test_a_bad_source_image_is_one_line_naming_it(
    frames: tuple[Path, list[str]], tmp_path: Path, content: bytes, reason: str
) -> None:
    root, keys = frames
    bad = image_file(root, keys[1])
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=reason) as refused:
        scored(config(root, tmp_path))
    message = str(refused.value)
    assert "\n" not in message and str(bad) in message and "eval.input=source" in message


def test_the_source_reads_under_shards_max_pixels(frames: tuple[Path, list[str]], tmp_path: Path) -> None:
    """The budget is the configured one: a 2048x1024 frame is over shards.max_pixels=1000000."""
    root, _ = frames
    with pytest.raises(ConfigError, match="over the budget shards.max_pixels=1000000"):
        scored(config(root, tmp_path, max_pixels=1_000_000))
