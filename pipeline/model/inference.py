"""Running an exported generator: the one rule set, used by evaluation, validation (and so tuning) and the
registry's pyfunc.

There is one path because a model is only what it does: the R-PD evaluation, the validation that selects
a checkpoint or ranks a sweep's trials, and the registered model a user calls must enhance a frame alike,
or the numbers that chose a model would describe another one. The rules, all from the
:class:`~pipeline.model.spec.GeneratorSpec`:

* the input is ``one-hot(label) ⊕ edge ⊕ quality ⊕ decoded``
  (:func:`pipeline.model.inputs.generator_input`; the quality channel for a ``quality_input`` model only,
  which needs the quality the frame was coded at); the decoded image is zeroed unless
  ``spec.visual_input`` (phase 1's prior never saw it), the semantic channels are zeroed for a
  ``zero_semantics`` model;
* a frame whose size is not a multiple of the generator's stride (``2 ** n_downsample``) is padded at the
  bottom and right, the decoded image by reflection (by replication when the padding is wider than the
  image), label and edge maps by replication, and the output is cropped back;
* the generator runs with ``synthesis=spec.uses_synthesis`` (phase 1 draws with the synthesis head,
  later phases output through the correction head);
* with ``spec.self_ensemble`` ``hflip`` it runs on the frame and on its mirror image, and the output is the
  mean of the two outputs, the mirror's mirrored back (the encoder fits its gains to the mean of the two
  passes' correction parts). A model whose training mirrors its crops (``loader.flip``) sees both views
  alike, and its two outputs err differently; their mean is a steadier estimate, at twice the decoding
  compute.

Two entry points: :func:`enhance_batch` for tensors or arrays in the network's range ([-1, 1]), and
:func:`enhance_image` for one uint8 RGB frame with its label (and instance) map. :func:`decoder_output`
adds the encoder's side of ``model.correction_scale`` (it holds the original): the frame's scale, or the
gains of the correction head's parts (:func:`fit_gains`, :func:`fit_region`), and the image the decoder
makes with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.model.correction_scale import (
    GainFit,
    check_gain_codes,
    gain_count,
    gains_of,
    scaled,
    sends_gains,
)
from pipeline.model.inputs import Qualities, edge_map, generator_input
from pipeline.model.spec import GeneratorSpec


def _padded(x: Tensor, height: int, width: int, reflect: bool) -> Tensor:
    """``x`` (``... x h x w``) padded at the bottom and right to ``height x width``; any dtype."""
    rows = _pad_index(x.shape[-2], height, reflect, x.device)
    cols = _pad_index(x.shape[-1], width, reflect, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _pad_index(size: int, padded: int, reflect: bool, device: torch.device) -> Tensor:
    index = torch.arange(padded, device=device)
    if reflect:
        return torch.where(index < size, index, 2 * (size - 1) - index)
    return index.clamp(max=size - 1)


def _network_input(
    generator: nn.Module,
    spec: GeneratorSpec,
    label: Tensor | np.ndarray,
    decoded: Tensor | np.ndarray,
    edge: Tensor | np.ndarray | None,
    quality: Qualities | None,
) -> Tensor:
    """The generator's input for a batch, padded to its stride (see the module docstring)."""
    level = spec.quality_channel(quality)
    device = next(generator.parameters()).device
    label = torch.as_tensor(label)
    decoded = torch.as_tensor(decoded, dtype=torch.float32).to(device)
    if edge is not None:
        edge = torch.as_tensor(edge, dtype=torch.float32).to(device)
    height, width = label.shape[-2:]
    factor = 2**spec.n_downsample
    padded_h, padded_w = height + -height % factor, width + -width % factor
    if (padded_h, padded_w) != (height, width):
        reflect = padded_h < 2 * height and padded_w < 2 * width
        decoded = _padded(decoded, padded_h, padded_w, reflect)
        label = _padded(label, padded_h, padded_w, reflect=False)
        edge = _padded(edge, padded_h, padded_w, reflect=False) if edge is not None else None
    return generator_input(
        label,
        edge if spec.use_instance else None,
        decoded,
        label_nc=spec.label_nc,
        label_classes=spec.label_classes,
        use_instance=spec.use_instance,
        zero_semantics=spec.zero_semantics,
        visual_input=spec.visual_input,
        quality=level,
    )


def _views(spec: GeneratorSpec, x: Tensor) -> list[Tensor]:
    """The inputs the generator runs on for input ``x``: ``x``, and its mirror image with ``hflip``."""
    return [x, x.flip(-1)] if spec.self_ensemble == "hflip" else [x]


def _merged(outputs: list[Tensor]) -> Tensor:
    """The mean of the outputs of :func:`_views`' inputs, each mirror's output mirrored back."""
    if len(outputs) == 1:
        return outputs[0]
    return (outputs[0] + sum(out.flip(-1) for out in outputs[1:])) / len(outputs)


def enhance_batch(
    generator: nn.Module,
    spec: GeneratorSpec,
    label: Tensor | np.ndarray,
    decoded: Tensor | np.ndarray,
    edge: Tensor | np.ndarray | None = None,
    quality: Qualities | None = None,
    gains: Tensor | None = None,
) -> Tensor:
    """Run ``generator`` (described by ``spec``) on a batch; returns ``B x 3 x H x W`` float32 in [-1, 1]
    on the generator's device.

    ``label``: int ``B x H x W`` ids in ``[0, label_nc)`` (checked when given on the CPU); ``decoded``:
    ``B x 3 x H x W`` in [-1, 1]; ``edge``: ``B x 1 x H x W``, required when ``spec.use_instance``;
    ``quality``: the codec quality the frames were coded at (one, or one per frame), required when
    ``spec.quality_input``; ``gains``: ``B x (ngf + 1)``, the encoder's gains of the correction head's parts
    (``model.correction_scale: channels``, :func:`pipeline.model.correction_scale.gains_of`).
    """
    height, width = torch.as_tensor(label).shape[-2:]
    with torch.no_grad():
        views = _views(spec, _network_input(generator, spec, label, decoded, edge, quality))
        gained = {} if gains is None else {"gains": gains}
        outputs = [generator(v, synthesis=spec.uses_synthesis, **gained) for v in views]
        return _merged(outputs)[..., :height, :width]


def fit_region(
    fit: GainFit,
    generator: nn.Module,
    spec: GeneratorSpec,
    original: Tensor,
    label: Tensor,
    decoded: Tensor,
    edge: Tensor | None = None,
    quality: int | None = None,
    weight: Tensor | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Add one region's least-squares equations to the encoder's ``fit`` of a ``correction_scale: channels``
    generator's gains: ``original``, ``decoded`` ``1 x 3 x H x W`` in the network's range, ``label``,
    ``edge``, ``quality`` as :func:`enhance_batch`'s, ``weight`` ``H x W`` per pixel. Returns each pass's
    generator input and trunk features (padded to the stride; two passes with ``hflip``), from which
    ``Generator.corrected`` makes each pass's output with the fitted gains without running the trunk
    again (the decoder's output is their :func:`_merged` mean)."""
    height, width = label.shape[-2:]
    with torch.no_grad():
        views = _views(spec, _network_input(generator, spec, label, decoded, edge, quality))
        passes = [(v, generator.trunk(v)) for v in views]
        parts = _merged([generator.correction_parts(f) for _, f in passes])[0, ..., :height, :width]
        fit.add(parts, (original - decoded)[0].to(parts.device), weight)
    return passes


def to_network(image: np.ndarray) -> Tensor:
    """A uint8 ``H x W x 3`` RGB image as ``1 x 3 x H x W`` float32 in the network's range [-1, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float().div(127.5).sub(1)


def to_image(out: Tensor) -> np.ndarray:
    """``3 x H x W`` in the network's range as the uint8 ``H x W x 3`` image a decoder writes."""
    return out.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def _frame_batch(
    spec: GeneratorSpec, decoded: np.ndarray, label: np.ndarray, instance: np.ndarray | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One frame as :func:`enhance_batch`'s ``label``, ``decoded`` and ``edge``."""
    edge = None
    if spec.use_instance:
        if instance is None:
            edge = torch.zeros(1, 1, *label.shape)
        else:
            edge = edge_map(torch.from_numpy(instance.astype(np.int64)))[None, None]
    return torch.from_numpy(label.astype(np.int64))[None], to_network(decoded), edge


def enhance_image(
    generator: nn.Module,
    spec: GeneratorSpec,
    decoded: np.ndarray,
    label: np.ndarray,
    instance: np.ndarray | None = None,
    quality: int | None = None,
    gains: Sequence[int] | None = None,
) -> np.ndarray:
    """Enhance one frame: ``decoded`` uint8 ``H x W x 3`` RGB, ``label`` ``H x W`` ids, ``instance``
    ``H x W`` ids (a model with ``use_instance`` sees its edges; none given: no edges), ``quality`` the
    codec quality ``decoded`` was coded at (needed by a ``quality_input`` model), ``gains`` the encoder's
    gain codes (``model.correction_scale: channels``); returns the uint8 ``H x W x 3`` RGB output."""
    lab, dec, edge = _frame_batch(spec, decoded, label, instance)
    factors = None if gains is None else gains_of(check_gain_codes(gains, gain_count(spec)))[None]
    return to_image(enhance_batch(generator, spec, lab, dec, edge, quality, factors)[0])


def fit_gains(
    generator: nn.Module,
    spec: GeneratorSpec,
    original: np.ndarray,
    decoded: np.ndarray,
    label: np.ndarray,
    instance: np.ndarray | None = None,
    quality: int | None = None,
) -> tuple[int, ...]:
    """The gain codes the encoder of a ``correction_scale: channels`` generator sends for one frame
    (arguments as :func:`enhance_image`, ``original`` the uint8 frame before coding)."""
    lab, dec, edge = _frame_batch(spec, decoded, label, instance)
    fit = GainFit(gain_count(spec))
    fit_region(fit, generator, spec, to_network(original), lab, dec, edge, quality)
    return fit.codes()


class Decoded(NamedTuple):
    """What a decoder outputs for a frame, and what its encoder sent besides the codec's and the map's bits:
    the correction scale code (``model.correction_scale: frame``) or the gain codes (``channels``)."""

    image: np.ndarray
    scale: int | None = None
    gains: tuple[int, ...] | None = None


def decoder_output(
    generator: nn.Module,
    spec: GeneratorSpec,
    original: np.ndarray,
    decoded: np.ndarray,
    label: np.ndarray,
    instance: np.ndarray | None = None,
    quality: int | None = None,
) -> Decoded:
    """What the decoder of ``spec``'s generator outputs for one frame, and what its encoder, which holds
    ``original``, sends for it (arguments as :func:`fit_gains`): evaluation's and validation's image."""
    if sends_gains(spec):  # fit and output from one pass of the trunk
        lab, dec, edge = _frame_batch(spec, decoded, label, instance)
        fit = GainFit(gain_count(spec))
        passes = fit_region(fit, generator, spec, to_network(original), lab, dec, edge, quality)
        codes = fit.codes()
        with torch.no_grad():
            out = _merged([generator.corrected(x, f, gains_of(codes)[None]) for x, f in passes])
        return Decoded(to_image(out[0, :, : label.shape[0], : label.shape[1]]), gains=codes)
    enhanced = enhance_image(generator, spec, decoded, label, instance, quality)
    image, code = scaled(spec, original, decoded, enhanced)
    return Decoded(image, scale=code)
