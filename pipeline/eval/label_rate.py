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
    """Label bits per pixel per sample, quality and method; a class map is coded once per sample and
    quality, by ``data``'s label coder."""

    def __init__(self, data: EvalInput) -> None:
        self.data = data
        self._coded: dict[tuple[str, int, tuple[int, ...]], float] = {}

    def __call__(self, sample: EvalSample, quality: int, method: Method) -> float:
        """0 for a method without semantics or a sample whose map costs nothing (decoder-side maps); the
        class map's bits for a generator that sees classes; else the sample's label map's."""
        if not method.uses_labels or not sample.label_bpp:
            return 0.0
        assert method.spec is not None  # uses_labels
        classes = method.spec.label_classes
        if classes is None:
            return sample.label_bpp
        key = (sample.key, quality, classes)
        if key not in self._coded:
            label = sample.label_at(quality)
            self._coded = {k: v for k, v in self._coded.items() if k[0] == sample.key}  # one sample's only
            self._coded[key] = 8 * len(self.data.label_coder.encode(class_map(label, classes))) / label.size
        return self._coded[key]
