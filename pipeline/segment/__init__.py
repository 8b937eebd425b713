"""Semantic segmentation inside the pipeline: the label space (Cityscapes train ids), the segmenter
interface with its SegFormer implementation, and its training.

Importing this package stays light: transformers is imported only when a SegFormer is built.
"""

from pipeline.segment.labels import IGNORE, NUM_CLASSES, TRAIN_CLASSES, label_to_train, train_to_label

__all__ = ["IGNORE", "NUM_CLASSES", "TRAIN_CLASSES", "label_to_train", "train_to_label"]
