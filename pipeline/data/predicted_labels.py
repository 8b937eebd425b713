"""Label maps predicted by a segmenter, stored beside the shards, so that a generator trains on the maps it
will get when decoding (``data.label_source`` ``decoder`` or ``encoder``).

``decoder``: one map per sample and decoded member, the prediction on that decoded image (what the decoder
computes from the bitstream; 0 label bits). ``encoder``: one map per sample, the prediction on the original,
passed through the label coder of ``shards.*`` (what the decoder receives) with its coded size recorded.
Both come from :meth:`pipeline.segment.judge.LoadedSegmenter.label_ids` on full frames, the function
evaluation and ``decompress`` call, so training sees exactly the maps decoding will make.

Layout, for every shard folder training reads (``shards.output`` and ``loader.extra_shards``)::

    <shard folder>/labels-<source>-<segmenter sha256[:12]>/
        <shard file name>     a tar with the shard's keys: <key>.<member>.label.png (uint8 label ids),
                              member = the codec member (hevc_q42) for decoder, ``image`` for encoder
        predicted.json        source, segmenter sha256, and per finished shard its samples and the
                              decoded members it holds (decoder) or each key's label bpp (encoder);
                              written after each shard

Each tar is written atomically and listed in ``predicted.json`` only once complete, so an interrupted
build resumes at the first unfinished shard; a shard done for fewer qualities than a later config asks for
is redone with all of them. Another segmenter gets another folder.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from pipeline.atomic import atomic_path, write_atomic
from pipeline.config import ConfigError, JobConfig

FORMAT, VERSION = "jpdse-predicted-labels", 1
INDEX = "predicted.json"
ENCODER_MEMBER = "image"  # the member an encoder-side map is predicted from


class PredictedLabelsError(ConfigError):
    """Predicted label maps that are missing or do not match the configured segmenter."""


def folder_name(source: str, sha256: str) -> str:
    return f"labels-{source}-{sha256[:12]}"


def member_name(key: str, member: str) -> str:
    """The tar member holding ``key``'s map predicted from ``member`` (a codec member, or ``image``)."""
    return f"{key}.{member}.label.png"


@dataclass(frozen=True)
class Predicted:
    """Where the maps of one (label source, segmenter) live beside one shard folder."""

    shards: Path
    source: str
    sha256: str

    @property
    def folder(self) -> Path:
        return self.shards / folder_name(self.source, self.sha256)

    def index(self) -> dict[str, Any]:
        """``predicted.json``, or an empty index when nothing was built; refused when it names another
        segmenter or source than its folder says."""
        path = self.folder / INDEX
        if not path.is_file():
            return {"format": FORMAT, "version": VERSION, "source": self.source, "segmenter": self.sha256,
                    "shards": {}}  # fmt: skip
        data = json.loads(path.read_text())
        if (data.get("format"), data.get("source"), data.get("segmenter")) != (
            FORMAT,
            self.source,
            self.sha256,
        ):
            raise PredictedLabelsError(
                f"{path} is not an index of {self.source} maps of segmenter {self.sha256[:12]}"
            )
        return data


def _png(label: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", label.astype(np.uint8))
    if not ok:
        raise PredictedLabelsError("cannot encode a predicted label map as PNG")
    return data.tobytes()


def _rgb(data: bytes, what: str) -> np.ndarray:
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if array is None:
        raise PredictedLabelsError(f"cannot decode {what}")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shard_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """``(key, {member: bytes})`` of a shard, in order (members named as WebDataset names them)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            parsed = base_plus_ext(info.name)
            if parsed[0] is None:
                continue
            key, member = parsed
            handle = tar.extractfile(info)
            if handle is not None:
                samples.setdefault(key, {})[member] = handle.read()
    return list(samples.items())


def _predict_shard(cfg: JobConfig, shard: Path, target: Path, members: list[str], predictor: Any) -> dict:
    """Write ``target``, the maps of every sample of ``shard``; returns its index entry."""
    from pipeline.data.codecs import LabelCoder

    coder = LabelCoder(cfg.shards.label_coder, cfg.shards.label_downsample)
    entry: dict[str, Any] = {"samples": 0}
    if cfg.data.label_source == "decoder":
        entry["members"] = members
    bpp: dict[str, float] = {}
    with atomic_path(target) as tmp, tarfile.open(tmp, "w") as tar:
        for key, sample in _shard_samples(shard):
            if cfg.data.label_source == "encoder":
                label = predictor.label_ids(_rgb(sample["image.png"], f"{shard}: {key}.image.png"))
                bpp[key] = 8 * len(coder.encode(label)) / label.size
                _add(tar, member_name(key, ENCODER_MEMBER), _png(coder.reconstruct(label)))
            else:
                for member in members:
                    data = sample.get(f"{member}.png")
                    if data is None:
                        raise PredictedLabelsError(f"{shard}: sample {key} has no {member}.png")
                    _add(
                        tar,
                        member_name(key, member),
                        _png(predictor.label_ids(_rgb(data, f"{key}.{member}"))),
                    )
            entry["samples"] += 1
    if bpp:
        entry["label_bpp"] = bpp
    return entry


def _targets(cfg: JobConfig, sha256: str) -> list[tuple[Predicted, list[Path]]]:
    """Every training shard folder with the shard files of ``loader.split`` that training reads."""
    from pipeline.data.manifest import training_manifests

    if cfg.loader.shards:
        raise PredictedLabelsError(
            f"data.label_source={cfg.data.label_source} reads its maps beside the manifest's shards; "
            "unset loader.shards"
        )
    return [
        (Predicted(Path(m.folder), cfg.data.label_source, sha256), m.shard_paths(cfg.loader.split))
        for m in training_manifests(cfg)
    ]


def _segmenter_sha(cfg: JobConfig) -> str:
    from pipeline.model.export import weights_sha256

    if not cfg.data.segmenter:
        raise PredictedLabelsError(f"data.label_source={cfg.data.label_source} needs data.segmenter")
    path = Path(cfg.data.segmenter)
    if not path.is_file():
        raise PredictedLabelsError(f"data.segmenter: no such file {path}")
    return weights_sha256(path)


def _lacking(cfg: JobConfig, entry: dict[str, Any] | None, members: list[str]) -> list[str] | None:
    """What a shard's index entry lacks: None when it is complete, else the missing decoded members (all of
    them, or ``[]`` for an encoder shard, when the shard was never done)."""
    if entry is None:
        return members if cfg.data.label_source == "decoder" else []
    if cfg.data.label_source != "decoder":
        return None
    return sorted(set(members) - set(entry.get("members", []))) or None


def build_predicted_labels(cfg: JobConfig, progress: bool = True) -> list[Path]:
    """Predict the maps of ``data.label_source`` for every training shard not done yet; returns the
    folders. Nothing to do for ``gt``."""
    from pipeline.data.loader import codec_members
    from pipeline.lock import folder_lock
    from pipeline.segment.judge import open_segmenter

    if cfg.data.label_source == "gt":
        return []
    sha256 = _segmenter_sha(cfg)
    members = codec_members(cfg)
    predictor = None
    folders = []
    for predicted, shards in _targets(cfg, sha256):
        with folder_lock(predicted.folder, "predict label maps"):
            index = predicted.index()
            todo = [
                s
                for s in shards
                if _lacking(cfg, index["shards"].get(s.name), members)
                or not (predicted.folder / s.name).is_file()
            ]
            bar = tqdm(todo, desc=f"{cfg.data.label_source} label maps", unit="shard", disable=not progress)
            for shard in bar:
                predictor = predictor or open_segmenter(cfg.data.segmenter)
                # a shard done for other qualities is redone with those and the new ones
                wanted = sorted(set(members) | set(index["shards"].get(shard.name, {}).get("members", [])))
                index["shards"][shard.name] = _predict_shard(
                    cfg, shard, predicted.folder / shard.name, wanted, predictor
                )
                write_atomic(predicted.folder / INDEX, json.dumps(index, indent=1, sort_keys=True))
        folders.append(predicted.folder)
    return folders


def check_predicted_labels(cfg: JobConfig) -> None:
    """Refuse, in one line, training on predicted maps that were not built for every training shard and
    quality (``python -m pipeline labels`` builds them; the trainer does before it starts)."""
    if cfg.data.label_source == "gt":
        return
    from pipeline.data.loader import codec_members

    if cfg.model.use_instance:
        raise PredictedLabelsError(
            f"model.use_instance needs instance maps, which a decoder of data.label_source="
            f"{cfg.data.label_source} does not get; set model.use_instance=false"
        )
    sha256 = _segmenter_sha(cfg)
    members = codec_members(cfg)
    for predicted, shards in _targets(cfg, sha256):
        index = predicted.index()
        missing = [s.name for s in shards if s.name not in index["shards"]]
        lacking = sorted(
            {m for s in shards for m in _lacking(cfg, index["shards"].get(s.name), members) or []}
        )
        if missing or lacking:
            what = f"shards {missing[:3]}" if missing else f"members {lacking}"
            raise PredictedLabelsError(
                f"no {cfg.data.label_source} label maps of segmenter {sha256[:12]} for {what} in "
                f"{predicted.folder}: run python -m pipeline labels with this config"
            )


class PredictedReader:
    """Looks up one sample's predicted map (PNG bytes) and label bpp, reading each sidecar tar once (a few
    recent ones kept, as a shuffle buffer draws from a few shards at a time)."""

    def __init__(self, source: str, sha256: str, keep: int = 8) -> None:
        self.source, self.sha256, self.keep = source, sha256, keep
        self._tars: OrderedDict[Path, dict[str, bytes]] = OrderedDict()
        self._bpp: dict[Path, dict[str, float]] = {}

    def _members(self, shard: Path) -> dict[str, bytes]:
        predicted = Predicted(shard.parent, self.source, self.sha256)
        path = predicted.folder / shard.name
        if path not in self._tars:
            if not path.is_file():
                raise PredictedLabelsError(f"no predicted label maps {path}: run python -m pipeline labels")
            with tarfile.open(path) as tar:
                self._tars[path] = {
                    info.name: handle.read()
                    for info in tar
                    if info.isfile() and (handle := tar.extractfile(info)) is not None
                }
            entry = predicted.index()["shards"].get(shard.name, {})
            self._bpp[path] = entry.get("label_bpp", {})
            while len(self._tars) > self.keep:
                old, _ = self._tars.popitem(last=False)
                self._bpp.pop(old, None)
        self._tars.move_to_end(path)
        return self._tars[path]

    def lookup(self, url: str, key: str, member: str) -> tuple[bytes, float]:
        """The map of ``key`` in shard ``url`` for the decoded ``member``, and its label bpp (0 at the
        decoder)."""
        shard = Path(url)
        tars = self._members(shard)
        wanted = ENCODER_MEMBER if self.source == "encoder" else member
        data = tars.get(member_name(key, wanted))
        if data is None:
            raise PredictedLabelsError(f"no predicted label map for {key} ({wanted}) beside {shard}")
        path = Predicted(shard.parent, self.source, self.sha256).folder / shard.name
        return data, float(self._bpp.get(path, {}).get(key, 0.0))


def reader(cfg: JobConfig) -> PredictedReader | None:
    """The reader of ``data.label_source``'s maps (None for ``gt``)."""
    if cfg.data.label_source == "gt":
        return None
    return PredictedReader(cfg.data.label_source, _segmenter_sha(cfg))
