"""One typed job configuration, loaded from YAML with ``key.sub=value`` overrides.

The dataclasses below are the one source of defaults: a YAML file holds only what its job or preset
changes. A YAML file may list other files under ``defaults:`` (paths relative to it); they are merged
first, in order, and the file's own keys win; whatever no file sets keeps its dataclass default. Values
are checked on the way in: types and enumerations (``Literal``) by the loader, ranges by each section's
``__post_init__``. Every command reads the same :class:`JobConfig`, so a sweep or a registry entry can
always record the whole of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


PHASES = ("phase1", "phase2", "phase3")

Source = Literal["cityscapes", "ade20k", "folder"]
LabelCoderMethod = Literal["auto", "jxl", "webp", "png"]
Norm = Literal["instance", "batch", "none"]
Padding = Literal["reflect", "zeros"]
EndKernel = Literal[1, 3, 5, 7]  # odd, so that a stride-1 conv keeps the size; 7 is pix2pixHD's
Activation = Literal["relu", "leaky_relu"]
GanMode = Literal["lsgan", "hinge"]
Distortion = Literal["l1", "mse", "psnr"]
LrSchedule = Literal["constant", "cosine"]
ValidateMetric = Literal["psnr", "ms_ssim", "niqe"]
EvalInput = Literal["auto", "shards", "source"]
SemanticClasses = Literal["labels", "categories"]
CorrectionScale = Literal["none", "frame", "channels"]
SelfEnsemble = Literal["none", "hflip"]
LabelSource = Literal["gt", "decoder", "encoder"]  # the label map codec-SE gets: ground truth, or predicted
TuneMetric = Literal["val_psnr", "val_niqe", "val_score"]
Mode = Literal["max", "min"]
TuneSearch = Literal["random", "optuna"]
TuneScheduler = Literal["asha", "median", "fifo"]
JobModels = Literal["per_quality", "shared"]

# the direction of each sweep objective: PSNR and the score are higher-better, NIQE lower-better
TUNE_MODES: dict[str, Mode] = {"val_psnr": "max", "val_niqe": "min", "val_score": "max"}

# Field metadata: trained weights do not depend on this value, so JobConfig.training_digest leaves it
# out (a checkpoint resumes under another value). Unmarked fields count.
NOT_WEIGHTS = types.MappingProxyType({"weights": False})
# Field metadata: the digest counts this value only when it differs from its default; for fields added after
# checkpoints were written, so that those keep resuming while the field is unused.
WEIGHTS_WHEN_SET = types.MappingProxyType({"weights": "when set"})

# Keys that moved, for a clearer error than "unknown key" on a config written for the previous version.
MOVED = {"model.label_nc": "data.label_nc"}


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


def resolve_path(path: str) -> Path:
    """A config path: absolute, relative to the working directory, or else to the repository."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return REPO_ROOT / candidate


def _check_segmenter_path(path: str, name: str) -> None:
    """Refuse a segmenter setting that cannot name a segmenter file (exported as safetensors)."""
    if path and not path.endswith(".safetensors"):
        raise ConfigError(f"{name} must be a segmenter file (.safetensors), got {path!r}")


def _check_reference_codecs(names: list[str], ladders: dict[str, Any]) -> None:
    """Refuse reference codecs the registry does not know, named twice or without a quality ladder, and
    ladders that are not distinct integers on their codec's scale (the codec's class holds it)."""
    from pipeline.data.codecs.base import codec_class

    if len(set(names)) != len(names):
        raise ConfigError(f"reference_codecs names a codec twice: {names}")
    for name in [*names, *ladders]:
        try:
            codec_class(name)
        except ValueError as err:
            where = "reference_codecs" if name in names else "reference_qualities"
            raise ConfigError(f"{where}: {err}") from None
    for name in names:
        if name not in ladders:
            raise ConfigError(f"reference_qualities has no qualities for the reference codec {name}")
    for name, qualities in ladders.items():
        lo, hi = codec_class(name).quality_range
        plain = isinstance(qualities, list) and all(type(q) is int for q in qualities)
        if not plain or not qualities or len(set(qualities)) != len(qualities):
            raise ConfigError(
                f"reference_qualities.{name} must be a list of distinct integers, got {qualities!r}"
            )
        if not all(lo <= q <= hi for q in qualities):
            raise ConfigError(f"reference_qualities.{name} must lie in [{lo}, {hi}], got {qualities}")


def _at_least(section: Any, low: float, *names: str, note: str = "") -> None:
    """Refuse a field of ``section`` below ``low``. Messages name the field within its section; the
    loader puts the section's place in front (``loader.batch_size``)."""
    for name in names:
        value = getattr(section, name)
        if value < low:
            raise ConfigError(f"{name} must be >= {low}{note}, got {value}")


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

    source: Source = "cityscapes"
    root: str = str(REPO_ROOT.parent / "shared" / "data" / "cityscapes_sample")
    splits: list[str] = field(default_factory=lambda: ["val"])
    width: int = 512
    height: int = 256
    image_dir: str = "images"  # folder source only
    label_dir: str = "labels"  # folder source only
    # label ids 0..label_nc-1; 0: the source's label table (the folder source needs it set). The model's
    # input width follows it (through the shard manifest).
    label_nc: int = 0
    # held-out splits carved out of data.splits (e.g. a validation and a test city of one split)
    holdout: list[HoldoutConfig] = field(default_factory=list)
    # gt: the dataset's label maps (coded, bits counted); decoder: the segmenter's prediction on the decoded
    # image (0 label bits); encoder: its prediction on the original (coded, bits counted). The segmenter is
    # the file data.segmenter; a generator trains on the maps it will get when decoding.
    label_source: LabelSource = field(default="gt", metadata={"weights": "when set"})
    segmenter: str = field(default="", metadata={"weights": "when set"})

    def __post_init__(self) -> None:
        _at_least(self, 1, "width", "height")
        _check_segmenter_path(self.segmenter, "segmenter")
        _at_least(self, 0, "label_nc", note=" (0: the source's label table)")
        if not self.splits:
            raise ConfigError("splits is empty")


@dataclass
class CodecSpec:
    """A codec and the qualities (its own scale, e.g. QP 0-51 for bpg/hevc) to build."""

    name: str = "hevc"
    qualities: list[int] = field(default_factory=lambda: [37, 42])
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardConfig:
    """How ``python -m pipeline shards`` writes WebDataset shards.

    The qualities are checked against each codec's scale when the shards are built (the codec knows it).
    """

    output: str = field(default="shards/cityscapes", metadata=NOT_WEIGHTS)
    codecs: list[CodecSpec] = field(default_factory=lambda: [CodecSpec()], metadata=NOT_WEIGHTS)
    # the splits to build, of data.splits and the held-out ones (empty: all): e.g. the training split alone
    # at a second size (loader.extra_shards); the manifest lists the splits built
    splits: list[str] = field(default_factory=list, metadata=NOT_WEIGHTS)
    samples_per_shard: int = field(default=32, metadata=NOT_WEIGHTS)
    workers: int = field(default=0, metadata=NOT_WEIGHTS)  # 0: every core
    label_coder: LabelCoderMethod = field(default="auto", metadata=NOT_WEIGHTS)  # auto: the best available
    label_downsample: int = 1
    store_bitstreams: bool = field(default=False, metadata=NOT_WEIGHTS)
    strict: bool = field(default=False, metadata=NOT_WEIGHTS)
    use_ray: bool = field(default=False, metadata=NOT_WEIGHTS)
    # pixel budget of one image, label or instance map (and shard member), checked from the file's header
    # before it is decoded: a larger input is a reject, never an out-of-memory
    max_pixels: int = field(default=64_000_000, metadata=NOT_WEIGHTS)
    # a build across nodes (launch/shards_slurm.sbatch): node node_rank of num_nodes builds shards
    # node_rank, node_rank + num_nodes, ... of the plan and writes manifest-node<r>of<N>.json; the node
    # that completes the set merges them into manifest.json (equal to a one-node build's)
    node_rank: int = field(default=0, metadata=NOT_WEIGHTS)
    num_nodes: int = field(default=1, metadata=NOT_WEIGHTS)

    def __post_init__(self) -> None:
        _at_least(self, 1, "samples_per_shard", "label_downsample", "max_pixels", "num_nodes")
        _at_least(self, 0, "workers", note=" (0: every core)")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ConfigError(f"node_rank must be in [0, num_nodes={self.num_nodes}), got {self.node_rank}")
        if not self.codecs or any(not spec.qualities for spec in self.codecs):
            raise ConfigError("codecs needs at least one codec, each with at least one quality")
        tags = [f"{spec.name}_q{q}" for spec in self.codecs for q in spec.qualities]
        if len(set(tags)) != len(tags):
            raise ConfigError(f"codecs names the same codec and quality twice: {sorted(tags)}")


@dataclass
class LoaderConfig:
    """How training and evaluation read shards back as tensors."""

    shards: str = field(default="", metadata=NOT_WEIGHTS)  # empty: <shards.output>/<split>-*.tar (manifest)
    split: str = "val"
    codec: str = "hevc"
    quality: int = 42
    # train one model on several qualities: each sample's decoded image is drawn from these (a uniform
    # pick per sample); empty: loader.quality only. Validation then averages over them.
    qualities: list[int] = field(default_factory=list)
    # how often each of loader.qualities is drawn: one positive weight per entry, in the same order (only
    # their ratios count); empty: all equally often. E.g. [1, 1, 1.5, 2] with [32, 37, 42, 47] draws QP 47
    # twice as often as QP 32, for a model short of its gain at the low rates
    quality_weights: list[float] = field(default_factory=list, metadata=WEIGHTS_WHEN_SET)
    crop: list[int] = field(default_factory=lambda: [128, 256])  # [height, width]; [] = none
    flip: bool = True
    # also swap rows and columns of half the training samples (a crop [h, w] is cut w x h for them, so the
    # frames must be at least that size both ways); needs loader.crop
    transpose: bool = field(default=False, metadata=WEIGHTS_WHEN_SET)
    batch_size: int = 2
    num_workers: int = field(default=0, metadata=NOT_WEIGHTS)
    shuffle: int = 64
    resampled: bool = False
    # more shard folders whose loader.split trains too, e.g. the same frames built at twice the size
    # (python -m pipeline shards data.width=1024 data.height=512 shards.output=...): more content at
    # another scale, each image with the codec's own artifacts at that size. Each folder must hold the
    # training qualities and the label table of shards.output; its frames count as training frames.
    extra_shards: list[str] = field(default_factory=list, metadata=WEIGHTS_WHEN_SET)
    # keep up to this many MiB of decoded training samples in memory (in each rank), so that a small
    # training set read epoch after epoch is PNG-decoded once per sample and quality; the batches are the
    # same either way. Needs num_workers 0: workers start anew every epoch, and a cache with them. 0: off
    cache_mb: int = field(default=0, metadata=NOT_WEIGHTS)

    def __post_init__(self) -> None:
        _at_least(self, 1, "batch_size")
        _at_least(self, 0, "num_workers", "shuffle", "cache_mb")
        if self.crop and (len(self.crop) != 2 or min(self.crop) < 1):
            raise ConfigError(f"crop must be [] or [height, width] of positive sizes, got {self.crop}")
        if self.cache_mb and self.num_workers:
            raise ConfigError(
                "cache_mb needs loader.num_workers=0: DataLoader workers start anew every epoch, and "
                "a cache of decoded samples with them"
            )
        if self.transpose and not self.crop:
            raise ConfigError("transpose needs loader.crop: whole frames would not stack in a batch")
        if self.quality_weights:
            distinct = len(set(self.qualities)) == len(self.qualities)
            if len(self.quality_weights) != len(self.qualities) or not distinct:
                raise ConfigError(
                    f"quality_weights needs one weight per entry of loader.qualities, each quality once: "
                    f"got weights {self.quality_weights} for qualities {self.qualities}"
                )
            if not all(math.isfinite(w) and w > 0 for w in self.quality_weights):
                raise ConfigError(f"quality_weights must be positive numbers, got {self.quality_weights}")


# The range of each architecture number (also what an exported generator's spec may hold)
MODEL_BOUNDS: dict[str, tuple[int, int]] = {
    "ngf": (1, 1024),
    "n_downsample": (0, 6),
    "n_blocks": (0, 64),
    "ndf": (1, 1024),
    "n_layers_d": (1, 8),
    "num_d": (1, 8),
}


@dataclass
class ModelConfig:
    """pix2pixHD-style generator and multi-scale discriminator (``label_nc`` comes from the data)."""

    ngf: int = 64
    n_downsample: int = 4
    n_blocks: int = 9
    norm: Norm = "instance"
    # how the generator's size-keeping convs pad: reflect (pix2pixHD's ReflectionPad2d before each), or
    # zeros inside the conv (no separate copy of the input: a shorter step on CPU,
    # bench/bench_generator_step.py)
    padding: Padding = field(default="reflect", metadata=WEIGHTS_WHEN_SET)
    # the kernel of the generator's full-resolution convs at its two ends: the front conv and the output
    # heads (pix2pixHD: 7). A shorter step on CPU with 3 (bench/bench_generator_step.py)
    end_kernel: EndKernel = field(default=7, metadata=WEIGHTS_WHEN_SET)
    # the generator's activation: relu (pix2pixHD's), or leaky_relu (slope 0.2, as its discriminator's),
    # which keeps a gradient through every unit: without a norm (model.norm=none) a ReLU trunk can die
    # at the start of training, and the correction head, which reads its last ReLU, with it
    activation: Activation = field(default="relu", metadata=WEIGHTS_WHEN_SET)
    # every residual block also reads the semantic channels, pooled to its resolution: a 1x1 conv of them
    # (initialised at zero) scales and shifts the block's input, channel by channel (SPADE-like, without a
    # norm), so the classes steer the whole trunk rather than the front conv alone. Off: pix2pixHD's
    # generator, which sees them only in its input
    semantic_modulation: bool = field(default=False, metadata=WEIGHTS_WHEN_SET)
    ndf: int = 64
    n_layers_d: int = 3
    num_d: int = 2
    # pix2pixHD's instance edges as an extra input; off by default because the decoder would
    # need the instance map too, and its bits are not counted in the rate.
    use_instance: bool = False
    zero_semantics: bool = False
    # clamp(decoded + correction) with the correction initialised at zero: codec-SE starts at the codec.
    # False: pix2pixHD's tanh output (the paper's generator).
    residual: bool = True
    # one more input channel, constant over the frame: the quality the decoded image was coded at, as its
    # place on the codec's scale (pipeline.model.inputs.quality_level); for one model serving several
    # qualities (loader.qualities), which then knows how strong the artifacts are
    quality_input: bool = field(default=False, metadata=WEIGHTS_WHEN_SET)
    # what the one-hot channels hold: every label id of the source's table (labels), or the category each id
    # belongs to (categories: Cityscapes' 8, from cityscapesscripts); the label ids are mapped at the input
    semantic_classes: SemanticClasses = field(default="labels", metadata=WEIGHTS_WHEN_SET)
    # frame: the encoder sends one byte per frame, the least-squares scale of the generator's change to the
    # decoded image (pipeline.model.correction_scale), counted in the rate; channels: one byte per part of
    # the correction head (each trunk channel's contribution and the bias, ngf + 1 bytes), their joint
    # least-squares gains; none: the generator's output as is. Training is the same either way; validation,
    # evaluation and compress apply the scale or gains.
    correction_scale: CorrectionScale = field(default="none", metadata=WEIGHTS_WHEN_SET)
    # hflip: the decoder also runs the generator on the mirrored frame and averages the two outputs (the
    # mirror's mirrored back), twice the decoding compute for a steadier output; none: one pass. Training
    # is the same either way (loader.flip mirrors its crops at random); validation, evaluation and
    # compress decode so.
    self_ensemble: SelfEnsemble = field(default="none", metadata=WEIGHTS_WHEN_SET)

    def __post_init__(self) -> None:
        _at_least(self, 1, "ngf", "ndf", "n_layers_d", "num_d")
        _at_least(self, 0, "n_downsample", "n_blocks")
        for name, (_, high) in MODEL_BOUNDS.items():
            if getattr(self, name) > high:
                raise ConfigError(f"{name} must be <= {high}, got {getattr(self, name)}")
        if self.correction_scale == "channels" and not self.residual:
            raise ConfigError(
                "correction_scale=channels gains the correction head: needs model.residual=true"
            )


@dataclass
class LossWeights:
    """Weight of every loss term; a zero weight switches the term off."""

    gan: float = 1.0
    feat: float = 10.0
    vgg: float = 10.0
    dist: float = 0.0

    def __post_init__(self) -> None:
        _at_least(self, 0, "gan", "feat", "vgg", "dist")


@dataclass
class PhaseConfig:
    """One of the three JPD-SE training phases."""

    steps: int = field(default=100, metadata=NOT_WEIGHTS)
    visual_input: bool = True  # False: the decoded image is zeroed (phase 1)
    train_discriminator: bool = True  # False: D is not stepped (phase 3)
    loss: LossWeights = field(default_factory=LossWeights)
    lr: float = 2e-4
    # constant | cosine: a linear warm-up (warmup_steps), then cosine decay to zero at the phase's last
    # step (DeepSpeed's WarmupCosineLR; its state is part of the checkpoint)
    lr_schedule: LrSchedule = "constant"
    # the cosine schedule's warm-up; 0: 5 % of the steps
    warmup_steps: int = field(default=0, metadata=WEIGHTS_WHEN_SET)

    def __post_init__(self) -> None:
        _at_least(self, 0, "steps", "warmup_steps")
        if self.steps == 0:
            raise ConfigError("steps must be >= 1 (0 would export an untrained generator), got 0")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"warmup_steps must be < steps ({self.steps}), got {self.warmup_steps}")
        if self.warmup_steps and self.lr_schedule != "cosine":
            raise ConfigError(
                "warmup_steps warms up the cosine schedule: set lr_schedule=cosine or leave it 0"
            )

    @property
    def cosine_warmup(self) -> int:
        """The warm-up steps of the cosine schedule."""
        return self.warmup_steps or max(2, self.steps // 20)


@dataclass
class LossConfig:
    """Loss definitions shared by every phase (the weights live in each phase)."""

    gan_mode: GanMode = "lsgan"
    distortion: Distortion = "l1"
    vgg_weights: str = ""  # empty: the torch hub cache (vgg19-dcbb9e9d.pth)


@dataclass
class TrainConfig:
    """Distributed training with two DeepSpeed engines."""

    output_dir: str = field(default="runs/train", metadata=NOT_WEIGHTS)
    deepspeed_config: str = "configs/deepspeed/zero0_fp32.json"
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    checkpoint_every: int = field(default=50, metadata=NOT_WEIGHTS)  # 0: at the end only
    log_every: int = field(default=10, metadata=NOT_WEIGHTS)  # 0: at the end only
    seed: int = 0
    # exported generator of the previous phase, for --phases 2 or 3
    init_from: str = field(default="", metadata=NOT_WEIGHTS)
    keep_checkpoints: int = field(default=2, metadata=NOT_WEIGHTS)  # newest complete ones kept; 0: all
    # corrupt or truncated shard samples skipped (each named and logged) before training stops; 0: none
    max_bad_samples: int = field(default=0, metadata=NOT_WEIGHTS)
    # share of training samples whose semantic channels are zeroed (phases with the decoded image in): the
    # generator must also enhance without them, a regulariser against memorising the label maps
    semantic_dropout: float = field(default=0.0, metadata={"weights": "when set"})
    # > 0: validation, best-step selection, export and sweeps take an exponential moving average of the
    # generator's weights with this decay (e.g. 0.999) instead of the last step's (pipeline.train.ema)
    ema_decay: float = field(default=0.0, metadata=WEIGHTS_WHEN_SET)
    # each residual block of the generator skipped per training sample with this probability (stochastic
    # depth; Generator.set_stochastic_depth), a regulariser against over-fitting few training frames
    stochastic_depth: float = field(default=0.0, metadata=WEIGHTS_WHEN_SET)

    def __post_init__(self) -> None:
        if not 0 <= self.stochastic_depth < 1:
            raise ConfigError(f"stochastic_depth must be in [0, 1), got {self.stochastic_depth}")
        if not 0 <= self.semantic_dropout < 1:
            raise ConfigError(f"semantic_dropout must be in [0, 1), got {self.semantic_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1) (0: no average), got {self.ema_decay}")
        _at_least(self, 0, "checkpoint_every", "log_every", "keep_checkpoints", "max_bad_samples")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two values in [0, 1), got {self.betas}")


@dataclass
class ValidateConfig:
    """Validation on held-out frames during training: metrics, best-checkpoint selection, early stop.

    The frames of ``split`` must not be trained on, and should not be the ones results are reported on
    (``eval.split``): selecting a checkpoint on the reported frames is tuning on them.
    """

    split: str = "val"
    every: int = 0  # steps between validations (and step 0); 0: no validation, the last step is exported
    images: int = 0  # frames of the split used; 0: all
    metric: ValidateMetric = "psnr"  # what "best" means (mean over the frames)
    # a step replaces the best only when better by more than this (in the metric's units): on a few frames,
    # smaller differences are noise, and the starting point (the codec itself) should not be traded for it
    min_delta: float = 0.0
    patience: int = 0  # stop after this many validations without improvement; 0: never stop early

    def __post_init__(self) -> None:
        _at_least(self, 0, "every", "images", "min_delta", "patience")


@dataclass
class TrackingConfig:
    """MLflow tracking; the default needs no server."""

    enabled: bool = True
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db
    experiment: str = "jpd-se"
    log_every: int = 10  # 0: at the end only
    register: bool = True
    register_phase2: bool = False
    alias: str = "champion"
    # seconds to open the TCP connection to an http(s) store on first contact: a store that does not answer
    # fails this fast (each request afterwards is bounded by MLflow's own, longer, request timeout)
    connect_timeout: float = 3.0

    def __post_init__(self) -> None:
        _at_least(self, 0, "log_every")
        if not self.connect_timeout > 0:
            raise ConfigError(f"connect_timeout must be > 0 seconds, got {self.connect_timeout}")


@dataclass
class EvalConfig:
    """R-PD evaluation."""

    output_dir: str = "runs/eval"
    # shards | source (encode data.* on the fly) | auto: shards when built, else source
    input: EvalInput = "auto"
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
    # also score every model that receives a label map with the map withheld (zero semantics, no label
    # bits), as its own curve "<curve> (map withheld)": what the map adds to those very weights
    withheld_maps: bool = False
    # also score every model that receives a label map with its encoder sending the map only where it
    # pays (pipeline.model.map_choice: the squared error it removes against its bits on the codec's own
    # slope), as its own curve "<curve> (map chosen)"; its column "map" is the share of frames sent one
    map_choice: bool = False
    # a segmenter file (python -m pipeline segment): downstream accuracy (mIoU, pixel accuracy) of every
    # method at every quality; empty: not measured
    segmenter: str = ""
    # other codecs (e.g. [avif, jxl]) scored on the same originals, without a model, at each quality of
    # reference_qualities: a curve each on the plots, and an anchor each of the BD-rate table; empty: none
    reference_codecs: list[str] = field(default_factory=list)
    # the qualities of each reference codec (its own scale); the defaults span the PSNR of HEVC QP 32-47
    # (about 29-36.5 dB at 512x256 on the Cityscapes sample)
    reference_qualities: dict[str, list[int]] = field(
        default_factory=lambda: {"avif": [0, 15, 30, 50], "jxl": [0, 15, 30, 60]}
    )

    def __post_init__(self) -> None:
        _at_least(self, 0, "max_images", "crops")
        _check_segmenter_path(self.segmenter, "segmenter")
        _check_reference_codecs(self.reference_codecs, self.reference_qualities)


@dataclass
class TuneConfig:
    """Ray Tune search over the perception-distortion weights of phase 2."""

    num_samples: int = 8
    max_steps: int = 200
    metric: TuneMetric = "val_psnr"
    mode: Mode = "max"  # must be the metric's direction (TUNE_MODES)
    output_dir: str = "runs/tune"
    # dotted config keys -> {loguniform|uniform|randint: [lo, hi]} or {choice: [...]}; empty:
    # pipeline.train.tune.DEFAULT_SPACE
    search_space: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # experiment folder under output_dir; empty: <name>-tune
    report_every: int = 50  # steps between intermediate results (ASHA's rungs)
    eval_images: int = 8  # held-out images (validate.split) evaluated per result; 0: all
    niqe_weight: float = 1.0  # val_score = val_psnr - niqe_weight * val_niqe
    grace_period: int = 0  # ASHA: steps before a trial can be stopped; 0: report_every
    reduction_factor: float = 2.0  # ASHA
    cpus_per_trial: float = 1.0  # with workers_per_trial > 1: each worker's
    gpus_per_trial: float = 0.0  # with workers_per_trial > 1: each worker's
    # > 1: each trial trains on this many workers (Ray Train's TorchTrainer: gloo on CPU, NCCL on GPU)
    workers_per_trial: int = 1
    max_concurrent_trials: int = 1
    # random: Ray's BasicVariantGenerator; optuna: OptunaSearch (TPE); both seeded by train.seed
    search_alg: TuneSearch = "random"
    # asha: stops weak trials at the report_every rungs; median: MedianStoppingRule; fifo: none stopped
    scheduler: TuneScheduler = "asha"
    max_failures: int = 2  # Ray retries a failed trial this often, from its newest Ray checkpoint
    keep_checkpoints: int = 2  # Ray checkpoints kept per trial
    # Ray cluster to join: "" starts a local one, "auto" the one on this node, else ray://host:10001 or
    # host:6379 (the CLI's --address sets it)
    address: str = field(default="", metadata=NOT_WEIGHTS)

    def __post_init__(self) -> None:
        mode = TUNE_MODES.get(self.metric)
        if mode is None:
            raise ConfigError(f"metric must be one of {sorted(TUNE_MODES)}, got {self.metric!r}")
        if self.mode != mode:
            raise ConfigError(
                f"mode must be {mode!r} for {self.metric} (PSNR and the score are "
                f"higher-better, NIQE lower-better), got {self.mode!r}"
            )
        _at_least(
            self, 1, "num_samples", "max_steps", "report_every", "max_concurrent_trials", "workers_per_trial"
        )
        _at_least(self, 0, "eval_images", note=" (0: all)")
        _at_least(self, 0, "max_failures")
        _at_least(self, 1, "keep_checkpoints")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError(
                f"cpus_per_trial must be > 0 and gpus_per_trial >= 0, "
                f"got {self.cpus_per_trial} and {self.gpus_per_trial}"
            )
        if not 0 <= self.grace_period <= self.max_steps:
            raise ConfigError(f"grace_period must lie in [0, max_steps], got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass
class SegmentConfig:
    """``python -m pipeline segment``: a segmenter trained on the shards (``loader.*``: split, crops, batch
    size, ``loader.qualities``) through the generator's engine, checkpoints, tracking and registry.

    Its checkpoints resume only under the same :meth:`JobConfig.segment_digest` (the fields here not
    marked :data:`NOT_WEIGHTS`, the data and the loader).
    """

    # segmenter.safetensors and the checkpoints
    output_dir: str = field(default="runs/segment", metadata=NOT_WEIGHTS)
    architecture: str = "segformer"  # a registered segmenter (pipeline.segment.base)
    # the architecture's constructor options, e.g. {variant: b1} for SegFormer (its default: b0)
    options: dict[str, Any] = field(default_factory=dict)
    # ImageNet encoder weights (a file, or a save_pretrained folder); empty: the local cache, else random
    backbone: str = ""
    init_from: str = ""  # start from these weights (a segmenter file or state dict of the same network)
    steps: int = field(default=1000, metadata=NOT_WEIGHTS)
    lr: float = 6e-4  # AdamW, linear warm-up then linear decay to zero (SegFormer's recipe)
    weight_decay: float = 0.01
    warmup: int = 50
    originals: float = 0.5  # share of samples trained on the original image (the rest: decoded)
    seed: int = 0
    # DeepSpeed JSON (precision, ZeRO, clipping; the optimiser and schedule are the ones above);
    # empty: train.deepspeed_config
    deepspeed_config: str = ""
    checkpoint_every: int = field(default=100, metadata=NOT_WEIGHTS)  # 0: at the end only
    keep_checkpoints: int = field(default=2, metadata=NOT_WEIGHTS)  # 0: all
    log_every: int = field(default=10, metadata=NOT_WEIGHTS)  # 0: at the end only
    # registered-model name of the export (with tracking.alias); empty: not registered
    register_name: str = field(default="cityscapes-segmenter", metadata=NOT_WEIGHTS)
    # python -m pipeline run also trains (or, finished, reuses) this segmenter and, per quality, codec-SE on
    # its decoder label maps (0 label bits), evaluated beside codec-SE on gt maps (pipeline/job.py)
    in_main_job: bool = field(default=False, metadata=NOT_WEIGHTS)

    def __post_init__(self) -> None:
        _at_least(self, 1, "steps")
        _at_least(self, 0, "warmup", "weight_decay", "checkpoint_every", "keep_checkpoints", "log_every")
        if self.warmup >= self.steps:
            raise ConfigError(f"warmup must be < steps ({self.steps}), got {self.warmup}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.originals <= 1:
            raise ConfigError(f"originals must lie in [0, 1], got {self.originals}")
        if not self.architecture:
            raise ConfigError("architecture is empty")


@dataclass
class MainJobConfig:
    """``python -m pipeline run``: which generators the main job trains (:mod:`pipeline.job`)."""

    # per_quality: a codec-SE model and its ablation per codec quality, as in the paper; shared: one of each
    # for every quality of the job, trained on all of them (loader.qualities; model.quality_input tells the
    # model which), as bench/bench_quality.py trains
    models: JobModels = "per_quality"
    # the phases each model trains, phase 3 always; with phase 1 the semantic prior is trained once and
    # starts each codec-SE model (the ablations start from the identity generator)
    phases: list[int] = field(default_factory=lambda: [1, 2, 3])

    def __post_init__(self) -> None:
        known = set(self.phases) <= {1, 2, 3} and self.phases == sorted(set(self.phases))
        if not known or 3 not in self.phases:
            raise ConfigError(f"phases must be increasing phases of 1, 2 and 3 ending in 3: {self.phases}")


@dataclass
class JobConfig:
    """Everything one job needs; every command reads this.

    The three JPD-SE phases: phase 1, the semantic prior (the decoded image is zeroed; GAN + feature
    matching + VGG); phase 2, joint perception-distortion (decoded image in; GAN + FM + VGG + distortion:
    the weights Ray Tune searches); phase 3, distortion refinement (GAN, FM and VGG off, the
    discriminator not stepped, half the learning rate).
    """

    name: str = field(default="cityscapes-hevc", metadata=NOT_WEIGHTS)
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
            train_discriminator=False, loss=LossWeights(gan=0.0, feat=0.0, vgg=0.0, dist=1.0), lr=1e-4
        )
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig, metadata=NOT_WEIGHTS)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=NOT_WEIGHTS)
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=NOT_WEIGHTS)
    tune: TuneConfig = field(default_factory=TuneConfig, metadata=NOT_WEIGHTS)
    segment: SegmentConfig = field(default_factory=SegmentConfig, metadata=NOT_WEIGHTS)
    job: MainJobConfig = field(default_factory=MainJobConfig, metadata=NOT_WEIGHTS)

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
        """A hash of what trained weights depend on: every field not marked :data:`NOT_WEIGHTS` (data,
        labels, loader, model, losses, phase settings and optimiser; not step counts, paths, logging,
        tracking, validation or evaluation). A checkpoint resumes only under the same digest."""
        tree = _weights_tree(self)
        # Hashed in the previous version's layout, so that its checkpoints keep resuming: shards' one
        # field bare, the phases in one mapping, model.label_nc (now data.label_nc) at its only default 0.
        shards = tree.pop("shards")
        parts = [
            tree.pop("data"),
            shards.pop("label_downsample"),
            tree.pop("loader"),
            {**tree.pop("model"), "label_nc": 0},
            tree.pop("loss"),
            {name: tree.pop(name) for name in PHASES},
            tree.pop("train"),
        ]
        rest = {**tree, "shards": shards} if shards else tree  # fields added since, if weights depend on them
        if rest:
            parts.append(rest)
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def segment_digest(self) -> str:
        """A hash of what a segmenter's trained weights depend on: the ``segment`` fields not marked
        :data:`NOT_WEIGHTS`, its DeepSpeed file, the data and the loader. Its checkpoints resume only under
        the same digest."""
        parts = [
            _weights_tree(self.segment),
            self.segment.deepspeed_config or self.train.deepspeed_config,
            _weights_tree(self.data),
            _weights_tree(self.loader),
        ]
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """``{"phase2.loss.dist": 10.0, ...}``, e.g. for MLflow params."""
        return flatten(self.to_dict())


def _weights_tree(section: Any) -> dict[str, Any]:
    """``section`` as a nested dict of the fields trained weights depend on (no :data:`NOT_WEIGHTS`)."""
    tree: dict[str, Any] = {}
    for item in dataclasses.fields(section):
        weights = item.metadata.get("weights", True)
        value = getattr(section, item.name)
        if not weights or (weights == "when set" and value == _default(item)):
            continue
        is_section = dataclasses.is_dataclass(value) and not isinstance(value, type)
        tree[item.name] = _weights_tree(value) if is_section else _plain(value)
    return tree


def _default(item: dataclasses.Field) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def _plain(value: Any) -> Any:
    """A field value as :func:`dataclasses.asdict` writes it (sections in lists become dicts)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


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
    """The tree of a YAML config file with its ``defaults:`` merged in (not yet typed or checked)."""
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
    for key in unknown:
        dotted = f"{where}.{key}" if where else key
        if dotted in MOVED:
            raise ConfigError(f"{dotted} moved to {MOVED[dotted]}")
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for key, value in tree.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a range check of the section's __post_init__: name the key in full
        raise ConfigError(f"{where}.{err}" if where else str(err)) from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    hint = _hint_kind(hint)
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        default = hint()
        return _build(hint, _merge(dataclasses.asdict(default), value or {}), where)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
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
    """Read ``path`` (default ``configs/default.yaml``), apply overrides, validate types and ranges."""
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
