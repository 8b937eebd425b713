"""The JPD-SE generator input and the discriminator's conditioning.

The generator sees ``one-hot classes ⊕ instance edges (1, with instances) ⊕ quality (1, with
model.quality_input) ⊕ decoded RGB (3)``. The classes are the label ids (``label_nc`` channels), or with
``label_classes`` (``model.semantic_classes: categories``) the class each id is mapped to first
(:func:`class_count` channels). Ablations keep the same channels and zero some of them, so every
phase and ablation shares one architecture: ``visual_input=False`` zeroes the decoded image and the
quality (phase 1: no decoded image, so no quality either), ``zero_semantics=True`` zeroes the one-hot and
edge channels (the no-semantics baseline). The quality channel is :func:`quality_level` everywhere.

The discriminator is conditioned like pix2pixHD's: it sees the semantic channels of the generator input
⊕ an image (generated or real)::

    g_in = generator_input(label, edge, decoded, label_nc=nc, use_instance=inst, label_classes=lut, ...)
    fake = generator(g_in)
    semantics = g_in[:, : semantic_channels(class_count(nc, lut), inst)]
    pred_fake = discriminator(discriminator_input(semantics, fake))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

IMAGE_CHANNELS = 3


def class_count(label_nc: int, label_classes: Sequence[int] | None) -> int:
    """The one-hot channels: ``label_nc``, or with ``label_classes`` (the class of every label id) its
    ``max + 1``."""
    return max(label_classes) + 1 if label_classes else label_nc


def class_map(label: np.ndarray, label_classes: Sequence[int]) -> np.ndarray:
    """``label`` (``uint8`` ids) with each id of ``label_classes`` replaced by the smallest id of its class:
    still a label-id map, and the same generator input, but holding only the classes, so it codes in fewer
    bits. What ``compress`` sends to the decoder of a generator that sees classes."""
    lut = np.arange(256, dtype=np.uint8)
    first: dict[int, int] = {}
    for index, cls in enumerate(label_classes):
        lut[index] = first.setdefault(cls, index)
    return lut[label]


def semantic_channels(class_nc: int, use_instance: bool) -> int:
    """Channels of the semantic conditioning: the one-hot classes (:func:`class_count`) plus the instance
    edge map."""
    return class_nc + int(use_instance)


def input_channels(class_nc: int, use_instance: bool, quality_input: bool = False) -> int:
    """Channels of :func:`generator_input`'s output (``class_nc``: :func:`class_count`)."""
    return semantic_channels(class_nc, use_instance) + int(quality_input) + IMAGE_CHANNELS


# one codec quality, or one per frame, as callers hold it
Qualities = int | float | Tensor | np.ndarray


def quality_level(codec: str, quality: Qualities) -> Tensor:
    """``quality`` as its place on ``codec``'s scale: ``(quality - lo) / (hi - lo)`` for the codec's
    ``quality_range`` ``[lo, hi]`` (HEVC QP 42: 42 / 51), float32, the shape of ``quality``. Qualities
    outside the range are refused."""
    from pipeline.data.codecs.base import codec_class

    low, high = codec_class(codec).quality_range
    given = torch.as_tensor(quality)
    if given.numel() and (given.min() < low or given.max() > high):
        raise ValueError(f"{codec} quality must lie in [{low}, {high}], got {given.flatten().tolist()}")
    return (given.to(torch.float32) - low) / (high - low)


def edge_map(instance: Tensor) -> Tensor:
    """pix2pixHD's ``get_edges``: 1.0 where a pixel's id differs from a 4-neighbour's, else 0.0.

    Works on the last two dimensions of any tensor with at least two (``H x W``, ``B x H x W``,
    ``B x 1 x H x W``); the result has the input's shape and dtype float32.
    """
    if instance.dim() < 2:
        raise ValueError(f"edge_map needs at least 2 dimensions, got shape {tuple(instance.shape)}")
    edge = torch.zeros(instance.shape, dtype=torch.bool, device=instance.device)
    horizontal = instance[..., :, 1:] != instance[..., :, :-1]
    vertical = instance[..., 1:, :] != instance[..., :-1, :]
    edge[..., :, 1:] |= horizontal
    edge[..., :, :-1] |= horizontal
    edge[..., 1:, :] |= vertical
    edge[..., :-1, :] |= vertical
    return edge.float()


def check_label_ids(label: Tensor, label_nc: int) -> None:
    """Refuse ids outside ``[0, label_nc)`` in a label map on the CPU.

    A label map on an accelerator is not checked: reading its range back would stall the device on every
    training step. The loader hands labels over on the CPU, so :func:`generator_input` checks them there,
    before it moves them to the decoded image's device.
    """
    if label.device.type != "cpu" or not label.numel():
        return
    low, high = int(label.min()), int(label.max())
    if low < 0 or high >= label_nc:
        raise ValueError(
            f"label ids must lie in [0, {label_nc}) (label_nc={label_nc}), found ids in [{low}, {high}]"
        )


def generator_input(
    label: Tensor,
    edge: Tensor | None,
    decoded: Tensor,
    *,
    label_nc: int,
    use_instance: bool,
    zero_semantics: bool,
    visual_input: bool,
    quality: Tensor | None = None,
    label_classes: Sequence[int] | None = None,
) -> Tensor:
    """Assemble ``one-hot(label) ⊕ edge ⊕ quality ⊕ decoded`` (``B x input_channels x H x W``) on
    ``decoded``'s device.

    ``label``: int ``B x H x W`` (or ``B x 1 x H x W``) ids in ``[0, label_nc)``, checked when it is on the
    CPU (see :func:`check_label_ids`); ``edge``: ``B x 1 x H x W``, required when ``use_instance`` and
    ignored otherwise; ``decoded``: ``B x 3 x H x W`` in [-1, 1]; ``quality``: each sample's
    :func:`quality_level` (``B`` values, or one for all), a generator with ``model.quality_input`` only
    (none: no quality channel); ``label_classes``: the class of every id ``0..label_nc-1``, which the
    one-hot then holds instead of the id (:func:`class_count` channels). ``zero_semantics`` zeroes the
    one-hot and edge channels, ``visual_input=False`` the quality and decoded ones.
    """
    if label_nc <= 0:
        raise ValueError(f"label_nc must be positive, got {label_nc}")
    if label.dim() == 4 and label.shape[1] == 1:
        label = label[:, 0]
    if label.dim() != 3:
        raise ValueError(f"label must be B x H x W, got shape {tuple(label.shape)}")
    if label.dtype.is_floating_point or label.dtype == torch.bool:
        raise ValueError(f"label must hold integer ids, got dtype {label.dtype}")
    batch, height, width = label.shape
    if decoded.shape != (batch, IMAGE_CHANNELS, height, width):
        raise ValueError(
            f"decoded must be {batch} x 3 x {height} x {width} to match the label, got {tuple(decoded.shape)}"
        )
    check_label_ids(label, label_nc)
    if label_classes is not None:
        if len(label_classes) != label_nc or min(label_classes, default=0) < 0:
            raise ValueError(
                f"label_classes must give a class >= 0 to each of the {label_nc} label ids, "
                f"got {len(label_classes)} entries"
            )
        # mapped where the label is (the loader's, on the CPU): no table is copied to the device per step
        label = torch.as_tensor(label_classes, dtype=torch.long, device=label.device)[label.long()]
    label = label.to(decoded.device, torch.long)
    class_nc = class_count(label_nc, label_classes)
    onehot = torch.zeros(batch, class_nc, height, width, dtype=decoded.dtype, device=decoded.device)
    onehot.scatter_(1, label.unsqueeze(1), 1.0)
    parts = [onehot]
    if use_instance:
        if edge is None:
            raise ValueError("use_instance is set but no edge map was given")
        if edge.shape != (batch, 1, height, width):
            raise ValueError(f"edge must be {batch} x 1 x {height} x {width}, got {tuple(edge.shape)}")
        parts.append(edge.to(decoded.device, decoded.dtype))
    if zero_semantics:
        parts = [torch.zeros_like(p) for p in parts]
    if quality is not None:
        level = torch.as_tensor(quality, dtype=decoded.dtype).to(decoded.device).reshape(-1, 1, 1, 1)
        if level.shape[0] not in (1, batch):
            raise ValueError(f"quality must hold 1 or {batch} values, got {level.shape[0]}")
        parts.append(level.expand(batch, 1, height, width) * float(visual_input))
    parts.append(decoded if visual_input else torch.zeros_like(decoded))
    return torch.cat(parts, dim=1)


def discriminator_input(semantics: Tensor, image: Tensor) -> Tensor:
    """pix2pixHD conditioning: the semantic channels (one-hot ⊕ edge) ⊕ the image."""
    if semantics.shape[0] != image.shape[0] or semantics.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"semantics {tuple(semantics.shape)} and image {tuple(image.shape)} differ in batch or size"
        )
    return torch.cat([semantics, image], dim=1)
