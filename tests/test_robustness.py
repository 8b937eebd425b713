"""Bad inputs that must never abort, overwrite or exhaust: pixel budgets, mixed builds, crafted files."""

from __future__ import annotations

import io
import json
import re
import resource
import struct
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_sources import copy_frames, image_file, label_file

import pipeline.train.trainer as trainer
from pipeline.cli import main
from pipeline.config import ConfigError, JobConfig, from_dict, load_config
from pipeline.data.loader import LoaderError, make_dataset, shard_urls
from pipeline.data.manifest import Manifest, ManifestError, key_file_name
from pipeline.data.shards import ShardError, build_shards
from pipeline.data.sources import BadSample, CityscapesSource, check_pixels, header_size
from pipeline.model.export import load_generator, weights_sha256
from pipeline.model.spec import GeneratorSpec
from pipeline.tracking import Tracker


def png_header(width: int, height: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose header claims ``width x height`` and which holds (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def shards_config(root: Path, out: Path, max_pixels: int = 64_000_000) -> dict[str, Any]:
    return {
        "data": {"root": str(root), "splits": ["val"], "width": 128, "height": 64, "holdout": []},
        "shards": {
            "output": str(out),
            "codecs": [{"name": "hevc", "qualities": [37]}],
            "samples_per_shard": 2,
            "workers": 1,
            "max_pixels": max_pixels,
        },
    }


# ---- pixel budget -------------------------------------------------------------------------------------


def test_the_header_gives_the_size_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(100_000, 100_000))
    assert header_size(path) == (100_000, 100_000)
    with pytest.raises(BadSample, match=r"100000x100000 .*over the budget shards.max_pixels=64000000"):
        check_pixels(path, "image", 64_000_000)
    jpeg = tmp_path / "small.jpg"
    cv2.imwrite(str(jpeg), np.zeros((20, 30, 3), np.uint8))
    assert header_size(jpeg) == (30, 20)


def test_opencv_refusals_become_rejects(
    cityscapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = CityscapesSource(cityscapes_root)
    sample = source.samples("val")[0]

    def refuse(*args: Any) -> None:
        raise cv2.error("OpenCV(4.10) imgcodecs: CV_IO_MAX_IMAGE_PIXELS exceeded")

    monkeypatch.setattr(cv2, "imread", refuse)
    with pytest.raises(BadSample, match="unreadable image .*CV_IO_MAX_IMAGE_PIXELS"):
        source.read(sample)


def test_over_budget_inputs_are_rejected_and_the_build_completes(
    cityscapes_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    keys = copy_frames(cityscapes_root, root, 4)
    image_file(root, keys[0]).write_bytes(png_header(100_000, 100_000))  # 10 Gpixel claimed
    label_file(root, keys[1]).write_bytes(png_header(30_000, 30_000, colour=0))  # 900 Mpixel
    label_file(root, keys[2], "instanceIds").write_bytes(png_header(9_000, 9_000, 16, 0))  # 81 Mpixel
    out = tmp_path / "out"
    manifest = build_shards(from_dict(shards_config(root, out)))
    reasons = {r.key: r.reason for r in manifest.rejects}
    assert sorted(reasons) == sorted(keys[:3])
    assert "image" in reasons[keys[0]] and "100000x100000" in reasons[keys[0]]
    assert "label map" in reasons[keys[1]] and "over the budget" in reasons[keys[1]]
    assert "instance map" in reasons[keys[2]] and "81.0 Mpixel" in reasons[keys[2]]
    assert manifest.splits["val"].keys == (keys[3],)
    assert Manifest.read(out).rejects == manifest.rejects


def test_the_pixel_budget_is_configurable(cityscapes_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    keys = copy_frames(cityscapes_root, root, 2)
    out = tmp_path / "out"
    manifest = build_shards(from_dict(shards_config(root, out, max_pixels=1_000_000)))  # frames: 2 Mpixel
    assert sorted(r.key for r in manifest.rejects) == keys and manifest.splits["val"].samples == 0


# ---- a manifest that cannot lie -------------------------------------------------------------------------


@pytest.fixture
def small_build(cityscapes_root: Path, tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    root = tmp_path / "data"
    copy_frames(cityscapes_root, root, 4)
    out = tmp_path / "out"
    tree = shards_config(root, out)
    build_shards(from_dict(tree))
    return root, out, tree


def test_settings_and_their_hash_are_in_the_manifest_and_every_sidecar(small_build: Any) -> None:
    _, out, tree = small_build
    manifest = Manifest.read(out)
    assert manifest.build is not None and manifest.build.settings["data"]["width"] == 128
    # the decoder's chroma up-sampling is recorded at its default: the config leaves it out
    assert manifest.build.settings["codecs"] == [["hevc", 37, {"chroma_upsampling": "linear"}]]
    sidecars = [json.loads(p.read_text()) for p in sorted(out.glob("val-*.json"))]
    assert len(sidecars) == 2 and all(sc["build_hash"] == manifest.build.hash for sc in sidecars)
    assert json.loads((out / "manifest.json").read_text())["build"]["hash"] == manifest.build.hash


def test_a_build_with_other_settings_into_the_folder_is_refused(small_build: Any) -> None:
    _, out, tree = small_build
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    tree["shards"]["codecs"] = [{"name": "hevc", "qualities": [30]}]
    tree["data"]["width"] = 64
    with pytest.raises(ShardError, match=r"other settings \(manifest.json; differing: codecs, data.width\)"):
        build_shards(from_dict(tree))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    tree["shards"]["samples_per_shard"] = 1  # settings that leave the samples as they are: a new plan
    tree["shards"]["codecs"] = [{"name": "hevc", "qualities": [37]}]
    tree["data"]["width"] = 128
    assert Manifest.read(out).build == build_shards(from_dict(tree)).build


def test_shards_decoded_with_other_chroma_are_refused(small_build: Any) -> None:
    """libheif's own chroma (``nearest``) is another picture: a build of it is refused, and so is a build
    over a manifest older than the recorded build settings, whose hevc images were decoded that way."""
    _, out, tree = small_build
    tree["shards"]["codecs"] = [
        {"name": "hevc", "qualities": [37], "options": {"chroma_upsampling": "nearest"}}
    ]
    there, here = (
        "[['hevc', 37, {'chroma_upsampling': 'linear'}]]",
        "[['hevc', 37, {'chroma_upsampling': 'nearest'}]]",
    )
    with pytest.raises(
        ShardError,
        match=re.escape(f"(manifest.json; differing: codecs); codecs: {there} there, {here} here;"),
    ):
        build_shards(from_dict(tree))
    tree["shards"]["codecs"] = [{"name": "hevc", "qualities": [37]}]
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["build"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    for sidecar in out.glob("val-*.json"):
        sidecar.write_text(
            json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "build_hash"})
        )
    there, here = "[['hevc', 37, {}]]", "[['hevc', 37, {'chroma_upsampling': 'linear'}]]"
    with pytest.raises(
        ShardError,
        match=re.escape(f"(manifest.json; differing: codecs); codecs: {there} there, {here} here;"),
    ):
        build_shards(from_dict(tree))


def test_an_interrupted_rebuild_is_refused_by_its_sidecars(small_build: Any) -> None:
    """The manifest is gone (or the old one is left) but a sidecar of another build is there."""
    _, out, tree = small_build
    sidecar = out / "val-000001.json"
    data = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**data, "build_hash": "0" * 64}))
    (out / "manifest.json").unlink()
    with pytest.raises(ShardError, match=r"other settings \(val-000001.json; differing: unknown\)"):
        build_shards(from_dict(tree))


def test_a_reader_refuses_shards_that_disagree_with_the_manifest(small_build: Any) -> None:
    _, out, tree = small_build
    cfg = from_dict({**tree, "loader": {"codec": "hevc", "quality": 37}})
    assert len(shard_urls(cfg)) == 2
    sidecar = out / "val-000001.json"
    good = sidecar.read_text()
    sidecar.write_text(json.dumps({**json.loads(good), "build_hash": "f" * 64}))
    with pytest.raises(ManifestError, match="val-000001.tar was built with other settings"):
        shard_urls(cfg)
    sidecar.write_text(good)
    with (out / "val-000000.tar").open("ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ManifestError, match="val-000000.tar has .* bytes where its sidecar records"):
        shard_urls(cfg)


def test_a_manifest_without_build_settings_still_reads_and_its_build_resumes(
    cityscapes_root: Path, tmp_path: Path
) -> None:
    """A folder built before the settings were recorded: readable, and a build with its settings resumes
    (of jpeg: an hevc build of then decoded another way, ``test_shards_decoded_with_other_chroma_...``)."""
    copy_frames(cityscapes_root, tmp_path / "data", 4)
    out = tmp_path / "out"
    tree = shards_config(tmp_path / "data", out)
    tree["shards"]["codecs"] = [{"name": "jpeg", "qualities": [50]}]
    build_shards(from_dict(tree))
    old = json.loads((out / "manifest.json").read_text())
    del old["build"]
    (out / "manifest.json").write_text(json.dumps(old))
    for path in out.glob("val-*.json"):
        sidecar = json.loads(path.read_text())
        del sidecar["build_hash"]
        path.write_text(json.dumps(sidecar))
    assert Manifest.read(out).build is None
    tars = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    manifest = build_shards(from_dict(tree))
    assert manifest.build is not None and {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == tars
    tree["shards"]["codecs"] = [{"name": "jpeg", "qualities": [30]}]
    (out / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ShardError, match="differing: codecs"):
        build_shards(from_dict(tree))


# ---- registration completes a phase -------------------------------------------------------------------


class Killed(BaseException):
    """The process dying between the export and the registration."""


class RegisteringTracker(Tracker):
    def __init__(self, die: bool = False) -> None:
        self.die = die
        self.registered: list[tuple[Path, str, str | None]] = []

    def register_generator(
        self, generator_file: str | Path, name: str, *, alias: str | None = None, spec: Any = None
    ) -> str | None:
        if self.die:
            raise Killed
        self.registered.append((Path(generator_file), name, alias))
        return f"models:/{name}/{len(self.registered)}"


def phase3_cfg(shards: Path, out: Path, *extra: str) -> JobConfig:
    return load_config(
        None,
        [
            f"shards.output={shards}",
            f"train.output_dir={out}",
            "loader.crop=[64, 128]",
            "loader.batch_size=1",
            "loader.shuffle=4",
            "phase3.steps=2",
            "train.checkpoint_every=0",
            "validate.every=0",
            *extra,
        ],
    )


def test_a_resume_registers_an_export_whose_registration_was_lost(small_shards: Path, tmp_path: Path) -> None:
    cfg = phase3_cfg(small_shards, tmp_path / "run")
    with pytest.raises(Killed):
        trainer.train(cfg, [3], tracker=RegisteringTracker(die=True))
    export = tmp_path / "run" / "phase3" / "generator.safetensors"
    assert export.is_file() and not (export.parent / trainer.REGISTERED_FILE).exists()
    before = export.read_bytes()

    tracker = RegisteringTracker()
    trainer.train(cfg, [3], resume=True, tracker=tracker)
    assert export.read_bytes() == before  # not trained again
    assert tracker.registered == [(export, "hevc-se-q42", "champion")]
    marker = json.loads((export.parent / trainer.REGISTERED_FILE).read_text())
    assert marker["uri"] == "models:/hevc-se-q42/1" and marker["sha256"] == weights_sha256(export)

    again = RegisteringTracker()
    trainer.train(cfg, [3], resume=True, tracker=again)
    assert again.registered == []  # registered once


@pytest.mark.parametrize("alias", ["latest", "v3", "bad alias", "a/b"])
def test_a_bad_alias_is_refused_before_training(small_shards: Path, tmp_path: Path, alias: str) -> None:
    cfg = phase3_cfg(small_shards, tmp_path / "run", f"tracking.alias={alias}")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="invalid alias"):
        trainer.train(cfg, [1, 2, 3], tracker=RegisteringTracker())
    assert time.perf_counter() - start < 1 and not (tmp_path / "run").exists()


# ---- model files: bounds, memory and shapes before anything is built ------------------------------------


def crafted_file(path: Path, spec: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A small safetensors file whose metadata claims ``spec`` (version 2)."""
    metadata = {"format": "jpdse-generator", "format_version": "2", "spec": json.dumps(spec)}
    save_file(tensors or {"x": torch.zeros(4)}, str(path), metadata=metadata)
    return path


SPEC = {"ngf": 8, "n_downsample": 2, "n_blocks": 1, "norm": "instance", "label_nc": 35, "use_instance": False}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_downsample": 40}, r"n_downsample=40 is outside \[0, 6\]"),
        ({"label_nc": 100_000_000}, r"label_nc=100000000 is outside \[1, 256\]"),
        ({"label_nc": -3}, r"label_nc=-3 is outside \[1, 256\]"),
        ({"ngf": 0}, r"ngf=0 is outside"),
        ({"n_blocks": 10_000}, r"n_blocks=10000 is outside"),
        ({"norm": "group"}, "norm='group' is not one of"),
        ({"ngf": 1024, "n_downsample": 6}, r"needs .* GiB of weights, over the limit of 4.0 GiB"),
        ({}, r"weights do not match the spec's generator: .*missing, e\.g\."),
    ],
)
def test_a_crafted_spec_is_refused_quickly_in_bounded_memory(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    path = crafted_file(tmp_path / "g.safetensors", {**SPEC, **change})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message) as err:
        load_generator(path)
    assert time.perf_counter() - start < 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024
    assert "\n" not in str(err.value)


def test_weights_of_another_shape_are_refused_before_building(tmp_path: Path) -> None:
    small = GeneratorSpec.from_json(SPEC, 2)
    tensors = small.build_generator().state_dict()
    path = crafted_file(tmp_path / "g.safetensors", {**SPEC, "ngf": 16}, tensors)
    with pytest.raises(ValueError, match=r"of other shapes, e\.g\. .* \(spec: \["):
        load_generator(path)
    good = crafted_file(tmp_path / "ok.safetensors", SPEC, tensors)
    assert load_generator(good)[1] == small


# ---- output names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../escaped", "/etc/passwd", "a/b", "a\\b", "..", "x..y", "", "a\0b"])
def test_keys_that_are_not_plain_file_names_are_refused(key: str) -> None:
    with pytest.raises(ManifestError, match="cannot be a file name"):
        key_file_name(key, ".png")


def test_a_plain_key_becomes_its_file_name() -> None:
    assert key_file_name("frankfurt_000000_005898", "_hevc_q42.png") == "frankfurt_000000_005898_hevc_q42.png"


def test_a_crafted_key_writes_nothing_outside_the_evaluation_folder(tmp_path: Path) -> None:
    from pipeline.eval import evaluate as ev
    from pipeline.eval.inputs import EvalSample
    from pipeline.eval.methods import Method

    image = np.zeros((16, 32, 3), np.uint8)
    label = np.zeros((16, 32), np.uint8)
    samples = [
        EvalSample("frankfurt_a", image, label, None, {42: image}, {42: 0.1}),
        EvalSample("../../escaped", image, label, None, {42: image}, {42: 0.1}),
    ]

    class Data:
        codec, qualities, count, source_name = "hevc", [42], 2, "cityscapes"

        def samples(self) -> list[EvalSample]:
            return samples

    class Scorer:
        def add_original(self, *args: Any) -> None:
            pass

        def add(self, *args: Any, **kwargs: Any) -> None:
            pass

    codec = Method(name="hevc", quality=None)
    crops = tmp_path / "work" / "eval" / "crops"
    with pytest.raises(ManifestError, match=r"sample key '../../escaped' cannot be a file name"):
        ev._score(Data(), [codec], Scorer(), crops, 4)
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*.png")] == [
        Path("work/eval/crops/frankfurt_a_hevc_q42.png")
    ]


# ---- corrupt and truncated shards ------------------------------------------------------------------------


def shard_cfg(pattern: Path, max_bad: int = 0) -> JobConfig:
    return from_dict(
        {
            "loader": {"shards": str(pattern), "codec": "hevc", "quality": 42, "batch_size": 1},
            "train": {"max_bad_samples": max_bad},
        }
    )


def read_keys(cfg: JobConfig) -> list[str]:
    return [key for batch in make_dataset(cfg, train=False) for key in batch["key"]]


@pytest.fixture
def corrupt_shard(small_shards: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the first test shard whose second sample's image.png is garbage."""
    source = small_shards / "test-000000.tar"
    target = tmp_path / "test-000000.tar"
    keys: list[str] = []
    with tarfile.open(source) as old, tarfile.open(target, "w") as new:
        for info in old:
            data = old.extractfile(info).read()
            key = info.name.split(".")[0]
            if key not in keys:
                keys.append(key)
            if len(keys) == 2 and info.name == f"{keys[1]}.image.png":
                data = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10
            info.size = len(data)
            new.addfile(info, io.BytesIO(data))
    return target, keys


def test_a_corrupt_member_is_named_and_stops_reading_by_default(corrupt_shard: Any) -> None:
    path, keys = corrupt_shard
    with pytest.raises(LoaderError, match=rf"bad shard sample in {path}, key {keys[1]}: .*max_bad_samples=N"):
        read_keys(shard_cfg(path))


def test_a_corrupt_member_is_skipped_when_allowed(
    corrupt_shard: Any, caplog: pytest.LogCaptureFixture
) -> None:
    path, keys = corrupt_shard
    with caplog.at_level("WARNING", logger="pipeline.data.loader"):
        assert read_keys(shard_cfg(path, max_bad=1)) == [k for k in keys if k != keys[1]]
    assert f"skipping bad shard sample in {path}, key {keys[1]} (1 of at most 1)" in caplog.text


def test_a_truncated_shard_is_named_and_skipped_up_to_the_limit(small_shards: Path, tmp_path: Path) -> None:
    data = (small_shards / "test-000000.tar").read_bytes()
    path = tmp_path / "test-000000.tar"
    path.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(LoaderError, match=rf"bad shard sample in {path}"):
        read_keys(shard_cfg(path))
    kept = read_keys(shard_cfg(path, max_bad=5))
    assert 0 < len(kept) < 4


# ---- one line, exit 2 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "tracking.alias=latest"], "invalid alias 'latest'"),
        (["train", "tracking.alias=v2"], "invalid alias 'v2'"),
        (["train", "model.n_downsample=8"], "model.n_downsample must be <= 6, got 8"),
        (["train", "model.ngf=4096"], "model.ngf must be <= 1024, got 4096"),
        (["train", "phase2.steps=0"], "phase2.steps must be >= 1"),
        (["shards", "shards.max_pixels=0"], "shards.max_pixels must be >= 1"),
        (["train", "train.max_bad_samples=-1"], "train.max_bad_samples must be >= 0"),
    ],
)
def test_bad_values_give_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*args, f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
