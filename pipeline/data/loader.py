"""Shards -> batches of tensors: a WebDataset pipeline with aligned crop/flip, split by node and worker.

:func:`make_dataset` composes these stages (each runs inside a DataLoader worker)::

    shard list (SimpleShardList, or ResampledShards when loader.resampled)
    -> split shards over rank x worker units -> tar samples -> split samples (only with too few shards)
    -> shuffle (train) -> keep the members needed (one quality drawn per sample with loader.qualities,
      as often as loader.quality_weights says)
    -> the predicted label map in place of the dataset's (data.label_source decoder or encoder)
    -> decode PNGs with OpenCV (pixel budget from the header first), JSON; with a DecodedCache
       (loader.cache_mb), a sample and quality decoded before comes from memory
    -> instance edges, crop/flip/transpose (train), tensors -> batched

Splitting (finite mode). A *unit* is one DataLoader worker of one rank; there are
``world_size x num_workers`` of them. With at least that many shards every unit reads its own
shards (``shards[unit::units]``, what ``wds.split_by_node`` + ``wds.split_by_worker`` do). With
fewer shards every unit reads all of them and keeps every ``units``-th sample. Either way each
sample is seen exactly once per epoch across all units. Shards of equal size (and at least as many
as units) keep the ranks' workloads balanced and avoid reading every tar on every unit.

Resampled mode draws shards with replacement, forever, from a seed per rank and worker (for
multi-node jobs whose ranks must never run dry); :func:`make_loader` cuts a nominal epoch of
``ceil(samples / (world_size x batch_size))`` batches when the manifest gives the sample count.

Randomness (shard order, shuffle buffer, crops, flips) is drawn from ``seed``, the epoch (one per
pass over the dataset in a worker; :func:`make_loader` keeps workers alive so that it advances),
the rank and the worker, so a run is reproducible for a given seed and layout.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import random
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from torch import Tensor

from pipeline.config import ConfigError, JobConfig
from pipeline.data import predicted_labels
from pipeline.data.manifest import Manifest, SplitEntry, codec_tag, training_manifests
from pipeline.data.members import INSTANCE_MEMBER, LEGACY_INSTANCE_MEMBER, instance_from
from pipeline.data.predicted_labels import PredictedLabelsError, PredictedReader
from pipeline.data.sources import DEFAULT_MAX_PIXELS, png_size
from pipeline.model.inputs import edge_map

IMAGE, LABEL, META = "image.png", "label.png", "json"
INSTANCES = (INSTANCE_MEMBER, LEGACY_INSTANCE_MEMBER)  # instance.npz; instance.png in older shards
# Distinct streams of randomness derived from the same seed.
_SHARD_ORDER, _SHUFFLE, _AUGMENT, _RESAMPLE, _QUALITY = 1, 2, 3, 4, 5
DECODED = "__decoded__"  # the chosen codec member of a sample, e.g. hevc_q42
LABEL_BPP = "__label_bpp__"  # the label bpp of a predicted map, in place of the manifest's


log = logging.getLogger(__name__)


class LoaderError(ConfigError):
    """Shards that cannot be read as configured (missing shard files or members, bad loader settings)."""


def codec_member(cfg: JobConfig) -> str:
    """The shard member name of the configured codec x quality, e.g. ``hevc_q42``."""
    return codec_tag(cfg.loader.codec, cfg.loader.quality)


def training_qualities(cfg: JobConfig) -> list[int]:
    """The qualities a model trains on: ``loader.qualities``, else ``[loader.quality]``."""
    return sorted(set(cfg.loader.qualities)) or [cfg.loader.quality]


def codec_members(cfg: JobConfig) -> list[str]:
    """The shard members of every training quality, e.g. ``["hevc_q37", "hevc_q42"]``."""
    return [codec_tag(cfg.loader.codec, q) for q in training_qualities(cfg)]


def quality_draw_weights(cfg: JobConfig) -> list[float] | None:
    """How often each of :func:`training_qualities` is drawn (``loader.quality_weights``, in that order);
    ``None``: equally often."""
    if not cfg.loader.quality_weights:
        return None
    weight = dict(zip(cfg.loader.qualities, cfg.loader.quality_weights, strict=True))
    return [weight[q] for q in training_qualities(cfg)]


def _split_entry(cfg: JobConfig, manifest: Manifest, split: str) -> SplitEntry:
    """The split to read, refused unless it has shards and every training quality was built."""
    entry = manifest.split(split)
    if not entry.shards:
        raise LoaderError(f"split {split!r} has no shards in {manifest.folder}: every sample was rejected")
    manifest.qualities(cfg.loader.codec, training_qualities(cfg), setting="loader.quality/qualities")
    return entry


def _expand_pattern(pattern: str) -> list[str]:
    urls: list[str] = []
    for url in wds.shardlists.expand_urls(pattern):
        if "://" in url or url.startswith("pipe:"):
            urls.append(url)
        elif glob.has_magic(url):
            urls.extend(sorted(glob.glob(url)))
        elif Path(url).is_file():
            urls.append(url)
        else:
            raise LoaderError(f"loader.shards: no such shard file {url}")
    if not urls:
        raise LoaderError(f"loader.shards={pattern!r} matches no shard files")
    return urls


def shard_urls(cfg: JobConfig, split: str | None = None) -> list[str]:
    """Shard files of ``split`` (default ``loader.split``): ``loader.shards`` if set, else the manifest's.

    ``loader.shards`` may be a brace pattern (``shards/val-{000000..000003}.tar``), a glob, a
    ``::``-separated list or one file; it is taken as is, without checking split or codec.
    """
    if cfg.loader.shards:
        return _expand_pattern(cfg.loader.shards)
    split = split or cfg.loader.split
    urls: list[str] = []
    for manifest in training_manifests(cfg):
        _split_entry(cfg, manifest, split)
        urls += [str(path) for path in manifest.shard_paths(split)]
    return urls


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: torch.distributed's when initialised, else the arguments, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        actual = (dist.get_rank(), dist.get_world_size())
        if (rank is not None and rank != actual[0]) or (world_size is not None and world_size != actual[1]):
            raise ValueError(f"rank/world_size {rank}/{world_size} contradict torch.distributed's {actual}")
        return actual
    if rank is None and world_size is None:
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    return rank, world_size


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _unit(rank: int, world_size: int) -> tuple[int, int]:
    """This process's unit index and the number of units (ranks x workers)."""
    worker, num_workers = _worker()
    return rank * num_workers + worker, world_size * num_workers


def _unit_seed(rank: int) -> int:
    """ResampledShards' ``worker_seed``: distinct per rank and worker."""
    worker, _ = _worker()
    return wds.utils.make_seed(_RESAMPLE, rank, worker)


class _Stage:
    """A pipeline stage whose randomness depends on seed, rank and the pass (epoch) it is in."""

    def __init__(self, rank: int, world_size: int, seed: int):
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = -1

    def _next_rng(self, stream: int, per_unit: bool) -> random.Random:
        self.epoch += 1
        worker, _ = _worker()
        who = (self.rank, worker) if per_unit else ()
        return random.Random(wds.utils.make_seed(self.seed, stream, self.epoch, *who))


class _SplitShards(_Stage):
    """Shard-level split over units when there are enough shards, else pass them all on (see module doc)."""

    def __init__(self, rank: int, world_size: int, seed: int, num_shards: int, shuffle: bool):
        super().__init__(rank, world_size, seed)
        self.num_shards, self.shuffle = num_shards, shuffle

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # Same order on every unit: the stream is shared, not per unit.
        rng = self._next_rng(_SHARD_ORDER, per_unit=False)
        shards = list(src)
        if self.shuffle:
            rng.shuffle(shards)
        unit, units = _unit(self.rank, self.world_size)
        yield from shards[unit::units] if self.num_shards >= units else shards


class _SplitSamples:
    """Every ``units``-th sample, only when :class:`_SplitShards` passed every shard on."""

    def __init__(self, rank: int, world_size: int, num_shards: int):
        self.rank, self.world_size, self.num_shards = rank, world_size, num_shards

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        unit, units = _unit(self.rank, self.world_size)
        if self.num_shards >= units:
            yield from src
            return
        for index, sample in enumerate(src):
            if index % units == unit:
                yield sample


class _Shuffle(_Stage):
    """``wds.shuffle`` with a buffer of ``bufsize`` samples, seeded per unit and epoch."""

    def __init__(self, rank: int, world_size: int, seed: int, bufsize: int):
        super().__init__(rank, world_size, seed)
        self.bufsize = bufsize

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = self._next_rng(_SHUFFLE, per_unit=True)
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


def _select(sample: dict[str, Any], member: str) -> dict[str, Any]:
    """Keep only the members the batch needs (shards may hold several codecs and qualities)."""
    wanted = (IMAGE, LABEL, f"{member}.png", META)
    missing = [m for m in wanted if m not in sample]
    if missing:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise LoaderError(
            f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks {missing}; it has {have}"
        )
    keep = wanted + (*INSTANCES, "__key__", "__url__")
    return {**{k: v for k, v in sample.items() if k in keep}, DECODED: member}


class BadSamples:
    """Bad shard samples (corrupt or truncated tars, undecodable or missing members): each is named (shard
    and key) and skipped while at most ``limit`` were met, else reading stops with a :class:`LoaderError`
    naming it. Counted per reading process (each rank and DataLoader worker)."""

    def __init__(self, limit: int = 0):
        self.limit, self.count = limit, 0

    def skip(self, where: str, err: BaseException) -> None:
        """Count and log one bad sample, or raise when it is one too many."""
        text = str(err).strip()
        reason = text.splitlines()[-1] if text else type(err).__name__
        self.count += 1
        if self.count > self.limit:
            hint = (
                f" ({self.count} bad samples, over train.max_bad_samples={self.limit})"
                if self.limit
                else "; train.max_bad_samples=N skips up to N such samples"
            )
            raise LoaderError(f"bad shard sample in {where}: {reason}{hint}") from err
        log.warning(
            "skipping bad shard sample in %s (%d of at most %d): %s", where, self.count, self.limit, reason
        )

    def sample(self, sample: dict[str, Any], err: BaseException) -> None:
        self.skip(f"{sample.get('__url__', 'a shard')}, key {sample.get('__key__', '?')}", err)

    def tar_error(self, exn: Exception) -> bool:
        """webdataset's handler for errors reading a tar (the rest of that shard is skipped)."""
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and ".tar" in a), "a shard")
        self.skip(url, exn)
        return True


class _PickQuality(_Stage):
    """One of ``members`` per sample, drawn uniformly or with ``weights`` (one member: no randomness used)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        seed: int,
        members: list[str],
        bad: BadSamples,
        weights: list[float] | None = None,
    ):
        super().__init__(rank, world_size, seed)
        self.members, self.bad, self.weights = members, bad, weights

    def _draw(self, rng: random.Random) -> str:
        if len(self.members) == 1:
            return self.members[0]
        if self.weights is None:
            return rng.choice(self.members)
        return rng.choices(self.members, weights=self.weights)[0]

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = self._next_rng(_QUALITY, per_unit=True)
        for sample in src:
            member = self._draw(rng)
            try:
                selected = _select(sample, member)
            except LoaderError as err:
                self.bad.sample(sample, err)
                continue
            yield selected


class _PredictedLabels:
    """The label map a generator gets when decoding (:mod:`pipeline.data.predicted_labels`) in place of the
    dataset's: predicted from the sample's drawn decoded member (decoder) or from the original (encoder)."""

    def __init__(self, reader: PredictedReader, bad: BadSamples):
        self.reader, self.bad = reader, bad

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            try:
                label, bpp = self.reader.lookup(sample["__url__"], sample["__key__"], sample[DECODED])
            except (PredictedLabelsError, OSError, tarfile.TarError) as err:
                self.bad.sample(sample, err)
                continue
            yield {**sample, LABEL: label, LABEL_BPP: bpp}


def _png(key: str, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A PNG member with OpenCV, unchanged depth (16-bit instances), RGB order; its header's size is
    checked against ``max_pixels`` (``shards.max_pixels``) before it is decoded."""
    size = png_size(bytes(data[:24]))
    if size is None:
        raise LoaderError(f"member {key} is not a PNG")
    if size[0] * size[1] > max_pixels:
        raise LoaderError(f"PNG member {key} is {size[0]}x{size[1]}, over shards.max_pixels={max_pixels}")
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as err:
        raise LoaderError(f"cannot decode PNG member {key}: {str(err).strip().splitlines()[-1]}") from err
    if array is None:
        raise LoaderError(f"cannot decode PNG member {key}")
    if array.ndim == 3:
        if array.shape[2] != 3:
            raise LoaderError(f"PNG member {key} has {array.shape[2]} channels, expected 3")
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    return array


class DecodedCache:
    """Decoded samples (the arrays of :func:`_arrays`) by shard, key and drawn member, kept while their arrays
    fit in ``budget`` bytes; the first ones met are kept, none is evicted. Callers must not write into the
    arrays it hands out (the augmentation slices them, :func:`to_tensors` copies)."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self._arrays: dict[tuple[str, str, str], dict[str, Any]] = {}

    @staticmethod
    def key(sample: dict[str, Any]) -> tuple[str, str, str]:
        return str(sample.get("__url__")), str(sample["__key__"]), str(sample[DECODED])

    def get(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        return self._arrays.get(self.key(sample))

    def put(self, sample: dict[str, Any], arrays: dict[str, Any]) -> None:
        size = sum(a.nbytes for a in arrays.values() if isinstance(a, np.ndarray))
        if self.used + size <= self.budget:
            self._arrays[self.key(sample)] = arrays
            self.used += size


class _Decode:
    """PNG and JSON members -> the aligned arrays of :func:`_arrays`; a sample that cannot be decoded goes to
    :class:`BadSamples`. With a :class:`DecodedCache` a sample met again is not decoded again."""

    def __init__(self, bad: BadSamples, max_pixels: int, cache: DecodedCache | None = None):
        self.bad, self.max_pixels, self.cache = bad, max_pixels, cache

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            cached = self.cache.get(sample) if self.cache is not None else None
            if cached is not None:
                yield cached
                continue
            try:
                decoded = {
                    name: _png(name, value, self.max_pixels) if name.endswith(".png") else value
                    for name, value in sample.items()
                }
                decoded[META] = json.loads(sample[META])
                arrays = _arrays(decoded, self.max_pixels)
            except (
                LoaderError,
                ValueError,
                KeyError,
                TypeError,
                OSError,
                EOFError,
                zipfile.BadZipFile,
            ) as err:
                self.bad.sample(sample, err)
                continue
            if self.cache is not None:
                self.cache.put(sample, arrays)
            yield arrays


def _arrays(sample: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Decoded members -> aligned ``H x W [x C]`` arrays plus metadata; edges from the full instance map."""
    key, member = sample["__key__"], sample[DECODED]
    image, decoded, label = sample[IMAGE], sample[f"{member}.png"], sample[LABEL]
    meta = sample[META]
    if decoded.shape != image.shape or label.shape != image.shape[:2]:
        raise LoaderError(
            f"sample {key}: sizes differ: image {image.shape}, {member} {decoded.shape}, label {label.shape}"
        )
    instance = instance_from(sample, max_pixels)
    if instance is not None:
        edge = edge_map(torch.from_numpy(instance.astype(np.int32))).numpy()
    else:
        edge = np.zeros(label.shape, np.float32)
    try:
        bpp = float(meta["codecs"][member]["bpp"])
        quality = int(meta["codecs"][member]["quality"])
        label_bpp = float(sample[LABEL_BPP] if LABEL_BPP in sample else meta["label"]["bpp"])
    except (KeyError, TypeError) as err:
        raise LoaderError(
            f"sample {key}: metadata lacks codecs.{member}.bpp, codecs.{member}.quality or label.bpp"
        ) from err
    return {
        "image": image,
        "decoded": decoded,
        "label": label,
        "edge": edge,
        "bpp": bpp,
        "label_bpp": label_bpp,
        "quality": quality,
        "key": key,
    }


SPATIAL = ("image", "decoded", "label", "edge")


class _Augment(_Stage):
    """Random crop, horizontal flip and transpose, the same window, flip and transpose for every spatial
    member."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        seed: int,
        crop: tuple[int, int] | None,
        flip: bool,
        transpose: bool = False,
    ):
        super().__init__(rank, world_size, seed)
        self.crop, self.flip, self.transpose = crop, flip, transpose

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = self._next_rng(_AUGMENT, per_unit=True)
        for sample in src:
            yield augment(sample, rng, self.crop, self.flip, self.transpose)


def augment(
    sample: dict[str, Any],
    rng: random.Random,
    crop: tuple[int, int] | None,
    flip: bool,
    transpose: bool = False,
) -> dict[str, Any]:
    """Crop ``crop=(h, w)`` at a random offset, flip with probability 1/2 and (``transpose``) swap rows and
    columns with probability 1/2, identically on all members.

    A transposed sample is cut as a ``w x h`` window, so that it is ``h x w`` like the others. Transposing
    keeps where a block's prediction comes from (above and to the left), which a flip reverses. Without
    ``transpose`` no coin is drawn for it, so the crops and flips of a seed are those of earlier versions.
    """
    height, width = sample["label"].shape
    swap = transpose and rng.random() < 0.5
    top = left = 0
    out_h, out_w = height, width
    if crop is not None:
        out_h, out_w = (crop[1], crop[0]) if swap else crop
        if out_h > height or out_w > width:
            what = f"transposed, a {out_h}x{out_w} window" if swap else "it"
            raise LoaderError(
                f"loader.crop {list(crop)} ({what}) is larger than sample {sample['key']} "
                f"({height}x{width}, HxW)"
            )
        top, left = rng.randint(0, height - out_h), rng.randint(0, width - out_w)
    step = -1 if flip and rng.random() < 0.5 else 1
    out = dict(sample)
    for name in SPATIAL:
        window = sample[name][top : top + out_h, left : left + out_w][:, ::step]
        out[name] = window.swapaxes(0, 1) if swap else window
    return out


def to_tensors(sample: dict[str, Any]) -> dict[str, Any]:
    """Arrays -> CHW tensors, images still uint8: :func:`collate` converts a whole batch at once."""

    def chw(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)

    return {
        "image": chw(sample["image"]),
        "decoded": chw(sample["decoded"]),
        "label": torch.from_numpy(np.ascontiguousarray(sample["label"])),
        "edge": torch.from_numpy(np.ascontiguousarray(sample["edge"], dtype=np.float32))[None],
        "bpp": sample["bpp"],
        "label_bpp": sample["label_bpp"],
        "quality": sample["quality"],
        "key": sample["key"],
    }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> the batch dict of ARCHITECTURE.md "Batches".

    Images are stacked as uint8 and scaled to [-1, 1] once per batch: a quarter of the copying
    that stacking float images would cost.
    """
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise LoaderError(f"samples of different sizes {sorted(shapes)} in one batch: set loader.crop")
    batch: dict[str, Any] = {name: torch.stack([s[name] for s in samples]) for name in SPATIAL}
    for name in ("image", "decoded"):
        batch[name] = batch[name].float().div_(127.5).sub_(1.0)
    batch["label"] = batch["label"].long()
    for name in ("bpp", "label_bpp"):
        batch[name] = torch.tensor([s[name] for s in samples], dtype=torch.float32)
    batch["quality"] = torch.tensor([s["quality"] for s in samples], dtype=torch.long)
    batch["key"] = [s["key"] for s in samples]
    return batch


def _crop(cfg: JobConfig) -> tuple[int, int] | None:
    crop = cfg.loader.crop
    return (crop[0], crop[1]) if crop else None


def make_dataset(
    cfg: JobConfig,
    split: str | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    train: bool = True,
    seed: int = 0,
    cache: DecodedCache | None = None,
) -> wds.DataPipeline:
    """Batches of ``split`` for this rank (and, inside a DataLoader, this worker); see the module doc.

    ``train`` switches on shard-order shuffling, the shuffle buffer and crop/flip; without it the
    samples come in shard order at full size. A training pipeline decodes through ``cache`` when given
    (one cache may serve the pipelines of successive epochs).
    """
    loader = cfg.loader
    crop = _crop(cfg) if train else None
    urls = shard_urls(cfg, split)
    rank, world_size = resolve_rank(rank, world_size)
    members = codec_members(cfg) if train else [codec_member(cfg)]
    weights = quality_draw_weights(cfg) if train else None
    if loader.resampled:
        source = [
            wds.ResampledShards(urls, seed=seed, worker_seed=partial(_unit_seed, rank), deterministic=True)
        ]
    else:
        source = [
            wds.SimpleShardList(urls),
            _SplitShards(rank, world_size, seed, len(urls), shuffle=train),
        ]
    bad = BadSamples(cfg.train.max_bad_samples)
    samples = [wds.tarfile_to_samples(handler=bad.tar_error)]
    if not loader.resampled:
        samples.append(_SplitSamples(rank, world_size, len(urls)))
    if train and loader.shuffle > 1:
        samples.append(_Shuffle(rank, world_size, seed, loader.shuffle))
    samples.append(_PickQuality(rank, world_size, seed, members, bad, weights))
    predicted = predicted_labels.reader(cfg)
    if predicted is not None:
        samples.append(_PredictedLabels(predicted, bad))
    samples.append(_Decode(bad, cfg.shards.max_pixels, cache if train else None))
    if train and (crop is not None or loader.flip or loader.transpose):
        samples.append(_Augment(rank, world_size, seed, crop, loader.flip, loader.transpose))
    samples += [
        wds.map(to_tensors),
        wds.batched(loader.batch_size, collation_fn=collate, partial=not loader.resampled),
    ]
    return wds.DataPipeline(*source, *samples)


def make_loader(
    cfg: JobConfig,
    split: str | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    train: bool = True,
    seed: int = 0,
    cache: DecodedCache | None = None,
) -> wds.WebLoader:
    """:func:`make_dataset` in a ``WebLoader`` with ``loader.num_workers`` persistent workers.

    Iterating it again starts the next epoch (new shard order, shuffle and crops). In resampled
    mode one pass is a nominal epoch when the manifest gives the split's sample count, else endless.
    The workers start from a fork server, not by forking the training process: a fork copies the locks of
    that process's threads (OpenCV's and torch's pools, DeepSpeed's, MLflow's) in whatever state they are,
    and a worker that finds one held waits forever.
    """
    dataset = make_dataset(cfg, split, rank=rank, world_size=world_size, train=train, seed=seed, cache=cache)
    workers = cfg.loader.num_workers
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        multiprocessing_context="forkserver" if workers > 0 else None,
    )
    if cfg.loader.resampled and not cfg.loader.shards:
        name = split or cfg.loader.split
        samples = sum(_split_entry(cfg, m, name).samples for m in training_manifests(cfg))
        _, world = resolve_rank(rank, world_size)
        loader = loader.with_epoch(math.ceil(samples / (world * cfg.loader.batch_size)))
    return loader
