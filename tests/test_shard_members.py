"""Shards any WebDataset user can read: the 16-bit instance map through plain ``webdataset.WebDataset``,
metadata paths relative to data.root, and shards written the old way (instance.png) still read."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from pipeline.config import from_dict
from pipeline.data.loader import make_dataset
from pipeline.data.members import decode_instance, encode_instance, instance_from, relative_source
from pipeline.eval.inputs import ShardInput


def test_instance_member_round_trip_and_determinism() -> None:
    instance = np.array([[0, 255, 256], [26001, 32000, 65535]], np.uint16)
    data = encode_instance(instance)
    assert data == encode_instance(instance.astype(np.int32))  # same bytes: no timestamps inside
    decoded = decode_instance(data)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, instance)
    assert np.array_equal(instance_from({"instance.npz": data}), instance)
    assert np.array_equal(instance_from({"instance.npz": {"instance": instance}}), instance)
    assert np.array_equal(instance_from({"instance.png": instance}), instance)
    assert instance_from({}) is None
    with pytest.raises(ValueError, match="0..65535"):
        encode_instance(np.array([[70000]]))
    assert relative_source("/data/cs/gtFine/val/a.png", "/data/cs") == "gtFine/val/a.png"
    assert relative_source(None, "/data") is None


def _first_shard(shards: Path) -> Path:
    return sorted(shards.glob("*.tar"))[0]


@pytest.mark.parametrize("decoder", ["rgb8", "pil", "torchrgb"])
def test_plain_webdataset_reads_16_bit_instances(small_shards: Path, decoder: str) -> None:
    dataset = wds.WebDataset(str(_first_shard(small_shards)), shardshuffle=False, empty_check=False).decode(
        decoder
    )
    samples = list(dataset)
    assert samples
    top = 0
    for sample in samples:
        instance = sample["instance.npz"]["instance"]
        assert instance.dtype == np.uint16 and instance.shape == (128, 256)
        top = max(top, int(instance.max()))
        meta = sample["json"]
        for path in meta["source"].values():
            assert path is None or (not Path(path).is_absolute() and not path.startswith(".."))
    assert top > 255, "Cityscapes instance ids (>= 1000 for things) should survive"


def _legacy_copy(shard: Path, out: Path) -> Path:
    """``shard`` rewritten as shards were before instance.npz: the instance map as a 16-bit PNG."""
    with tarfile.open(shard) as src, tarfile.open(out, "w") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()
            if info.name.endswith(".instance.npz"):
                ok, png = cv2.imencode(".png", decode_instance(data))
                assert ok
                data, info = (
                    png.tobytes(),
                    tarfile.TarInfo(info.name.replace(".instance.npz", ".instance.png")),
                )
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out


def test_readers_take_new_and_legacy_shards(small_shards: Path, tmp_path: Path) -> None:
    manifest = json.loads((small_shards / "manifest.json").read_text())
    tree = {
        "shards": {"output": str(small_shards)},
        "loader": {"split": "val", "codec": "hevc", "quality": 42, "crop": [], "flip": False},
        "eval": {"split": "val", "max_images": 2, "input": "shards"},
    }
    cfg = from_dict(tree)
    new = next(iter(make_dataset(cfg, train=False)))
    assert new["edge"].max() > 0
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    for side in small_shards.glob("*.json"):  # the manifest and the per-shard records
        shutil.copy2(side, legacy_dir / side.name)
    for name in manifest["splits"]["val"]["shards"]:
        tar = _legacy_copy(small_shards / name, legacy_dir / name)
        sidecar = legacy_dir / name.replace(".tar", ".json")
        record = json.loads(sidecar.read_text())
        if "tar_bytes" in record:  # the rewritten tar's size, as a build of the old format records it
            sidecar.write_text(json.dumps({**record, "tar_bytes": tar.stat().st_size}))
    legacy_cfg = from_dict({**tree, "shards": {"output": str(legacy_dir)}})
    old = next(iter(make_dataset(legacy_cfg, train=False)))
    assert old["key"] == new["key"] and np.array_equal(old["edge"], new["edge"])
    new_eval = next(ShardInput(cfg).samples())
    old_eval = next(ShardInput(legacy_cfg).samples())
    assert new_eval.instance.dtype == np.uint16 and new_eval.instance.max() > 255
    assert np.array_equal(new_eval.instance, old_eval.instance)
