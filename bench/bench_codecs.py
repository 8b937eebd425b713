"""Codec figures quoted in the README: the label-map coders, the HEVC stream vs its HEIF file, and the
``hevc`` decoder's chroma.

Prints, from one run over the Cityscapes sample:
  1. lossless label-map bpp per coder (and at down-sampling factor 2), at the working size;
  2. the ``hevc`` codec's bitstream (raw HEVC + 4-byte header) vs the HEIF file libheif writes
     with the same encoder settings, on the first frame at full size;
  3. the mean PSNR of every frame's ``hevc`` picture at the working size, per QP (``--qps``), with
     libheif's repeated chroma (``chroma_upsampling=nearest``) and with it interpolated (``linear``, the
     default), from the same bitstreams.

Usage: python bench/bench_codecs.py [--root DIR] [--width W --height H] [--qp QP] [--qps Q ...]
"""

from __future__ import annotations

import argparse
import io
import statistics

import pillow_heif

from pipeline.config import DataConfig, JobConfig
from pipeline.data.codecs import LabelCoder, get_codec
from pipeline.data.sources import open_source
from pipeline.eval.fidelity import psnr


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--root", default=JobConfig().data.root)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--qp", type=int, default=42)
    parser.add_argument("--qps", type=int, nargs="+", default=[32, 37, 42, 47])
    args = parser.parse_args()
    source = open_source(DataConfig(root=args.root, width=args.width, height=args.height))
    samples = source.samples("val")
    loaded = [source.load(s, args.width, args.height) for s in samples]  # image, label map, instances
    labels = [label for _, label, _ in loaded]
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

    images = [image for image, _, _ in loaded]
    decoders = {way: get_codec("hevc", chroma_upsampling=way) for way in ("nearest", "linear")}
    print(f"{len(images)} frames at {args.width}x{args.height}, hevc: mean PSNR (dB) by chroma up-sampling")
    for qp in args.qps:
        streams = [decoders["linear"].encode(image, qp) for image in images]
        pairs = list(zip(images, streams, strict=True))
        means = {
            way: statistics.mean(psnr(i, codec.decode(b)) for i, b in pairs)
            for way, codec in decoders.items()
        }
        print(f"  QP {qp}: nearest {means['nearest']:.3f}  linear {means['linear']:.3f}  "
              f"gain {means['linear'] - means['nearest']:+.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
