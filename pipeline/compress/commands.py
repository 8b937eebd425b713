"""``python -m pipeline compress`` and ``decompress``: an image and its label map to one ``.jse`` file and
back, enhanced by the generator the file names (or another given with ``--model``).

Compression codes the image with the codec (every core: the codec's own thread pool) and the label map
losslessly (:class:`~pipeline.data.codecs.LabelCoder`), and records the model reference: a registry URI
is pinned to its version (``models:/name@alias`` -> ``models:/name/3``), and the sha256 of the exported
generator file is kept whatever its origin. Decompression decodes both streams, checks the model against
the reference (a different sha256 is refused unless ``--force``) and runs the one inference function
(:func:`pipeline.model.inference.enhance_image`), in overlapping tiles for frames larger than a tile
(:mod:`pipeline.compress.tiling`), on the GPU when there is one. A generator with
``model.correction_scale: frame`` runs at compression too: the file then carries the encoder's scale of its
correction (one byte, :mod:`pipeline.model.correction_scale`), which decompression applies; with
``channels`` the gains of its correction head's parts (``ngf + 1`` bytes, format version 5, fitted over the
tiles decompression uses), which decompression runs the generator with.

``--send-map rd`` (with ``--model``): the encoder enhances its decoded image with the label map and on zero
semantics, and sends the map only where the squared error it removes is worth more than its bits spent on
the codec (:mod:`pipeline.model.map_choice`); a file without its map (format version 4) is decoded on zero
semantics. ``always`` (the default, the paper's) sends every map.

Folder mode: ``compress DIR --label LABEL_DIR -o OUT_DIR`` pairs images and label maps as the folder
dataset does (same relative path with ``.png``, else the one label map with the image's stem) and writes
``OUT_DIR/<relative path>.jse``; ``decompress DIR -o OUT_DIR`` writes a PNG per ``.jse``.

Label source ``decoder`` (``--label-source decoder --segmenter FILE``; the default for a generator trained
on decoder maps): no label map is read or coded; the file records the segmenter's sha256 instead, and
decompression predicts the map from the decoded image with that segmenter (``--segmenter FILE``, checked
against the sha256), so the rate holds 0 label bits. Label source ``encoder`` (``--label-source encoder
--segmenter FILE``): the segmenter predicts the map from the original image at compression, and the map is
coded like a ground-truth one; the decoder receives a coded map either way, so a file of coded maps decodes
with a generator trained on ``gt`` or ``encoder`` maps. A generator trained on another label source than
the compression uses is refused in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.atomic import write_atomic
from pipeline.compress.container import (
    NO_LABEL_CODER,
    Container,
    ContainerError,
    ModelRef,
    pack,
    read_container,
)
from pipeline.compress.tiling import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    check_tiling,
    decoder_output_tiled,
    enhance_tiled,
)
from pipeline.model.correction_scale import apply_code, gain_count, sends_gains, sends_scale
from pipeline.model.inference import Decoded
from pipeline.model.inputs import class_map
from pipeline.model.map_choice import choose_map, codec_slope

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.model.spec import GeneratorSpec
    from pipeline.segment.judge import LoadedSegmenter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
DEFAULT_CODEC = "hevc"
DEFAULT_QUALITY = 42
LABEL_SOURCES = ("gt", "decoder", "encoder")
SEND_MAP = ("always", "rd")  # every label map, or only where it pays (pipeline.model.map_choice)
NO_LABEL_MAP = {"label_coder": NO_LABEL_CODER, "label_downsample": 1, "label_bitstream": b""}  # no stream


class CompressError(ValueError):
    """An expected failure of compress/decompress: bad input, a refused model, a corrupt bitstream."""


@dataclass
class Model:
    """A loaded generator and the reference a container records for it."""

    origin: str  # as the user gave it
    generator: nn.Module
    spec: GeneratorSpec
    ref: ModelRef


def load_model(origin: str, device: torch.device | str = "cpu", tracking_uri: str = "") -> Model:
    """The generator behind a file path or a ``models:/`` / ``runs:/`` URI, with its pinned reference."""
    from pipeline import tracking
    from pipeline.model.export import load_generator, weights_sha256

    try:
        pinned = tracking.pin_model_uri(origin, tracking_uri=tracking_uri)
        with tempfile.TemporaryDirectory(prefix="jpdse-model-") as download:
            path = tracking.resolve_model_uri(pinned, tracking_uri=tracking_uri, dst_dir=download)
            sha = weights_sha256(path)
            generator, spec = load_generator(path, device=device)
    except (FileNotFoundError, ValueError, ConnectionError) as err:  # ConnectionError: store unreachable
        raise CompressError(f"model {origin}: {err}") from None
    except Exception as err:  # MLflow's errors (unknown model, unreachable store) without a traceback
        if type(err).__module__.startswith("mlflow"):
            raise CompressError(f"model {origin}: {str(err).splitlines()[0]}") from None
        raise
    name, version = "", ""
    if pinned.startswith("models:/"):
        name, _, version = pinned.removeprefix("models:/").strip("/").partition("/")
        if not version.isdigit():
            name, version = "", ""
    return Model(origin, generator, spec, ModelRef(name, version, sha))


def _check_model_for(model: Model, codec: str, quality: int, what: str) -> list[str]:
    """Why ``model`` does not fit ``codec`` at ``quality`` (empty: it fits)."""
    spec, problems = model.spec, []
    if spec.codec is not None and spec.codec != codec:
        problems.append(f"it was trained for codec {spec.codec!r}, {what} is {codec!r}")
    elif spec.trained_qualities and quality not in spec.trained_qualities:
        trained = "/".join(f"q{q}" for q in spec.trained_qualities)
        problems.append(f"it was trained at {trained}, {what} is q{quality}")
    if spec.use_instance:
        problems.append("it needs instance maps, which a .jse file does not carry")
    return problems


def _check_label_source(model: Model, source: str, segmenter: str, what: str, coded: bool = False) -> None:
    """Refuse ``model`` unless it was trained on ``source`` maps (and, where its spec records one, by the
    segmenter of sha256 ``segmenter``). ``coded``: ``source`` is a file's coded map, which may hold ground
    truth or an encoder's prediction, so a model trained on either fits."""
    trained = model.spec.trained_label_source
    if model.spec.zero_semantics:
        return
    if coded and source != "decoder" and trained != "decoder":
        return
    if trained != source:
        raise CompressError(
            f"model {model.origin} was trained on {trained} label maps, but {what} has {source} label maps"
        )
    recorded = model.spec.segmenter
    if source != "gt" and recorded and segmenter and recorded != segmenter:
        raise CompressError(
            f"model {model.origin} was trained on the maps of segmenter {recorded[:12]}, "
            f"{what} names segmenter {segmenter[:12]}"
        )


def open_label_segmenter(path: str) -> LoadedSegmenter:
    """The segmenter file that predicts the label maps of label source decoder or encoder (one
    :class:`CompressError` if unusable)."""
    from pipeline.segment.base import SegmenterError
    from pipeline.segment.judge import open_segmenter

    if not path:
        raise CompressError(
            "label source decoder or encoder needs --segmenter FILE (the segmenter that predicts the maps)"
        )
    try:
        return open_segmenter(path)
    except SegmenterError as err:
        raise CompressError(f"segmenter: {err}") from None


def _check_labels(label: np.ndarray, model: Model) -> None:
    top = int(label.max())
    if top >= model.spec.label_nc:
        raise CompressError(f"label id {top} is outside model {model.origin}'s {model.spec.label_nc} classes")


def read_image(path: Path) -> np.ndarray:
    """An RGB ``uint8`` image file (8-bit; alpha dropped)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise CompressError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_label(path: Path, height: int, width: int) -> np.ndarray:
    """A single-channel label-id map at the image's size; a map 1/k the image's size on both sides is
    up-sampled with nearest neighbour (as the dataset sources do)."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise CompressError(f"cannot read label map {path}")
    if raw.ndim != 2:
        raise CompressError(f"label map {path} must be single-channel, got shape {raw.shape}")
    if raw.dtype != np.uint8:
        if raw.dtype != np.uint16 or int(raw.max()) > 255:
            raise CompressError(f"label map {path} must hold 8-bit ids (0..255)")
        raw = raw.astype(np.uint8)
    lh, lw = raw.shape
    if (lh, lw) == (height, width):
        return raw
    if width % lw or height % lh or width // lw != height // lh:
        raise CompressError(
            f"label map {path} is {lw}x{lh}: not the image size {width}x{height} divided by a whole number"
        )
    return cv2.resize(raw, (width, height), interpolation=cv2.INTER_NEAREST)


def compress_image(
    image_path: Path,
    label_path: Path | None,
    out: Path,
    *,
    codec: str,
    quality: int,
    label_coder: str = "auto",
    label_downsample: int = 1,
    model: Model | None = None,
    segmenter: LoadedSegmenter | None = None,
    encoder: LoadedSegmenter | None = None,
    send_map: str = "always",
) -> Container:
    """Compress one image and its label map to ``out`` (written atomically); returns the container.

    With ``segmenter`` (label source ``decoder``) no label map is read (``label_path`` is ignored): the
    container records the segmenter's sha256 and carries no label stream. With ``encoder`` (label source
    ``encoder``) the coded map is that segmenter's prediction on the image, not ``label_path``. For a
    ``model`` that scales its correction per frame (``model.correction_scale: frame`` or ``channels``) the
    encoder decodes its own streams, enhances them as ``decompress`` does (default tiles) and records the
    scale code or the gain codes. With
    ``send_map="rd"`` the encoder also enhances them on zero semantics and keeps the label map only where it
    pays (:func:`pipeline.model.map_choice.choose_map`; the file then has no label map)."""
    from pipeline.data.codecs import LabelCoder, get_codec

    choosing = _choosing(send_map, model, segmenter)
    rgb = read_image(image_path)
    height, width = rgb.shape[:2]
    coder_of_codec = get_codec(codec, **(model.spec.decode_options(codec) if model is not None else {}))
    codec_bitstream = coder_of_codec.encode(rgb, quality)
    received = None  # the label map the decoder will have (for the correction scale)
    if segmenter is not None:
        coded = NO_LABEL_MAP
    else:
        if encoder is not None:
            label = encoder.label_ids(rgb)
        elif label_path is None:
            raise CompressError(f"{image_path}: label source gt needs a label map (--label)")
        else:
            label = read_label(label_path, height, width)
        if model is not None:
            _check_labels(label, model)
            if model.spec.label_classes is not None:  # its decoder needs the classes only
                label = class_map(label, model.spec.label_classes)
        coder = LabelCoder(label_coder, label_downsample)
        coded = {
            "label_coder": coder.method,
            "label_downsample": coder.downsample,
            "label_bitstream": coder.encode(label),
        }
        received = coder.reconstruct(label)
    scale, gains = None, None
    if model is not None and (sends_scale(model.spec) or sends_gains(model.spec) or choosing):
        decoded = coder_of_codec.decode(codec_bitstream)
        if segmenter is not None:
            received = segmenter.label_ids(decoded)
        assert received is not None  # a coded map, or the segmenter's
        enhanced = _decoder_output(model, rgb, decoded, received, quality)
        if choosing:
            blind = dataclasses.replace(model, spec=dataclasses.replace(model.spec, zero_semantics=True))
            without = _decoder_output(blind, rgb, decoded, np.zeros_like(received), quality)
            slope = codec_slope(coder_of_codec, rgb, quality, decoded, 8 * len(codec_bitstream))
            map_bits = 8 * len(coded["label_bitstream"])
            if not choose_map(rgb, enhanced.image, without.image, map_bits, slope).sent:
                enhanced = without
                coded = NO_LABEL_MAP
        scale, gains = enhanced.scale, enhanced.gains
    container = Container(
        codec=codec,
        quality=quality,
        width=width,
        height=height,
        codec_bitstream=codec_bitstream,
        model=model.ref if model is not None else ModelRef(),
        segmenter=segmenter.sha256 if segmenter is not None else "",
        correction_scale=scale,
        correction_gains=gains,
        **coded,
    )
    write_atomic(out, pack(container))
    return container


def _choosing(send_map: str, model: Model | None, segmenter: LoadedSegmenter | None) -> bool:
    """Whether the encoder chooses frame by frame to send the map (``send_map="rd"``), refused in one line
    where there is nothing to choose. A zero-semantics model is no exception: its map removes nothing, so
    the rule never sends it."""
    if send_map not in SEND_MAP:
        raise CompressError(f"--send-map must be one of {', '.join(SEND_MAP)}, got {send_map!r}")
    if send_map == "always":
        return False
    if model is None:
        raise CompressError(
            "--send-map rd needs --model: the encoder enhances its image with and without the map"
        )
    if segmenter is not None:
        raise CompressError(
            "--send-map rd prices a coded label map; maps predicted at the decoder cost no bits"
        )
    return True


def _decoder_output(
    model: Model, original: np.ndarray, decoded: np.ndarray, label: np.ndarray, quality: int
) -> Decoded:
    """What ``decompress`` writes for this frame (default tiles), with the correction scale or gains the
    encoder then sends."""
    return decoder_output_tiled(model.generator, model.spec, original, decoded, label, quality)


def decode_container(
    container: Container, segmenter: LoadedSegmenter | None = None, options: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The codec's decoded RGB image and the label map of a container, both checked against its size.

    ``options``: the codec's decode options (default: its defaults), e.g. those of the pictures a generator
    was trained on (:meth:`~pipeline.model.spec.GeneratorSpec.decode_options`). A container of decoder-side
    maps: the map is ``segmenter``'s prediction on the decoded image (None without a segmenter). The
    bitstreams are untrusted: whatever a decoder raises on them is one :class:`CompressError`.
    """
    from pipeline.data.codecs import LabelCoder, get_codec

    try:
        codec = get_codec(container.codec, **(options or {}))
        lo, hi = codec.quality_range
        if not lo <= container.quality <= hi:
            raise CompressError(
                f"quality {container.quality} is outside {container.codec}'s range {lo}..{hi}"
            )
        carried = not (container.segmenter or container.map_withheld)
        coder = LabelCoder(container.label_coder, container.label_downsample) if carried else None
    except ValueError as err:
        raise CompressError(str(err)) from None
    size = (container.width, container.height)
    try:
        codec.check_size(container.codec_bitstream, container.width, container.height)
        rgb = codec.decode(container.codec_bitstream)
    except Exception as err:  # a corrupt stream may fail anywhere in a decoder: one line, no traceback
        raise CompressError(f"corrupt {container.codec} bitstream: {str(err).splitlines()[0]}") from None
    if rgb.shape[:2] != (container.height, container.width):
        raise CompressError(
            f"the {container.codec} bitstream decodes to {rgb.shape[1]}x{rgb.shape[0]}, not {size}"
        )
    if coder is None:
        if segmenter is None:
            return rgb, None
        if segmenter.sha256 != container.segmenter:
            raise CompressError(
                f"segmenter {segmenter.path} (sha256 {segmenter.sha256[:12]}) is not the one the file "
                f"records ({container.segmenter[:12]})"
            )
        return rgb, segmenter.label_ids(rgb)
    try:
        coder.check_size(container.label_bitstream, size)
        label = coder.decode(container.label_bitstream, size)
    except Exception as err:
        raise CompressError(f"corrupt label bitstream: {str(err).splitlines()[0]}") from None
    return rgb, label


def write_png(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise CompressError(f"OpenCV could not encode {path}")
    write_atomic(path, buf.tobytes())


class ModelCache:
    """Models loaded once per command, by what names them."""

    def __init__(self, device: torch.device | str, tracking_uri: str) -> None:
        self.device, self.tracking_uri = device, tracking_uri
        self._models: dict[str, Model] = {}

    def get(self, origin: str) -> Model:
        if origin not in self._models:
            self._models[origin] = load_model(origin, self.device, self.tracking_uri)
        return self._models[origin]


def decompress_file(
    path: Path,
    out: Path,
    *,
    models: ModelCache | None,
    model: str = "",
    force: bool = False,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    segmenter: str = "",
) -> tuple[Container, Model | None]:
    """Decompress ``path`` to the PNG ``out``; ``models`` None: the codec's plain output (no generator).

    ``model`` overrides the container's reference; a model whose sha256 differs from the recorded one,
    or that does not fit the container's codec and quality, is refused unless ``force``; a model trained on
    another label source is always refused. ``segmenter``: the segmenter file that predicts the label map
    of a container of decoder-side maps (its sha256 must be the recorded one). A container whose encoder
    withheld the map is enhanced on zero semantics.
    """
    container = read_container(path)
    if models is None:
        rgb, _ = decode_container(container)
        write_png(out, rgb)
        return container, None
    predictor = open_label_segmenter(segmenter) if container.segmenter else None
    origin = model or container.model.uri
    if not origin:
        named = container.model.describe()
        raise CompressError(
            f"{path} does not name a registry model ({named}); give --model FILE or --no-enhance"
        )
    used = models.get(origin)
    # the codec's picture as the generator was trained on it (hevc's chroma, say), not the codec's default
    rgb, label = decode_container(container, predictor, used.spec.decode_options(container.codec))
    spec = used.spec
    if container.map_withheld:  # the same weights on zero semantics: any label source fits
        spec = dataclasses.replace(spec, zero_semantics=True)
        label = np.zeros(rgb.shape[:2], np.uint8)
    else:
        _check_label_source(used, container.label_source, container.segmenter, "the file", coded=True)
    recorded = container.model.sha256
    problems = []
    if recorded and used.ref.sha256 != recorded:
        problems.append(f"its sha256 {used.ref.sha256[:12]} is not the recorded {recorded[:12]}")
    problems += _check_model_for(used, container.codec, container.quality, "the file")
    if problems and not force:
        raise CompressError(
            f"{path}: model {origin} is refused: {'; '.join(problems)} (--force to use it anyway)"
        )
    assert label is not None  # decoded, predicted or zero
    _check_labels(label, used)
    check_tiling(spec, tile, overlap)
    gains = container.correction_gains
    if gains is not None and len(gains) != gain_count(spec):
        wanted = f"{gain_count(spec)} correction gains" if sends_gains(spec) else "no correction gains"
        raise CompressError(f"{path}: carries {len(gains)} correction gains; model {origin} takes {wanted}")
    enhanced = enhance_tiled(
        used.generator, spec, rgb, label, container.quality, tile=tile, overlap=overlap, gains=gains
    )
    code = container.correction_scale
    write_png(out, enhanced if code is None else apply_code(rgb, enhanced, code))
    return container, used


def _rate_line(container: Container) -> str:
    """The bits of each part; a container of decoder-side maps names its segmenter in place of label bits."""
    bpp = container.bpp()
    parts = {
        "codec": len(container.codec_bitstream),
        "label": len(container.label_bitstream),
        "header": container.header_bytes(),
    }
    text = " + ".join(f"{k} {bpp[k]:.4f} ({n} B)" for k, n in parts.items())
    source = ""
    if container.segmenter:
        source = f", label map predicted at the decoder (segmenter {container.segmenter[:12]})"
    elif container.map_withheld:
        source = ", no label map (withheld by the encoder: decoded on zero semantics)"
    return f"{text} = {bpp['total']:.4f} bpp ({sum(parts.values())} B){source}"


def _images(images: Path) -> list[tuple[Path, None, Path]]:
    """``(image, None, relative path)`` of each image under ``images`` (no label maps: decoder source)."""
    found = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise CompressError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {images}")
    return [(image, None, image.relative_to(images)) for image in found]


def _pairs(images: Path, labels: Path) -> list[tuple[Path, Path | None, Path]]:
    """``(image, label, relative path)`` of each image under ``images`` and its label map under ``labels``."""
    if not labels.is_dir():
        raise CompressError(f"folder mode: --label must be a folder, got {labels}")
    found = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(labels.rglob("*.png")):
        by_stem.setdefault(p.stem, []).append(p)
    out, missing = [], []
    for image in found:
        rel = image.relative_to(images)
        same_place = labels / rel.with_suffix(".png")
        candidates = [same_place] if same_place.is_file() else by_stem.get(image.stem, [])
        if len(candidates) == 1:
            out.append((image, candidates[0], rel))
        else:
            missing.append(str(rel))
    if missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise CompressError(
            f"no single label map (by stem) under {labels} for {len(missing)} image(s): {listed}"
        )
    if not out:
        raise CompressError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {images}")
    return out


def _device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compress_command(args: argparse.Namespace) -> int:
    """``python -m pipeline compress``."""
    src, out = Path(args.input), Path(args.output)
    model = load_model(args.model, "cpu", args.tracking_uri) if args.model else None
    source = args.label_source or (model.spec.trained_label_source if model is not None else "gt")
    if source not in LABEL_SOURCES:
        raise CompressError(f"--label-source must be one of {', '.join(LABEL_SOURCES)}, got {source!r}")
    predictor = open_label_segmenter(args.segmenter) if source != "gt" else None
    segmenter, encoder = (predictor, None) if source == "decoder" else (None, predictor)
    if predictor is None and not args.label:
        raise CompressError("label source gt needs --label (a label map, or a folder of them)")
    label = Path(args.label) if predictor is None else None
    if model is not None:
        _check_label_source(model, source, predictor.sha256 if predictor else "", "the compression")
    codec = args.codec or (model.spec.codec if model and model.spec.codec else DEFAULT_CODEC)
    quality = args.quality
    if quality is None:
        quality = model.spec.quality if model and model.spec.quality is not None else DEFAULT_QUALITY
    if model is not None:
        problems = _check_model_for(model, codec, quality, "the compression")
        if problems:
            raise CompressError(f"model {args.model} does not fit: {'; '.join(problems)}")
    options = {
        "codec": codec,
        "quality": quality,
        "label_coder": args.label_coder,
        "label_downsample": args.label_downsample,
        "model": model,
        "segmenter": segmenter,
        "encoder": encoder,
        "send_map": args.send_map,
    }
    if not src.exists():
        raise CompressError(f"input not found: {src}")
    if src.is_file():
        container = compress_image(src, label, out, **options)
        print(f"{out}  {container.width}x{container.height} {codec} q{quality}: {_rate_line(container)}")
        return 0
    jobs = _pairs(src, label) if label is not None else _images(src)
    bits = dict.fromkeys(("codec", "label", "header", "total"), 0.0)
    pixels = 0
    for image, label_path, rel in tqdm(jobs, desc="compress", unit="image", file=sys.stderr):
        target = out / rel.with_suffix(".jse")
        container = compress_image(image, label_path, target, **options)
        tqdm.write(f"{target}  {container.width}x{container.height}: {_rate_line(container)}")
        for k, v in container.bpp().items():
            bits[k] += v * container.pixels
        pixels += container.pixels
    summary = ", ".join(f"{k} {v / pixels:.4f}" for k, v in bits.items())
    print(f"{len(jobs)} image(s) -> {out}  {codec} q{quality}, bpp over all pixels: {summary}")
    return 0


def decompress_command(args: argparse.Namespace) -> int:
    """``python -m pipeline decompress``."""
    src, out = Path(args.input), Path(args.output)
    if not src.exists():
        raise CompressError(f"input not found: {src}")
    models = None if args.no_enhance else ModelCache(_device(), args.tracking_uri)
    options = {
        "models": models,
        "model": args.model,
        "force": args.force,
        "tile": args.tile,
        "overlap": args.overlap,
        "segmenter": args.segmenter,
    }
    if src.is_file():
        container, used = decompress_file(src, out, **options)
        print(f"{out}  {_described(container, used)}")
        return 0
    jobs = sorted(p for p in src.rglob("*.jse") if p.is_file())
    if not jobs:
        raise CompressError(f"no .jse files under {src}")
    for path in tqdm(jobs, desc="decompress", unit="image", file=sys.stderr):
        target = out / path.relative_to(src).with_suffix(".png")
        container, used = decompress_file(path, target, **options)
        tqdm.write(f"{target}  {_described(container, used)}")
    print(f"{len(jobs)} file(s) -> {out}")
    return 0


def _described(container: Container, used: Model | None) -> str:
    how = (
        "plain codec output"
        if used is None
        else f"enhanced by {used.ref.uri or used.origin} ({used.ref.describe()})"
    )
    return (
        f"{container.width}x{container.height} {container.codec} q{container.quality}, "
        f"{container.bpp()['total']:.4f} bpp, {how}"
    )


def add_arguments(compress: argparse.ArgumentParser, decompress: argparse.ArgumentParser) -> None:
    """The two commands' arguments (the CLI owns the sub-parsers)."""
    compress.add_argument("input", help="image file, or a folder of images")
    compress.add_argument(
        "--label",
        default="",
        help="label-id map (PNG), or a folder of them (matched by stem); gt source only",
    )
    compress.add_argument(
        "--label-source",
        default="",
        help="gt (code --label), decoder (predicted at the decoder by --segmenter: 0 label bits) or "
        "encoder (predicted from the image by --segmenter, coded); default: the model's, else gt",
    )
    compress.add_argument("-o", "--output", required=True, help="the .jse file, or a folder in folder mode")
    compress.add_argument(
        "--codec", default="", help=f"codec name (default: the model's, else {DEFAULT_CODEC})"
    )
    compress.add_argument(
        "--quality",
        type=int,
        default=None,
        help=f"on the codec's scale (default: the model's, else {DEFAULT_QUALITY})",
    )
    compress.add_argument("--label-coder", default="auto", help="jxl, webp, png or auto (the best available)")
    compress.add_argument("--label-downsample", type=int, default=1, help="code the label map on a 1/k grid")
    compress.add_argument("--model", default="", help="the generator to record: models:/name@alias or a file")
    compress.add_argument(
        "--send-map",
        choices=SEND_MAP,
        default="always",
        help="always: every label map; rd: only where it removes more squared error than its bits would "
        "on the codec (needs --model; frames without their map are decoded on zero semantics)",
    )
    decompress.add_argument("input", help="a .jse file, or a folder of them")
    decompress.add_argument("-o", "--output", required=True, help="the PNG file, or a folder in folder mode")
    decompress.add_argument(
        "--model", default="", help="models:/name@alias or a generator file (default: the recorded one)"
    )
    decompress.add_argument("--no-enhance", action="store_true", help="write the codec's plain output")
    decompress.add_argument(
        "--force", action="store_true", help="use a model that does not match the recorded one"
    )
    decompress.add_argument("--tile", type=int, default=DEFAULT_TILE, help="largest tile side in pixels")
    decompress.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="tile overlap in pixels")
    for p in (compress, decompress):
        p.add_argument("--segmenter", default="", help="the segmenter file of label source decoder/encoder")
        p.add_argument(
            "--tracking-uri", default="", help="MLflow store (default: $MLFLOW_TRACKING_URI, else local)"
        )


EXPECTED_ERRORS = (CompressError, ContainerError)


def run(command: str, args: argparse.Namespace) -> int:
    """Run ``compress`` or ``decompress``; expected failures are one line on stderr and exit 2."""
    from pipeline.data.codecs import CodecError, CodecUnavailable

    try:
        return compress_command(args) if command == "compress" else decompress_command(args)
    except (*EXPECTED_ERRORS, CodecError, CodecUnavailable, ValueError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
