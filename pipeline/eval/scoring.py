"""Scoring reconstructions against their originals.

:func:`score_image` is the one per-image score that evaluation and validation share: PSNR (capped at
100 dB), MS-SSIM and standard NIQE (published pristine model). :class:`Scorer` adds what only the R-PD
evaluation measures: the rates, LPIPS, the dataset-fitted NIQE, and the set-level FID of every
model x quality, and, with a judging segmenter (``eval.segmenter``), the downstream accuracy of every
reconstruction and of the originals; :func:`fit_niqe` fits that NIQE model on the evaluated split's
originals.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pipeline.eval.fid import FIDInception, frechet_distance
from pipeline.eval.fidelity import cap_psnr, ms_ssim, psnr
from pipeline.eval.inputs import EvalInput, EvalSample
from pipeline.eval.lpips import LPIPS
from pipeline.eval.methods import Method
from pipeline.eval.niqe import (
    NIQEModel,
    fit_niqe_model_from_features,
    niqe,
    niqe_features,
    niqe_from_features,
    select_sharp_patches,
)
from pipeline.eval.rows import Measures, RPDRow
from pipeline.eval.segmentation import ConfusionMatrix, SegmentationScores
from pipeline.eval.weights import Unavailable
from pipeline.segment.judge import LoadedSegmenter
from pipeline.segment.labels import label_to_train


@dataclass(frozen=True)
class Scores:
    """PSNR (capped at 100 dB), MS-SSIM and standard NIQE: of one image, or means over images."""

    psnr: float
    ms_ssim: float
    niqe: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{name}": value for name, value in dataclasses.asdict(self).items()}


def score_image(original: np.ndarray, result: np.ndarray) -> Scores:
    """The scores of one reconstruction ``result`` of ``original`` (uint8 RGB, same shape)."""
    return Scores(psnr=cap_psnr(psnr(original, result)), ms_ssim=ms_ssim(original, result), niqe=niqe(result))


def mean_scores(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> Scores:
    """Means of :func:`score_image` over ``(original, reconstruction)`` pairs; NIQE over the images where
    it is defined (NaN when it is defined on none)."""
    scores = [score_image(original, result) for original, result in pairs]
    niqes = [s.niqe for s in scores if math.isfinite(s.niqe)]
    return Scores(
        psnr=float(np.mean([s.psnr for s in scores])),
        ms_ssim=float(np.mean([s.ms_ssim for s in scores])),
        niqe=float(np.mean(niqes)) if niqes else math.nan,
    )


@dataclass(frozen=True)
class FittedNIQE:
    """A NIQE pristine model fitted on the evaluated split's originals, and their mean NIQE under it."""

    model: NIQEModel
    original_niqe: float


def fit_niqe(data: EvalInput, size: str) -> FittedNIQE:
    """Fit NIQE's pristine model on ``data``'s uncompressed originals (``size``: their size, for the record
    of what it was fitted on)."""
    patches, features = [], []
    for image in tqdm(data.originals(), total=data.count, desc="NIQE pristine fit"):
        feats, sharpness = niqe_features(image)
        features.append(feats)
        patches.append(select_sharp_patches(feats, sharpness))
    model = fit_niqe_model_from_features(patches, f"uncompressed {data.description} ({size})")
    return FittedNIQE(model, float(np.mean([niqe_from_features(f, model) for f in features])))


class Scorer:
    """Scores every reconstruction of an R-PD evaluation into an :class:`RPDRow`, and keeps the Inception
    features for the FID of each model x quality against the originals."""

    def __init__(
        self,
        codec: str,
        lpips: LPIPS | Unavailable,
        fid: FIDInception | Unavailable,
        niqe_model: NIQEModel | None = None,
        judge: LoadedSegmenter | None = None,
    ) -> None:
        """``niqe_model``: a dataset-fitted NIQE model, scored as the extra measure ``niqe_fitted``;
        ``judge``: the segmenter whose predictions score downstream accuracy (``miou``, ``pixel_accuracy``)
        against the samples' ground truth, which must be Cityscapes label ids."""
        self.codec = codec
        self.lpips = lpips
        self.fid_model = fid
        self.niqe_model = niqe_model
        self.judge = judge
        self.rows: list[RPDRow] = []
        self.original_niqes: list[float] = []
        self._real: list[np.ndarray] = []
        self._fake: dict[tuple[str, int], list[np.ndarray]] = {}
        self.original_accuracy = ConfusionMatrix()
        self._accuracy: dict[tuple[str, int], ConfusionMatrix] = {}
        self._truth: tuple[int, np.ndarray] | None = None  # (id of the label map, its train ids)

    def add_original(self, image: np.ndarray, label: np.ndarray | None = None) -> None:
        """Score an original: its standard NIQE, its features for FID and, with a judge and its ground truth
        ``label``, the judge's accuracy on it."""
        self.original_niqes.append(niqe(image))
        if not isinstance(self.fid_model, Unavailable):
            self._real.append(self.fid_model.features(image))
        if self.judge is not None and label is not None:
            self.original_accuracy.add(self.judge.train_ids(image), self._train_ids(label))

    def _train_ids(self, label: np.ndarray) -> np.ndarray:
        """``label`` (label ids) in train ids, converted once per sample."""
        if self._truth is None or self._truth[0] != id(label):
            self._truth = (id(label), label_to_train(label))
        return self._truth[1]

    def _judged(
        self, judge: LoadedSegmenter, sample: EvalSample, model: str, quality: int, result: np.ndarray
    ) -> SegmentationScores:
        """The judge's accuracy on ``result`` (pooled into the model x quality's matrix); its image's own."""
        one = ConfusionMatrix()
        one.add(judge.train_ids(result), self._train_ids(sample.label))
        self._accuracy.setdefault((model, quality), ConfusionMatrix()).merge(one)
        return one.scores()

    def add(
        self,
        sample: EvalSample,
        quality: int,
        method: Method,
        result: np.ndarray,
        bpp: float | None = None,
        label_bpp: float = 0.0,
        scale: float | None = None,
        map_sent: bool | None = None,
    ) -> RPDRow:
        """Score ``method``'s reconstruction ``result`` of ``sample`` at ``quality``; return its row. ``bpp``:
        the rate of a reference codec's own bitstream, or of codec-SE's with its correction scale
        (:func:`pipeline.eval.methods.reconstruct`; default: the evaluated codec's at ``quality``);
        ``label_bpp``: the label bits its decoder receives (:class:`pipeline.eval.label_rate.LabelRates`;
        none for the codec and the reference codecs); ``scale``: the correction scale its encoder sent;
        ``map_sent``: whether its encoder sent the label map (``eval.map_choice``)."""
        scores = score_image(sample.image, result)
        rate = sample.bpp[quality] if bpp is None else bpp
        judge = self.judge
        judged = None if judge is None else self._judged(judge, sample, method.model, quality, result)
        measures = Measures(
            bpp_codec=rate,
            bpp_total=rate + label_bpp,
            **scores.as_dict(),
            niqe_fitted=None if self.niqe_model is None else niqe(result, self.niqe_model),
            lpips=math.nan if isinstance(self.lpips, Unavailable) else self.lpips(sample.image, result),
            miou=None if judged is None else judged.miou,
            pixel_accuracy=None if judged is None else judged.pixel_accuracy,
            correction_scale=scale,
            map_sent=None if map_sent is None else float(map_sent),
        )
        row = RPDRow(
            key=sample.key,
            method=method.name,
            model=method.model,
            codec=self.codec if method.encoder is None else method.encoder.name,
            quality=quality,
            measures=measures,
            on_training_frames=method.on_training_frames,
        )
        self.rows.append(row)
        if not isinstance(self.fid_model, Unavailable):
            self._fake.setdefault((method.model, quality), []).append(self.fid_model.features(result))
        return row

    def accuracy(self, model: str, quality: int) -> SegmentationScores:
        """The judge's accuracy on ``model``'s reconstructions at ``quality``, pooled over the set."""
        return self._accuracy[(model, quality)].scores()

    @property
    def original_niqe(self) -> float:
        """The mean standard NIQE of the originals."""
        return float(np.mean(self.original_niqes))

    @property
    def lpips_note(self) -> str:
        """Why LPIPS is NaN; empty when it was measured."""
        return self.lpips.reason if isinstance(self.lpips, Unavailable) else ""

    def fid(self, model: str, quality: int) -> tuple[float, str]:
        """The FID of ``model``'s reconstructions at ``quality`` against the originals, and a note on it
        (NaN and the reason when it could not be computed)."""
        if isinstance(self.fid_model, Unavailable):
            return math.nan, self.fid_model.reason
        try:
            fake = np.stack(self._fake[(model, quality)])
            value = frechet_distance(np.stack(self._real), fake)
        except ValueError as err:
            return math.nan, str(err)
        return value, f"over {len(fake)} images (FID is biased upwards on small sets)"
