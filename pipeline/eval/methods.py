"""The methods evaluation compares: the base codec and one method per exported generator and quality.

Every method carries its model's identity (:attr:`Method.model`): ``models:/name/version`` for registry
models (an alias is pinned to its version), ``<path>#<sha256[:12]>`` for files, the codec's name for the base
codec. Models of one kind at different qualities form one curve (:attr:`Method.name`: ``<codec>-SE``, or
``<codec>-SE (no semantics)`` for ``zero_semantics`` models); two models that would share a curve point get
curves of their own (suffixed with the folder that tells them apart, else their hash or registry version),
so a (curve, quality) pair is always one model. A file given twice (same sha256) is evaluated once.

Frames: a model that records its training frames (:func:`pipeline.model.export.read_train_frames`) is never
scored on them unless allowed (then its results are flagged ``on_training_frames``).

Reference codecs (``eval.reference_codecs``, :func:`reference_methods`): other codecs that encode the same
originals themselves, without a model, one method per quality of their own scale; each is a curve of its own
(named after the codec) and an anchor of the BD-rate table.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.data.codecs import Codec, CodecResult, CodecUnavailable, get_codec
from pipeline.eval.gains import SEMANTICS_SUFFIX, WITHHELD_SUFFIX
from pipeline.eval.inputs import EvalSample
from pipeline.model.correction_scale import SCALE_UNIT, side_bits
from pipeline.model.export import load_generator, read_train_frames, weights_sha256
from pipeline.model.inference import decoder_output
from pipeline.model.map_choice import FLAG_BITS, choose_map, codec_slope
from pipeline.model.spec import GeneratorSpec

REGISTRY_SCHEMES = ("models:/", "runs:/")
CHOSEN_SUFFIX = " (map chosen)"  # the curves of eval.map_choice


@dataclass
class Method:
    """What makes the images of one curve point: the base codec (no generator, every quality) or one
    exported generator at one quality."""

    name: str  # the curve
    quality: int | None  # None: the base codec, at every quality
    generator: nn.Module | None = None
    spec: GeneratorSpec | None = None  # the generator's
    origin: str = ""  # the model as given
    model: str = ""  # identity: models:/name/version, <path>#<sha256[:12]>, or the codec's name
    label: str = ""  # short unique name for tables and legends
    train_frames: list[str] | None = None  # None: the model does not record them
    on_training_frames: bool = False
    encoder: Codec | None = None  # a reference codec: it encodes the original itself, at ``quality``
    map_choice: bool = False  # its encoder sends the label map only where it pays (eval.map_choice)

    @property
    def uses_labels(self) -> bool:
        """Whether the decoder must receive the label map for this method's images."""
        return self.spec is not None and not self.spec.zero_semantics


def load_methods(
    models: list[str],
    codec: str,
    qualities: list[int],
    label_nc: int,
    device: torch.device,
    tracking_uri: str = "",
    decode_options: dict[str, Any] | None = None,
) -> list[Method]:
    """The base codec plus one method per model (checked against the codec, qualities and label table).

    ``decode_options``: the codec's decode options of the evaluated pictures; a model trained on pictures
    decoded otherwise (:meth:`~pipeline.model.spec.GeneratorSpec.decode_options`) is scored with a warning,
    as it is then fed pictures it never saw in training.

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
        if spec.codec != codec or spec.quality is None:
            raise ValueError(
                f"model {model} is for codec {spec.codec!r} q{spec.quality}, "
                f"but the evaluation is of {codec!r}"
            )
        # a model trained on several qualities (loader.qualities) is one point of its curve at each
        trained = spec.trained_qualities
        points = [q for q in trained if q in qualities]
        if not points:
            at = "/".join(f"q{q}" for q in trained)
            raise ValueError(f"model {model} is for {codec} {at}, which is not evaluated ({qualities})")
        if spec.label_nc != label_nc:
            raise ValueError(f"model {model} has label_nc {spec.label_nc} but the data has {label_nc}")
        trained_on = spec.decode_options(codec)
        if decode_options is not None and trained_on != decode_options:
            print(
                f"[eval] WARNING: model {model} was trained on {codec} pictures decoded with {trained_on}, "
                f"the evaluated ones are decoded with {decode_options}: its scores are of pictures it never "
                "saw in training (rebuild the shards with its options to score it as compress runs it)"
            )
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
                name=f"{codec}-SE{SEMANTICS_SUFFIX}" if spec.zero_semantics else f"{codec}-SE",
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


def withheld_map_methods(methods: list[Method]) -> list[Method]:
    """Every method whose decoder receives a label map again, with the map withheld (``eval.withheld_maps``):
    the same weights, zero semantics at its input and no label bits; curve and identity suffixed
    :data:`WITHHELD_SUFFIX`. What the map adds to that very model, free of the training noise between it
    and a separately trained ablation; a model trained with ``train.semantic_dropout`` learnt both inputs."""
    return [
        dataclasses.replace(
            method,
            name=method.name + WITHHELD_SUFFIX,
            spec=dataclasses.replace(method.spec, zero_semantics=True),
            model=method.model + WITHHELD_SUFFIX,
            label=method.label + WITHHELD_SUFFIX,
        )
        for method in methods
        if method.uses_labels and method.spec is not None
    ]


def map_choice_methods(methods: list[Method], codec: str) -> list[Method]:
    """Every method whose decoder receives a label map again, with its encoder choosing frame by frame
    whether to send it (``eval.map_choice``, :mod:`pipeline.model.map_choice`); curve and identity suffixed
    :data:`CHOSEN_SUFFIX`. A model on decoder-side maps has nothing to choose (its map costs no bits) and
    gets no such curve. The choice codes every frame once more with ``codec``: a machine without it is
    refused in one line, before any work."""
    if not get_codec(codec).is_available():
        raise ConfigError(
            f"eval.map_choice prices a label map on {codec}'s own slope, one more round trip per frame and "
            f"quality, but {codec} is not available on this machine"
        )
    return [
        dataclasses.replace(
            method,
            name=method.name + CHOSEN_SUFFIX,
            model=method.model + CHOSEN_SUFFIX,
            label=method.label + CHOSEN_SUFFIX,
            map_choice=True,
        )
        for method in methods
        if method.uses_labels and method.spec is not None and method.spec.trained_label_source != "decoder"
    ]


def reference_methods(names: list[str], ladders: dict[str, list[int]], codec: str) -> list[Method]:
    """One method per reference codec of ``names`` and quality of its ladder (``eval.reference_qualities``),
    in order of rising quality. The evaluated ``codec`` itself and codecs this machine lacks are refused in
    one line, before any work."""
    methods = []
    for name in names:
        if name == codec:
            raise ConfigError(f"eval.reference_codecs holds {name}, the evaluated codec (loader.codec)")
        try:
            encoder = get_codec(name, single_thread=True)
        except (ValueError, CodecUnavailable) as err:
            raise ConfigError(f"eval.reference_codecs: codec {name!r}: {err}") from None
        ladder = sorted(ladders[name])
        methods += [Method(name=name, quality=q, model=name, label=name, encoder=encoder) for q in ladder]
    return methods


def encode_reference(method: Method, sample: EvalSample) -> tuple[int, CodecResult]:
    """A reference codec's quality and its round trip of ``sample``'s original at that quality."""
    if method.encoder is None or method.quality is None:
        raise ValueError(f"{method.name} is not a reference codec's point")
    return method.quality, method.encoder.roundtrip(sample.image, method.quality)


class Reconstruction(NamedTuple):
    """A method's image of a sample at a quality, its rate besides the label map (bpp), the correction scale
    its encoder sent (``code / 128``; ``None``: the method sends none) and, for a ``map_choice`` method,
    whether its encoder sent the map."""

    image: np.ndarray
    bpp: float
    scale: float | None = None
    map_sent: bool | None = None  # a map_choice method's choice; None: no choice made


def reconstruct(method: Method, sample: EvalSample, quality: int) -> Reconstruction:
    """``method``'s image of ``sample`` at ``quality``: the codec's decoded image at the codec's rate, or the
    generator's enhancement of it as its decoder outputs it (:func:`pipeline.model.inference.decoder_output`,
    on the generator's device, with the scale or gains its encoder sends; their bits are in the rate)."""
    decoded = sample.decoded[quality]
    if method.generator is None or method.spec is None:
        return Reconstruction(decoded, sample.bpp[quality])
    label = sample.label_at(quality)
    made = decoder_output(
        method.generator, method.spec, sample.image, decoded, label, sample.instance, quality
    )
    pixels = decoded.shape[0] * decoded.shape[1]
    rate = sample.bpp[quality] + side_bits(method.spec) / pixels
    return Reconstruction(made.image, rate, None if made.scale is None else made.scale / SCALE_UNIT)


class MapChooser:
    """The encoder's choice of sending the map, for the methods of :func:`map_choice_methods`: the codec's
    slope on a sample at a quality is measured once (one round trip of the evaluated codec) and shared by
    every method."""

    def __init__(self, codec: str, decode_options: dict[str, Any] | None = None) -> None:
        self.codec = get_codec(codec, single_thread=True, **(decode_options or {}))
        self._slopes: dict[tuple[str, int], float] = {}

    def slope(self, sample: EvalSample, quality: int) -> float:
        key = (sample.key, quality)
        if key not in self._slopes:
            decoded = sample.decoded[quality]
            bits = sample.bpp[quality] * decoded.shape[0] * decoded.shape[1]
            self._slopes[key] = codec_slope(self.codec, sample.image, quality, decoded, bits)
        return self._slopes[key]

    def __call__(
        self,
        method: Method,
        sample: EvalSample,
        quality: int,
        label_bpp: float,
        rebuild: Callable[[Method], Reconstruction],
    ) -> tuple[Reconstruction, float]:
        """What ``method``'s decoder outputs, and its label rate: its reconstruction on the map (which costs
        ``label_bpp``), or the same weights' on zero semantics with no label bits, whichever
        :func:`pipeline.model.map_choice.choose_map` picks; each with the choice's flag bit. ``rebuild`` makes
        a method's reconstruction of this sample at this quality (:func:`reconstruct`, or the caller's copy of
        what it already made for the model's own curve and its withheld map)."""
        assert method.spec is not None  # map_choice methods receive maps
        with_map = rebuild(method)
        blind = dataclasses.replace(method.spec, zero_semantics=True)
        without = rebuild(dataclasses.replace(method, spec=blind))
        pixels = with_map.image.shape[0] * with_map.image.shape[1]
        slope = self.slope(sample, quality)
        choice = choose_map(sample.image, with_map.image, without.image, label_bpp * pixels, slope)
        made, label = (with_map, label_bpp) if choice.sent else (without, 0.0)
        return made._replace(bpp=made.bpp + FLAG_BITS / pixels, map_sent=choice.sent), label


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
