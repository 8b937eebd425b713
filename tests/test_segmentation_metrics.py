"""mIoU, per-class IoU and pixel accuracy against cityscapesscripts' own pixel-level evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.eval.segmentation import ConfusionMatrix, segmentation_scores
from pipeline.segment.labels import IGNORE, NUM_CLASSES, TRAIN_CLASSES, label_to_train, train_to_label


def cityscapes_reference(tmp_path: Path, predictions: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """cityscapesscripts' evaluateImgLists on label-id PNGs (instance scores and JSON output off)."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as reference

    pred_files, gt_files = [], []
    for i, (prediction, truth) in enumerate(zip(predictions, truths, strict=True)):
        pred_files.append(str(tmp_path / f"pred_{i}.png"))
        gt_files.append(str(tmp_path / f"gt_{i}_gtFine_labelIds.png"))
        Image.fromarray(prediction).save(pred_files[-1])
        Image.fromarray(truth).save(gt_files[-1])
    args = reference.args
    args.evalInstLevelScore, args.JSONOutput, args.quiet, args.evalPixelAccuracy = False, False, True, False
    return reference.evaluateImgLists(pred_files, gt_files, args)


def synthetic_pair(rng: np.random.Generator, present: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Label-id maps: truth drawn from ``present`` plus void ids, prediction mostly right, some void."""
    void_ids = [0, 1, 4, 9, 14, 29]
    truth = rng.choice(present + void_ids, size=(48, 64)).astype(np.uint8)
    prediction = truth.copy()
    wrong = rng.random(truth.shape) < 0.3
    prediction[wrong] = rng.choice(present + [26, 0, 9], size=int(wrong.sum()))
    return prediction, truth


def test_label_table_is_cityscapes_train_ids() -> None:
    assert NUM_CLASSES == 19 and TRAIN_CLASSES[0] == "road" and TRAIN_CLASSES[-1] == "bicycle"
    ids = np.arange(34, dtype=np.uint8).reshape(2, 17)
    train = label_to_train(ids)
    assert train[0, 7] == 0 and train[1, 33 - 17] == 18 and train[0, 0] == IGNORE and train[0, 9] == IGNORE
    assert (train != IGNORE).sum() == 19
    assert np.array_equal(
        label_to_train(train_to_label(np.arange(19, dtype=np.uint8)[None])), np.arange(19)[None]
    )
    assert train_to_label(np.array([[IGNORE]], np.uint8))[0, 0] == 0
    with pytest.raises(ValueError, match="integer H x W"):
        label_to_train(np.zeros((2, 2), np.float32))


def test_agrees_with_cityscapesscripts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # image 1 lacks most classes; image 2 has others; caravan-like void ids and void predictions throughout
    pairs = [synthetic_pair(rng, [7, 8, 11, 26, 24]), synthetic_pair(rng, [7, 21, 23, 33, 17, 26])]
    predictions, truths = [p for p, _ in pairs], [t for _, t in pairs]
    # a class predicted but never in the truth (train: false positives only) and one never seen at all
    predictions[0][:4, :4] = 28
    expected = cityscapes_reference(tmp_path, predictions, truths)
    scores = segmentation_scores(
        [label_to_train(p) for p in predictions], [label_to_train(t) for t in truths]
    )
    for name in TRAIN_CLASSES:
        reference = expected["classScores"][name]
        if math.isnan(reference):
            assert math.isnan(scores.class_iou[name]), name
        else:
            assert scores.class_iou[name] == pytest.approx(reference, abs=1e-12), name
    assert scores.class_iou["bus"] == 0.0 and math.isnan(scores.class_iou["train"])
    assert scores.miou == pytest.approx(expected["averageScoreClasses"], abs=1e-12)
    truth_train = np.concatenate([label_to_train(t).ravel() for t in truths])
    pred_train = np.concatenate([label_to_train(p).ravel() for p in predictions])
    valid = truth_train != IGNORE
    assert scores.pixels == valid.sum()
    assert scores.pixel_accuracy == pytest.approx((pred_train[valid] == truth_train[valid]).mean())


def test_real_map_with_a_shifted_prediction(tmp_path: Path, cityscapes_root: Path) -> None:
    path = sorted((cityscapes_root / "gtFine").rglob("*_gtFine_labelIds.png"))[0]
    truth = cv2.resize(
        cv2.imread(str(path), cv2.IMREAD_UNCHANGED), (256, 128), interpolation=cv2.INTER_NEAREST
    )
    prediction = np.roll(truth, 5, axis=1)
    expected = cityscapes_reference(tmp_path, [prediction], [truth])
    scores = segmentation_scores([label_to_train(prediction)], [label_to_train(truth)])
    assert scores.miou == pytest.approx(expected["averageScoreClasses"], abs=1e-12)
    assert 0 < scores.miou < 1


def test_perfect_empty_and_bad_input() -> None:
    truth = np.array([[0, 1, IGNORE], [2, 2, IGNORE]], np.uint8)
    perfect = segmentation_scores([truth], [truth])
    assert perfect.miou == 1.0 and perfect.pixel_accuracy == 1.0 and perfect.pixels == 4
    assert sum(not math.isnan(v) for v in perfect.class_iou.values()) == 3
    empty = ConfusionMatrix().scores()
    assert math.isnan(empty.miou) and math.isnan(empty.pixel_accuracy) and empty.pixels == 0
    merged = ConfusionMatrix()
    merged.add(truth, truth)
    other = ConfusionMatrix()
    other.add(np.zeros_like(truth), truth)
    merged.merge(other)
    assert merged.scores().pixel_accuracy == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="differ in size"):
        segmentation_scores([truth[:1]], [truth])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        segmentation_scores([truth, truth], [truth])
