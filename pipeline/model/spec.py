"""The generator spec: what an exported generator is (its network, its data, how it was trained).

A :class:`GeneratorSpec` travels as a JSON object in the exported file's metadata
(:mod:`pipeline.model.export`) and in the registry. Its keys are fixed per format version; a key this code
does not know is refused rather than ignored, since guessing would rebuild another network, or run it with
another rule:

* version 1 (files without a ``format_version``): plain pix2pixHD generators, no ``residual`` key
  (they load with ``residual=False``), none of the keys added with version 2;
* version 2: the :class:`~pipeline.config.ModelConfig` fields, the resolved ``label_nc``/``use_instance``,
  and what the trainer records: ``codec``, ``quality``, ``qualities`` (a model trained on several,
  ``loader.qualities``), ``phase``, ``steps``, ``train_split`` and ``selected`` (the best-checkpoint
  selection, a free-form object);
* version 3: version 2 plus the label maps the generator was trained on: ``label_source`` (``gt``,
  ``decoder``: the segmenter's prediction on the decoded image, or ``encoder``: its prediction on the
  original, coded) and ``segmenter`` (the sha256 of that segmenter's file). A spec without them is
  written as version 2 (:attr:`GeneratorSpec.format_version`), so exports of earlier content keep their
  bytes, and a pipeline that predates version 3 refuses a ``decoder`` generator instead of feeding it
  ground-truth maps. Absent, the label source is ``gt``;
* version 4: version 3 plus ``quality_input`` (the generator sees the codec quality,
  :func:`pipeline.model.inputs.quality_level` of ``codec``). A spec without it is written as version 3 or
  older, and a pipeline that predates version 4 refuses a generator that needs the quality;
* version 5: version 4 plus ``semantic_classes`` (``categories``) and ``label_classes`` (the class of
  every label id ``0..label_nc-1``: what the one-hot holds, :func:`pipeline.model.inputs.generator_input`).
  A spec without them (label ids, ``model.semantic_classes: labels``) is written as version 4 or older, and
  a pipeline that predates version 5 refuses a generator that needs its labels mapped;
* version 6: version 5 plus ``correction_scale`` (``frame``: the encoder sends the scale of the
  generator's change per frame; ``channels``: the gains of the correction head's parts per frame,
  :mod:`pipeline.model.correction_scale`; a pipeline that knows only ``frame`` refuses ``channels`` by
  name). A spec without it
  (``model.correction_scale: none``) is written as version 5 or older, and a pipeline that predates
  version 6 refuses a generator whose output it would not scale;
* version 7: version 6 plus ``padding`` (``zeros``: the generator's convs pad with zeros inside the conv,
  not pix2pixHD's reflection, which changes both the network's layers and its output). A spec without it
  (``model.padding: reflect``) is written as version 6 or older, and a pipeline that predates version 7
  refuses a generator it would build with the wrong padding;
* version 8: version 7 plus ``codec_options``: the options that decided the codec's decoded pictures the
  generator was trained on (:attr:`pipeline.data.codecs.Codec.output_options`, e.g. ``hevc``'s
  ``chroma_upsampling``), so that compress and decompress decode its input the same way
  (:meth:`GeneratorSpec.decode_options`). Written for a codec that has such options; a spec without it
  (a codec without them, or an export that predates them) is written as version 7 or older, and its
  generator is run on the pictures of before the options (their legacy values);
* version 9: version 8 plus ``end_kernel`` (the kernel of the generator's front conv and heads, other than
  pix2pixHD's 7). A spec without it (``model.end_kernel: 7``) is written as version 8 or older, and a
  pipeline that predates version 9 refuses a generator it would build with 7x7 ends;
* version 10: version 9 plus ``activation`` (``leaky_relu``: the generator's activations, other than
  pix2pixHD's ReLU). A spec without it (``model.activation: relu``) is written as version 9 or older, and a
  pipeline that predates version 10 refuses a generator it would run with ReLUs.
* version 11: version 10 plus ``self_ensemble`` (``hflip``: the decoder averages the generator's outputs on
  the frame and on its mirror image, :mod:`pipeline.model.inference`). A spec without it
  (``model.self_ensemble: none``) is written as version 10 or older, and a pipeline that predates version
  11 refuses a generator it would decode with one pass, unlike its encoder's gain fit.
* version 12: version 11 plus ``semantic_modulation`` (``true``: every residual block scales and shifts its
  input by a 1x1 conv of the semantic channels, which adds weights). A spec without it
  (``model.semantic_modulation: false``) is written as version 11 or older, and a pipeline that predates
  version 12 refuses a generator it would build without those layers.

Optional keys absent from the JSON are ``None`` here, and :meth:`GeneratorSpec.to_json` leaves ``None``
out again: a spec written by this code is the JSON the previous version wrote for the same content, so
an export's bytes (its identity, :func:`pipeline.model.export.weights_sha256`) do not change.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.config import (
    MODEL_BOUNDS,
    CorrectionScale,
    EndKernel,
    JobConfig,
    LabelSource,
    ModelConfig,
    SelfEnsemble,
    SemanticClasses,
)
from pipeline.model.inputs import (
    IMAGE_CHANNELS,
    Qualities,
    class_count,
    input_channels,
    quality_level,
    semantic_channels,
)
from pipeline.model.networks import ACTIVATIONS, NORMS, PADDINGS, PIX2PIXHD_OPTIONS, Generator

FORMAT_VERSION = 12  # the newest version this code reads and writes
REQUIRED_SPEC_KEYS = ("ngf", "n_downsample", "n_blocks", "norm", "label_nc", "use_instance")
# The range of every architecture number a spec may hold (ModelConfig's, and label_nc): a model file's
# metadata decides what is allocated, so it is checked before anything is built.
BOUNDS: dict[str, tuple[int, int]] = {**MODEL_BOUNDS, "label_nc": (1, 256)}  # label maps are 8-bit
LABEL_SOURCES = typing.get_args(LabelSource)
SEMANTIC_CLASSES = typing.get_args(SemanticClasses)
CORRECTION_SCALES = typing.get_args(CorrectionScale)
END_KERNELS = typing.get_args(EndKernel)
SELF_ENSEMBLES = typing.get_args(SelfEnsemble)
# ModelConfig fields a spec holds only where they differ from their default (then it is the JSON of the
# version before them for the same content), with the values each may take
DEFAULTED_CHOICES: dict[str, tuple[Any, ...]] = {
    "correction_scale": CORRECTION_SCALES,
    "padding": PADDINGS,
    "end_kernel": END_KERNELS,
    "activation": ACTIVATIONS,
    "self_ensemble": SELF_ENSEMBLES,
    "semantic_modulation": (True,),
}
MODEL_DEFAULTS = ModelConfig()
MAX_GENERATOR_BYTES = 4 << 30  # float32 weights of a generator this code builds (the default is 0.7 GB)


def label_source_spec(cfg: JobConfig) -> dict[str, str]:
    """The spec keys that record the label maps a generator is trained on: none for ``gt`` (a version 2
    file), else ``label_source`` and the sha256 of the segmenter ``data.segmenter`` that predicts them."""
    if cfg.data.label_source == "gt":
        return {}
    from pipeline.model.export import weights_sha256

    return {"label_source": cfg.data.label_source, "segmenter": weights_sha256(cfg.data.segmenter)}


@dataclass(frozen=True)
class GeneratorSpec:
    """An exported generator's spec (see the module docstring for the JSON it reads and writes)."""

    ngf: int
    n_downsample: int
    n_blocks: int
    norm: str
    label_nc: int
    use_instance: bool
    # the discriminator that trained the generator (not needed to run it)
    ndf: int | None = None
    n_layers_d: int | None = None
    num_d: int | None = None
    zero_semantics: bool = False
    residual: bool = False  # files written before the residual generator existed hold plain generators
    codec: str | None = None
    quality: int | None = None
    qualities: tuple[int, ...] | None = None
    phase: int | None = None
    steps: int | None = None
    train_split: str | None = None
    selected: dict[str, Any] | None = None
    label_source: str | None = None  # None: gt (version 2 and earlier)
    segmenter: str | None = None  # sha256 of the segmenter file that made the maps (decoder, encoder)
    quality_input: bool | None = None  # None: no quality channel (version 3 and earlier)
    semantic_classes: str | None = None  # None: label ids (version 4 and earlier)
    label_classes: tuple[int, ...] | None = None  # the class of each label id, with semantic_classes
    correction_scale: str | None = None  # None: none (version 5 and earlier)
    padding: str | None = None  # None: reflect (version 6 and earlier)
    codec_options: dict[str, Any] | None = None  # None: the codec's legacy pictures (version 7 and earlier)
    end_kernel: int | None = None  # None: 7 (version 8 and earlier)
    activation: str | None = None  # None: relu (version 9 and earlier)
    self_ensemble: str | None = None  # None: one pass (version 10 and earlier)
    semantic_modulation: bool | None = None  # None: off (version 11 and earlier)

    def __post_init__(self) -> None:
        if self.label_source not in (None, *LABEL_SOURCES):
            raise ValueError(
                f"generator spec label_source={self.label_source!r} is not one of {LABEL_SOURCES}"
            )
        if self.qualities is not None:
            object.__setattr__(self, "qualities", tuple(self.qualities))
        if self.quality_input is False:  # the same spec as without the key: written as before it existed
            object.__setattr__(self, "quality_input", None)
        if self.quality_input and self.codec is None:
            raise ValueError("generator spec quality_input needs the codec whose scale the quality is on")
        self._check_classes()
        for key, choices in DEFAULTED_CHOICES.items():
            value = getattr(self, key)
            if value == getattr(MODEL_DEFAULTS, key):  # the same spec as without the key
                object.__setattr__(self, key, None)
            elif value not in (None, *choices):
                raise ValueError(f"generator spec {key}={value!r} is not one of {list(choices)}")
        if self.correction_scale == "channels" and not self.residual:
            raise ValueError(
                "generator spec correction_scale='channels' needs a residual generator's correction head"
            )
        for key, (low, high) in BOUNDS.items():
            value = getattr(self, key)
            if value is not None and not low <= value <= high:
                raise ValueError(f"generator spec {key}={value} is outside [{low}, {high}]")
        if self.norm not in NORMS:
            raise ValueError(f"generator spec norm={self.norm!r} is not one of {list(NORMS)}")
        self._check_codec_options()

    def _check_codec_options(self) -> None:
        options = self.codec_options
        if not options:  # the same spec as without the key
            object.__setattr__(self, "codec_options", None)
            return
        if self.codec is None:
            raise ValueError("generator spec codec_options needs the codec they are options of")
        if not all(isinstance(v, str | int | float | bool) for v in options.values()):
            raise ValueError(f"generator spec codec_options must map names to plain values, got {options!r}")
        object.__setattr__(self, "codec_options", dict(sorted(options.items())))

    def _check_classes(self) -> None:
        if self.semantic_classes == "labels":  # the same spec as without the key
            object.__setattr__(self, "semantic_classes", None)
        if self.semantic_classes not in (None, *SEMANTIC_CLASSES):
            raise ValueError(
                f"generator spec semantic_classes={self.semantic_classes!r} is not one of {SEMANTIC_CLASSES}"
            )
        if (self.semantic_classes is None) != (self.label_classes is None):
            raise ValueError(
                "generator spec semantic_classes and label_classes come together (the classes the label ids "
                f"are mapped to), got {self.semantic_classes!r} and {self.label_classes!r}"
            )
        if self.label_classes is not None:
            object.__setattr__(self, "label_classes", tuple(self.label_classes))
            if len(self.label_classes) != self.label_nc or not all(
                0 <= c < self.label_nc for c in self.label_classes
            ):
                raise ValueError(
                    f"generator spec label_classes must give each of the {self.label_nc} label ids a class "
                    f"in [0, {self.label_nc}), got {list(self.label_classes)}"
                )

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, label_nc: int, use_instance: bool, **extra: Any
    ) -> GeneratorSpec:
        """The ``ModelConfig`` fields with the resolved ``label_nc``/``use_instance``, plus ``extra``
        (e.g. ``codec``, ``quality``, ``phase``)."""
        return cls(
            **{**dataclasses.asdict(model_cfg), "label_nc": label_nc, "use_instance": use_instance, **extra}
        )

    @classmethod
    def from_json(cls, spec: Mapping[str, Any], version: int) -> GeneratorSpec:
        """The spec of a JSON object written with format ``version``; unknown keys, missing required keys
        and values of the wrong type are refused (one-line messages)."""
        if version not in SPEC_KEYS:
            raise ValueError(f"unrecognised generator format_version {version!r}")
        unknown = sorted(set(spec) - SPEC_KEYS[version])
        if unknown:
            raise ValueError(
                f"spec keys {unknown} are unknown to generator format version {version}; "
                "written by a newer pipeline?"
            )
        missing = [k for k in REQUIRED_SPEC_KEYS if spec.get(k) is None]
        if missing:
            raise ValueError(f"generator spec lacks {missing}; it needs {list(REQUIRED_SPEC_KEYS)}")
        values = {k: v for k, v in spec.items() if v is not None}
        for key, value in values.items():
            _check_type(key, value)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the current format version (``None`` fields left out)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        for key in ("qualities", "label_classes"):
            if out.get(key) is not None:
                out[key] = list(out[key])
        return out

    @property
    def format_version(self) -> int:
        """The oldest format version that holds this spec's keys: what its export is written as."""
        keys = set(self.to_json())
        return next(v for v in sorted(SPEC_KEYS) if v > 1 and keys <= SPEC_KEYS[v])

    @property
    def trained_label_source(self) -> str:
        """The label maps the generator was trained on: ``gt`` unless the spec says otherwise."""
        return self.label_source or "gt"

    def quality_channel(self, quality: Qualities | None) -> Tensor | None:
        """What :func:`~pipeline.model.inputs.generator_input` takes as ``quality`` for this generator: the
        :func:`~pipeline.model.inputs.quality_level` of ``quality`` on ``codec``'s scale when the generator
        sees the quality (refused when none is given), else ``None``."""
        if not self.quality_input:
            return None
        if quality is None:
            raise ValueError(
                f"this generator sees the {self.codec} quality its input was coded at (model.quality_input); "
                "give that quality"
            )
        return quality_level(str(self.codec), quality)

    def decode_options(self, codec: str) -> dict[str, Any]:
        """The options to decode ``codec``'s bitstreams with before this generator: those of the pictures it
        was trained on (``codec_options``; without them, the codec's legacy pictures); for another codec
        than its own (a forced run), that codec's defaults."""
        from pipeline.data.codecs import decode_options, with_output_defaults

        if codec != self.codec:
            return with_output_defaults(codec, {})
        return decode_options(codec, self.codec_options)

    @property
    def uses_synthesis(self) -> bool:
        """Whether to run the generator with ``synthesis=True``: phase-1 exports (the semantic prior) draw
        the image with the synthesis head; every later phase outputs through the correction head."""
        return self.phase == 1

    @property
    def visual_input(self) -> bool:
        """Whether the generator sees the decoded image: every export but phase 1's (it is zeroed there)."""
        return not self.uses_synthesis

    @property
    def trained_qualities(self) -> tuple[int, ...]:
        """The sorted qualities the model was trained at: ``qualities``, else ``quality`` (none: empty)."""
        if self.qualities:
            return tuple(sorted(set(self.qualities)))
        return () if self.quality is None else (self.quality,)

    @property
    def class_nc(self) -> int:
        """The one-hot channels: ``label_nc``, or the classes of ``label_classes``."""
        return class_count(self.label_nc, self.label_classes)

    @property
    def generator_kwargs(self) -> dict[str, Any]:
        """:class:`~pipeline.model.networks.Generator`'s arguments (its ``hparams``)."""
        return {
            "input_nc": input_channels(self.class_nc, self.use_instance, bool(self.quality_input)),
            "output_nc": IMAGE_CHANNELS,
            "ngf": self.ngf,
            "n_downsample": self.n_downsample,
            "n_blocks": self.n_blocks,
            "norm": self.norm,
            "residual": self.residual,
            **{k: getattr(self, k) for k in PIX2PIXHD_OPTIONS if getattr(self, k) is not None},
            **(
                {"semantic_nc": semantic_channels(self.class_nc, self.use_instance)}
                if self.semantic_modulation
                else {}
            ),
        }

    def weight_shapes(self, max_bytes: int = MAX_GENERATOR_BYTES) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor of this spec's generator, worked out without allocating it (on the meta
        device); refused when its float32 weights would need more than ``max_bytes``."""
        with torch.device("meta"):
            state = Generator(**self.generator_kwargs).state_dict()
        needed = sum(4 * t.numel() for t in state.values())
        if needed > max_bytes:
            raise ValueError(
                f"generator spec {self.generator_kwargs} needs {needed / 2**30:.1f} GiB of weights, over the "
                f"limit of {max_bytes / 2**30:.1f} GiB"
            )
        return {name: tuple(t.shape) for name, t in state.items()}

    def build_generator(self, max_bytes: int = MAX_GENERATOR_BYTES) -> Generator:
        """A freshly initialised generator of this spec's architecture (its size checked first)."""
        self.weight_shapes(max_bytes)
        return Generator(**self.generator_kwargs)


# The keys each format version added; versions 1 to 11 are closed: the spec as it was then, so a field added
# later is never taken for part of an older file. The newest version is GeneratorSpec's fields.
ADDED_KEYS: dict[int, frozenset[str]] = {
    3: frozenset({"label_source", "segmenter"}),
    4: frozenset({"quality_input"}),
    5: frozenset({"semantic_classes", "label_classes"}),
    6: frozenset({"correction_scale"}),
    7: frozenset({"padding"}),
    8: frozenset({"codec_options"}),
    9: frozenset({"end_kernel"}),
    10: frozenset({"activation"}),
    11: frozenset({"self_ensemble"}),
    12: frozenset({"semantic_modulation"}),
}
_ALL_KEYS = frozenset(f.name for f in dataclasses.fields(GeneratorSpec))
SPEC_KEYS: dict[int, frozenset[str]] = {
    1: frozenset(
        {
            *("ngf", "n_downsample", "n_blocks", "norm", "ndf", "n_layers_d", "num_d", "label_nc"),
            *("use_instance", "zero_semantics", "codec", "quality", "phase", "steps"),
        }
    ),
    **{
        version: _ALL_KEYS.difference(*(keys for added, keys in ADDED_KEYS.items() if added > version))
        for version in range(2, FORMAT_VERSION + 1)
    },
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# what each field's JSON value must be, by its annotation (a field of a new type fails here, at import)
_JSON_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", _is_int),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "tuple[int, ...]": ("a list of integers", lambda v: isinstance(v, list) and all(map(_is_int, v))),
    "dict[str, Any]": ("an object", lambda v: isinstance(v, dict)),
}
_FIELD_KINDS = {
    f.name: _JSON_KINDS[str(f.type).removesuffix(" | None")] for f in dataclasses.fields(GeneratorSpec)
}


def _check_type(key: str, value: Any) -> None:
    kind, accepts = _FIELD_KINDS[key]
    if not accepts(value):
        raise ValueError(f"generator spec key {key!r} must be {kind}, got {value!r}")
