"""Train a segmenter on the shards' originals and decoded images against their label maps.

Each batch comes from the generator's own loader (same shards, crops and flips; ``loader.qualities``
draws one decoded quality per sample); with probability ``originals`` a batch is trained on the
originals instead, so that the segmenter stays accurate on codec output as well as on clean images.
Label ids become train ids once (:mod:`pipeline.segment.labels`); void pixels are ignored by the
cross-entropy. AdamW with a linear warm-up and polynomial decay (SegFormer's recipe); the result is
exported as a segmenter file (:func:`pipeline.segment.base.save_segmenter`).
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config import JobConfig
from pipeline.segment.base import Segmenter, build_segmenter, load_weights, save_segmenter
from pipeline.segment.labels import _LABEL_TO_TRAIN, IGNORE
from pipeline.segment.recipe import SegmentTraining


def _lr_factor(step: int, run: SegmentTraining) -> float:
    if step < run.warmup:
        return (step + 1) / (run.warmup + 1)
    return (1 - (step - run.warmup) / max(1, run.steps - run.warmup)) ** 1.0


def train_segmenter(cfg: JobConfig, run: SegmentTraining, *, progress: bool = True) -> Path:
    """Train ``run.steps`` steps on ``cfg.loader.split`` of the shards and export; returns the file."""
    from pipeline.data.loader import make_loader

    torch.manual_seed(run.seed)
    rng = random.Random(run.seed)
    model: Segmenter = build_segmenter(run.architecture, **run.options)
    if run.init_from:
        load_weights(model, run.init_from)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, run))
    to_train = torch.from_numpy(_LABEL_TO_TRAIN).long()
    loader = make_loader(cfg, cfg.loader.split, train=True, seed=run.seed)
    batches = iter(loader)
    losses: list[float] = []
    bar = tqdm(range(run.steps), desc="segmenter", disable=not progress)
    for _ in bar:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        images = batch["image"] if rng.random() < run.originals else batch["decoded"]
        target = to_train[batch["label"].clamp(0, 255)]
        logits = model(images)
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    training = {
        "steps": run.steps,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "data": {"split": cfg.loader.split, "codec": cfg.loader.codec, "qualities": cfg.loader.qualities},
        "recipe": {k: v for k, v in asdict(run).items() if k not in ("output", "options")},
    }
    return save_segmenter(model, run.output, extra={"training": training})
