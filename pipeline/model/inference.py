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
  later phases output through the correction head).

Two entry points: :func:`enhance_batch` for tensors or arrays in the network's range ([-1, 1]), and
:func:`enhance_image` for one uint8 RGB frame with its label (and instance) map.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

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


def enhance_batch(
    generator: nn.Module,
    spec: GeneratorSpec,
    label: Tensor | np.ndarray,
    decoded: Tensor | np.ndarray,
    edge: Tensor | np.ndarray | None = None,
    quality: Qualities | None = None,
) -> Tensor:
    """Run ``generator`` (described by ``spec``) on a batch; returns ``B x 3 x H x W`` float32 in [-1, 1]
    on the generator's device.

    ``label``: int ``B x H x W`` ids in ``[0, label_nc)`` (checked when given on the CPU); ``decoded``:
    ``B x 3 x H x W`` in [-1, 1]; ``edge``: ``B x 1 x H x W``, required when ``spec.use_instance``;
    ``quality``: the codec quality the frames were coded at (one, or one per frame), required when
    ``spec.quality_input``.
    """
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
    with torch.no_grad():
        x = generator_input(
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
        return generator(x, synthesis=spec.uses_synthesis)[..., :height, :width]


def enhance_image(
    generator: nn.Module,
    spec: GeneratorSpec,
    decoded: np.ndarray,
    label: np.ndarray,
    instance: np.ndarray | None = None,
    quality: int | None = None,
) -> np.ndarray:
    """Enhance one frame: ``decoded`` uint8 ``H x W x 3`` RGB, ``label`` ``H x W`` ids, ``instance``
    ``H x W`` ids (a model with ``use_instance`` sees its edges; none given: no edges), ``quality`` the
    codec quality ``decoded`` was coded at (needed by a ``quality_input`` model); returns the uint8
    ``H x W x 3`` RGB output."""
    dec = torch.from_numpy(np.array(decoded, dtype=np.uint8)).permute(2, 0, 1)[None].float().div(127.5).sub(1)
    lab = torch.from_numpy(label.astype(np.int64))[None]
    edge = None
    if spec.use_instance:
        if instance is None:
            edge = torch.zeros(1, 1, *label.shape)
        else:
            edge = edge_map(torch.from_numpy(instance.astype(np.int64)))[None, None]
    out = enhance_batch(generator, spec, lab, dec, edge, quality)[0]
    return out.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
