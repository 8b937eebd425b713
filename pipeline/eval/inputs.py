"""What evaluation and validation score: full images with their label maps and the codec's decoded images.

``eval.input`` picks the source: the WebDataset shards of ``eval.split`` (full images, read directly, no
crops; :class:`ShardInput`), or the dataset itself (``data.*``) encoded on the fly with ``loader.codec`` and
the label coder of ``shards.*`` (:class:`SourceInput`); ``auto`` takes the shards when
``<shards.output>/manifest.json`` exists.

``data.label_source`` picks the label map codec-SE receives: ``gt`` the dataset's, coded losslessly (its
bits in ``label_bpp``); ``decoder`` the prediction of the segmenter ``data.segmenter`` on the codec's
decoded image at each quality (no label bits, ``label_bpp`` 0); ``encoder`` its prediction on the original,
coded like the ground truth (:class:`PredictedLabels`). The ground truth stays in :attr:`EvalSample.label`
either way (downstream accuracy is judged against it).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from pipeline.config import ConfigError, JobConfig
from pipeline.data.members import INSTANCE_MEMBER, LEGACY_INSTANCE_MEMBER, decode_instance

if TYPE_CHECKING:
    from pipeline.data.codecs import LabelCoder


@dataclass
class EvalSample:
    """One image with its label map and the codec's decoded images (by quality) and rates."""

    key: str
    image: np.ndarray
    label: np.ndarray
    instance: np.ndarray | None
    decoded: dict[int, np.ndarray] = field(default_factory=dict)
    bpp: dict[int, float] = field(default_factory=dict)
    label_bpp: float = 0.0
    # label_source decoder or encoder: the segmenter's label map a generator gets at each quality
    predicted_label: dict[int, np.ndarray] = field(default_factory=dict)

    def label_at(self, quality: int) -> np.ndarray:
        """The label map a generator gets at ``quality``: the predicted one, else the ground truth."""
        return self.predicted_label.get(quality, self.label)


class EvalInput(Protocol):
    """The images of one split at the evaluated qualities of one codec."""

    codec: str
    qualities: list[int]
    decode_options: dict[str, Any]  # the options that decided the codec's decoded pictures
    source_name: str
    label_nc: int
    count: int  # samples that :meth:`samples` yields
    description: str  # for people: how many images of what

    @property
    def label_coder(self) -> LabelCoder:
        """The coder its label maps were coded with (what another map the decoder receives is coded with)."""
        ...

    def keys(self) -> list[str]:
        """The keys of the evaluated samples, in order."""
        ...

    def originals(self) -> Iterator[np.ndarray]:
        """The uncompressed images, in order (nothing is encoded)."""
        ...

    def samples(self) -> Iterator[EvalSample]:
        """The samples, in order, with the codec's decoded images and rates at every quality."""
        ...


def _decode_png(data: bytes, flags: int, what: str) -> np.ndarray:
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if array is None:
        raise ValueError(f"cannot decode {what}")
    return array


def _all_shards(urls: Iterable[str]) -> Iterable[str]:
    return urls


class ShardInput:
    """Full-size samples of one split of built shards."""

    def __init__(self, cfg: JobConfig) -> None:
        from pipeline.data.manifest import Manifest

        self.root = Path(cfg.shards.output)
        self.max_pixels = cfg.shards.max_pixels
        manifest = Manifest.read(self.root)
        split = cfg.eval.split
        entry = manifest.split(split)
        self.shards = [str(path) for path in manifest.shard_paths(split)]
        self.codec = cfg.loader.codec
        self.qualities = manifest.qualities(self.codec, cfg.eval.qualities, setting="eval.qualities")
        self.decode_options = manifest.decode_options(self.codec)
        self.source_name = manifest.dataset.source
        self.label_nc = manifest.dataset.label_nc
        total = entry.samples
        self.count = min(total, cfg.eval.max_images) if cfg.eval.max_images > 0 else total
        self.description = f"{self.count} {split} images of the shards at {self.root}"
        # the manifest lists a split's keys in shard order, the order the samples are read in
        self._keys = list(entry.keys[: self.count])
        coders = manifest.label.coder.split(",")  # the builder's; several when the samples used several
        method = coders[0] if len(coders) == 1 else cfg.shards.label_coder
        self._label_coding = (method, manifest.label.downsample)

    @functools.cached_property
    def label_coder(self) -> LabelCoder:
        """The shard builder's label coder (made when first needed: it may be missing on this machine)."""
        from pipeline.data.codecs import LabelCoder

        return LabelCoder(*self._label_coding)

    def _raw(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        # every shard on this rank: evaluation (and validation, on rank 0 of a training world) reads it all
        dataset = wds.WebDataset(self.shards, shardshuffle=False, empty_check=False, nodesplitter=_all_shards)
        for index, sample in enumerate(dataset):
            if index >= self.count:
                return
            yield sample

    def keys(self) -> list[str]:
        """The keys of the evaluated samples, in order (from the manifest: no shard is read)."""
        return self._keys

    def originals(self) -> Iterator[np.ndarray]:
        for raw in self._raw():
            yield cv2.cvtColor(
                _decode_png(raw["image.png"], cv2.IMREAD_COLOR, "image.png"), cv2.COLOR_BGR2RGB
            )

    def samples(self) -> Iterator[EvalSample]:
        for raw in self._raw():
            key = raw["__key__"]
            meta = json.loads(raw["json"])
            image = cv2.cvtColor(
                _decode_png(raw["image.png"], cv2.IMREAD_COLOR, f"{key} image"), cv2.COLOR_BGR2RGB
            )
            instance = None  # instance.npz; instance.png in shards written before it
            if INSTANCE_MEMBER in raw:
                instance = decode_instance(raw[INSTANCE_MEMBER], self.max_pixels)
            elif LEGACY_INSTANCE_MEMBER in raw:
                instance = _decode_png(raw[LEGACY_INSTANCE_MEMBER], cv2.IMREAD_UNCHANGED, f"{key} instance")
            sample = EvalSample(
                key=key,
                image=image,
                label=_decode_png(raw["label.png"], cv2.IMREAD_UNCHANGED, f"{key} label"),
                instance=instance,
                label_bpp=float(meta["label"]["bpp"]),
            )
            for q in self.qualities:
                tag = f"{self.codec}_q{q}"
                if f"{tag}.png" not in raw:
                    raise ValueError(f"shard sample {key} lacks {tag}.png")
                bgr = _decode_png(raw[f"{tag}.png"], cv2.IMREAD_COLOR, f"{key} {tag}")
                sample.decoded[q] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                sample.bpp[q] = float(meta["codecs"][tag]["bpp"])
            yield sample


class SourceInput:
    """Samples of ``data.*`` encoded on the fly with ``loader.codec`` and the ``shards.*`` label coder."""

    def __init__(self, cfg: JobConfig) -> None:
        from pipeline.data.codecs import LabelCoder, decode_options, get_codec, with_output_defaults
        from pipeline.data.sources import open_source

        self.source = open_source(cfg.data, cfg.shards.max_pixels)
        self.width, self.height = cfg.data.width, cfg.data.height
        self.codec = cfg.loader.codec
        specs = [c for c in cfg.shards.codecs if c.name == self.codec]
        self.qualities = sorted(set(cfg.eval.qualities)) or sorted({q for c in specs for q in c.qualities})
        if not self.qualities:
            raise ValueError(f"no qualities for {self.codec}: set eval.qualities or list it in shards.codecs")
        options = with_output_defaults(self.codec, specs[0].options if specs else {})
        self.encoder = get_codec(self.codec, **options)
        self.decode_options = decode_options(self.codec, options)
        self.label_coder = LabelCoder(cfg.shards.label_coder, cfg.shards.label_downsample)
        self.source_name = self.source.name
        self.label_nc = self.source.label_nc
        items = self.source.samples(cfg.eval.split)
        self.items = items[: cfg.eval.max_images] if cfg.eval.max_images > 0 else items
        self.count = len(self.items)
        self.description = f"{self.count} {cfg.eval.split} images of {self.source_name} at {self.source.root}"

    def keys(self) -> list[str]:
        """The keys of the evaluated samples, in order."""
        return [item.key for item in self.items]

    def _load(self, item: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One sample at the working size; a bad one (undecodable, over shards.max_pixels) is one line."""
        from pipeline.data.sources import BadSample

        try:
            return self.source.load(item, self.width, self.height)
        except BadSample as err:
            raise ConfigError(
                f"eval.input=source: sample {item.key}: {err}; fix or remove it, or evaluate built shards "
                "(eval.input=shards: the shard builder rejects it)"
            ) from None

    def originals(self) -> Iterator[np.ndarray]:
        for item in self.items:
            yield self._load(item)[0]

    def samples(self) -> Iterator[EvalSample]:
        pixels = self.width * self.height
        for item in self.items:
            image, label, instance = self._load(item)
            sample = EvalSample(
                key=item.key,
                image=image,
                label=self.label_coder.reconstruct(label),
                instance=instance,
                label_bpp=8 * len(self.label_coder.encode(label)) / pixels,
            )
            for q in self.qualities:
                result = self.encoder.roundtrip(image, q)
                sample.decoded[q], sample.bpp[q] = result.decoded, result.bpp
            yield sample


class PredictedLabels:
    """An input whose samples carry a segmenter's label maps: its prediction on each decoded image (label
    source ``decoder``: no label bits, ``label_bpp`` 0), or on the original, coded with the ``shards.*``
    label coder (``encoder``: the coded map's bits in ``label_bpp``)."""

    def __init__(self, data: EvalInput, cfg: JobConfig) -> None:
        from pipeline.data.codecs import LabelCoder
        from pipeline.segment.judge import open_segmenter

        self.data, self.source = data, cfg.data.label_source
        self.segmenter = open_segmenter(cfg.data.segmenter)
        self.label_coder = LabelCoder(cfg.shards.label_coder, cfg.shards.label_downsample)
        self.codec, self.qualities, self.decode_options = data.codec, data.qualities, data.decode_options
        self.source_name, self.label_nc, self.count = data.source_name, data.label_nc, data.count
        where = "the decoded images (decoder)" if self.source == "decoder" else "the originals (encoder)"
        self.description = f"{data.description}, label maps predicted by {self.segmenter.name} from {where}"

    def keys(self) -> list[str]:
        return self.data.keys()

    def originals(self) -> Iterator[np.ndarray]:
        return self.data.originals()

    def samples(self) -> Iterator[EvalSample]:
        for sample in self.data.samples():
            if self.source == "decoder":
                sample.predicted_label = {q: self.segmenter.label_ids(d) for q, d in sample.decoded.items()}
                sample.label_bpp = 0.0
            else:
                label = self.segmenter.label_ids(sample.image)
                sample.label_bpp = 8 * len(self.label_coder.encode(label)) / label.size
                coded = self.label_coder.reconstruct(label)
                sample.predicted_label = {q: coded for q in sample.decoded}
            yield sample


def with_label_source(data: EvalInput, cfg: JobConfig) -> EvalInput:
    """``data`` with the label maps of ``data.label_source`` (unchanged for ``gt``)."""
    if cfg.data.label_source == "gt":
        return data
    if data.source_name != "cityscapes":
        raise ValueError(
            f"data.label_source={cfg.data.label_source}: the segmenter predicts Cityscapes labels, "
            f"the data is {data.source_name}"
        )
    if not cfg.data.segmenter:
        raise ValueError(f"data.label_source={cfg.data.label_source} needs data.segmenter (a segmenter file)")
    return PredictedLabels(data, cfg)


def open_input(cfg: JobConfig) -> EvalInput:
    """The evaluation input named by ``eval.input``, with the label maps of ``data.label_source``."""
    kind = cfg.eval.input
    if kind == "auto":
        kind = "shards" if (Path(cfg.shards.output) / "manifest.json").is_file() else "source"
    data: EvalInput = ShardInput(cfg) if kind == "shards" else SourceInput(cfg)
    return with_label_source(data, cfg)
