"""Shard builder on the real Cityscapes sample: content, manifest, resume after SIGKILL, rejects, layouts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.atomic import temporary_names
from pipeline.config import REPO_ROOT, ConfigError, from_dict
from pipeline.data.codecs import LabelCoder, get_codec
from pipeline.data.manifest import (
    CodecEntry,
    DatasetEntry,
    LabelEntry,
    Manifest,
    ManifestError,
    Reject,
    SplitEntry,
)
from pipeline.data.members import decode_instance
from pipeline.data.shards import ShardError, build_shards, format_summary
from pipeline.data.sources import open_source

QUALITIES = [37, 45]


def config(root: Path, out: Path, **data: Any) -> dict[str, Any]:
    return {
        # no held-out splits (the default config's): the tests cut the sample down to a few frames
        "data": {"root": str(root), "splits": ["val"], "width": 256, "height": 128, "holdout": [], **data},
        "shards": {
            "output": str(out),
            "codecs": [{"name": "hevc", "qualities": QUALITIES}],
            "samples_per_shard": 4,
            "workers": 2,
        },
    }


def read_tars(paths: list[Path]) -> dict[str, dict[str, bytes]]:
    """``{key: {member: bytes}}``; fails on a key seen twice."""
    samples: dict[str, dict[str, bytes]] = {}
    seen: list[str] = []
    for path in paths:
        with tarfile.open(path) as tar:
            for info in tar:
                key, _, member = info.name.partition(".")
                if key not in samples:
                    seen.append(key)
                samples.setdefault(key, {})[member] = tar.extractfile(info).read()
    assert len(seen) == len(set(seen)), "a key appears in more than one place"
    return samples


def shard_paths(out: Path, manifest: Manifest, split: str = "val") -> list[Path]:
    return [out / name for name in manifest.splits[split].shards]


def png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def cli(args: list[str], **kw: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "shards", *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def overrides(cfg: dict[str, Any]) -> list[str]:
    """A nested config dict as ``key.sub=value`` CLI overrides (values as JSON, which YAML reads)."""
    return [
        f"{section}.{key}={json.dumps(value)}" for section, keys in cfg.items() for key, value in keys.items()
    ]


@pytest.fixture(scope="module")
def built(cityscapes_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("shards") / "cityscapes"
    tree = config(cityscapes_root, out)
    tree["shards"]["store_bitstreams"] = True
    cfg = from_dict(tree)
    manifest = build_shards(cfg)
    return cfg, out, manifest, read_tars(shard_paths(out, manifest))


def test_every_frame_is_in_exactly_one_shard(built, cityscapes_root: Path) -> None:
    cfg, out, manifest, samples = built
    keys = [p.name.replace("_leftImg8bit.png", "") for p in cityscapes_root.glob("leftImg8bit/val/*/*.png")]
    assert sorted(samples) == sorted(keys) and len(keys) == 22
    assert manifest.splits["val"] == SplitEntry(
        shards=tuple(f"val-{i:06d}.tar" for i in range(6)), samples=22, keys=tuple(sorted(keys))
    )
    # shard i holds sorted keys [4i, 4i+4)
    for i, path in enumerate(shard_paths(out, manifest)):
        assert sorted(read_tars([path])) == sorted(keys)[4 * i : 4 * i + 4]
    tags = [f"hevc_q{q}" for q in QUALITIES]
    expected = {"image.png", "label.png", "instance.npz", "label.bin", "json"}
    expected |= {f"{t}.png" for t in tags} | {f"{t}.bin" for t in tags}
    assert all(set(members) == expected for members in samples.values())
    assert not list(out.glob(".*"))


def test_members_match_standalone_load_and_codec(built) -> None:
    cfg, out, manifest, samples = built
    source = open_source(cfg.data)
    codec = get_codec("hevc")
    for sample in [source.samples("val")[0], source.samples("val")[-1]]:
        members = samples[sample.key]
        meta = json.loads(members["json"])
        rgb, label, instance = source.load(sample, 256, 128)
        assert meta["key"] == sample.key and meta["split"] == "val"
        root = Path(cfg.data.root)  # paths relative to data.root, not the build machine's
        assert meta["source"] == {
            "image": sample.image.relative_to(root).as_posix(),
            "label": sample.label.relative_to(root).as_posix(),
            "instance": sample.instance.relative_to(root).as_posix(),
        }
        assert (meta["width"], meta["height"], meta["original_size"]) == (256, 128, [2048, 1024])
        assert np.array_equal(cv2.cvtColor(png(members["image.png"]), cv2.COLOR_BGR2RGB), rgb)
        stored_label = png(members["label.png"])
        assert stored_label.dtype == np.uint8 and np.array_equal(stored_label, label)
        stored_instance = decode_instance(members["instance.npz"])
        assert stored_instance.dtype == np.uint16 and stored_instance.max() > 255
        assert np.array_equal(stored_instance, instance)
        for q in QUALITIES:
            tag = f"hevc_q{q}"
            alone = codec.roundtrip(rgb, q)
            entry = meta["codecs"][tag]
            assert entry["bpp"] == pytest.approx(alone.bpp, abs=0) and entry["bytes"] == len(alone.bitstream)
            assert entry["sha256"] == hashlib.sha256(alone.bitstream).hexdigest()
            assert members[f"{tag}.bin"] == alone.bitstream
            assert np.array_equal(cv2.cvtColor(png(members[f"{tag}.png"]), cv2.COLOR_BGR2RGB), alone.decoded)
        coder = LabelCoder(meta["label"]["coder"], downsample=1)
        assert np.array_equal(coder.decode(members["label.bin"], size=(256, 128)), label)
        assert meta["label"]["bpp"] == 8 * len(members["label.bin"]) / (256 * 128)
        for name, digest in meta["sha256"].items():
            assert hashlib.sha256(members[name]).hexdigest() == digest
        assert set(meta["sha256"]) == set(members) - {"json"}


def test_manifest_agrees_with_the_shards(built) -> None:
    cfg, out, manifest, samples = built
    assert Manifest.read(out) == manifest and Manifest.read(out).folder == manifest.folder == out
    assert json.loads((out / "manifest.json").read_text()) == manifest.to_json()
    metas = [json.loads(m["json"]) for m in samples.values()]
    assert manifest.config == cfg.to_dict() and manifest.config_hash == cfg.digest()
    assert manifest.dataset.label_nc == 34 and manifest.dataset.has_instances is True
    assert manifest.rejects == ()
    for q in QUALITIES:
        values = [m["codecs"][f"hevc_q{q}"]["bpp"] for m in metas]
        stats = manifest.codecs[f"hevc_q{q}"]
        assert stats.codec == "hevc" and stats.quality == q
        assert stats.bpp_mean == pytest.approx(statistics.fmean(values))
        assert (stats.bpp_min, stats.bpp_max) == (min(values), max(values))
    q_lo, q_hi = (manifest.codecs[f"hevc_q{q}"].bpp_mean for q in QUALITIES)
    assert q_lo > q_hi  # a higher QP spends fewer bits
    assert manifest.label.bpp_mean == pytest.approx(statistics.fmean(m["label"]["bpp"] for m in metas))
    assert manifest.label.coder == metas[0]["label"]["coder"]
    summary = format_summary(manifest)
    assert "val: 22 samples in 6 shards" in summary and "rejects: 0" in summary
    assert f"{manifest.codecs['hevc_q45'].bpp_mean:9.4f}" in summary


def test_rerun_skips_complete_shards_and_redoes_a_broken_one(built) -> None:
    cfg, out, manifest, _ = built
    files = sorted(out.glob("val-*"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    assert build_shards(cfg) == manifest
    assert {p: p.stat().st_mtime_ns for p in files} == {p: m for p, (m, _) in before.items()}

    (out / "val-000002.json").unlink()  # as if killed between the tar rename and its sidecar
    (out / "val-000099.tar").write_bytes(b"from a bigger build before")
    (out / "val-000099.json").write_text("{}")
    assert build_shards(cfg) == manifest
    assert sorted(out.glob("val-*")) == files
    for path, (mtime, data) in before.items():
        assert path.read_bytes() == data  # deterministic: the rebuilt shard is byte-identical
        assert (path.stat().st_mtime_ns == mtime) == (not path.name.startswith("val-000002"))


@pytest.mark.slow
def test_resume_after_sigkill(cityscapes_root: Path, tmp_path: Path) -> None:
    from test_sources import copy_frames

    keys = copy_frames(cityscapes_root, tmp_path / "data", 8)
    out = tmp_path / "out"
    tree = config(tmp_path / "data", out)
    tree["shards"].update(samples_per_shard=2, workers=1)
    proc = cli(overrides(tree), start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("val-*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("val-*.json")}
    assert 1 <= len(done_before) < 4, f"the build should have been killed part way; stderr: {stderr}"
    assert not (out / "manifest.json").exists()
    # temporaries left by killed writes, named as pipeline.atomic names them
    stale = [out / ".val-000003.tar.x1y2z3.tmp", out / ".manifest.json.a1b2c3.tmp"]
    for path in stale:
        path.write_bytes(b"left by a killed run")
    assert temporary_names(out, "val-000003.tar") == [stale[0]]

    tree["shards"]["workers"] = 2
    rerun = cli(overrides(tree))
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "val: 8 samples in 4 shards" in stdout
    manifest = Manifest.read(out)
    assert sorted(read_tars(shard_paths(out, manifest))) == keys
    assert not list(out.glob(".*"))
    for name, mtime in done_before.items():
        assert (out / name).stat().st_mtime_ns == mtime  # shards finished before the kill were kept


def test_rejects_are_recorded_and_strict_fails(cityscapes_root: Path, tmp_path: Path) -> None:
    from test_sources import copy_frames, image_file, label_file

    root = tmp_path / "data"
    keys = copy_frames(cityscapes_root, root, 6)
    image_file(root, keys[0]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    label_file(root, keys[1]).unlink()
    lab = cv2.imread(str(label_file(root, keys[2])), cv2.IMREAD_UNCHANGED)
    lab[100:120, 100:120] = 200
    cv2.imwrite(str(label_file(root, keys[2])), lab)
    cv2.imwrite(str(label_file(root, keys[3])), cv2.resize(lab, (1000, 512), interpolation=cv2.INTER_NEAREST))
    out = tmp_path / "out"
    tree = config(root, out)
    tree["data"].update(width=128, height=64)
    tree["shards"].update(samples_per_shard=2, workers=1)

    plain = cli(overrides(tree))
    stdout, stderr = plain.communicate(timeout=300)
    assert plain.returncode == 0, stderr
    assert "rejects: 4" in stdout
    strict = cli(["--strict", *overrides(tree)])
    stdout, stderr = strict.communicate(timeout=300)
    assert strict.returncode != 0 and "rejects: 4" in stdout

    manifest = Manifest.read(out)
    reasons = {r.key: r.reason for r in manifest.rejects}
    assert sorted(reasons) == sorted(keys[:4])
    assert "unreadable image" in reasons[keys[0]]
    assert "missing label map" in reasons[keys[1]]
    assert "200 outside" in reasons[keys[2]]
    assert "1000x512 is not the image size" in reasons[keys[3]]
    assert all(r.split == "val" and Path(r.path).is_file() for r in manifest.rejects)
    samples = read_tars(shard_paths(out, manifest))
    assert sorted(samples) == sorted(keys[4:]) and manifest.splits["val"].samples == 2
    # keys 0-3 are shards 0 and 1: both all-rejected, so only shard 2 has a tar
    assert manifest.splits["val"].shards == ("val-000002.tar",)
    assert not (out / "val-000000.tar").exists() and (out / "val-000000.json").is_file()


def test_ade20k_and_folder_layouts(cityscapes_root: Path, tmp_path: Path) -> None:
    from test_sources import make_ade20k

    ade = tmp_path / "ade"
    keys = make_ade20k(cityscapes_root, ade, 3)
    tree = config(ade, tmp_path / "ade_out", source="ade20k", width=128, height=64)
    tree["shards"].update(samples_per_shard=2, workers=1)
    cfg = from_dict(tree)
    manifest = build_shards(cfg)
    assert manifest.dataset.label_nc == 151 and manifest.dataset.has_instances is False
    assert manifest.splits["val"] == SplitEntry(
        shards=("val-000000.tar", "val-000001.tar"),
        samples=3,
        keys=("ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"),
    )
    samples = read_tars(shard_paths(tmp_path / "ade_out", manifest))
    assert sorted(samples) == keys
    assert all("instance.npz" not in m and "instance.png" not in m for m in samples.values())
    source = open_source(cfg.data)
    for sample in source.samples("val"):
        assert np.array_equal(png(samples[sample.key]["label.png"]), source.load(sample, 128, 64)[1])

    folder = tmp_path / "folder"
    places = [
        ("set0/frame.1.jpg", "set0/frame.1.png"),
        ("set1/frame.1.jpg", "set1/frame.1.png"),
        ("photo.jpg", "elsewhere/photo.png"),
    ]  # the last is matched by stem alone
    for key, (image, label) in zip(keys, places, strict=True):
        for src, dest in [
            (ade / "images" / "validation" / f"{key}.jpg", folder / "images" / image),
            (ade / "annotations" / "validation" / f"{key}.png", folder / "labels" / label),
        ]:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest)
    tree = config(folder, tmp_path / "folder_out", source="folder", label_nc=34, width=128, height=64)
    tree["shards"].update(samples_per_shard=1, workers=1)
    manifest = build_shards(from_dict(tree))
    samples = read_tars(shard_paths(tmp_path / "folder_out", manifest))
    assert sorted(samples) == ["frame_1", "frame_1_2", "photo"] and manifest.dataset.label_nc == 34
    label = cv2.imread(str(ade / "annotations" / "validation" / f"{keys[2]}.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(
        png(samples["photo"]["label.png"]), cv2.resize(label, (128, 64), interpolation=cv2.INTER_NEAREST)
    )
    assert manifest.rejects == ()


def test_errors_are_clear(cityscapes_root: Path, tmp_path: Path) -> None:
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(ShardError, match="has no images"):
        build_shards(from_dict(config(tmp_path, tmp_path / "out")))
    tree = config(cityscapes_root, tmp_path / "out")
    tree["shards"]["codecs"] = [{"name": "hevc", "qualities": [37]}, {"name": "hevc", "qualities": [37]}]
    with pytest.raises(ConfigError, match="same codec and quality twice"):
        from_dict(tree)
    tree["shards"]["codecs"] = [{"name": "hevc", "qualities": [52]}]
    with pytest.raises(ShardError, match=r"quality must be in \[0, 51\]"):
        build_shards(from_dict(tree))
    with pytest.raises(ManifestError, match="no manifest.json"):
        Manifest.read(tmp_path)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_ray_build_equals_local_build(cityscapes_root: Path, tmp_path: Path) -> None:
    from test_sources import copy_frames

    copy_frames(cityscapes_root, tmp_path / "data", 3)
    tree = config(tmp_path / "data", tmp_path / "local", width=128, height=64)
    tree["shards"].update(samples_per_shard=2, workers=1)
    local = build_shards(from_dict(tree))
    tree["shards"].update(output=str(tmp_path / "ray"), use_ray=True, workers=2)
    remote = build_shards(from_dict(tree))
    assert remote.splits == local.splits and remote.codecs == local.codecs
    assert local.splits["val"].shards == ("val-000000.tar", "val-000001.tar")
    for name in local.splits["val"].shards:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_format_summary_lists_first_reasons() -> None:
    manifest = Manifest(
        version=2,
        config={"shards": {"output": "x"}},
        config_hash="abc",
        dataset=DatasetEntry("folder", "r", 3, ("a", "b", "c"), False, 8, 8),
        splits={"val": SplitEntry(shards=(), samples=0, keys=())},
        codecs={"hevc_q42": CodecEntry("hevc", 42, None, None, None)},
        label=LabelEntry("png", 1, None),
        rejects=tuple(Reject(f"k{i}", "val", "p", f"reason {i}") for i in range(7)),
    )
    text = format_summary(manifest)
    assert "rejects: 7" in text and "val/k0: reason 0" in text and "val/k4: reason 4" in text
    assert "val/k5" not in text and "2 more" in text


def test_downsampled_label_map_is_stored_as_decoded(cityscapes_root: Path, tmp_path: Path) -> None:
    cfg_tree = config(cityscapes_root, tmp_path, width=128, height=64)
    cfg_tree["shards"].update(label_downsample=2, store_bitstreams=True, workers=1, samples_per_shard=32)
    cfg_tree["shards"]["codecs"] = [{"name": "hevc", "qualities": [45]}]
    cfg = from_dict(cfg_tree)
    manifest = build_shards(cfg)
    source = open_source(cfg.data)
    loaded = {s.key: source.load(s, 128, 64)[1] for s in source.samples("val")}
    for key, members in read_tars(shard_paths(tmp_path, manifest)).items():
        meta = json.loads(members["json"])
        coder = LabelCoder(meta["label"]["coder"], downsample=2)
        stored = png(members["label.png"])
        assert np.array_equal(stored, coder.decode(members["label.bin"], size=(128, 64)))
        assert np.array_equal(stored, coder.reconstruct(loaded[key]))
        assert meta["label"]["bytes"] == len(members["label.bin"]) == len(coder.encode(loaded[key]))


def test_manifest_versions(built, tmp_path: Path) -> None:
    """Version 2 lists every split's keys; a version-1 manifest (keys only in the sidecars) still reads with
    the same keys; a newer version is refused in one line."""
    _, out, manifest, samples = built
    assert manifest.version == 2 and sorted(manifest.splits["val"].keys) == sorted(samples)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    old = json.loads((copy / "manifest.json").read_text())
    old["version"] = 1
    for entry in old["splits"].values():
        del entry["keys"]
    (copy / "manifest.json").write_text(json.dumps(old))
    v1 = Manifest.read(copy)
    assert v1.version == 1 and v1.splits["val"].keys == manifest.splits["val"].keys
    assert v1.to_json() == old  # written back as it was read
    old["version"] = 3
    (copy / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ManifestError, match=r"version 3 is newer than this code reads \(reads \[1, 2\]\)"):
        Manifest.read(copy)


def test_held_out_splits_get_shards_of_their_own(cityscapes_root: Path, tmp_path: Path) -> None:
    tree = config(cityscapes_root, tmp_path / "out")
    tree["data"]["holdout"] = [{"name": "test", "from_split": "val", "cities": ["lindau"]}]
    tree["shards"]["workers"] = 1
    tree["shards"]["codecs"] = [{"name": "hevc", "qualities": [45]}]
    manifest = build_shards(from_dict(tree))
    assert manifest.splits["test"].samples == 10 and manifest.splits["val"].samples == 12
    test_keys = set(read_tars(shard_paths(tmp_path / "out", manifest, "test")))
    val_keys = set(read_tars(shard_paths(tmp_path / "out", manifest, "val")))
    assert test_keys == set(manifest.splits["test"].keys) and not test_keys & val_keys
    assert all(k.startswith("lindau_") for k in test_keys) and len(test_keys | val_keys) == 22
    assert "test: 10 samples" in format_summary(manifest)


def test_shards_splits_builds_the_named_splits_alone(cityscapes_root: Path, tmp_path: Path) -> None:
    tree = config(cityscapes_root, tmp_path / "out")
    tree["data"]["holdout"] = [{"name": "test", "from_split": "val", "cities": ["lindau"]}]
    tree["shards"]["workers"] = 1
    tree["shards"]["codecs"] = [{"name": "hevc", "qualities": [45]}]
    tree["shards"]["splits"] = ["test"]
    manifest = build_shards(from_dict(tree))
    assert list(manifest.splits) == ["test"] and manifest.splits["test"].samples == 10
    assert Manifest.read(tmp_path / "out").splits.keys() == {"test"}
    tars = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert tars == sorted(manifest.splits["test"].shards) == [f"test-00000{i}.tar" for i in range(3)]
    assert all(k.startswith("lindau_") for k in read_tars(shard_paths(tmp_path / "out", manifest, "test")))
    tree["shards"]["splits"] = ["valid"]
    with pytest.raises(
        ShardError, match=r"shards.splits names \['valid'\], not splits of this build: \['test', 'val'\]"
    ):
        build_shards(from_dict(tree))
