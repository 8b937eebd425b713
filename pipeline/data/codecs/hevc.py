"""HEVC intra in process through pillow-heif (x265 encoder, libde265 decoder); the bare stream is counted."""

from __future__ import annotations

import io
import struct

import numpy as np

from pipeline.data.codecs.base import Codec, CodecError, CodecUnavailable, register_codec
from pipeline.data.codecs.chroma import (
    CHROMA_UPSAMPLINGS,
    DEFAULT_CHROMA_UPSAMPLING,
    ChromaUpsampling,
    interpolate_chroma,
)
from pipeline.data.codecs.heif import (
    NAL_PPS,
    NAL_SEI,
    NAL_SPS,
    NAL_VPS,
    START_CODE,
    find_box,
    heif_file,
    hvcc_nals,
    length_prefixed_nals,
    nal_type,
    sps_size,
)

# libheif codes an image smaller than 64 pixels per side, or of odd size, in a padded picture (measured:
# 1x1 and 17x9 -> 64x64, 65x33 -> 66x64); the SPS may exceed the size header by that much, no more.
MIN_PICTURE, PADDING = 64, 16


@register_codec
class HEVCCodec(Codec):
    """HEVC intra at a fixed QP (0-51, the scale of BPG's ``-q``), 4:2:0, in process via pillow-heif.

    This is the HEVC core that BPG wraps (x265 encoder, libde265 decoder) on the same QP scale, but not
    BPG's exact encoder settings: at equal QP it spends more bits (reference 2048x1024 Cityscapes frame:
    BPG q42 0.062 bpp, x265 QP42 via libheif 0.073 bpp, +18 %; measured here on frankfurt_000000_005898:
    HEIF file 0.0729 bpp, this bitstream 0.0719 bpp), so compare codecs by rate, not by QP.
    ``enc_params={"x265:qp": ...}`` switches x265 to constant QP;
    libheif's ``quality`` is then ignored (the same bytes at quality 0, 50 and 100), it is set to 50 only
    to stay clear of its lossless mode. RGB <-> YCbCr is libheif's own conversion (BT.601; its encoder
    averages each 2x2 block's chroma). libheif's decoder repeats each chroma sample over its block;
    ``chroma_upsampling="linear"`` (the default) interpolates it instead, as ``bpgdec`` does
    (:mod:`pipeline.data.codecs.chroma`; what it gains is printed by ``bench/bench_codecs.py``);
    ``"nearest"`` keeps libheif's picture.

    The bitstream is not the HEIF file: it is a 4-byte header (width, height: two big-endian uint16,
    since 4:2:0 HEVC cannot code odd sizes and libheif pads small or odd images) followed by the raw
    HEVC elementary stream in Annex-B form (VPS, SPS, PPS and slice NAL units with 4-byte start codes;
    no SEI), i.e. what a decoder needs. The HEIF file that libheif writes is 268 bytes larger (measured:
    1411 vs 1143 bytes at 256x128 QP42, 19104 vs 18836 at 2048x1024; 305 more with the ``clap`` box of
    odd sizes), a 23 % overhead on small images. :meth:`decode` rebuilds a minimal HEIF around the stream
    for libde265 (its output equals libde265's decode of libheif's own file) and crops to the header's size.

    ``threads`` sizes x265's thread pool (0: x265's default, every core); the bitstream does not depend
    on it. The shard builder uses one thread per worker process, so that one worker is one core.
    """

    name = "hevc"
    quality_range = (0, 51)
    higher_quality_is_better = False
    single_thread_options = {"threads": 1}
    output_options = {"chroma_upsampling": DEFAULT_CHROMA_UPSAMPLING}
    legacy_output_options = {"chroma_upsampling": "nearest"}  # libheif's picture, before the option

    def __init__(
        self, threads: int = 0, chroma_upsampling: ChromaUpsampling = DEFAULT_CHROMA_UPSAMPLING
    ) -> None:
        if threads < 0:
            raise ValueError(f"hevc: threads must be >= 0 (0: x265's default pool), got {threads}")
        if chroma_upsampling not in CHROMA_UPSAMPLINGS:
            choices = ", ".join(CHROMA_UPSAMPLINGS)
            raise ValueError(f"hevc: chroma_upsampling must be one of {choices}, got {chroma_upsampling!r}")
        self._interpolate = chroma_upsampling == "linear"
        self._enc_params = {"x265:pools": str(threads)} if threads else {}
        try:
            import pillow_heif  # imported here so that the other codecs work without it
        except ImportError as err:
            raise CodecUnavailable("the hevc codec needs pillow-heif (pip install pillow-heif)") from err
        if not pillow_heif.libheif_info().get("HEIF"):
            raise CodecUnavailable("pillow-heif was built without an HEVC encoder (x265)")
        self._heif = pillow_heif

    def _encode(self, rgb: np.ndarray, quality: int) -> bytes:
        height, width = rgb.shape[:2]
        if max(height, width) > 0xFFFF:
            raise ValueError(
                f"hevc: images larger than 65535 pixels per side are not supported, got {width}x{height}"
            )
        buf = io.BytesIO()
        self._heif.from_bytes("RGB", (width, height), rgb.tobytes()).save(
            buf,
            quality=50,
            enc_params={"x265:qp": str(quality), **self._enc_params},
            chroma=420,
            save_nclx_profile=False,
        )
        heif = buf.getvalue()
        hvcc, mdat = find_box(heif, [b"meta", b"iprp", b"ipco", b"hvcC"]), find_box(heif, [b"mdat"])
        nals = hvcc_nals(hvcc) + length_prefixed_nals(mdat, (hvcc[21] & 3) + 1)
        stream = b"".join(START_CODE + nal for nal in nals if nal_type(nal) not in NAL_SEI)
        return struct.pack(">HH", width, height) + stream

    def stream_size(self, data: bytes) -> tuple[int, int]:
        """The size header's ``(width, height)``, once the SPS's picture (what libde265 allocates) is checked
        to hold it with no more than libheif's padding."""
        if len(data) < 4 + len(START_CODE) or not data[4:].startswith(START_CODE):
            raise CodecError("hevc: not a bitstream of this codec (size header + Annex-B stream expected)")
        width, height = struct.unpack_from(">HH", data)
        coded_w, coded_h = sps_size(data[4:])
        for coded, size in ((coded_w, width), (coded_h, height)):
            if not size <= coded <= max(MIN_PICTURE, size + PADDING):
                raise CodecError(
                    f"hevc: the SPS codes a {coded_w}x{coded_h} picture for a {width}x{height} image"
                )
        return width, height

    def _decode(self, data: bytes) -> np.ndarray:
        if len(data) < 4 + len(START_CODE) or not data[4:].startswith(START_CODE):
            raise CodecError("hevc: not a bitstream of this codec (size header + Annex-B stream expected)")
        width, height = struct.unpack_from(">HH", data)
        nals = [nal.rstrip(b"\x00") for nal in data[4:].split(b"\x00\x00\x01")[1:]]
        parameter_sets = [nal for nal in nals if nal_type(nal) in (NAL_VPS, NAL_SPS, NAL_PPS)]
        slices = [nal for nal in nals if nal_type(nal) not in (NAL_VPS, NAL_SPS, NAL_PPS)]
        try:
            image = self._heif.open_heif(
                io.BytesIO(heif_file(parameter_sets, slices)), convert_hdr_to_8bit=True
            )
            rgb = np.asarray(image)
        except (RuntimeError, ValueError) as err:
            raise CodecError(f"hevc: libheif could not decode the stream: {err}") from err
        if rgb.ndim != 3 or rgb.shape[0] < height or rgb.shape[1] < width:
            raise CodecError(f"hevc: decoded {rgb.shape} is smaller than the coded size {width}x{height}")
        if self._interpolate:  # on the whole picture: its chroma blocks start at its top-left corner
            rgb = interpolate_chroma(rgb[..., :3])
        return np.ascontiguousarray(rgb[:height, :width, :3])
