"""Image codecs (RGB ``uint8`` in, exact bitstream bytes out, and back) and the lossless label-map coder.

``base`` holds the :class:`Codec` interface and the registry; each codec module registers its codecs
when imported, and importing this package imports them all, so :func:`get_codec` knows every codec:
``opencv`` (jpeg, webp, jpeg2000), ``bpg`` (reference binaries), ``hevc`` (in process; its container
code is in ``heif``), ``avif`` (AV1 intra through Pillow), ``jxl`` (lossy JPEG XL through imagecodecs).
``label`` holds :class:`LabelCoder`.
"""

from pipeline.data.codecs.avif import AVIFCodec
from pipeline.data.codecs.base import (
    Codec,
    CodecError,
    CodecResult,
    CodecUnavailable,
    available_codecs,
    codec_class,
    decode_options,
    get_codec,
    register_codec,
    with_output_defaults,
)
from pipeline.data.codecs.bpg import BPGCodec
from pipeline.data.codecs.hevc import HEVCCodec
from pipeline.data.codecs.jxl import JPEGXLCodec
from pipeline.data.codecs.label import LabelCoder
from pipeline.data.codecs.opencv import JPEG2000Codec, JPEGCodec, WebPCodec

__all__ = [
    "AVIFCodec",
    "BPGCodec",
    "Codec",
    "CodecError",
    "CodecResult",
    "CodecUnavailable",
    "HEVCCodec",
    "JPEG2000Codec",
    "JPEGCodec",
    "JPEGXLCodec",
    "LabelCoder",
    "WebPCodec",
    "available_codecs",
    "codec_class",
    "decode_options",
    "get_codec",
    "register_codec",
    "with_output_defaults",
]
