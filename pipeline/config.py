"""One typed job configuration, loaded from YAML with ``key.sub=value`` overrides.

A YAML file may list other files under ``defaults:`` (paths relative to it); they are
merged first, in order, and the file's own keys win. Every command reads the same
:class:`JobConfig`, so a sweep or a registry entry can always record the whole of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


PHASES = ("phase1", "phase2", "phase3")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


def resolve_path(path: str) -> Path:
    """A config path: absolute, relative to the working directory, or else to the repository."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return REPO_ROOT / candidate


@dataclass
class HoldoutConfig:
    """Frames carved out of a dataset split into a split of their own, so that training never sees them.

    A sample goes to split ``name`` when it belongs to ``from_split`` and its city (Cityscapes: the key's
    prefix, ``lindau`` in ``lindau_000005_000019``) is in ``cities`` or its key is listed in ``list_file``
    (one key per line, ``#`` comments).
    """

    name: str = ""
    from_split: str = "val"
    cities: list[str] = field(default_factory=list)
    list_file: str = ""


@dataclass
class DataConfig:
    """Where the images and label maps come from and the working size."""

    source: str = "cityscapes"  # cityscapes | ade20k | folder
    root: str = str(REPO_ROOT.parent / "shared" / "data" / "cityscapes_sample")
    splits: list[str] = field(default_factory=lambda: ["val"])
    width: int = 512
    height: int = 256
    image_dir: str = "images"  # folder source only
    label_dir: str = "labels"  # folder source only
    label_nc: int = 0  # 0: take it from the source's label table
    # held-out splits carved out of data.splits (e.g. a validation and a test city of one split)
    holdout: list[HoldoutConfig] = field(default_factory=list)


@dataclass
class CodecSpec:
    """A codec and the qualities (its own scale, e.g. QP 0-51 for bpg/hevc) to build."""

    name: str = "hevc"
    qualities: list[int] = field(default_factory=lambda: [37, 42])
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardConfig:
    """How ``python -m pipeline shards`` writes WebDataset shards."""

    output: str = "shards/cityscapes"
    codecs: list[CodecSpec] = field(default_factory=lambda: [CodecSpec()])
    samples_per_shard: int = 32
    workers: int = 0  # 0: every core
    label_coder: str = "auto"  # auto | jxl | webp | png
    label_downsample: int = 1
    store_bitstreams: bool = False
    strict: bool = False
    use_ray: bool = False


@dataclass
class LoaderConfig:
    """How training and evaluation read shards back as tensors."""

    shards: str = ""  # empty: <shards.output>/<split>-*.tar via the manifest
    split: str = "val"
    codec: str = "hevc"
    quality: int = 42
    # train one model on several qualities: each sample's decoded image is drawn from these (a uniform
    # pick per sample); empty: loader.quality only. Validation then averages over them.
    qualities: list[int] = field(default_factory=list)
    crop: list[int] = field(default_factory=lambda: [128, 256])  # [height, width]; [] = none
    flip: bool = True
    batch_size: int = 2
    num_workers: int = 0
    shuffle: int = 64
    resampled: bool = False


@dataclass
class ModelConfig:
    """pix2pixHD-style generator and multi-scale discriminator."""

    ngf: int = 64
    n_downsample: int = 4
    n_blocks: int = 9
    norm: str = "instance"  # instance | batch | none
    ndf: int = 64
    n_layers_d: int = 3
    num_d: int = 2
    label_nc: int = 0  # 0: from the data (manifest / source)
    # pix2pixHD's instance edges as an extra input; off by default because the decoder would
    # need the instance map too, and its bits are not counted in the rate.
    use_instance: bool = False
    zero_semantics: bool = False
    # clamp(decoded + correction) with the correction initialised at zero: codec-SE starts at the codec.
    # False: pix2pixHD's tanh output (the paper's generator).
    residual: bool = True


@dataclass
class LossWeights:
    """Weight of every loss term; a zero weight switches the term off."""

    gan: float = 1.0
    feat: float = 10.0
    vgg: float = 10.0
    dist: float = 0.0


@dataclass
class PhaseConfig:
    """One of the three JPD-SE training phases."""

    steps: int = 100
    visual_input: bool = True  # False: the decoded image is zeroed (phase 1)
    train_discriminator: bool = True  # False: D is not stepped (phase 3)
    loss: LossWeights = field(default_factory=LossWeights)
    lr: float = 2e-4
    # constant | cosine: a short linear warm-up (5 % of the steps), then cosine decay to zero at the
    # phase's last step (DeepSpeed's WarmupCosineLR; its state is part of the checkpoint)
    lr_schedule: str = "constant"


@dataclass
class LossConfig:
    """Loss definitions shared by every phase (the weights live in each phase)."""

    gan_mode: str = "lsgan"  # lsgan | hinge
    distortion: str = "l1"  # l1 | mse
    vgg_weights: str = ""  # empty: the torch hub cache (vgg19-dcbb9e9d.pth)


@dataclass
class TrainConfig:
    """Distributed training with two DeepSpeed engines."""

    output_dir: str = "runs/train"
    deepspeed_config: str = "configs/deepspeed/zero0_fp32.json"
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    init_from: str = ""  # exported generator of the previous phase, for --phases 2 or 3
    keep_checkpoints: int = 2  # newest complete checkpoints kept; 0: keep all


@dataclass
class ValidateConfig:
    """Validation on held-out frames during training: metrics, best-checkpoint selection, early stop.

    The frames of ``split`` must not be trained on, and should not be the ones results are reported on
    (``eval.split``): selecting a checkpoint on the reported frames is tuning on them.
    """

    split: str = "val"
    every: int = 0  # steps between validations (and step 0); 0: no validation, the last step is exported
    images: int = 0  # frames of the split used; 0: all
    metric: str = "psnr"  # psnr | ms_ssim | niqe: what "best" means (mean over the frames)
    # a step replaces the best only when better by more than this (in the metric's units): on a few frames,
    # smaller differences are noise, and the starting point (the codec itself) should not be traded for it
    min_delta: float = 0.0
    patience: int = 0  # stop after this many validations without improvement; 0: never stop early


@dataclass
class TrackingConfig:
    """MLflow tracking; the default needs no server."""

    enabled: bool = True
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db
    experiment: str = "jpd-se"
    log_every: int = 10
    register: bool = True
    register_phase2: bool = False
    alias: str = "champion"


@dataclass
class EvalConfig:
    """R-PD evaluation."""

    output_dir: str = "runs/eval"
    input: str = "auto"  # shards | source (encode data.* on the fly) | auto: shards when built, else source
    split: str = "val"
    qualities: list[int] = field(default_factory=list)  # empty: every built quality
    max_images: int = 0  # 0: all
    crops: int = 4
    fid_weights: str = ""
    lpips_weights: str = ""
    # also score NIQE against a pristine model fitted on the split's own originals (column niqe_fitted)
    niqe_fitted: bool = False
    # scoring a model on frames it was trained on is refused; true: allowed, with a warning in every table
    allow_training_frames: bool = False


@dataclass
class TuneConfig:
    """Ray Tune search over the perception-distortion weights of phase 2."""

    num_samples: int = 8
    max_steps: int = 200
    metric: str = "val_psnr"
    mode: str = "max"
    output_dir: str = "runs/tune"
    search_space: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # experiment folder under output_dir; empty: <name>-tune
    report_every: int = 50  # steps between intermediate results (ASHA's rungs)
    eval_images: int = 8  # held-out images (eval.split) evaluated per result; 0: all
    niqe_weight: float = 1.0  # val_score = val_psnr - niqe_weight * val_niqe
    grace_period: int = 0  # ASHA: steps before a trial can be stopped; 0: report_every
    reduction_factor: float = 2.0  # ASHA
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 1


@dataclass
class JobConfig:
    """Everything one job needs; every command reads this."""

    name: str = "cityscapes-hevc"
    data: DataConfig = field(default_factory=DataConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    phase1: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(
            visual_input=False, loss=LossWeights(gan=1.0, feat=10.0, vgg=10.0, dist=0.0)
        )
    )
    phase2: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(loss=LossWeights(gan=1.0, feat=10.0, vgg=10.0, dist=10.0))
    )
    phase3: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(
            train_discriminator=False, loss=LossWeights(gan=0.0, feat=0.0, vgg=0.0, dist=1.0)
        )
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def phase(self, number: int) -> PhaseConfig:
        if number not in (1, 2, 3):
            raise ConfigError(f"phase must be 1, 2 or 3, got {number}")
        return getattr(self, f"phase{number}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short stable hash of the resolved config."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def training_digest(self) -> str:
        """A hash of what trained weights depend on: data, labels, loader, model, losses, phase
        settings and optimiser; not step counts, paths, logging, tracking or evaluation."""
        tree = self.to_dict()
        loader = {k: v for k, v in tree["loader"].items() if k not in ("num_workers", "shards")}
        phases = {
            n: {k: v for k, v in tree[n].items() if k != "steps"} for n in ("phase1", "phase2", "phase3")
        }
        train = {k: tree["train"][k] for k in ("seed", "betas", "deepspeed_config")}
        parts = [
            tree["data"],
            tree["shards"]["label_downsample"],
            loader,
            tree["model"],
            tree["loss"],
            phases,
            train,
        ]
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """``{"phase2.loss.dist": 10.0, ...}``, e.g. for MLflow params."""
        return flatten(self.to_dict())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config defaults form a cycle through {path}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    merged: dict[str, Any] = {}
    for parent in tree.pop("defaults", []) or []:
        merged = _merge(merged, _read_yaml(path.parent / parent, seen + (path,)))
    return _merge(merged, tree)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["phase2.loss.dist=5", "data.splits=[val]"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override must look like key.sub=value, got {item!r}")
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw else "")
    return tree


def _hint_kind(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _hint_kind(args[0]) if args else Any
    return hint


def _build(cls: type, tree: Any, where: str) -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for key, value in tree.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    hint = _hint_kind(hint)
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        default = hint()
        return _build(hint, _merge(dataclasses.asdict(default), value or {}), where)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if value is None:
            return []
        if not isinstance(value, list):
            value = [value]
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        if hint is str and value is None:
            return ""
        if isinstance(value, bool) or (hint is str and not isinstance(value, (str, int, float))):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        try:
            converted = hint(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}") from err
        if hint is int and isinstance(value, float) and value != converted:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return converted
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read ``path`` (default ``configs/default.yaml``), apply overrides, validate types."""
    tree = _read_yaml(Path(path) if path else DEFAULT_CONFIG)
    tree = _merge(tree, parse_overrides(overrides or []))
    return from_dict(tree)


def with_overrides(cfg: JobConfig, values: dict[str, Any]) -> JobConfig:
    """``cfg`` with ``{"phase2.loss.dist": 12.5, ...}`` applied and validated like any override."""
    tree: dict[str, Any] = {}
    for key, value in values.items():
        _set_path(tree, key, value)
    return from_dict(_merge(cfg.to_dict(), tree))


def from_dict(tree: dict[str, Any]) -> JobConfig:
    """Build a :class:`JobConfig` from a (possibly partial) nested dict.

    The tree is merged over ``JobConfig()``'s own defaults first, so a partial
    ``phase1:`` section keeps phase 1's defaults rather than a generic phase's.
    """
    return _build(JobConfig, _merge(dataclasses.asdict(JobConfig()), tree), "")
