"""Dataset layouts (Cityscapes, ADE20K SceneParsing, a generic folder) and their label tables.

A :class:`Source` lists :class:`Sample` records per split and loads one sample as
arrays at the working size. Every file's size is checked from its header against
``shards.max_pixels`` before it is decoded. Anything wrong with one sample (an unreadable
or over-budget file included) raises :class:`BadSample`
(the shard builder records it as a reject and goes on); anything wrong with the
dataset as a whole raises :class:`SourceError`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.config import ConfigError, DataConfig, ShardConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_MAX_PIXELS = ShardConfig.__dataclass_fields__["max_pixels"].default


class SourceError(ConfigError):
    """The dataset cannot be used at all (unknown source, missing root or split, no images)."""


class BadSample(ValueError):
    """One sample cannot be used; the message says why."""


@dataclass(frozen=True)
class Sample:
    """One image with its label map (and instance map) on disk."""

    key: str  # dataset id without dots, e.g. frankfurt_000000_005898
    split: str  # the split name it was asked for
    image: Path
    label: Path | None
    instance: Path | None = None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(head: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the first 24 bytes of a PNG (its IHDR chunk); None when it is no PNG."""
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def header_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` as the file's header states them, without decoding the pixels."""
    with path.open("rb") as f:
        size = png_size(f.read(24))
    if size is not None:
        return size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                return image.size
        except Image.DecompressionBombError as err:  # Pillow's own limit (179 Mpixel)
            raise BadSample(f"over Pillow's pixel limit: {err}") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise BadSample(f"bad header: {err}") from err


def check_pixels(path: Path, what: str, max_pixels: int) -> None:
    """Refuse (:class:`BadSample`) a file whose header claims more than ``max_pixels`` pixels."""
    try:
        width, height = header_size(path)
    except BadSample as err:
        raise BadSample(f"unreadable {what} {path}: {err}") from err
    if width * height > max_pixels:
        raise BadSample(
            f"{what} {path} is {width}x{height} ({width * height / 1e6:.1f} Mpixel), over the budget "
            f"shards.max_pixels={max_pixels}"
        )


def _imread(path: Path, flags: int, what: str, max_pixels: int) -> np.ndarray:
    """``cv2.imread`` after the header's pixel budget; OpenCV's own refusals become :class:`BadSample`."""
    check_pixels(path, what, max_pixels)
    try:
        data = cv2.imread(str(path), flags)
    except cv2.error as err:  # e.g. over CV_IO_MAX_IMAGE_PIXELS
        raise BadSample(f"unreadable {what} {path}: {str(err).strip().splitlines()[-1]}") from err
    if data is None:
        raise BadSample(f"unreadable {what} {path}")
    return data


def _read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    if not path.is_file():
        raise BadSample(f"missing image file {path}")
    bgr = _imread(path, cv2.IMREAD_COLOR, "image", max_pixels)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _read_map(path: Path | None, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    if path is None or not path.is_file():
        raise BadSample(f"missing {what} file" + (f" {path}" if path else ""))
    data = _imread(path, cv2.IMREAD_UNCHANGED, what, max_pixels)
    if data.ndim != 2:
        raise BadSample(f"{what} {path} must be single-channel, got shape {data.shape}")
    return data


def _check_factor(image: np.ndarray, other: np.ndarray, what: str) -> None:
    """``other`` must be the image size divided by a whole number (the same for both sides)."""
    ih, iw = image.shape[:2]
    oh, ow = other.shape[:2]
    if ow and oh and iw % ow == 0 and ih % oh == 0 and iw // ow == ih // oh:
        return
    raise BadSample(f"{what} size {ow}x{oh} is not the image size {iw}x{ih} divided by a whole number")


def fit(
    rgb: np.ndarray, label: np.ndarray, instance: np.ndarray | None, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Resize a sample to the working size: area for the image, nearest for id maps."""
    size = (width, height)
    if rgb.shape[:2] != (height, width):
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    if label.shape != (height, width):
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    if instance is not None and instance.shape != (height, width):
        instance = cv2.resize(instance, size, interpolation=cv2.INTER_NEAREST)
    return rgb, label, instance


class Source:
    """A dataset layout: samples per split, a label table and a loader."""

    name = "source"
    has_instances = False
    max_pixels = DEFAULT_MAX_PIXELS  # pixel budget of one file (shards.max_pixels)

    def __init__(self, root: str | Path, label_nc: int, label_names: list[str], valid_ids: set[int]):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"{self.name} root {self.root} does not exist or is not a folder")
        if not 0 < label_nc <= 256:
            raise SourceError(f"label_nc must be in 1..256 (label maps are 8-bit), got {label_nc}")
        self.label_nc = label_nc
        self.label_names = label_names
        self.valid_ids = frozenset(i for i in valid_ids if 0 <= i < label_nc)
        invalid = np.ones(256, dtype=bool)
        invalid[list(self.valid_ids)] = False
        self._invalid = invalid

    def samples(self, split: str) -> list[Sample]:
        """Every sample of ``split``, sorted by key."""
        raise NotImplementedError

    def read(self, sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The sample at its stored sizes, validated: (RGB uint8, label uint8, instance or None)."""
        rgb = _read_image(sample.image, self.max_pixels)
        raw = _read_map(sample.label, "label map", self.max_pixels)
        _check_factor(rgb, raw, "label map")
        if raw.dtype not in (np.uint8, np.uint16):
            raise BadSample(f"label map {sample.label} has unsupported type {raw.dtype}")
        counts = np.bincount(raw.ravel(), minlength=256)
        bad = np.flatnonzero(counts[256:]) + 256 if counts.size > 256 else np.empty(0, dtype=np.int64)
        bad = np.concatenate([np.flatnonzero((counts[:256] > 0) & self._invalid), bad])
        if bad.size:
            shown = ", ".join(str(int(i)) for i in bad[:8])
            raise BadSample(
                f"label map {sample.label} has id(s) {shown} outside the {self.name} table "
                f"(label_nc={self.label_nc})"
            )
        label = raw.astype(np.uint8, copy=False)
        instance = None
        if self.has_instances:
            instance = _read_map(sample.instance, "instance map", self.max_pixels)
            _check_factor(rgb, instance, "instance map")
            if instance.dtype == np.uint8:
                instance = instance.astype(np.uint16)
            elif instance.dtype != np.uint16:
                raise BadSample(f"instance map {sample.instance} has unsupported type {instance.dtype}")
        return rgb, label, instance

    def load(
        self, sample: Sample, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The sample at the working size (see :func:`fit`)."""
        return fit(*self.read(sample), width, height)

    def _split_dir(self, base: Path, split: str) -> Path:
        folder = base / split
        if not folder.is_dir():
            have = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
            raise SourceError(f"{self.name}: split folder {folder} not found (there: {have or 'none'})")
        return folder


def _table_size(table_nc: int, override: int) -> int:
    """The configured ``data.label_nc`` wins when set; ids at or above it are then rejected."""
    return override or table_nc


class CityscapesSource(Source):
    """``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``gtFine`` label and instance ids."""

    name = "cityscapes"
    has_instances = True

    def __init__(self, root: str | Path, label_nc: int = 0):
        from cityscapesscripts.helpers.labels import labels

        ids = {lab.id for lab in labels if lab.id >= 0}
        table_nc = max(ids) + 1
        names = [f"class_{i}" for i in range(table_nc)]
        for lab in labels:
            if lab.id >= 0:
                names[lab.id] = lab.name
        nc = _table_size(table_nc, label_nc)
        names += [f"class_{i}" for i in range(table_nc, nc)]
        super().__init__(root, nc, names[:nc], ids)

    def samples(self, split: str) -> list[Sample]:
        images = self._split_dir(self.root / "leftImg8bit", split)
        labels = self.root / "gtFine" / split
        out = []
        for path in images.glob("*/*_leftImg8bit.png"):
            key = path.name[: -len("_leftImg8bit.png")]
            city = labels / path.parent.name
            out.append(
                Sample(
                    key=key.replace(".", "_"),
                    split=split,
                    image=path,
                    label=city / f"{key}_gtFine_labelIds.png",
                    instance=city / f"{key}_gtFine_instanceIds.png",
                )
            )
        return sorted(out, key=lambda s: s.key)


class ADE20KSource(Source):
    """ADE20K SceneParsing: ``images/<split>/*.jpg`` and ``annotations/<split>/*.png`` (ids 0-150)."""

    name = "ade20k"
    SPLITS = {"train": "training", "val": "validation"}

    def __init__(self, root: str | Path, label_nc: int = 0):
        table_nc = 151
        names = ["other"] + [f"class_{i}" for i in range(1, table_nc)]
        info = Path(root) / "objectInfo150.txt"  # shipped with ADEChallengeData2016
        if info.is_file():
            for line in info.read_text().splitlines()[1:]:
                cols = line.split("\t")
                if len(cols) >= 5 and cols[0].strip().isdigit() and 0 < int(cols[0]) < table_nc:
                    names[int(cols[0])] = cols[4].split(";")[0].strip()
        nc = _table_size(table_nc, label_nc)
        names += [f"class_{i}" for i in range(table_nc, nc)]
        super().__init__(root, nc, names[:nc], set(range(table_nc)))

    def samples(self, split: str) -> list[Sample]:
        folder = self.SPLITS.get(split, split)
        images = self._split_dir(self.root / "images", folder)
        labels = self.root / "annotations" / folder
        out = [
            Sample(key=p.stem.replace(".", "_"), split=split, image=p, label=labels / f"{p.stem}.png")
            for p in images.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
        return sorted(out, key=lambda s: s.key)


class FolderSource(Source):
    """``<root>/<image_dir>/**/*.{png,jpg,jpeg}`` matched by stem to ``<root>/<label_dir>/**/<stem>.png``.

    One split: whatever split name is asked for lists every image.
    """

    name = "folder"

    def __init__(self, root: str | Path, image_dir: str, label_dir: str, label_nc: int):
        if label_nc <= 0:
            raise SourceError("the folder source needs data.label_nc > 0 (the number of label ids)")
        super().__init__(root, label_nc, [f"class_{i}" for i in range(label_nc)], set(range(label_nc)))
        self.image_dir = self.root / image_dir
        self.label_dir = self.root / label_dir
        if not self.image_dir.is_dir():
            raise SourceError(f"folder source: image folder {self.image_dir} not found")

    def samples(self, split: str) -> list[Sample]:
        images = sorted(
            p for p in self.image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        by_stem: dict[str, list[Path]] = {}
        if self.label_dir.is_dir():
            for p in sorted(self.label_dir.rglob("*.png")):
                by_stem.setdefault(p.stem, []).append(p)
        out = []
        used: set[str] = set()
        for path in images:
            base = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem) or "sample"
            key, n = base, 1
            while key in used:
                n += 1
                key = f"{base}_{n}"
            used.add(key)
            out.append(Sample(key=key, split=split, image=path, label=self._label_for(path, by_stem)))
        return sorted(out, key=lambda s: s.key)

    def _label_for(self, image: Path, by_stem: dict[str, list[Path]]) -> Path | None:
        """Same relative folder first; else the only label with that stem anywhere."""
        same_place = self.label_dir / image.relative_to(self.image_dir).with_suffix(".png")
        if same_place.is_file():
            return same_place
        found = by_stem.get(image.stem, [])
        return found[0] if len(found) == 1 else None


def label_categories(source: str, label_nc: int) -> tuple[int, ...]:
    """The category of every label id ``0..label_nc-1`` of the dataset ``source`` (``model.semantic_classes:
    categories``). Cityscapes: cityscapesscripts' ``categoryId`` (void, flat, construction, object, nature,
    sky, human, vehicle); ids beyond its table (a larger ``data.label_nc``) are void. Refused for a source
    without a category table."""
    if source != "cityscapes":
        raise SourceError(
            f"model.semantic_classes=categories needs a dataset with a category table (cityscapes); "
            f"{source!r} has none, use model.semantic_classes=labels"
        )
    from cityscapesscripts.helpers.labels import labels

    table = {lab.id: lab.categoryId for lab in labels if lab.id >= 0}
    return tuple(table.get(i, 0) for i in range(label_nc))


def open_source(data: DataConfig, max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
    """The source named by ``data.source`` at ``data.root``, reading files of up to ``max_pixels`` pixels."""
    if not data.root:
        raise SourceError("data.root is empty")
    if not Path(data.root).is_dir():
        raise SourceError(f"data.root {data.root} does not exist or is not a folder")
    source: Source
    if data.source == "cityscapes":
        source = CityscapesSource(data.root, data.label_nc)
    elif data.source == "ade20k":
        source = ADE20KSource(data.root, data.label_nc)
    elif data.source == "folder":
        source = FolderSource(data.root, data.image_dir, data.label_dir, data.label_nc)
    else:
        raise SourceError(f"unknown data.source {data.source!r}; known: cityscapes, ade20k, folder")
    source.max_pixels = max_pixels
    return source
