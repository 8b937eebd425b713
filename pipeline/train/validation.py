"""Validation on held-out frames: what training selects its checkpoints by and what a sweep ranks trials by.

The frames are the full images of ``validate.split`` in the shards, decoded at ``loader.codec`` x each
training quality (``loader.qualities``, else ``loader.quality``). A :class:`Validator` scores the codec
once and then any generator: mean PSNR, MS-SSIM and (standard, published-model) NIQE over frames x
qualities (:func:`pipeline.eval.scoring.mean_scores`, the per-image scores of the R-PD evaluation), and
the codec-SE minus codec differences.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import ConfigError, JobConfig, ValidateMetric, with_overrides
from pipeline.data.loader import training_qualities
from pipeline.data.manifest import DatasetInfo
from pipeline.eval.inputs import EvalSample, ShardInput, with_label_source
from pipeline.eval.scoring import Scores, mean_scores
from pipeline.model.inference import decoder_output
from pipeline.model.networks import generator_from_state
from pipeline.model.spec import GeneratorSpec
from pipeline.train.rng import rng_untouched

# what "better" means for each selectable metric (validate.metric, checked by the config)
DIRECTIONS: dict[ValidateMetric, str] = {"psnr": "max", "ms_ssim": "max", "niqe": "min"}


def improves(value: float, best: float | None, metric: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` (``None``: nothing yet) on ``metric`` by more than ``min_delta``;
    NaN never improves."""
    if not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best + min_delta if DIRECTIONS[metric] == "max" else value < best - min_delta


def load_frames(cfg: JobConfig, split: str, images: int) -> list[EvalSample]:
    """The first ``images`` (0: all) frames of ``split`` of the built shards at the training qualities, with
    the label maps of ``data.label_source``."""
    if not (Path(cfg.shards.output) / "manifest.json").is_file():
        raise ConfigError(f"validation reads built shards, but there is no manifest in {cfg.shards.output}")
    data = ShardInput(
        with_overrides(
            cfg, {"eval.split": split, "eval.max_images": images, "eval.qualities": training_qualities(cfg)}
        )
    )
    samples = list(with_label_source(data, cfg).samples())
    if not samples:
        raise ConfigError(f"no validation frames: {data.description}")
    return samples


class Validator:
    """Scores generators on held-out frames, through a float32 eval-mode copy (any engine dtype)."""

    def __init__(
        self,
        cfg: JobConfig,
        data: DatasetInfo,
        samples: list[EvalSample],
        codec: Scores | None = None,
    ) -> None:
        """``codec``: the codec's scores on ``samples`` when already known (a sweep scores them once)."""
        self.qualities = training_qualities(cfg)
        self.spec = GeneratorSpec.from_config(
            cfg.model,
            data.label_nc,
            data.use_instance,
            label_classes=data.label_classes,
            codec=cfg.loader.codec,
            quality=cfg.loader.quality,
            phase=2,
        )
        self.samples = samples
        self.keys = [s.key for s in samples]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.codec = codec or mean_scores([(s.image, s.decoded[q]) for s in samples for q in self.qualities])

    def enhanced(self, generator: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(original, codec-SE)`` for every frame x quality, codec-SE as its decoder outputs it (with the
        encoder's scale or gains, ``model.correction_scale``)."""
        net = generator_from_state(generator.hparams, generator.state_dict(), self.device).eval()
        pairs = []
        for s in self.samples:
            for q in self.qualities:
                made = decoder_output(net, self.spec, s.image, s.decoded[q], s.label_at(q), s.instance, q)
                pairs.append((s.image, made.image))
        return pairs

    def __call__(self, generator: nn.Module) -> dict[str, float]:
        """``psnr``, ``ms_ssim``, ``niqe`` of codec-SE, the codec's as ``codec_*``, and ``delta_*``.

        Every RNG is left as it was, whatever the scoring calls: how often a training validates must not
        change what it draws next."""
        with rng_untouched():
            se = mean_scores(self.enhanced(generator))
        deltas = {f"delta_{k}": v - getattr(self.codec, k) for k, v in se.as_dict().items()}
        return {**se.as_dict(), **self.codec.as_dict("codec_"), **deltas}
