"""Downstream accuracy: mIoU, per-class IoU and pixel accuracy, with cityscapesscripts' conventions.

One confusion matrix is accumulated over every image of a set (not a mean of per-image scores), in
train ids (:mod:`pipeline.segment.labels`): ground-truth void pixels are left out; a prediction outside
the 19 classes on a valid pixel is a false negative of the true class and a false positive of none. A
class's IoU is ``tp / (tp + fp + fn)``, NaN when the class is in neither ground truth nor prediction;
mIoU is the mean of the classes that are not NaN (cityscapesscripts' ``getScoreAverage``). Pixel
accuracy is the share of non-void pixels predicted right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.segment.labels import IGNORE, NUM_CLASSES, TRAIN_CLASSES


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of one set of predictions; ``class_iou`` maps each train class's name to its IoU (or NaN)."""

    miou: float
    pixel_accuracy: float
    class_iou: dict[str, float]
    pixels: int  # non-void ground-truth pixels scored


class ConfusionMatrix:
    """Counts ``(ground truth, prediction)`` pairs in train ids over many images.

    Rows are the 19 classes; the columns are the 19 classes and one more for any other prediction.
    """

    def __init__(self) -> None:
        self.counts = np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64)

    def add(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        """Add one image: ``prediction`` and ``truth`` are ``H x W`` train-id maps of the same size."""
        for array, what in ((prediction, "prediction"), (truth, "ground truth")):
            if not isinstance(array, np.ndarray) or array.ndim != 2 or array.dtype.kind not in "ui":
                raise ValueError(f"expected an integer H x W {what} map of train ids")
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction {prediction.shape} and ground truth {truth.shape} differ in size")
        truth = truth.astype(np.int64).ravel()
        valid = (truth >= 0) & (truth < NUM_CLASSES)
        prediction = prediction.astype(np.int64).ravel()[valid]
        prediction = np.where((prediction >= 0) & (prediction < NUM_CLASSES), prediction, NUM_CLASSES)
        index = truth[valid] * (NUM_CLASSES + 1) + prediction
        self.counts += np.bincount(index, minlength=self.counts.size).reshape(self.counts.shape)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix's counts (e.g. from another worker)."""
        self.counts += other.counts

    def scores(self) -> SegmentationScores:
        """mIoU, per-class IoU and pixel accuracy of everything added so far."""
        tp = np.diag(self.counts[:, :NUM_CLASSES]).astype(np.float64)
        fn = self.counts.sum(axis=1) - tp
        fp = self.counts[:, :NUM_CLASSES].sum(axis=0) - tp
        denom = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(denom > 0, tp / denom, np.nan)
        valid = iou[~np.isnan(iou)]
        pixels = int(self.counts.sum())
        return SegmentationScores(
            miou=float(valid.mean()) if valid.size else math.nan,
            pixel_accuracy=float(tp.sum() / pixels) if pixels else math.nan,
            class_iou={name: float(value) for name, value in zip(TRAIN_CLASSES, iou, strict=True)},
            pixels=pixels,
        )


def segmentation_scores(predictions: list[np.ndarray], truths: list[np.ndarray]) -> SegmentationScores:
    """Scores of paired train-id maps, pooled over the set as cityscapesscripts does."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} ground-truth maps")
    matrix = ConfusionMatrix()
    for prediction, truth in zip(predictions, truths, strict=True):
        matrix.add(prediction, truth)
    return matrix.scores()


__all__ = ["IGNORE", "ConfusionMatrix", "SegmentationScores", "segmentation_scores"]
