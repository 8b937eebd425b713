"""Enhancing large frames in overlapping tiles, so that memory is bounded by the tile, not the frame.

A frame that fits in one tile goes through :func:`pipeline.model.inference.enhance_image` unchanged, so
its output is exactly evaluation's. A larger frame is cut into tiles of at most ``tile`` pixels per side
that overlap by ``overlap`` pixels; each tile runs through :func:`~pipeline.model.inference.enhance_batch`
and the tiles are blended in the network's float range with weights that ramp linearly across each
overlap (a pixel away from any seam has weight 1 in its one tile), then quantised as ``enhance_image``
does. The encoder of per-part gains (``model.correction_scale: channels``) fits them over the same tiles
(:func:`fit_gains_tiled`), and the decoder passes them to every tile.

Instance norm (pix2pixHD's default) normalises with the statistics of what it sees: run tile by tile, each
tile would be normalised by its own, and the seams and colours drift. So for an instance-norm generator
the frame's statistics are gathered first, layer by layer (one partial pass over the tiles per instance
norm, see :class:`_FrameNorms`), and the output pass normalises every tile with them. What is left is the
receptive field cut at each tile's border, which the overlap absorbs. Memory: one tile's activations,
plus the frame-sized output accumulator.

Tiled output is not bit-exact with untiled output; :data:`TILE_TOLERANCE` is what the tests hold it to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.correction_scale import (
    GainFit,
    check_gain_codes,
    gain_count,
    gains_of,
    scaled,
    sends_gains,
)
from pipeline.model.inference import (
    Decoded,
    decoder_output,
    enhance_batch,
    enhance_image,
    fit_gains,
    fit_region,
    to_network,
)
from pipeline.model.spec import GeneratorSpec

DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 128
# Tiled vs untiled output in uint8 levels: mean absolute difference and 99.9th percentile. Measured
# (tests/test_compress.py) on a 512x256 frame in 256-pixel tiles overlapping by 64, for an instance-norm
# generator whose correction moves the frame by 17 levels on average: 0.080 and 3 (max 10); at a
# correction of 4 levels 0.021 and 1 (max 2); 0.6 and 10 in 128-pixel tiles. Batch norm or no norm:
# at most 1 level anywhere. Without the frame statistics, instance norm was 4.05 and 30 off.
TILE_TOLERANCE = {"mean": 0.15, "p999": 4}


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``size`` with at least ``overlap`` in common."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return sorted(set(starts))


def _ramp(start: int, end: int, size: int, overlap: int) -> np.ndarray:
    """Blend weights along one axis of a tile spanning ``[start, end)`` of ``size``: linear from near 0
    to 1 across ``overlap`` pixels on each side that borders another tile, 1 elsewhere."""
    weight = np.ones(end - start, np.float32)
    ramp = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
    if start > 0:
        weight[:overlap] = np.minimum(weight[:overlap], ramp)
    if end < size:
        weight[-overlap:] = np.minimum(weight[-overlap:], ramp[::-1])
    return weight


def check_tiling(spec: GeneratorSpec, tile: int, overlap: int) -> None:
    """Refuse tile sizes the generator cannot use (one-line ValueError)."""
    stride = 2**spec.n_downsample
    if tile < 2 * stride or tile % stride:
        raise ValueError(
            f"tile size must be a multiple of the generator's stride {stride} and >= {2 * stride}"
        )
    if not 0 < overlap < tile // 2:
        raise ValueError(f"tile overlap must be in 1..{tile // 2 - 1} for tiles of {tile}, got {overlap}")


class _Stop(Exception):
    """Ends a statistics pass at the layer it gathers for: later layers are not needed yet."""


class _FrameNorms:
    """Forward hooks on a generator's instance norms that normalise each tile with the frame's statistics
    instead of its own.

    The statistics are gathered layer by layer: pass ``k`` over the tiles normalises layers ``0..k-1`` with
    the frame statistics gathered before and accumulates layer ``k``'s, weighted by the tile's ``share``
    (its blend weight over the sum of every tile's weight at each pixel, so the shares of all tiles sum to
    1 everywhere, average-pooled to the layer's resolution), then stops.
    """

    def __init__(self, generator: nn.Module) -> None:
        self.norms = [m for m in generator.modules() if isinstance(m, nn.InstanceNorm2d)]
        self.frozen: list[tuple[Tensor, Tensor]] = []
        self.share: Tensor | None = None
        self.sums: list[Tensor] = []
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.norms)]

    @property
    def gathering(self) -> bool:
        return len(self.frozen) < len(self.norms)

    def freeze(self) -> None:
        """Fix the statistics of the layer just gathered (all tiles seen)."""
        total, squares, weight = self.sums
        mean = total / weight
        self.frozen.append((mean.float(), (squares / weight - mean**2).clamp(min=0).float()))
        self.sums = []

    def _hook(self, index: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            x = inputs[0]
            if index == len(self.frozen):
                if self.share is None:
                    raise RuntimeError("tile share not set while gathering instance-norm statistics")
                factor = self.share.shape[-1] // x.shape[-1]
                share = F.avg_pool2d(self.share, factor) if factor > 1 else self.share
                w, xd = share.to(x.device, torch.float64), x.double()
                parts = [(w * xd).sum((0, 2, 3)), (w * xd * xd).sum((0, 2, 3)), w.sum()]
                self.sums = [a + b for a, b in zip(self.sums, parts, strict=True)] if self.sums else parts
                raise _Stop
            mean, var = (t.view(1, -1, 1, 1).to(x) for t in self.frozen[index])
            return (x - mean) / torch.sqrt(var + module.eps)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _Tile(NamedTuple):
    top: int
    bottom: int
    left: int
    right: int
    weight: np.ndarray  # the tile's blend weights

    def crop(self, image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(image[self.top : self.bottom, self.left : self.right])


class _FrameTiles:
    """A large frame's tiles with their blend weights, and (for instance norm) the frame statistics every
    tile is normalised with, gathered on entry (:class:`_FrameNorms`)."""

    def __init__(
        self,
        generator: nn.Module,
        spec: GeneratorSpec,
        decoded: np.ndarray,
        label: np.ndarray,
        quality: int | None,
        tile: int,
        overlap: int,
    ) -> None:
        self.generator, self.spec, self.decoded, self.label, self.quality = (
            generator,
            spec,
            decoded,
            label,
            quality,
        )
        height, width = label.shape
        self.tiles = []
        for top in tile_starts(height, tile, overlap):
            bottom = min(top + tile, height)
            for left in tile_starts(width, tile, overlap):
                right = min(left + tile, width)
                weight = (
                    _ramp(top, bottom, height, overlap)[:, None] * _ramp(left, right, width, overlap)[None, :]
                )
                self.tiles.append(_Tile(top, bottom, left, right, weight))
        self.weights = np.zeros((height, width), np.float32)
        for t in self.tiles:
            self.weights[t.top : t.bottom, t.left : t.right] += t.weight
        self.norms: _FrameNorms | None = None

    def share(self, t: _Tile) -> np.ndarray:
        """The tile's weight over every tile's at each pixel: the shares of all tiles sum to 1."""
        return t.weight / self.weights[t.top : t.bottom, t.left : t.right]

    def inputs(self, t: _Tile) -> tuple[Tensor, Tensor, Tensor | None]:
        """:func:`~pipeline.model.inference.enhance_batch`'s ``label``, ``decoded``, ``edge`` of a tile."""
        lab = torch.from_numpy(t.crop(self.label).astype(np.int64))[None]
        edge = torch.zeros(1, 1, *lab.shape[-2:]) if self.spec.use_instance else None
        return lab, to_network(t.crop(self.decoded)), edge

    def run(self, t: _Tile, gains: Tensor | None = None) -> Tensor:
        lab, dec, edge = self.inputs(t)
        return enhance_batch(self.generator, self.spec, lab, dec, edge, self.quality, gains)[0].clamp(-1, 1)

    def __enter__(self) -> _FrameTiles:
        if self.spec.norm != "instance":
            return self
        self.norms = _FrameNorms(self.generator)
        try:
            stride = 2**self.spec.n_downsample
            while self.norms.gathering:
                for t in self.tiles:
                    h, w = t.weight.shape
                    share = torch.from_numpy(self.share(t))
                    self.norms.share = F.pad(share, (0, -w % stride, 0, -h % stride))[None, None]
                    with contextlib.suppress(_Stop):
                        self.run(t)
                self.norms.freeze()
        except BaseException:
            self.norms.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.norms is not None:
            self.norms.remove()


def enhance_tiled(
    generator: nn.Module,
    spec: GeneratorSpec,
    decoded: np.ndarray,
    label: np.ndarray,
    quality: int | None = None,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    gains: Sequence[int] | None = None,
) -> np.ndarray:
    """Enhance one uint8 ``H x W x 3`` frame with its ``H x W`` label map (coded at ``quality``, which a
    ``quality_input`` model needs), in tiles when it is larger than ``tile`` pixels on a side (see the
    module docstring), with the encoder's ``gains`` codes (``model.correction_scale: channels``); returns
    uint8 ``H x W x 3``."""
    check_tiling(spec, tile, overlap)
    height, width = label.shape
    if height <= tile and width <= tile:
        return enhance_image(generator, spec, decoded, label, quality=quality, gains=gains)
    factors = None if gains is None else gains_of(check_gain_codes(gains, gain_count(spec)))[None]
    total = np.zeros((height, width, 3), np.float32)
    with _FrameTiles(generator, spec, decoded, label, quality, tile, overlap) as frame:
        for t in frame.tiles:
            out = frame.run(t, factors).permute(1, 2, 0).cpu().numpy()
            total[t.top : t.bottom, t.left : t.right] += out * t.weight[..., None]
        blended = torch.from_numpy(total / frame.weights[..., None])
    return blended.clamp(-1, 1).add(1).mul(127.5).round().byte().numpy()


def fit_gains_tiled(
    generator: nn.Module,
    spec: GeneratorSpec,
    original: np.ndarray,
    decoded: np.ndarray,
    label: np.ndarray,
    quality: int | None = None,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
) -> tuple[int, ...]:
    """The gain codes the encoder sends for a frame that :func:`enhance_tiled` decodes: untiled
    :func:`pipeline.model.inference.fit_gains` for a frame within one tile; for a larger one, each tile's
    parts fitted with its share of the overlaps as pixel weights (the blend of the tiles' outputs, up to
    their clipping)."""
    check_tiling(spec, tile, overlap)
    height, width = label.shape
    if height <= tile and width <= tile:
        return fit_gains(generator, spec, original, decoded, label, quality=quality)
    fit = GainFit(gain_count(spec))
    with _FrameTiles(generator, spec, decoded, label, quality, tile, overlap) as frame:
        for t in frame.tiles:
            lab, dec, edge = frame.inputs(t)
            share = torch.from_numpy(frame.share(t))
            fit_region(fit, generator, spec, to_network(t.crop(original)), lab, dec, edge, quality, share)
    return fit.codes()


def decoder_output_tiled(
    generator: nn.Module,
    spec: GeneratorSpec,
    original: np.ndarray,
    decoded: np.ndarray,
    label: np.ndarray,
    quality: int | None = None,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
) -> Decoded:
    """What ``decompress`` writes for a frame in these tiles, and the scale or gains its encoder sends:
    :func:`pipeline.model.inference.decoder_output` (evaluation's, one trunk pass) for a frame within one
    tile. A larger frame runs each tile's trunk twice, once to fit the gains and once to decode: keeping
    every tile's features between the two would hold the whole frame's, which tiling exists to avoid."""
    check_tiling(spec, tile, overlap)
    height, width = label.shape
    if height <= tile and width <= tile:
        return decoder_output(generator, spec, original, decoded, label, quality=quality)
    tiles = {"tile": tile, "overlap": overlap}
    if sends_gains(spec):
        gains = fit_gains_tiled(generator, spec, original, decoded, label, quality, **tiles)
        return Decoded(
            enhance_tiled(generator, spec, decoded, label, quality, gains=gains, **tiles), gains=gains
        )
    enhanced = enhance_tiled(generator, spec, decoded, label, quality, **tiles)
    return Decoded(*scaled(spec, original, decoded, enhanced))
