"""pipeline.data.manifest: manifests written by the previous code read and write back unchanged; one
error for a split or a codec quality that was not built; dataset_info."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import ConfigError, from_dict
from pipeline.data.manifest import (
    MANIFEST,
    Manifest,
    ManifestError,
    SplitEntry,
    dataset_info,
)

# A manifest exactly as the builder wrote it before the typed manifest (shards.py's _manifest), with a
# config of that time: the config is kept as written, whatever the current JobConfig looks like.
V2: dict[str, Any] = {
    "version": 2,
    "config": {"shards": {"output": "/data/shards", "label_coder": "auto"}, "model": {"label_nc": 0}},
    "config_hash": "0123456789abcdef",
    "dataset": {
        "source": "cityscapes",
        "root": "/data/cityscapes",
        "label_nc": 34,
        "label_names": ["unlabeled", "ego vehicle", "road"],
        "has_instances": True,
        "width": 256,
        "height": 128,
    },
    "splits": {
        "val": {
            "shards": ["val-000000.tar", "val-000001.tar"],
            "samples": 3,
            "keys": ["frankfurt_a", "frankfurt_b", "frankfurt_c"],
        },
        "test": {"shards": ["test-000000.tar"], "samples": 1, "keys": ["lindau_a"]},
        "empty": {"shards": [], "samples": 0, "keys": []},
    },
    "codecs": {
        "hevc_q42": {"codec": "hevc", "quality": 42, "bpp_mean": 0.07, "bpp_min": 0.05, "bpp_max": 0.09},
        "hevc_q37": {"codec": "hevc", "quality": 37, "bpp_mean": 0.15, "bpp_min": 0.125, "bpp_max": 0.2},
        "jpeg_q50": {"codec": "jpeg", "quality": 50, "bpp_mean": None, "bpp_min": None, "bpp_max": None},
    },
    "label": {"coder": "jxl", "downsample": 1, "bpp_mean": 0.03125},
    "rejects": [{"key": "frankfurt_d", "split": "val", "path": "/x.png", "reason": "unreadable image"}],
}
SIDECAR_KEYS = {
    "val-000000": ["frankfurt_a", "frankfurt_b"],
    "val-000001": ["frankfurt_c"],
    "test-000000": ["lindau_a"],
}


def write_previous(folder: Path, manifest: dict[str, Any]) -> Path:
    """``manifest.json`` as the previous builder wrote it (``json.dumps(indent=1, sort_keys=True)``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


def test_version_2_round_trips(tmp_path: Path) -> None:
    path = write_previous(tmp_path / "old", V2)
    manifest = Manifest.read(tmp_path / "old")
    assert manifest.to_json() == V2
    assert manifest.folder == tmp_path / "old"
    assert manifest.dataset.label_names == ("unlabeled", "ego vehicle", "road")
    assert manifest.splits["val"] == SplitEntry(
        ("val-000000.tar", "val-000001.tar"), 3, ("frankfurt_a", "frankfurt_b", "frankfurt_c")
    )
    assert manifest.codecs["hevc_q37"].tag == "hevc_q37" and manifest.codecs["jpeg_q50"].bpp_mean is None
    assert [r.reason for r in manifest.rejects] == ["unreadable image"]
    # written back byte for byte as the previous code wrote it
    written = manifest.write(tmp_path / "new")
    assert written.read_bytes() == path.read_bytes()
    assert Manifest.from_json(V2) == manifest


def test_version_1_reads_keys_from_the_sidecars_and_writes_back_unchanged(tmp_path: Path) -> None:
    v1 = copy.deepcopy(V2)
    v1["version"] = 1
    del v1["splits"]["empty"]
    for entry in v1["splits"].values():
        del entry["keys"]
    write_previous(tmp_path, v1)
    for shard, keys in SIDECAR_KEYS.items():
        (tmp_path / f"{shard}.json").write_text(json.dumps({"shard": shard, "keys": keys}))
    manifest = Manifest.read(tmp_path)
    assert manifest.version == 1
    assert manifest.split("val").keys == ("frankfurt_a", "frankfurt_b", "frankfurt_c")
    assert manifest.split("test").keys == ("lindau_a",)
    assert manifest.to_json() == v1
    manifest.write()
    assert json.loads((tmp_path / MANIFEST).read_text()) == v1

    (tmp_path / "test-000000.json").unlink()
    with pytest.raises(ManifestError, match="not a shard manifest this code reads"):
        Manifest.read(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no manifest.json in .*; build shards first"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "a JSON object expected"),
        (json.dumps({**V2, "version": 3}), r"version 3 is newer than this code reads \(reads \[1, 2\]\)"),
        (json.dumps({**V2, "version": "2"}), "'2' is not a shard manifest version"),
        (json.dumps({k: v for k, v in V2.items() if k != "label"}), "not a shard manifest this code reads"),
    ],
)
def test_unreadable_manifests_are_refused(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(ManifestError, match=message):
        Manifest.read(tmp_path)


def test_qualities_and_splits_have_one_error_each(tmp_path: Path) -> None:
    write_previous(tmp_path, V2)
    manifest = Manifest.read(tmp_path)
    assert manifest.qualities("hevc") == [37, 42]
    assert manifest.qualities("hevc", [42, 42]) == [42]
    assert manifest.qualities("hevc", [42, 37]) == [37, 42]
    assert manifest.qualities("jpeg") == [50]
    with pytest.raises(
        ManifestError, match=r"codec 'webp' was not built in .*; built: \['hevc_q37', 'hevc_q42'"
    ):
        manifest.qualities("webp")
    with pytest.raises(
        ManifestError, match=r"^eval.qualities: hevc_q32, hevc_q47 were not built in .*; built: \['hevc_q37'"
    ):
        manifest.qualities("hevc", [32, 37, 47], setting="eval.qualities")
    assert manifest.split("test").samples == 1
    with pytest.raises(
        ManifestError, match=r"split 'train' was not built in .*; built: \['empty', 'test', 'val'\]"
    ):
        manifest.split("train")
    assert manifest.shard_paths("val") == [tmp_path / "val-000000.tar", tmp_path / "val-000001.tar"]
    # the manifest's errors are configuration errors (and so ValueErrors) like the others of the pipeline
    assert issubclass(ManifestError, ConfigError) and issubclass(ManifestError, ValueError)


def test_dataset_info_takes_what_the_config_leaves_open_from_the_manifest(tmp_path: Path) -> None:
    def cfg(**sections: dict[str, Any]) -> Any:
        return from_dict({"shards": {"output": str(tmp_path)}, "loader": {"split": "val"}, **sections})

    with pytest.raises(ConfigError, match="data.label_nc is 0 and there is no shard manifest"):
        dataset_info(cfg())
    assert dataset_info(cfg(data={"label_nc": 5}, model={"use_instance": True})).label_nc == 5

    write_previous(tmp_path, V2)
    info = dataset_info(cfg(model={"use_instance": True}))
    assert (info.label_nc, info.use_instance) == (34, True)
    assert info.train_frames == ("frankfurt_a", "frankfurt_b", "frankfurt_c")
    assert dataset_info(cfg(data={"label_nc": 34})).label_nc == 34
    with pytest.raises(
        ConfigError, match="data.label_nc is 19 but the shards .* were built with label_nc 34"
    ):
        dataset_info(cfg(data={"label_nc": 19}))
    assert dataset_info(cfg(model={"use_instance": False})).use_instance is False
    assert dataset_info(cfg(loader={"split": "val", "shards": "x-{0..1}.tar"})).train_frames == ()
    with pytest.raises(ManifestError, match="split 'train' was not built"):
        dataset_info(cfg(loader={"split": "train"}))


LINEAR, NEAREST = {"chroma_upsampling": "linear"}, {"chroma_upsampling": "nearest"}


def _with_build(codecs: list[list[Any]]) -> dict[str, Any]:
    """:data:`V2` with a build record of these ``[name, quality, options]`` codec settings."""
    data = copy.deepcopy(V2)
    data["build"] = {"settings": {"codecs": codecs}, "hash": "0" * 16}
    return data


def test_the_manifest_tells_how_its_pictures_were_decoded(tmp_path: Path) -> None:
    write_previous(tmp_path / "legacy", V2)  # no build record: built before the options existed
    assert Manifest.read(tmp_path / "legacy").decode_options("hevc") == NEAREST
    write_previous(
        tmp_path / "new", _with_build([["hevc", 37, LINEAR], ["hevc", 42, LINEAR], ["jpeg", 50, {}]])
    )
    assert Manifest.read(tmp_path / "new").decode_options("hevc") == LINEAR
    assert Manifest.read(tmp_path / "new").decode_options("jpeg") == {}
    write_previous(tmp_path / "before", _with_build([["hevc", 42, {}]]))  # a record of before the option
    assert Manifest.read(tmp_path / "before").decode_options("hevc") == NEAREST
    write_previous(tmp_path / "mixed", _with_build([["hevc", 37, LINEAR], ["hevc", 42, NEAREST]]))
    with pytest.raises(ManifestError, match="hold hevc pictures decoded in 2 ways"):
        Manifest.read(tmp_path / "mixed").decode_options("hevc")


def test_training_takes_the_options_of_every_folder_it_reads(tmp_path: Path) -> None:
    def cfg(*extra: Path, **sections: Any) -> Any:
        shards = {"output": str(tmp_path / "main"), **sections.pop("shards", {})}
        loader = {"split": "val", "extra_shards": [str(f) for f in extra]}
        return from_dict({"shards": shards, "loader": loader, **sections})

    # no manifest: what a build of the config would record (today's default, or the option given)
    assert dataset_info(cfg(data={"label_nc": 34})).decode_options == LINEAR
    nearest = {"codecs": [{"name": "hevc", "qualities": [42], "options": NEAREST}]}
    assert dataset_info(cfg(data={"label_nc": 34}, shards=nearest)).decode_options == NEAREST
    write_previous(tmp_path / "main", _with_build([["hevc", 42, LINEAR]]))
    write_previous(tmp_path / "same", _with_build([["hevc", 42, LINEAR]]))
    write_previous(tmp_path / "other", _with_build([["hevc", 42, NEAREST]]))
    assert dataset_info(cfg(tmp_path / "same")).decode_options == LINEAR
    with pytest.raises(ManifestError, match=r"other holds hevc pictures decoded with .*nearest.* but .*main"):
        dataset_info(cfg(tmp_path / "other"))
