"""The encoder's scale of the generator's correction (``model.correction_scale: frame``).

The encoder holds the original, so once it has enhanced its own decoded image it can measure how far the
generator's change should go on this frame: the least-squares scale ``a`` of ``enhanced - decoded`` towards
``original - decoded``, sent as one byte (``a = code / 128``, so ``0 <= a < 2``). The decoder outputs
``clip(round(decoded + a * (enhanced - decoded)))``. ``a = 0`` is the codec's own image and ``a = 1`` the
generator's, so up to the byte's rounding a frame comes out no worse than either. A model trained on other
frames over-corrects some frames (HEVC QP 32 on unseen cities); the encoder turns its correction down there.
This is the frame-level form of the residual scaling that neural post-filters of video coding signal.

The byte is side information of codec-SE: the evaluation adds :data:`CODE_BITS` per frame to its rate, and
the ``.jse`` container carries it (:mod:`pipeline.compress.container`). The scale is MSE's: it trades any
perceptual gain of a GAN-trained generator back for distortion, so it suits distortion-refined exports.

``model.correction_scale: channels`` refines the one scale into one gain per part of the correction head:
the head is one 7x7 convolution of the trunk's ``ngf`` channels plus a bias, so the correction is the sum
of ``ngf + 1`` parts (:meth:`pipeline.model.networks.Generator.correction_parts`), and the encoder sends
the joint least-squares gains of those parts, one byte each (``gain = (code - 128) / 64``, so
``-2 <= gain < 2``; all codes 192 is the generator's output). The decoder runs the generator with them
(``Generator.forward(x, gains=...)``). Where a trunk channel helps this frame, its gain rises; where it
over-corrects, it falls. The fit is regularised slightly towards the generator's own gains (1), and the
quantised gains are kept only where they beat both the generator's output and the codec's image on the
frame (in the fit's quadratic error). A phase-1 export draws with its synthesis head and sends no gains.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.model.spec import GeneratorSpec

SCALE_UNIT = 128  # the code of scale 1: the generator's output unchanged
CODE_BITS = 8
MAX_CODE = (1 << CODE_BITS) - 1
GAIN_ZERO = 128  # the code of gain 0: the part left out
GAIN_UNIT = 64  # codes per unit of gain; code 192 is gain 1, the part as the generator made it
RIDGE = 1e-3  # the pull of the gain fit towards 1, relative to the parts' mean power


def _check(name: str, image: np.ndarray, like: np.ndarray) -> None:
    if image.shape != like.shape or image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 of shape {like.shape}, got {image.dtype} {image.shape}")


def fit_code(original: np.ndarray, decoded: np.ndarray, enhanced: np.ndarray) -> int:
    """The code (``0..255``) of the least-squares scale of ``enhanced - decoded`` towards
    ``original - decoded``: uint8 images of one shape. A generator that changed nothing gets scale 1."""
    _check("original", original, decoded)
    _check("enhanced", enhanced, decoded)
    change = enhanced.astype(np.float64) - decoded
    power = float(np.square(change).sum())
    if power == 0.0:
        return SCALE_UNIT
    scale = float((change * (original.astype(np.float64) - decoded)).sum()) / power
    return int(np.clip(np.rint(scale * SCALE_UNIT), 0, MAX_CODE))


def apply_code(decoded: np.ndarray, enhanced: np.ndarray, code: int) -> np.ndarray:
    """``decoded + (code / 128) * (enhanced - decoded)``, rounded and clipped to uint8; what the decoder of
    a frame with scale ``code`` outputs."""
    _check("enhanced", enhanced, decoded)
    if not 0 <= code <= MAX_CODE:
        raise ValueError(f"correction scale code must lie in [0, {MAX_CODE}], got {code}")
    change = enhanced.astype(np.float64) - decoded
    return np.clip(np.rint(decoded + change * (code / SCALE_UNIT)), 0, 255).astype(np.uint8)


def apply_codes(decoded: np.ndarray, enhanced: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """:func:`apply_code` for float batches in the network's range: ``decoded`` and ``enhanced``
    ``B x 3 x H x W`` in [-1, 1], ``codes`` one per frame (or one for all); no rounding, so within a grey
    level of the uint8 output."""
    codes = np.asarray(codes).reshape(-1)
    if codes.shape[0] not in (1, enhanced.shape[0]) or codes.min() < 0 or codes.max() > MAX_CODE:
        raise ValueError(f"correction_scale must hold 1 or {enhanced.shape[0]} codes in [0, {MAX_CODE}]")
    factor = (codes / SCALE_UNIT).astype(np.float32).reshape(-1, 1, 1, 1)
    return np.clip(decoded + factor * (enhanced - decoded), -1.0, 1.0)


def sends_scale(spec: GeneratorSpec) -> bool:
    """Whether the encoder of ``spec``'s generator sends a scale per frame."""
    return spec.correction_scale == "frame"


def scaled(
    spec: GeneratorSpec, original: np.ndarray, decoded: np.ndarray, enhanced: np.ndarray
) -> tuple[np.ndarray, int | None]:
    """What the decoder of ``spec``'s generator outputs for a frame, with the code the encoder sends:
    ``enhanced`` and ``None`` unless the spec scales its correction per frame."""
    if not sends_scale(spec):
        return enhanced, None
    code = fit_code(original, decoded, enhanced)
    return apply_code(decoded, enhanced, code), code


def sends_gains(spec: GeneratorSpec) -> bool:
    """Whether the encoder of ``spec``'s generator sends a gain per part of the correction head
    (``model.correction_scale: channels``; a phase-1 export draws with its synthesis head and sends none)."""
    return spec.correction_scale == "channels" and not spec.uses_synthesis


def gain_count(spec: GeneratorSpec) -> int:
    """How many gain codes a frame of ``spec``'s generator carries: ``ngf + 1``, or 0 without gains."""
    return spec.ngf + 1 if sends_gains(spec) else 0


def side_bits(spec: GeneratorSpec) -> int:
    """The bits a frame of ``spec``'s generator sends besides the codec's and the label map's."""
    return CODE_BITS * (1 if sends_scale(spec) else gain_count(spec))


def check_gain_codes(codes: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """``codes`` as an int array whose last axis holds ``count`` codes in ``0..255`` (one-line ValueError)."""
    array = np.asarray(codes)
    if (
        array.ndim == 0
        or array.shape[-1] != count
        or array.size == 0
        or not np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"correction gains must be {count} integer codes per frame, got shape {array.shape}")
    if array.min() < 0 or array.max() > MAX_CODE:
        raise ValueError(f"correction gain codes must lie in [0, {MAX_CODE}]")
    return array.astype(np.int64)


def gains_of(codes: Sequence[int] | np.ndarray) -> Tensor:
    """The gains (float32, ``... x K``) the codes stand for: ``(code - 128) / 64``."""
    return torch.from_numpy((np.asarray(codes, np.float32) - GAIN_ZERO) / GAIN_UNIT)


class GainFit:
    """The normal equations of one frame's gain fit, summed over its pixels (tile by tile for large frames).

    ``add(parts, residual, weight)``: the correction head's parts of a region (``K x 3 x H x W``, network
    range), ``original - decoded`` there (``3 x H x W``, network range) and each pixel's weight (``H x W``;
    a tile's share of its overlaps, or none). :meth:`codes` solves and quantises.
    """

    def __init__(self, count: int) -> None:
        self.gram = np.zeros((count, count))
        self.cross = np.zeros(count)
        self.power = 0.0

    def add(self, parts: Tensor, residual: Tensor, weight: Tensor | None = None) -> None:
        count = self.cross.shape[0]
        if parts.shape[0] != count or tuple(parts.shape[1:]) != tuple(residual.shape):
            raise ValueError(
                f"gain fit: parts {tuple(parts.shape)} do not match residual {tuple(residual.shape)}"
            )
        flat = parts.detach().double().reshape(count, -1)
        target = residual.detach().double().reshape(-1)
        if weight is not None:
            w = weight.detach().double().to(flat.device).expand_as(residual).reshape(-1)
            target, weighted = target * w, flat * w
        else:
            weighted = flat
        self.gram += (weighted @ flat.T).cpu().numpy()
        self.cross += (flat @ target).cpu().numpy()
        self.power += float((residual.detach().double().reshape(-1) * target).sum())

    def error(self, gains: np.ndarray) -> float:
        """The fitted region's squared error with ``gains`` (before clipping and rounding)."""
        return float(gains @ self.gram @ gains - 2 * self.cross @ gains + self.power)

    def codes(self) -> tuple[int, ...]:
        """The quantised least-squares gains, pulled slightly towards 1 (:data:`RIDGE`); the generator's own
        gains (all 1) or the codec's image (all 0) where either fits better."""
        count = self.cross.shape[0]
        ridge = RIDGE * max(float(np.trace(self.gram)) / count, 1e-12)
        unit = np.ones(count)
        fitted = np.linalg.solve(self.gram + ridge * np.eye(count), self.cross + ridge * unit)
        candidates = [np.clip(np.rint(fitted * GAIN_UNIT) + GAIN_ZERO, 0, MAX_CODE)]
        candidates += [np.full(count, GAIN_ZERO + GAIN_UNIT), np.full(count, GAIN_ZERO)]
        best = min(candidates, key=lambda c: self.error((c - GAIN_ZERO) / GAIN_UNIT))
        return tuple(int(c) for c in best)
