"""Lossless label-map coding, measured: bpp of each coder at each down-sampling factor, and its share of the
image codec's bits.

For each working size, over the sample's label maps (label ids, as the shards store them):
  - every lossless coder a maintained installed library offers (JPEG XL at several efforts, WebP,
    PNG, JPEG-LS, AVIF lossless; general-purpose LZMA, Brotli and Zstandard on the raw map with a
    4-byte size header), each round trip checked bit-exact;
  - at each down-sampling factor k (every k-th pixel of every k-th row coded, nearest-neighbour
    up-sampling at the decoder, as ``shards.label_downsample``), with the mIoU of the up-sampled map
    against the full one (cityscapesscripts' conventions), i.e. what the factor costs in accuracy;
  - each coder's share of HEVC's bits (the ``hevc`` codec, x265 intra) at each QP:
    ``label bpp / HEVC bpp``, both means over the frames.

Usage: python bench/bench_labels.py [--root DIR] [--sizes 512x256 1024x512] [--factors 1 2 4 8]
                                    [--qps 32 37 42 47]
"""

from __future__ import annotations

import argparse
import lzma
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
from tqdm import tqdm

from pipeline.config import DataConfig, JobConfig
from pipeline.data.codecs import LabelCoder, get_codec
from pipeline.data.sources import open_source
from pipeline.eval.segmentation import segmentation_scores
from pipeline.segment.labels import label_to_train

sys.path.insert(0, str(Path(__file__).parent))
from sizes import frame_size  # noqa: E402

Coder = tuple[Callable[[np.ndarray], bytes], Callable[[bytes], np.ndarray]]


def _cv(ext: str, params: list[int]) -> Coder:
    def encode(label: np.ndarray) -> bytes:
        return cv2.imencode(ext, label, params)[1].tobytes()

    def decode(data: bytes) -> np.ndarray:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        return image if image.ndim == 2 else image[:, :, 0]

    return encode, decode


def _jxl(effort: int) -> Coder:
    def encode(label: np.ndarray) -> bytes:
        return bytes(imagecodecs.jpegxl_encode(label, lossless=True, effort=effort, numthreads=1))

    return encode, imagecodecs.jpegxl_decode


def _raw(compress: Callable[[bytes], bytes], decompress: Callable[[bytes], bytes]) -> Coder:
    """A general-purpose compressor on the raw map, after a 4-byte (width, height) header."""

    def encode(label: np.ndarray) -> bytes:
        return struct.pack(">HH", label.shape[1], label.shape[0]) + compress(label.tobytes())

    def decode(data: bytes) -> np.ndarray:
        width, height = struct.unpack_from(">HH", data)
        return np.frombuffer(decompress(data[4:]), np.uint8).reshape(height, width)

    return encode, decode


def coders() -> dict[str, Coder]:
    """Every lossless coder measured, by name; ``default`` is what ``LabelCoder("auto")`` uses."""
    default = LabelCoder("auto")
    table: dict[str, Coder] = {f"default ({default.method})": (default.encode, default.decode)}
    if imagecodecs.JPEGXL.available:
        table.update({f"jxl e{effort}": _jxl(effort) for effort in (1, 3, 5, 7, 9, 10)})
    table["webp (OpenCV)"] = _cv(".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])
    if imagecodecs.WEBP.available:
        table["webp m6"] = (
            lambda x: bytes(imagecodecs.webp_encode(np.dstack([x] * 3), lossless=True, level=100, method=6)),
            lambda d: imagecodecs.webp_decode(d)[:, :, 0],
        )
    table["png"] = _cv(".png", [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if imagecodecs.JPEGLS.available:
        table["jpeg-ls"] = (lambda x: bytes(imagecodecs.jpegls_encode(x, level=0)), imagecodecs.jpegls_decode)
    if imagecodecs.AVIF.available:
        table["avif lossless s0"] = (
            lambda x: bytes(imagecodecs.avif_encode(x, level=100, speed=0, numthreads=1)),
            imagecodecs.avif_decode,
        )
    table["lzma 9e"] = _raw(lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)
    if imagecodecs.BROTLI.available:
        table["brotli 11"] = _raw(
            lambda b: bytes(imagecodecs.brotli_encode(b, level=11)), imagecodecs.brotli_decode
        )
    if imagecodecs.ZSTD.available:
        table["zstd 22"] = _raw(
            lambda b: bytes(imagecodecs.zstd_encode(b, level=22)), imagecodecs.zstd_decode
        )
    return table


def measure(root: str, width: int, height: int, factors: list[int], qps: list[int]) -> None:
    source = open_source(DataConfig(root=root, width=width, height=height))
    frames = [source.load(sample, width, height) for sample in source.samples("val")]
    pixels = width * height
    hevc = get_codec("hevc", single_thread=True)
    codec_bpp = {
        qp: statistics.mean(8 * len(hevc.encode(rgb, qp)) / pixels for rgb, _, _ in frames) for qp in qps
    }
    table = coders()
    bits: dict[tuple[str, int], list[float]] = {}
    millis: dict[tuple[str, int], list[float]] = {}
    miou: dict[int, float] = {}
    for factor in factors:
        grids = [np.ascontiguousarray(label[::factor, ::factor]) for _, label, _ in frames]
        upsampled = [LabelCoder("png", downsample=factor).reconstruct(label) for _, label, _ in frames]
        miou[factor] = segmentation_scores(
            [label_to_train(u) for u in upsampled], [label_to_train(label) for _, label, _ in frames]
        ).miou
        for name, (encode, decode) in tqdm(table.items(), desc=f"{width}x{height} /{factor}", leave=False):
            for grid in grids:
                start = time.perf_counter()
                data = encode(grid)
                millis.setdefault((name, factor), []).append(1000 * (time.perf_counter() - start))
                if not np.array_equal(decode(data), grid):
                    raise RuntimeError(f"{name} is not lossless on a {grid.shape[1]}x{grid.shape[0]} map")
                bits.setdefault((name, factor), []).append(8 * len(data) / pixels)

    print(f"\n{len(frames)} label maps at {width}x{height}; HEVC (x265 intra) on the same frames:")
    print("  " + "  ".join(f"QP {qp} {bpp:.3f} bpp" for qp, bpp in codec_bpp.items()))
    shares = "".join(f" {'QP' + str(qp):>6}" for qp in qps)
    print(
        f"  {'coder':<18}{'/k':>3} {'bpp mean':>9} {'(min-max)':>13} {'ms/map':>7}  share of HEVC at{shares}"
    )
    for factor in factors:
        ranked = sorted(table, key=lambda name: statistics.mean(bits[name, factor]))
        for name in ranked:
            values = bits[name, factor]
            mean = statistics.mean(values)
            share = "".join(f" {100 * mean / codec_bpp[qp]:5.1f}%" for qp in qps)
            print(
                f"  {name:<18}{factor:>3} {mean:9.4f} ({min(values):.3f}-{max(values):.3f})"
                f" {statistics.mean(millis[name, factor]):7.1f}  {'':>16}{share}"
            )
        print(f"  /{factor}: mIoU of the up-sampled map against the full map {100 * miou[factor]:.1f} %")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--root", default=JobConfig().data.root)
    parser.add_argument("--sizes", nargs="+", type=frame_size, default=[(512, 256), (1024, 512)])
    parser.add_argument("--factors", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--qps", nargs="+", type=int, default=[32, 37, 42, 47])
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}; imagecodecs {imagecodecs.__version__}"
        f" ({imagecodecs.jpegxl_version()}), OpenCV {cv2.__version__}; one thread per coder"
    )
    for width, height in args.sizes:
        measure(args.root, width, height, args.factors, args.qps)


if __name__ == "__main__":
    main()
