"""The shard manifest: what a shard folder holds, as the builder wrote it to ``manifest.json``.

One typed record read by everything that consumes shards (loader, training, validation, evaluation,
the main job), so that "which splits and which qualities were built" is answered, and refused, in one
place. Version 2 lists every split's keys; version 1 listed them only in the per-shard sidecars
(``<split>-NNNNNN.json``), from which :meth:`Manifest.read` fills them in. Either version is written
back as it was read. Builds since record their settings and the settings' hash (``build``), which every
shard's sidecar carries too; the shards of a split are read only when they carry that hash
(:meth:`Manifest.verify`), so a folder of mixed builds is refused rather than read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import write_atomic
from pipeline.config import ConfigError, JobConfig

MANIFEST = "manifest.json"
VERSION = 2  # 2: every split lists its keys, held-out splits (data.holdout); 1 still reads
READABLE_VERSIONS = (1, 2)


class ManifestError(ConfigError):
    """A shard folder without a readable manifest, or a split or codec quality that was not built."""


@dataclass(frozen=True)
class DatasetEntry:
    """The source the shards were built from, and the working size every sample was fitted to."""

    source: str
    root: str
    label_nc: int
    label_names: tuple[str, ...]
    has_instances: bool
    width: int
    height: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DatasetEntry:
        return cls(
            source=str(data["source"]),
            root=str(data["root"]),
            label_nc=int(data["label_nc"]),
            label_names=tuple(data["label_names"]),
            has_instances=bool(data["has_instances"]),
            width=int(data["width"]),
            height=int(data["height"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "root": self.root,
            "label_nc": self.label_nc,
            "label_names": list(self.label_names),
            "has_instances": self.has_instances,
            "width": self.width,
            "height": self.height,
        }


@dataclass(frozen=True)
class SplitEntry:
    """A built split: its tar files (names in the shard folder) and its sample keys, both in shard order.

    A split whose samples were all rejected has no shards.
    """

    shards: tuple[str, ...]
    samples: int
    keys: tuple[str, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SplitEntry:
        return cls(tuple(data["shards"]), int(data["samples"]), tuple(data["keys"]))

    def to_json(self, version: int = VERSION) -> dict[str, Any]:
        entry: dict[str, Any] = {"shards": list(self.shards), "samples": self.samples}
        if version >= 2:
            entry["keys"] = list(self.keys)
        return entry


@dataclass(frozen=True)
class CodecEntry:
    """One codec at one quality, and its rate over the built samples (``None`` when there are none)."""

    codec: str
    quality: int
    bpp_mean: float | None
    bpp_min: float | None
    bpp_max: float | None

    @property
    def tag(self) -> str:
        """The shard member name, e.g. ``hevc_q42``."""
        return codec_tag(self.codec, self.quality)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CodecEntry:
        return cls(
            str(data["codec"]),
            int(data["quality"]),
            _rate(data["bpp_mean"]),
            _rate(data["bpp_min"]),
            _rate(data["bpp_max"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "quality": self.quality,
            "bpp_mean": self.bpp_mean,
            "bpp_min": self.bpp_min,
            "bpp_max": self.bpp_max,
        }


@dataclass(frozen=True)
class LabelEntry:
    """The lossless label-map coder (names joined by commas if the samples used several) and its rate."""

    coder: str
    downsample: int
    bpp_mean: float | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabelEntry:
        return cls(str(data["coder"]), int(data["downsample"]), _rate(data["bpp_mean"]))

    def to_json(self) -> dict[str, Any]:
        return {"coder": self.coder, "downsample": self.downsample, "bpp_mean": self.bpp_mean}


@dataclass(frozen=True)
class Reject:
    """An input left out of the shards, and why."""

    key: str
    split: str
    path: str
    reason: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reject:
        return cls(str(data["key"]), str(data["split"]), str(data["path"]), str(data["reason"]))

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "split": self.split, "path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class BuildEntry:
    """The settings every shard of the folder was built with, and their hash (also in every sidecar)."""

    settings: dict[str, Any]
    hash: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BuildEntry:
        return cls(dict(data["settings"]), str(data["hash"]))

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "hash": self.hash}


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a shard folder; ``folder`` is where it was read from or written to."""

    version: int
    config: dict[str, Any]  # the build's JobConfig.to_dict(), kept as written: older configs still read
    config_hash: str
    dataset: DatasetEntry
    splits: dict[str, SplitEntry]
    codecs: dict[str, CodecEntry]  # by tag, e.g. hevc_q42
    label: LabelEntry
    rejects: tuple[Reject, ...]
    folder: Path | None = field(default=None, compare=False)
    build: BuildEntry | None = None  # None: written before the build settings were recorded

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest of a shard folder; a clear error when there is none or this code cannot read it."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST} in {folder}; build shards first (python -m pipeline shards)")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise ManifestError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ManifestError(f"{path} is not a shard manifest (a JSON object expected)")
        _check_version(data.get("version"), path)
        try:
            if data["version"] == 1:
                data = _with_sidecar_keys(data, path.parent)
            return cls.from_json(data, path.parent)
        except (OSError, KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"{path} is not a shard manifest this code reads: {err!r}") from err

    @classmethod
    def from_json(cls, data: Mapping[str, Any], folder: str | Path | None = None) -> Manifest:
        """The manifest of a parsed ``manifest.json`` (a version-1 one with its keys filled in)."""
        _check_version(data.get("version"), folder or "the manifest")
        return cls(
            version=int(data["version"]),
            config=dict(data["config"]),
            config_hash=str(data["config_hash"]),
            dataset=DatasetEntry.from_json(data["dataset"]),
            splits={name: SplitEntry.from_json(entry) for name, entry in data["splits"].items()},
            codecs={tag: CodecEntry.from_json(entry) for tag, entry in data["codecs"].items()},
            label=LabelEntry.from_json(data["label"]),
            rejects=tuple(Reject.from_json(reject) for reject in data["rejects"]),
            folder=Path(folder) if folder is not None else None,
            build=BuildEntry.from_json(data["build"]) if data.get("build") is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``manifest.json`` (a version-1 manifest without the split keys, as read)."""
        out = {
            "version": self.version,
            "config": self.config,
            "config_hash": self.config_hash,
            "dataset": self.dataset.to_json(),
            "splits": {name: entry.to_json(self.version) for name, entry in self.splits.items()},
            "codecs": {tag: entry.to_json() for tag, entry in self.codecs.items()},
            "label": self.label.to_json(),
            "rejects": [reject.to_json() for reject in self.rejects],
        }
        if self.build is not None:
            out["build"] = self.build.to_json()
        return out

    def write(self, folder: str | Path | None = None) -> Path:
        """Write ``manifest.json`` atomically to ``folder`` (default: :attr:`folder`); return its path."""
        target = folder if folder is not None else self.folder
        if target is None:
            raise ValueError("Manifest.write: no folder given and the manifest has none")
        text = json.dumps(self.to_json(), indent=1, sort_keys=True)
        return write_atomic(Path(target) / MANIFEST, text)

    def _where(self) -> str:
        return f" in {self.folder}" if self.folder is not None else ""

    def split(self, name: str) -> SplitEntry:
        """The built split ``name``; refused, naming the built splits, when there is none."""
        if name not in self.splits:
            raise ManifestError(
                f"split {name!r} was not built{self._where()}; built: {sorted(self.splits) or 'none'}"
            )
        return self.splits[name]

    def shard_paths(self, split: str) -> list[Path]:
        """The tar files of a built split, in shard order (under the working directory without a folder);
        refused unless they are the shards this manifest describes (see :meth:`verify`)."""
        folder = self.folder if self.folder is not None else Path()
        self.verify(split)
        return [folder / name for name in self.split(split).shards]

    def verify(self, split: str) -> None:
        """Refuse a split whose shards on disk are not the ones this manifest lists: each shard's sidecar must
        carry this build's settings hash, its tar the recorded size, and their keys the split's keys.

        Manifests written before the build settings were recorded are taken as they are.
        """
        if self.build is None or self.folder is None:
            return
        entry, keys = self.split(split), []
        for name in entry.shards:
            sidecar_path = self.folder / name.replace(".tar", ".json")
            tar = self.folder / name
            try:
                sidecar = json.loads(sidecar_path.read_text())
                size = tar.stat().st_size
            except (OSError, ValueError) as err:
                raise ManifestError(
                    f"{self.folder}: shard {name} of {MANIFEST} is unreadable ({err})"
                ) from err
            why = ""
            if not isinstance(sidecar, dict) or sidecar.get("build_hash") != self.build.hash:
                why = f"was built with other settings than {MANIFEST} records"
            elif sidecar.get("tar_bytes") != size:
                why = f"has {size} bytes where its sidecar records {sidecar.get('tar_bytes')}"
            if why:
                raise ManifestError(
                    f"{self.folder}: shard {name} {why} (a mixed or interrupted build); rebuild the "
                    "shards (python -m pipeline shards)"
                )
            keys += sidecar.get("keys", [])
        if tuple(keys) != entry.keys:
            raise ManifestError(
                f"{self.folder}: the shards of split {split!r} hold other samples than {MANIFEST} lists; "
                "rebuild the shards (python -m pipeline shards)"
            )

    def qualities(self, codec: str, wanted: Iterable[int] = (), setting: str = "") -> list[int]:
        """The sorted qualities built for ``codec``; with ``wanted``, those, each refused unless built.

        ``setting`` names the configuration that asked (e.g. ``eval.qualities``) in the error.
        """
        built = sorted(entry.quality for entry in self.codecs.values() if entry.codec == codec)
        asked = f"{setting}: " if setting else ""
        if not built:
            raise ManifestError(
                f"{asked}codec {codec!r} was not built{self._where()}; built: {sorted(self.codecs) or 'none'}"
            )
        chosen = sorted(set(wanted)) or built
        missing = [codec_tag(codec, q) for q in chosen if q not in built]
        if missing:
            raise ManifestError(
                f"{asked}{', '.join(missing)} {'was' if len(missing) == 1 else 'were'} not built"
                f"{self._where()}; built: {[codec_tag(codec, q) for q in built]}"
            )
        return chosen

    def decode_options(self, codec: str) -> dict[str, Any]:
        """The options that decided ``codec``'s decoded pictures in these shards (its output options, as
        :func:`pipeline.data.codecs.decode_options` reads a record: a folder built before an option existed
        has that option's legacy value). Refused when the shards hold ``codec`` decoded two ways."""
        from pipeline.data.codecs import decode_options

        recorded = [
            options
            for name, _, options in (self.build.settings.get("codecs", []) if self.build else [])
            if name == codec
        ]
        found = [decode_options(codec, options) for options in recorded or [None]]
        ways = [options for i, options in enumerate(found) if options not in found[:i]]
        if len(ways) > 1:
            raise ManifestError(
                f"the shards{self._where()} hold {codec} pictures decoded in {len(ways)} ways: {ways}"
            )
        return ways[0]


def key_file_name(key: str, suffix: str = "") -> str:
    """``key + suffix`` as a file name: the one way a sample key (read from a shard, so from outside) becomes
    part of a path. A key with a path separator, ``..``, a NUL or nothing in it is refused, so that nothing
    is ever written outside the folder the name is joined to."""
    name = f"{key}{suffix}"
    if not key or ".." in key or any(c in key for c in ("/", "\\", "\0", ":")):
        raise ManifestError(f"sample key {key!r} cannot be a file name (separators, '..' or empty)")
    if Path(name).is_absolute() or Path(name).name != name:
        raise ManifestError(f"sample key {key!r} cannot be a file name")
    return name


def codec_tag(codec: str, quality: int) -> str:
    """The shard member name of a codec at a quality, e.g. ``hevc_q42``."""
    return f"{codec}_q{quality}"


def _rate(value: Any) -> float | None:
    return None if value is None else float(value)


def _check_version(version: Any, where: str | Path) -> None:
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > VERSION
        raise ManifestError(
            f"{where}: manifest version {version!r} "
            + ("is newer than this code reads" if newer else "is not a shard manifest version")
            + f" (reads {list(READABLE_VERSIONS)}); rebuild the shards or update the pipeline"
        )


def _with_sidecar_keys(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A version-1 manifest with each split's keys taken from its shards' sidecars, in shard order."""
    splits = {}
    for name, entry in data["splits"].items():
        keys = [
            key
            for shard in entry["shards"]
            for key in json.loads((folder / shard.replace(".tar", ".json")).read_text())["keys"]
        ]
        splits[name] = {**entry, "keys": keys}
    return {**data, "splits": splits}


@dataclass(frozen=True)
class DatasetInfo:
    """What training needs to know of the data."""

    label_nc: int
    use_instance: bool
    train_frames: tuple[str, ...] = ()  # keys of loader.split; empty when shards are given by pattern
    # the class of every label id the generator sees (model.semantic_classes: categories); None: the ids
    label_classes: tuple[int, ...] | None = None
    # the options that decided loader.codec's decoded pictures (Manifest.decode_options): what the
    # generator is trained on, recorded in its spec so that compress and decompress decode the same way
    decode_options: dict[str, Any] = field(default_factory=dict)

    @property
    def class_nc(self) -> int:
        """The generator's one-hot channels."""
        from pipeline.model.inputs import class_count

        return class_count(self.label_nc, self.label_classes)


def training_manifests(cfg: JobConfig) -> list[Manifest]:
    """The manifests of every folder training reads: ``shards.output``, then ``loader.extra_shards``
    (each refused unless built from the same dataset with the same label table)."""
    main = Manifest.read(cfg.shards.output)
    manifests = [main]
    for folder in cfg.loader.extra_shards:
        extra = Manifest.read(folder)
        if (extra.dataset.source, extra.dataset.label_nc) != (main.dataset.source, main.dataset.label_nc):
            raise ManifestError(
                f"loader.extra_shards: {folder} holds {extra.dataset.source} shards with label_nc "
                f"{extra.dataset.label_nc}, but {cfg.shards.output} holds {main.dataset.source} with "
                f"label_nc {main.dataset.label_nc}; extra folders must be built from the same dataset"
            )
        manifests.append(extra)
    return manifests


def dataset_info(cfg: JobConfig) -> DatasetInfo:
    """``label_nc`` (the manifest's, else ``data.label_nc``), whether the generator gets instance edges, and
    with ``model.semantic_classes: categories`` the category of every label id (of the manifest's dataset,
    else ``data.source``)."""
    folder = Path(cfg.shards.output)
    manifests = training_manifests(cfg) if (folder / MANIFEST).is_file() else []
    manifest = manifests[0] if manifests else None
    label_nc = manifest.dataset.label_nc if manifest else cfg.data.label_nc
    if manifest and cfg.data.label_nc not in (0, label_nc):
        raise ConfigError(
            f"data.label_nc is {cfg.data.label_nc} but the shards in {folder} were built with label_nc "
            f"{label_nc}; rebuild them (python -m pipeline shards) or leave data.label_nc at 0"
        )
    if label_nc <= 0:
        raise ConfigError(
            f"data.label_nc is 0 and there is no shard manifest in {folder} to take it from; "
            "set data.label_nc or shards.output"
        )
    has_instances = manifest.dataset.has_instances if manifest else cfg.model.use_instance
    frames: tuple[str, ...] = ()
    if manifest and not cfg.loader.shards:
        keys = (m.split(cfg.loader.split).keys for m in manifests)
        frames = tuple(sorted(set().union(*keys)))
    classes = None
    if cfg.model.semantic_classes == "categories":
        from pipeline.data.sources import label_categories

        classes = label_categories(manifest.dataset.source if manifest else cfg.data.source, int(label_nc))
    options = _decode_options(cfg, manifests)
    return DatasetInfo(int(label_nc), cfg.model.use_instance and has_instances, frames, classes, options)


def _decode_options(cfg: JobConfig, manifests: list[Manifest]) -> dict[str, Any]:
    """``loader.codec``'s decode options of every folder training reads, refused unless they agree; without a
    manifest, those a build of ``shards.codecs`` would record."""
    from pipeline.data.codecs import decode_options, with_output_defaults

    codec = cfg.loader.codec
    if not manifests:
        given = [spec.options for spec in cfg.shards.codecs if spec.name == codec]
        return decode_options(codec, with_output_defaults(codec, given[0] if given else {}))
    found = [(m.folder, m.decode_options(codec)) for m in manifests]
    for folder, options in found[1:]:
        if options != found[0][1]:
            raise ManifestError(
                f"loader.extra_shards: {folder} holds {codec} pictures decoded with {options}, but "
                f"{found[0][0]} with {found[0][1]}; build every folder training reads with the same options"
            )
    return found[0][1]
