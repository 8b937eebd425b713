"""SegFormer (transformers' ``SegformerForSemanticSegmentation``), built from a config, never downloaded.

The MiT encoder's ImageNet weights (``nvidia/mit-<variant>``) come from ``backbone`` (a safetensors or
torch file, or a folder written by ``save_pretrained``), else from the Hugging Face cache when they are
there; without either the network starts from random weights, with a warning. Published on full
Cityscapes (1024x1024 crops, 160k iterations): B0 76.2 % mIoU (71.9 % at 1024x512 inference), B1 78.5 %,
B2 81.0 % (Xie et al. 2021, table 1).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from pipeline.segment.base import (
    Segmenter,
    SegmenterError,
    imagenet_normalise,
    read_state_dict,
    register_segmenter,
)
from pipeline.segment.labels import NUM_CLASSES

# MiT encoder sizes (hidden sizes, depths, attention heads) and the all-MLP decoder's width.
VARIANTS: dict[str, dict[str, Any]] = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _cached_backbone(variant: str) -> Path | None:
    """The ImageNet MiT weights in the Hugging Face cache, if present (looked up offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in _WEIGHT_FILES:
        found = try_to_load_from_cache(f"nvidia/mit-{variant}", name)
        if isinstance(found, str):
            return Path(found)
    return None


@register_segmenter
class SegFormer(Segmenter):
    """SegFormer-``variant`` for ``num_classes`` classes; see the module doc for ``backbone``."""

    architecture = "segformer"

    def __init__(self, num_classes: int = NUM_CLASSES, variant: str = "b0", backbone: str = "") -> None:
        super().__init__(num_classes)
        if variant not in VARIANTS:
            raise SegmenterError(f"unknown SegFormer variant {variant!r}; choose {', '.join(VARIANTS)}")
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        heads = [1, 2, 5, 8]
        config = SegformerConfig(num_labels=num_classes, num_attention_heads=heads, **VARIANTS[variant])
        self.variant = variant
        self.net = SegformerForSemanticSegmentation(config)
        path = Path(backbone) if backbone else _cached_backbone(variant)
        if path is None:
            warnings.warn(
                f"no ImageNet weights for the SegFormer-{variant} encoder (pass backbone=FILE, or put "
                f"nvidia/mit-{variant} in the Hugging Face cache); starting from random weights",
                stacklevel=2,
            )
        else:
            self.load_backbone(path)
        self.backbone = str(path or "")

    def options(self) -> dict[str, Any]:
        return {"variant": self.variant}

    def load_backbone(self, path: Path) -> None:
        """Load the MiT encoder's weights (keys ``segformer.encoder.*`` or ``encoder.*``)."""
        if path.is_dir():
            files = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
            if not files:
                raise SegmenterError(f"no {' or '.join(_WEIGHT_FILES)} in backbone folder {path}")
            path = files[0]
        state = {k.removeprefix("segformer."): v for k, v in read_state_dict(path).items()}
        encoder = self.net.segformer.state_dict()
        matched = {k: v for k, v in state.items() if k in encoder}
        wrong = [k for k, v in matched.items() if v.shape != encoder[k].shape]
        if not matched or wrong or len(matched) < len(encoder):
            detail = (
                f"mis-shaped {wrong[0]}" if wrong else f"{len(matched)} of {len(encoder)} encoder weights"
            )
            raise SegmenterError(f"{path} is not a SegFormer-{self.variant} encoder ({detail})")
        self.net.segformer.load_state_dict(matched)

    def forward(self, images: Tensor) -> Tensor:
        logits = self.net(pixel_values=imagenet_normalise(images)).logits  # at 1/4 of the input size
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
