"""R-PD evaluation: the base codec against codec-SE (and the no-semantics ablation) at every quality.

Inputs (``eval.input``): the WebDataset shards of ``eval.split`` (full images, read directly, no crops),
or the dataset itself (``data.*``), encoded on the fly with ``loader.codec`` and the label coder of
``shards.*``; ``auto`` takes the shards when ``<shards.output>/manifest.json`` exists.

Methods: the base codec's decoded image at every quality, and one enhanced image per exported generator
at the codec x quality in its spec. Models with ``zero_semantics`` form their own curve
``<codec>-SE (no semantics)``.

Models: every result carries its model's identity (column ``model``): ``models:/name/version`` for registry
models (an alias is pinned to its version), ``<path>#<sha256[:12]>`` for files, the codec's name for the
base codec. Models of one kind at different qualities form one curve (``method``); two models that would
share a curve point get curves of their own (suffixed with the folder that tells them apart, else their
hash or registry version), so a (method, quality) pair is always one model. A file given twice (same
sha256) is evaluated once.

Frames: a model that records its training frames (:func:`pipeline.model.export.read_train_frames`) is never
scored on them unless ``eval.allow_training_frames`` (then its results are flagged ``on_training_frames``).

Rates, both in every row: ``bpp_codec`` (the codec bitstream alone) and ``bpp_total`` (what the decoder
must receive: codec + the lossless label map for methods that read labels; equal to ``bpp_codec`` for the
base codec and the no-semantics model).

Outputs in ``eval.output_dir``: ``rpd.csv`` (one row per image x method x quality), ``rpd_mean.csv`` (one
row per model x quality: plain means of the rows, plus set-level FID), ``bdrate.json`` (with the scored
frames), ``niqe_model.json`` (``eval.niqe_fitted`` only),
``rpd_psnr.png`` / ``rpd_msssim.png`` / ``rpd_niqe.png`` and ``crops/``. PSNRs are capped at 100 dB
(:func:`pipeline.eval.metrics.cap_psnr`). MS-SSIM BD-rates use MS-SSIM in dB, ``-10 log10(1 - MS-SSIM)``.

NIQE (column ``niqe``) is the standard one, against the published pristine model. With ``eval.niqe_fitted``
a pristine model is also fitted on the split's own originals (``niqe_model.json``) and scored as the extra
column ``niqe_fitted``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import JobConfig
from pipeline.eval import metrics
from pipeline.eval.bdrate import MIN_POINTS, bd_psnr, bd_rate
from pipeline.model.export import (
    load_generator,
    read_train_frames,
    uses_synthesis,
    visual_input,
    weights_sha256,
)
from pipeline.tracking import Tracker

NUMERIC = ["bpp_codec", "bpp_total", "psnr", "ms_ssim", "niqe", "lpips"]
ROW_COLUMNS = ["key", "method", "model", "codec", "quality", *NUMERIC, "on_training_frames"]
MEAN_COLUMNS = [
    "method",
    "model",
    "label",
    "codec",
    "quality",
    "images",
    *NUMERIC,
    "fid",
    "lpips_note",
    "fid_note",
    "on_training_frames",
]
FITTED_NIQE = "niqe_fitted"  # the column after ``niqe`` with eval.niqe_fitted
REGISTRY_SCHEMES = ("models:/", "runs:/")
CROP_SIZE = 256
SHOWN_KEYS = 10  # frame keys printed in full; more are abbreviated


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


@dataclass
class Method:
    """A curve point generator: the base codec (``generator is None``) or one exported generator."""

    name: str  # the curve
    quality: int | None  # None: the base codec, at every quality
    generator: torch.nn.Module | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # the model as given
    model: str = ""  # identity: models:/name/version, <path>#<sha256[:12]>, or the codec's name
    label: str = ""  # short unique name for tables and legends
    train_frames: list[str] | None = None  # None: the model does not record them
    on_training_frames: bool = False

    @property
    def uses_labels(self) -> bool:
        return self.generator is not None and not bool(self.spec.get("zero_semantics", False))


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
        from pipeline.data.shards import read_manifest

        self.root = Path(cfg.shards.output)
        manifest = read_manifest(self.root)
        split = cfg.eval.split
        if split not in manifest["splits"]:
            raise ValueError(
                f"split {split!r} not in the shards at {self.root}: {sorted(manifest['splits'])}"
            )
        self.shards = [str(self.root / name) for name in manifest["splits"][split]["shards"]]
        self.codec = cfg.loader.codec
        built = sorted(int(c["quality"]) for c in manifest["codecs"].values() if c["codec"] == self.codec)
        if not built:
            raise ValueError(
                f"no {self.codec} images in the shards at {self.root}; built: {sorted(manifest['codecs'])}"
            )
        missing = sorted(set(cfg.eval.qualities) - set(built))
        if missing:
            raise ValueError(
                f"eval.qualities {missing} not built for {self.codec} at {self.root}; built: {built}"
            )
        self.qualities = sorted(set(cfg.eval.qualities)) or built
        dataset = manifest["dataset"]
        self.source_name = str(dataset["source"])
        self.label_nc = int(dataset["label_nc"])
        total = int(manifest["splits"][split]["samples"])
        self.count = min(total, cfg.eval.max_images) if cfg.eval.max_images > 0 else total
        self.description = f"{self.count} {split} images of the shards at {self.root}"
        # the manifest lists a split's keys in shard order, the order the samples are read in
        self._keys = list(manifest["splits"][split]["keys"][: self.count])

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
            instance = None
            if "instance.png" in raw:
                instance = _decode_png(raw["instance.png"], cv2.IMREAD_UNCHANGED, f"{key} instance")
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
        from pipeline.data.codecs import LabelCoder, get_codec
        from pipeline.data.sources import open_source

        self.source = open_source(cfg.data)
        self.width, self.height = cfg.data.width, cfg.data.height
        self.codec = cfg.loader.codec
        specs = [c for c in cfg.shards.codecs if c.name == self.codec]
        self.qualities = sorted(set(cfg.eval.qualities)) or sorted({q for c in specs for q in c.qualities})
        if not self.qualities:
            raise ValueError(f"no qualities for {self.codec}: set eval.qualities or list it in shards.codecs")
        self.encoder = get_codec(self.codec, **(specs[0].options if specs else {}))
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

    def originals(self) -> Iterator[np.ndarray]:
        for item in self.items:
            yield self.source.load(item, self.width, self.height)[0]

    def samples(self) -> Iterator[EvalSample]:
        pixels = self.width * self.height
        for item in self.items:
            image, label, instance = self.source.load(item, self.width, self.height)
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


def open_input(cfg: JobConfig) -> ShardInput | SourceInput:
    """The evaluation input named by ``eval.input``."""
    kind = cfg.eval.input
    if kind == "auto":
        kind = "shards" if (Path(cfg.shards.output) / "manifest.json").is_file() else "source"
    if kind == "shards":
        return ShardInput(cfg)
    if kind == "source":
        return SourceInput(cfg)
    raise ValueError(f"eval.input must be auto, shards or source, got {cfg.eval.input!r}")


def load_methods(
    models: list[str],
    codec: str,
    qualities: list[int],
    label_nc: int,
    device: torch.device,
    tracking_uri: str = "",
) -> list[Method]:
    """The base codec plus one method per model (checked against the codec, qualities and label table).

    A model is an exported generator file or a registry URI (``models:/name@alias``), pinned by
    :func:`pipeline.tracking.pin_model_uri` and resolved by :func:`pipeline.tracking.resolve_model_uri`
    against ``tracking_uri``. Each gets its identity, label and curve name (see the module docstring);
    a file whose sha256 was already given is skipped with a notice.
    """
    from pipeline import tracking

    methods = [Method(name=codec, quality=None, model=codec, label=codec)]
    seen: dict[str, str] = {}  # sha256 -> identity
    # identity -> (its folders, nearest first; its hash or registry version): what may tell it apart
    suffixes: dict[str, tuple[list[str], str]] = {}
    for model in models:
        pinned = tracking.pin_model_uri(model, tracking_uri=tracking_uri)
        with tempfile.TemporaryDirectory(prefix="jpdse-model-") as download:  # registry models only
            path = Path(tracking.resolve_model_uri(pinned, tracking_uri=tracking_uri, dst_dir=download))
            sha = weights_sha256(path)
            if sha in seen:
                print(f"[eval] {model} is the model {seen[sha]} again (same sha256): evaluated once")
                continue
            generator, spec = load_generator(path, device=device)
            train_frames = read_train_frames(path)
        if spec.get("codec") != codec or "quality" not in spec:
            raise ValueError(
                f"model {model} is for codec {spec.get('codec')!r} q{spec.get('quality')}, "
                f"but the evaluation is of {codec!r}"
            )
        # a model trained on several qualities (loader.qualities) is one point of its curve at each
        trained = sorted({int(q) for q in spec.get("qualities") or [spec["quality"]]})
        points = [q for q in trained if q in qualities]
        if not points:
            at = "/".join(f"q{q}" for q in trained)
            raise ValueError(f"model {model} is for {codec} {at}, which is not evaluated ({qualities})")
        if int(spec["label_nc"]) != label_nc:
            raise ValueError(f"model {model} has label_nc {spec['label_nc']} but the data has {label_nc}")
        if pinned.startswith(REGISTRY_SCHEMES):
            identity, label = pinned, pinned.split(":/", 1)[1]
            suffixes[identity] = ([], label)
        else:
            folders = [p.name for p in path.resolve().parents]
            identity, label = f"{model}#{sha[:12]}", f"{folders[0]}/{path.stem}#{sha[:12]}"
            suffixes[identity] = (folders, sha[:12])
        seen[sha] = identity
        methods += [
            Method(
                name=f"{codec}-SE (no semantics)" if spec.get("zero_semantics") else f"{codec}-SE",
                quality=quality,
                generator=generator.eval(),
                spec=spec,
                origin=model,
                model=identity,
                label=label,
                train_frames=train_frames,
            )
            for quality in points
        ]
    _split_shared_points(methods[1:], suffixes)
    return methods


def _split_shared_points(methods: list[Method], suffixes: dict[str, tuple[list[str], str]]) -> None:
    """Give models that would share a (curve, quality) point curves of their own, suffixed with the nearest
    folder level whose names differ across them, else with their hashes or registry versions."""
    points: dict[tuple[str, int | None], list[Method]] = {}
    for method in methods:
        points.setdefault((method.name, method.quality), []).append(method)
    for group in points.values():
        if len(group) < 2:
            continue
        folders = [suffixes[m.model][0] for m in group]
        names = [suffixes[m.model][1] for m in group]
        for level in range(min(map(len, folders))):
            if len({f[level] for f in folders}) == len(group):
                names = [f[level] for f in folders]
                break
        for method, suffix in zip(group, names, strict=True):
            method.name = f"{method.name} [{suffix}]"


def enhance(
    method: Method, decoded: np.ndarray, label: np.ndarray, instance: np.ndarray | None, device: torch.device
) -> np.ndarray:
    """Run ``method``'s generator on a full image (padded to its stride, cropped back); uint8 RGB out."""
    from pipeline.model.networks import edge_map, generator_input

    if method.generator is None:
        raise ValueError(f"{method.name} has no generator to run")
    spec = method.spec
    height, width = label.shape
    factor = 2 ** int(spec["n_downsample"])
    pad_h, pad_w = -height % factor, -width % factor
    image_mode = "reflect" if pad_h < height and pad_w < width else "edge"
    decoded = np.pad(decoded, ((0, pad_h), (0, pad_w), (0, 0)), mode=image_mode)
    label = np.pad(label, ((0, pad_h), (0, pad_w)), mode="edge")
    dec = torch.from_numpy(decoded).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
    lab = torch.from_numpy(label.astype(np.int64))[None].to(device)
    if instance is not None:
        inst = np.pad(instance.astype(np.int64), ((0, pad_h), (0, pad_w)), mode="edge")
        edge = edge_map(torch.from_numpy(inst))[None, None].to(device)
    else:
        edge = torch.zeros(1, 1, *label.shape, device=device)
    with torch.no_grad():
        x = generator_input(
            lab,
            edge,
            dec,
            label_nc=int(spec["label_nc"]),
            use_instance=bool(spec["use_instance"]),
            zero_semantics=bool(spec.get("zero_semantics", False)),
            visual_input=visual_input(spec),
        )
        out = method.generator(x, synthesis=uses_synthesis(spec))[0, :, :height, :width]
    return out.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def label_palette(source_name: str) -> np.ndarray:
    """256 x 3 uint8 colours: Cityscapes' own for its label ids, else a fixed VOC-style bit palette."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    if source_name == "cityscapes":
        from cityscapesscripts.helpers.labels import labels

        for lab in labels:
            if 0 <= lab.id < 256:
                palette[lab.id] = lab.color
    return palette


def _panel(image: np.ndarray, title: str, box: tuple[int, int, int, int]) -> np.ndarray:
    top, left, h, w = box
    crop = np.ascontiguousarray(image[top : top + h, left : left + w])
    bar = np.full((22, w, 3), 255, dtype=np.uint8)
    cv2.putText(
        bar, title[: max(1, w // 8)], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA
    )
    return np.concatenate([bar, crop], axis=0)


def write_crop(path: Path, panels: list[tuple[str, np.ndarray]]) -> None:
    """Centre crops (at most 256 x 256) of the panels side by side, each under its title."""
    height, width = panels[0][1].shape[:2]
    h, w = min(height, CROP_SIZE), min(width, CROP_SIZE)
    box = ((height - h) // 2, (width - w) // 2, h, w)
    gap = np.full((h + 22, 4, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for title, image in panels:
        parts += [_panel(image, title, box), gap]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(parts[:-1], axis=1), cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _ms_ssim_db(value: float) -> float:
    return -10.0 * math.log10(1.0 - value) if value < 1.0 else math.inf


def _with_fitted_niqe(columns: list[str]) -> list[str]:
    at = columns.index("niqe") + 1
    return [*columns[:at], FITTED_NIQE, *columns[at:]]


def _mean_rows(
    rows: list[dict[str, Any]], methods: list[Method], qualities: list[int], numeric: list[str]
) -> list[dict[str, Any]]:
    """One row per model x quality: the plain means of that model's rows."""
    out = []
    for method in methods:
        for q in qualities if method.quality is None else [method.quality]:
            group = [r for r in rows if r["model"] == method.model and r["quality"] == q]
            if not group:
                continue
            mean = {
                "method": method.name,
                "model": method.model,
                "label": method.label,
                "codec": group[0]["codec"],
                "quality": q,
                "images": len(group),
                "on_training_frames": method.on_training_frames,
            }
            mean.update({col: float(np.mean([r[col] for r in group])) for col in numeric})
            out.append(mean)
    return out


def check_training_frames(methods: list[Method], keys: list[str], allow: bool) -> None:
    """Refuse to score a model on frames it was trained on; with ``allow``, warn and flag its results.

    A model trained on several qualities is several methods: it is checked, and flagged, as one.
    """
    evaluated = set(keys)
    by_model: dict[str, list[Method]] = {}
    for method in methods:
        if method.generator is not None:
            by_model.setdefault(method.model, []).append(method)
    for model, group in by_model.items():
        frames = group[0].train_frames
        if frames is None:
            print(f"[eval] {model} does not record its training frames: could not check them")
            continue
        trained = sorted(evaluated.intersection(frames))
        if not trained:
            continue
        listed = ", ".join(trained[:3]) + (", ..." if len(trained) > 3 else "")
        message = f"model {model} was trained on {len(trained)} of the evaluated frames ({listed})"
        if not allow:
            raise ValueError(f"{message}; evaluate another split, or set eval.allow_training_frames=true")
        for method in group:
            method.on_training_frames = True
        print(f"[eval] WARNING: SCORED ON TRAINING FRAMES: {message} (flagged on_training_frames)")


def describe_frames(split: str, keys: list[str]) -> str:
    """Which frames are scored: split, count and keys (the first and last few of a long list)."""
    half = SHOWN_KEYS // 2
    shown = (
        keys
        if len(keys) <= SHOWN_KEYS
        else [*keys[:half], f"... {len(keys) - 2 * half} more ...", *keys[-half:]]
    )
    return f"scored {len(keys)} frames of split {split!r}: {', '.join(shown)}"


def _bdrate_report(means: list[dict[str, Any]], codec: str, qualities: list[int]) -> dict[str, Any]:
    """BD-rate/BD-PSNR of each codec-SE curve against the codec (pchip), plus per-quality deltas."""
    anchor = {m["quality"]: m for m in means if m["method"] == codec}
    report: dict[str, Any] = {
        "anchor": codec,
        "qualities": qualities,
        "mode": "pchip",
        "distortion": {"psnr": "dB (capped at 100)", "ms_ssim": "dB: -10 log10(1 - MS-SSIM)"},
        "keys": "bd_rate_pct: % rate change at equal quality; bd_quality_db: quality change at equal rate",
        "methods": {},
    }
    for name in sorted({m["method"] for m in means} - {codec}):
        points = sorted((m for m in means if m["method"] == name), key=lambda m: m["quality"])
        entry: dict[str, Any] = {
            "per_quality": [
                {
                    "quality": p["quality"],
                    "model": p["model"],
                    "on_training_frames": p["on_training_frames"],
                    "bpp_codec": p["bpp_codec"],
                    "bpp_total": p["bpp_total"],
                    "label_overhead_pct": 100.0 * (p["bpp_total"] / p["bpp_codec"] - 1.0),
                    "delta_psnr": p["psnr"] - anchor[p["quality"]]["psnr"],
                    "delta_ms_ssim": p["ms_ssim"] - anchor[p["quality"]]["ms_ssim"],
                    "delta_niqe": p["niqe"] - anchor[p["quality"]]["niqe"],
                }
                for p in points
            ]
        }
        if len(points) < MIN_POINTS or len(anchor) < MIN_POINTS:
            entry["available"] = False
            entry["reason"] = (
                f"BD-rate needs >= {MIN_POINTS} qualities per curve; {name} has {len(points)} and {codec} "
                f"{len(anchor)}. per_quality holds the deltas at equal codec bitstream instead."
            )
        else:
            entry["available"] = True
            entry["bd_rate_pct"], entry["bd_quality_db"] = {}, {}
            a_sorted = [anchor[q] for q in sorted(anchor)]
            for metric, convert in (("psnr", float), ("ms_ssim", _ms_ssim_db)):
                d_anchor = [convert(m[metric]) for m in a_sorted]
                d_test = [convert(p[metric]) for p in points]
                for rate in ("bpp_codec", "bpp_total"):
                    r_anchor = [m["bpp_codec"] for m in a_sorted]
                    r_test = [p[rate] for p in points]
                    key = f"{metric}/{rate}"
                    try:
                        entry["bd_rate_pct"][key] = bd_rate(r_anchor, d_anchor, r_test, d_test)
                        entry["bd_quality_db"][key] = bd_psnr(r_anchor, d_anchor, r_test, d_test)
                    except ValueError as err:
                        entry["bd_rate_pct"][key] = entry["bd_quality_db"][key] = None
                        entry.setdefault("errors", {})[key] = str(err)
        report["methods"][name] = entry
    return report


def _plot(
    path: Path,
    means: list[dict[str, Any]],
    metric: str,
    label: str,
    codec: str,
    reference: float | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name in sorted({m["method"] for m in means}, key=lambda n: (n != codec, n)):
        pts = sorted((m for m in means if m["method"] == name), key=lambda m: m["bpp_codec"])
        legend = name  # a model curve lists its models, one per quality
        for p in pts if name != codec else []:
            legend += f"\n  q{p['quality']}: {p['label']}" + (
                " (TRAINING FRAMES)" if p["on_training_frames"] else ""
            )
        line = ax.plot([p["bpp_total"] for p in pts], [p[metric] for p in pts], marker="o", label=legend)[0]
        if any(p["bpp_total"] != p["bpp_codec"] for p in pts):
            ax.plot(
                [p["bpp_codec"] for p in pts],
                [p[metric] for p in pts],
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"{name}, codec bits only",
            )
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="grey", linestyle=":", label="original images")
    ax.set_xlabel("bits per pixel (solid: codec + label map; dashed: codec only)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def format_table(means: list[dict[str, Any]]) -> str:
    """The R-PD mean table for people: one line per model x quality; ``!`` marks scores on training frames."""
    fitted = any(FITTED_NIQE in m for m in means)
    width = max(len("model"), *(len(m["label"]) for m in means))
    head = (
        f"  {'method':<28} {'model':<{width}} {'q':>4} {'n':>4} {'bpp_codec':>9} {'bpp_total':>9} "
        f"{'PSNR':>7} {'MS-SSIM':>8} {'NIQE':>7}"
        + (f" {'NIQE-fit':>8}" if fitted else "")
        + f" {'LPIPS':>7} {'FID':>7}"
    )
    lines = [head, "-" * len(head)]
    for m in means:
        lines.append(
            f"{'!' if m['on_training_frames'] else ' '} {m['method']:<28} {m['label']:<{width}} "
            f"{m['quality']:>4} {m['images']:>4} {m['bpp_codec']:>9.4f} {m['bpp_total']:>9.4f} "
            f"{m['psnr']:>7.3f} {m['ms_ssim']:>8.5f} {m['niqe']:>7.3f}"
            + (f" {m[FITTED_NIQE]:>8.3f}" if fitted else "")
            + f" {m['lpips']:>7.4f} {m['fid']:>7.2f}"
        )
    if any(m["on_training_frames"] for m in means):
        lines.append("! scored on frames the model was trained on (eval.allow_training_frames): not held out")
    return "\n".join(lines)


def _fit_niqe(data: ShardInput | SourceInput, size: str) -> tuple[metrics.NIQEModel, float]:
    """NIQE's pristine model fitted on the split's own originals, and their mean NIQE under it."""
    patches, features = [], []
    for image in tqdm(data.originals(), total=data.count, desc="NIQE pristine fit"):
        feats, sharpness = metrics.niqe_features(image)
        features.append(feats)
        patches.append(metrics.select_sharp_patches(feats, sharpness))
    model = metrics.fit_niqe_model_from_features(patches, f"uncompressed {data.description} ({size})")
    return model, float(np.mean([metrics.niqe_from_features(f, model) for f in features]))


def _metric_prefix(mean: dict[str, Any]) -> str:
    """``eval.<method>.<model label>.q<quality>``; the codec's label is its method name, not repeated."""
    parts = dict.fromkeys((mean["method"], mean["label"]))
    return ".".join(["eval", *map(_slug, parts), f"q{mean['quality']}"])


def evaluate(cfg: JobConfig, models: list[str], tracker: Tracker | None = None) -> Path:
    """Evaluate the codec and every model on ``eval.split``; write the results; return their folder."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = open_input(cfg)
    if data.count == 0:
        raise ValueError(f"no images to evaluate ({data.description})")
    codec, qualities = data.codec, data.qualities
    methods = load_methods(models, codec, qualities, data.label_nc, device, cfg.tracking.uri)
    keys = data.keys()
    check_training_frames(methods, keys, cfg.eval.allow_training_frames)
    out = Path(cfg.eval.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    fitted, original_niqe_fitted = None, math.nan
    numeric, row_columns, mean_columns = NUMERIC, ROW_COLUMNS, MEAN_COLUMNS
    if cfg.eval.niqe_fitted:
        fitted, original_niqe_fitted = _fit_niqe(data, f"{cfg.data.width}x{cfg.data.height}")
        (out / "niqe_model.json").write_text(json.dumps(fitted.to_dict()))
        numeric, row_columns, mean_columns = map(_with_fitted_niqe, (NUMERIC, ROW_COLUMNS, MEAN_COLUMNS))

    lpips_model = metrics.load_lpips(cfg.eval.lpips_weights, device)
    fid_model = metrics.load_fid_inception(cfg.eval.fid_weights, device)
    fid_real: list[np.ndarray] = []
    fid_fake: dict[tuple[str, int], list[np.ndarray]] = {}
    palette = label_palette(data.source_name)

    rows: list[dict[str, Any]] = []
    original_niqes: list[float] = []
    for index, sample in enumerate(tqdm(data.samples(), total=data.count, desc="R-PD evaluation")):
        original_niqes.append(metrics.niqe(sample.image))
        if not isinstance(fid_model, metrics.Unavailable):
            fid_real.append(fid_model.features(sample.image))
        for q in qualities:
            outputs = []
            for method in methods:
                if method.quality not in (None, q):
                    continue
                decoded = sample.decoded[q]
                result = (
                    decoded
                    if method.generator is None
                    else enhance(method, decoded, sample.label, sample.instance, device)
                )
                outputs.append((method.name, result))
                row = {
                    "key": sample.key,
                    "method": method.name,
                    "model": method.model,
                    "codec": codec,
                    "quality": q,
                    "bpp_codec": sample.bpp[q],
                    "bpp_total": sample.bpp[q] + (sample.label_bpp if method.uses_labels else 0.0),
                    "psnr": metrics.cap_psnr(metrics.psnr(sample.image, result)),
                    "ms_ssim": metrics.ms_ssim(sample.image, result),
                    "niqe": metrics.niqe(result),
                    "lpips": math.nan
                    if isinstance(lpips_model, metrics.Unavailable)
                    else lpips_model(sample.image, result),
                    "on_training_frames": method.on_training_frames,
                }
                if fitted is not None:
                    row[FITTED_NIQE] = metrics.niqe(result, fitted)
                rows.append(row)
                if not isinstance(fid_model, metrics.Unavailable):
                    fid_fake.setdefault((method.model, q), []).append(fid_model.features(result))
            if index < cfg.eval.crops and (len(outputs) > 1 or len(methods) == 1):
                panels = [
                    ("original", sample.image),
                    *((f"{n} q{q}", img) for n, img in outputs),
                    ("label map", palette[sample.label]),
                ]
                write_crop(out / "crops" / f"{sample.key}_{codec}_q{q}.png", panels)
    original_niqe = float(np.mean(original_niqes))

    means = _mean_rows(rows, methods, qualities, numeric)
    for mean in means:
        mean["lpips_note"] = lpips_model.reason if isinstance(lpips_model, metrics.Unavailable) else ""
        if isinstance(fid_model, metrics.Unavailable):
            mean["fid"], mean["fid_note"] = math.nan, fid_model.reason
        else:
            try:
                feats = np.stack(fid_fake[(mean["model"], mean["quality"])])
                mean["fid"] = metrics.frechet_distance(np.stack(fid_real), feats)
                mean["fid_note"] = f"over {len(feats)} images (FID is biased upwards on small sets)"
            except ValueError as err:
                mean["fid"], mean["fid_note"] = math.nan, str(err)

    _write_csv(out / "rpd.csv", row_columns, rows)
    _write_csv(out / "rpd_mean.csv", mean_columns, means)
    report = _bdrate_report(means, codec, qualities)
    report["original_niqe"] = original_niqe
    if fitted is not None:
        report["original_niqe_fitted"] = original_niqe_fitted
    report["frames"] = {"split": cfg.eval.split, "count": len(keys), "keys": keys}
    (out / "bdrate.json").write_text(json.dumps(report, indent=2))
    _plot(out / "rpd_psnr.png", means, "psnr", "PSNR (dB)", codec)
    _plot(out / "rpd_msssim.png", means, "ms_ssim", "MS-SSIM", codec)
    _plot(out / "rpd_niqe.png", means, "niqe", "NIQE (lower = more natural)", codec, original_niqe)

    print(f"R-PD evaluation of {data.description}; standard NIQE of the originals {original_niqe:.3f}")
    print(describe_frames(cfg.eval.split, keys))
    print(format_table(means))
    for name, entry in report["methods"].items():
        print(f"BD-rate {name} vs {codec}: {entry['bd_rate_pct'] if entry['available'] else entry['reason']}")
        for key, error in entry.get("errors", {}).items():
            print(f"  {key}: not computed: {error}")
    if tracker is not None:
        names = ["rpd.csv", "rpd_mean.csv", "bdrate.json", "rpd_psnr.png", "rpd_msssim.png", "rpd_niqe.png"]
        for name in names + (["niqe_model.json"] if fitted is not None else []):
            tracker.log_artifact(out / name, "eval")
        if (out / "crops").is_dir():
            tracker.log_artifact(out / "crops", "eval/crops")
        scalars = {
            f"{_metric_prefix(m)}.{col}": float(m[col])
            for m in means
            for col in (*numeric, "fid")
            if math.isfinite(float(m[col]))
        }
        for name, entry in report["methods"].items():
            for key, value in (entry.get("bd_rate_pct") or {}).items():
                if value is not None:
                    scalars[f"eval.bdrate.{_slug(name)}.{_slug(key)}"] = float(value)
        tracker.log_metrics(scalars)
    return out
