"""Rate figures quoted in the README: the label-map coders and the HEVC stream vs its HEIF file.

Prints, from one run over the Cityscapes sample:
  1. lossless label-map bpp per coder (and at down-sampling factor 2), at the working size;
  2. the ``hevc`` codec's bitstream (raw HEVC + 4-byte header) vs the HEIF file libheif writes
     with the same encoder settings, on the first frame at full size.

Usage: python bench/bench_codecs.py [--root DIR] [--width W --height H] [--qp QP]
"""

from __future__ import annotations

import argparse
import io
import statistics

import pillow_heif

from pipeline.config import DataConfig, JobConfig
from pipeline.data.codecs import LabelCoder, get_codec
from pipeline.data.sources import open_source


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--root", default=JobConfig().data.root)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--qp", type=int, default=42)
    args = parser.parse_args()
    source = open_source(DataConfig(root=args.root, width=args.width, height=args.height))
    samples = source.samples("val")
    labels = [source.load(s, args.width, args.height)[1] for s in samples]
    pixels = args.width * args.height
    print(f"{len(labels)} label maps at {args.width}x{args.height}: lossless bpp, mean (min-max)")
    for method in ("jxl", "webp", "png"):
        for factor in (1, 2):
            try:
                coder = LabelCoder(method, downsample=factor)
            except (ValueError, RuntimeError) as err:
                print(f"  {method:<5} /{factor}  unavailable: {err}")
                continue
            bpps = [8 * len(coder.encode(label)) / pixels for label in labels]
            print(f"  {method:<5} /{factor}  {statistics.mean(bpps):.3f} ({min(bpps):.3f}-{max(bpps):.3f})")

    rgb = source.read(samples[0])[0]
    height, width = rgb.shape[:2]
    stream = get_codec("hevc").encode(rgb, args.qp)
    buf = io.BytesIO()
    pillow_heif.from_bytes("RGB", (width, height), rgb.tobytes()).save(
        buf, quality=50, enc_params={"x265:qp": str(args.qp)}, chroma=420, save_nclx_profile=False
    )
    heif = len(buf.getvalue())
    print(f"{samples[0].key} at {width}x{height}, x265 QP {args.qp}:")
    pixels = width * height
    print(f"  hevc bitstream  {len(stream)} bytes, {8 * len(stream) / pixels:.4f} bpp")
    print(f"  HEIF file       {heif} bytes, {8 * heif / pixels:.4f} bpp (+{heif - len(stream)} bytes)")


if __name__ == "__main__":
    main()
