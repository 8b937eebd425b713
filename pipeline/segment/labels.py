"""The one label space of the segmenter and of downstream accuracy: Cityscapes train ids.

19 classes (``0..18``) and :data:`IGNORE` (255) for void, mapped once from the dataset's label ids with
cityscapesscripts' label table (``labelIds`` -> ``trainId``; every void id and anything outside the
table becomes :data:`IGNORE`).
"""

from __future__ import annotations

import numpy as np

IGNORE = 255


def _table() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    from cityscapesscripts.helpers.labels import labels

    names: dict[int, str] = {}
    to_train = np.full(256, IGNORE, np.uint8)
    to_label = np.zeros(256, np.uint8)  # train id -> label id; void -> 0 ("unlabeled")
    for label in labels:
        if label.id < 0 or label.ignoreInEval or not 0 <= label.trainId < IGNORE:
            continue
        to_train[label.id] = label.trainId
        to_label[label.trainId] = label.id
        names[label.trainId] = label.name
    return tuple(names[i] for i in range(len(names))), to_train, to_label


TRAIN_CLASSES, _LABEL_TO_TRAIN, _TRAIN_TO_LABEL = _table()
NUM_CLASSES = len(TRAIN_CLASSES)


def _check_map(array: np.ndarray, what: str) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.dtype.kind not in "ui":
        got = f"{array.dtype} array of shape {array.shape}" if isinstance(array, np.ndarray) else type(array)
        raise ValueError(f"expected an integer H x W map of {what}, got {got}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{what} must lie in 0..255, got {array.min()}..{array.max()}")


def label_to_train(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes label ids -> train ids (``uint8``; void -> :data:`IGNORE`)."""
    _check_map(label_ids, "label ids")
    return _LABEL_TO_TRAIN[label_ids.astype(np.intp)]


def train_to_label(train_ids: np.ndarray) -> np.ndarray:
    """Train ids -> Cityscapes label ids (``uint8``; :data:`IGNORE` and anything unknown -> 0, unlabeled)."""
    _check_map(train_ids, "train ids")
    return _TRAIN_TO_LABEL[train_ids.astype(np.intp)]
