"""Dataset sources on the real Cityscapes sample and on small ADE20K / folder layouts made from it."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.sources import (
    ADE20KSource,
    BadSample,
    CityscapesSource,
    FolderSource,
    SourceError,
    open_source,
)

FRAME = "frankfurt_000000_005898"


def copy_frames(root: Path, dest: Path, count: int) -> list[str]:
    """Copy the first ``count`` frames of the sample into a Cityscapes layout under ``dest``."""
    keys = []
    for image in sorted((root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))[:count]:
        key = image.name[: -len("_leftImg8bit.png")]
        city = image.parent.name
        (dest / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
        (dest / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, dest / "leftImg8bit" / "val" / city / image.name)
        for kind in ("labelIds", "instanceIds"):
            name = f"{key}_gtFine_{kind}.png"
            shutil.copy(root / "gtFine" / "val" / city / name, dest / "gtFine" / "val" / city / name)
        keys.append(key)
    return keys


def label_file(root: Path, key: str, kind: str = "labelIds") -> Path:
    return root / "gtFine" / "val" / key.split("_")[0] / f"{key}_gtFine_{kind}.png"


def image_file(root: Path, key: str) -> Path:
    return root / "leftImg8bit" / "val" / key.split("_")[0] / f"{key}_leftImg8bit.png"


@pytest.fixture(scope="module")
def cityscapes(cityscapes_root: Path) -> CityscapesSource:
    return CityscapesSource(cityscapes_root)


def test_cityscapes_lists_every_frame_sorted(cityscapes: CityscapesSource, cityscapes_root: Path) -> None:
    samples = cityscapes.samples("val")
    on_disk = sorted(cityscapes_root.glob("leftImg8bit/val/*/*_leftImg8bit.png"))
    assert len(samples) == len(on_disk) == 22
    assert [s.key for s in samples] == sorted(p.name.replace("_leftImg8bit.png", "") for p in on_disk)
    assert all("." not in s.key and s.split == "val" for s in samples)
    assert all(s.label.is_file() and s.instance.is_file() for s in samples)


def test_cityscapes_label_table_comes_from_cityscapesscripts(cityscapes: CityscapesSource) -> None:
    from cityscapesscripts.helpers.labels import id2label

    assert cityscapes.label_nc == 34
    assert set(cityscapes.valid_ids) == set(range(34))
    assert cityscapes.has_instances
    names = [cityscapes.label_names[i] for i in (7, 26)]
    assert names == [id2label[7].name, id2label[26].name] == ["road", "car"]


def test_cityscapes_read_matches_an_independent_reader(
    cityscapes: CityscapesSource, cityscapes_root: Path
) -> None:
    sample = next(s for s in cityscapes.samples("val") if s.key == FRAME)
    rgb, label, instance = cityscapes.read(sample)
    assert np.array_equal(rgb, np.asarray(Image.open(image_file(cityscapes_root, FRAME)).convert("RGB")))
    assert np.array_equal(label, np.asarray(Image.open(label_file(cityscapes_root, FRAME))))
    assert instance.dtype == np.uint16 and instance.max() > 255  # real 16-bit ids (class * 1000 + n)
    raw = np.asarray(Image.open(label_file(cityscapes_root, FRAME, "instanceIds")))
    assert np.array_equal(instance.astype(np.int64), raw.astype(np.int64))


def test_cityscapes_load_resizes_to_the_working_size(cityscapes: CityscapesSource) -> None:
    sample = cityscapes.samples("val")[0]
    full_rgb, full_label, full_instance = cityscapes.read(sample)
    rgb, label, instance = cityscapes.load(sample, 256, 128)
    assert rgb.shape == (128, 256, 3) and rgb.dtype == np.uint8
    assert label.shape == instance.shape == (128, 256)
    # 1024x512 label -> 256x128 by nearest neighbour: a subset of the ids, no blended values
    assert set(np.unique(label)) <= set(np.unique(full_label))
    assert set(np.unique(instance)) <= set(np.unique(full_instance))
    assert abs(float(rgb.mean()) - float(full_rgb.mean())) < 1.0  # area averaging keeps the mean


def test_bad_samples_raise_with_reasons(cityscapes_root: Path, tmp_path: Path) -> None:
    keys = copy_frames(cityscapes_root, tmp_path, 5)
    image_file(tmp_path, keys[0]).write_bytes(b"not a png at all")
    label_file(tmp_path, keys[1]).unlink()
    lab = cv2.imread(str(label_file(tmp_path, keys[2])), cv2.IMREAD_UNCHANGED)
    lab[:10, :10] = 200
    cv2.imwrite(str(label_file(tmp_path, keys[2])), lab)
    cv2.imwrite(
        str(label_file(tmp_path, keys[3])), cv2.resize(lab, (1000, 500), interpolation=cv2.INTER_NEAREST)
    )
    inst = cv2.imread(str(label_file(tmp_path, keys[4], "instanceIds")), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(label_file(tmp_path, keys[4], "instanceIds")), inst[:, :1000])

    source = CityscapesSource(tmp_path)
    samples = {s.key: s for s in source.samples("val")}
    expected = [
        "unreadable image",
        "missing label map",
        r"id\(s\) 200 outside",
        "size 1000x500",
        "instance map",
    ]
    for key, reason in zip(keys, expected, strict=True):
        with pytest.raises(BadSample, match=reason):
            source.load(samples[key], 256, 128)


def test_integer_factor_rule(cityscapes_root: Path, tmp_path: Path) -> None:
    (key,) = copy_frames(cityscapes_root, tmp_path, 1)
    lab = cv2.imread(str(label_file(tmp_path, key)), cv2.IMREAD_UNCHANGED)
    source = CityscapesSource(tmp_path)
    (sample,) = source.samples("val")
    for size, ok in [((2048, 1024), True), ((512, 256), True), ((1024, 256), False), ((4096, 2048), False)]:
        cv2.imwrite(str(label_file(tmp_path, key)), cv2.resize(lab, size, interpolation=cv2.INTER_NEAREST))
        cv2.imwrite(
            str(label_file(tmp_path, key, "instanceIds")),
            np.zeros(size[::-1], np.uint16),
        )
        if ok:
            assert source.load(sample, 128, 64)[1].shape == (64, 128)
        else:
            with pytest.raises(BadSample, match="divided by a whole number"):
                source.read(sample)


def make_ade20k(cityscapes_root: Path, dest: Path, count: int) -> list[str]:
    """ADE20K SceneParsing layout: jpg images, 8-bit png annotations (Cityscapes ids are within 0-150)."""
    keys = []
    for folder in ("training", "validation"):
        (dest / "images" / folder).mkdir(parents=True)
        (dest / "annotations" / folder).mkdir(parents=True)
    for i, image in enumerate(sorted(cityscapes_root.glob("leftImg8bit/val/*/*_leftImg8bit.png"))[:count]):
        key = f"ADE_val_{i + 1:08d}"
        bgr = cv2.resize(cv2.imread(str(image)), (512, 256), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(dest / "images" / "validation" / f"{key}.jpg"), bgr)
        frame = image.name[: -len("_leftImg8bit.png")]
        lab = cv2.imread(str(label_file(cityscapes_root, frame)), cv2.IMREAD_UNCHANGED)
        lab = cv2.resize(lab, (256, 128), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(dest / "annotations" / "validation" / f"{key}.png"), lab)
        keys.append(key)
    return keys


def test_ade20k_layout(cityscapes_root: Path, tmp_path: Path) -> None:
    keys = make_ade20k(cityscapes_root, tmp_path, 3)
    lab = cv2.imread(str(tmp_path / "annotations" / "validation" / f"{keys[2]}.png"), cv2.IMREAD_UNCHANGED)
    lab[0, 0] = 151
    cv2.imwrite(str(tmp_path / "annotations" / "validation" / f"{keys[2]}.png"), lab)
    source = open_source(DataConfig(source="ade20k", root=str(tmp_path)))
    assert isinstance(source, ADE20KSource)
    assert source.label_nc == 151 and not source.has_instances and max(source.valid_ids) == 150
    for split in ("val", "validation"):
        samples = source.samples(split)
        assert [s.key for s in samples] == keys and {s.split for s in samples} == {split}
    assert source.samples("train") == []
    rgb, label, instance = source.load(source.samples("val")[0], 128, 64)
    assert rgb.shape == (64, 128, 3) and label.shape == (64, 128) and instance is None
    with pytest.raises(BadSample, match="151"):
        source.read(source.samples("val")[2])
    with pytest.raises(SourceError, match="split folder"):
        source.samples("test")


def test_folder_layout(cityscapes_root: Path, tmp_path: Path) -> None:
    frames = sorted(cityscapes_root.glob("leftImg8bit/val/*/*_leftImg8bit.png"))[:4]
    names = ["a/img.v1.png", "b/img.v1.png", "c/photo.jpg", "c/nolabel.png"]
    for frame, name in zip(frames, names, strict=True):
        path = tmp_path / "rgb" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(frame)), (256, 128), interpolation=cv2.INTER_AREA))
    ids = np.arange(128 * 256, dtype=np.int64).reshape(128, 256) % 20
    for i, name in enumerate(names[:3]):
        path = (tmp_path / "ann" / name).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), (ids + i).astype(np.uint8))

    data = DataConfig(source="folder", root=str(tmp_path), image_dir="rgb", label_dir="ann", label_nc=21)
    source = open_source(data)
    assert isinstance(source, FolderSource) and source.label_nc == 21 and not source.has_instances
    samples = source.samples("whatever")
    by_key = {s.key: s for s in samples}
    assert sorted(by_key) == ["img_v1", "img_v1_2", "nolabel", "photo"]
    assert [s.key for s in samples] == sorted(by_key)
    assert by_key["img_v1"].label == tmp_path / "ann" / "a" / "img.v1.png"
    assert by_key["img_v1_2"].label == tmp_path / "ann" / "b" / "img.v1.png"
    assert np.array_equal(source.load(by_key["img_v1"], 256, 128)[1], ids.astype(np.uint8))
    with pytest.raises(BadSample, match="id\\(s\\) 21 outside"):
        source.load(by_key["photo"], 256, 128)  # ids 2..21 with label_nc 21
    with pytest.raises(BadSample, match="missing label"):
        source.load(by_key["nolabel"], 256, 128)


def test_configuration_errors(cityscapes_root: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown data.source"):
        open_source(DataConfig(source="coco", root=str(cityscapes_root)))
    with pytest.raises(SourceError, match="does not exist"):
        open_source(DataConfig(root=str(tmp_path / "nowhere")))
    with pytest.raises(SourceError, match="label_nc > 0"):
        open_source(DataConfig(source="folder", root=str(tmp_path)))
    with pytest.raises(SourceError, match="split folder"):
        open_source(DataConfig(root=str(cityscapes_root))).samples("train")
    with pytest.raises(SourceError, match="1..256"):
        open_source(DataConfig(source="folder", root=str(tmp_path), label_nc=300))
