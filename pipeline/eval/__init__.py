"""Evaluation: image-quality metrics, BD-rate, and the R-PD evaluation of a codec against codec-SE.

Metrics (each on uint8 RGB images): :mod:`~pipeline.eval.fidelity` (PSNR, MS-SSIM),
:mod:`~pipeline.eval.niqe` (standard NIQE), :mod:`~pipeline.eval.lpips` and :mod:`~pipeline.eval.fid`
(network weights from local files, :mod:`~pipeline.eval.weights`); :mod:`~pipeline.eval.bdrate`.

The R-PD evaluation (:func:`pipeline.eval.evaluate.evaluate`): :mod:`~pipeline.eval.inputs` ->
:mod:`~pipeline.eval.methods` -> :mod:`~pipeline.eval.scoring` (typed rows, :mod:`~pipeline.eval.rows`) ->
:mod:`~pipeline.eval.report` -> :mod:`~pipeline.eval.plots`.
"""
