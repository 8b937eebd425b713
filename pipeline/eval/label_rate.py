"""The label bits a method's decoder receives, counted in its total rate.

A generator that sees classes instead of label ids (``model.semantic_classes: categories``, the spec's
``label_classes``) needs only its class map, and ``compress`` sends only that
(:func:`pipeline.model.inputs.class_map`): so its rate counts the bits of that map, coded by the same
label coder as the label map, not the label map's.
"""

from __future__ import annotations

from pipeline.eval.inputs import EvalInput, EvalSample
from pipeline.eval.methods import Method
from pipeline.model.inputs import class_map


class LabelRates:
    """Label bits per pixel per sample, quality and method; a class map is coded once per label map a
    sample hands its generators (one for every quality but with decoder-side maps) and mapping, by ``data``'s
    label coder."""

    def __init__(self, data: EvalInput) -> None:
        self.data = data
        self._sample = ""
        # (the quality of a predicted map, or None for the ground truth every quality shares; mapping)
        self._coded: dict[tuple[int | None, tuple[int, ...]], float] = {}

    def __call__(self, sample: EvalSample, quality: int, method: Method) -> float:
        """0 for a method without semantics or a sample whose map costs nothing (decoder-side maps); the
        class map's bits for a generator that sees classes; else the sample's label map's."""
        if not method.uses_labels or not sample.label_bpp:
            return 0.0
        assert method.spec is not None  # uses_labels
        classes = method.spec.label_classes
        if classes is None:
            return sample.label_bpp
        if sample.key != self._sample:  # one sample's maps at a time
            self._sample, self._coded = sample.key, {}
        label = sample.label_at(quality)
        key = (quality if quality in sample.predicted_label else None, classes)
        if key not in self._coded:
            self._coded[key] = 8 * len(self.data.label_coder.encode(class_map(label, classes))) / label.size
        return self._coded[key]
