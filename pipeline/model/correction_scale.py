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
"""

from __future__ import annotations

import numpy as np

from pipeline.model.spec import GeneratorSpec

SCALE_UNIT = 128  # the code of scale 1: the generator's output unchanged
CODE_BITS = 8
MAX_CODE = (1 << CODE_BITS) - 1


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


def side_bits(spec: GeneratorSpec) -> int:
    """The bits a frame of ``spec``'s generator sends besides the codec's and the label map's."""
    return CODE_BITS if sends_scale(spec) else 0
