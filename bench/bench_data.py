"""Data-path benchmark at 1024x512 (issue: shards vs on-the-fly codec, read cost, build scaling).

Prints, from one run on one machine:
  1. training samples/s read from shards vs the on-the-fly path of the original code
     (load PNGs, encode + decode the codec per sample, crop/flip, to tensors);
  2. shard read cost per sample vs the bare PNG decode of the same members;
  3. shard build samples/s with 1 vs 2 worker processes.

Usage: python bench/bench_data.py [--root DIR] [--quality Q]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.config import JobConfig, from_dict
from pipeline.data.codecs import get_codec
from pipeline.data.loader import augment, collate, make_dataset, make_loader, to_tensors
from pipeline.data.manifest import Manifest
from pipeline.data.sources import open_source
from pipeline.model.inputs import edge_map


def _config(root: str, out: Path, quality: int, workers: int) -> JobConfig:
    return from_dict(
        {
            "data": {"root": root, "width": 1024, "height": 512},
            "shards": {
                "output": str(out),
                "codecs": [{"name": "hevc", "qualities": [quality]}],
                "samples_per_shard": 4,
                "workers": workers,
            },
            "loader": {
                "codec": "hevc",
                "quality": quality,
                "crop": [256, 512],
                "batch_size": 1,
                "shuffle": 0,
            },
        }
    )


def _build_rate(cfg: JobConfig) -> tuple[float, int]:
    """Samples/s of ``python -m pipeline shards`` as a user runs it (a fresh process, so the
    spawned workers import the light CLI, not this script's torch-heavy main module)."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in _flat_overrides(cfg).items()]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "shards", *overrides], check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    manifest = Manifest.read(cfg.shards.output)
    count = sum(s.samples for s in manifest.splits.values())
    return count / elapsed, count


def _flat_overrides(cfg: JobConfig) -> dict[str, object]:
    return {
        "data.root": cfg.data.root,
        "data.width": cfg.data.width,
        "data.height": cfg.data.height,
        "shards.output": cfg.shards.output,
        "shards.codecs": [{"name": c.name, "qualities": c.qualities} for c in cfg.shards.codecs],
        "shards.samples_per_shard": cfg.shards.samples_per_shard,
        "shards.workers": cfg.shards.workers,
    }


def _loader_rate(cfg: JobConfig, train: bool, workers: int = 0) -> float:
    """Samples/s through the training loader; with workers, the second epoch (workers warm)."""
    if workers:
        cfg = replace(cfg, loader=replace(cfg.loader, num_workers=workers))
        loader = make_loader(cfg, train=train)
        sum(len(batch["key"]) for batch in loader)
    else:
        loader = make_dataset(cfg, train=train)
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["key"])
    return count / (time.perf_counter() - start)


def _on_the_fly_rate(cfg: JobConfig, limit: int, single_thread: bool) -> float:
    """The original JPD-SE path: the codec round trip runs per training sample."""
    source = open_source(cfg.data)
    codec = get_codec("hevc", single_thread=single_thread)
    samples = source.samples(cfg.loader.split)[:limit]
    rng = random.Random(0)
    start = time.perf_counter()
    for sample in samples:
        rgb, label, instance = source.load(sample, cfg.data.width, cfg.data.height)
        result = codec.roundtrip(rgb, cfg.loader.quality)
        edge = edge_map(torch.from_numpy(instance.astype(np.int32))).numpy()
        arrays = {
            "image": rgb,
            "decoded": result.decoded,
            "label": label,
            "edge": edge,
            "bpp": result.bpp,
            "label_bpp": 0.0,
            "quality": cfg.loader.quality,
            "key": sample.key,
        }
        collate([to_tensors(augment(arrays, rng, tuple(cfg.loader.crop), True))])
    return len(samples) / (time.perf_counter() - start)


def _burn(n: int) -> int:
    return sum(i * i for i in range(n))


def _cpu_ceiling(n: int = 20_000_000) -> float:
    """How well two processes scale on this machine at all: a pure-Python loop, 2 processes vs 1."""
    start = time.perf_counter()
    _burn(n), _burn(n)
    serial = time.perf_counter() - start
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_burn, [1, 1])  # start-up out of the timing
        start = time.perf_counter()
        pool.map(_burn, [n, n])
        parallel = time.perf_counter() - start
    return serial / parallel


def _bare_png_rate(shards: list[Path], member: str) -> float:
    """Decode the PNG members a training sample needs, from bytes already in memory."""
    blobs: list[bytes] = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                if info.name.endswith((".image.png", ".label.png", ".instance.png", f".{member}")):
                    blobs.append(tar.extractfile(info).read())
    samples = len(blobs) / 4
    start = time.perf_counter()
    for blob in blobs:
        cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=JobConfig().data.root)
    parser.add_argument("--quality", type=int, default=42)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, 1024x512, hevc QP {args.quality}")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        one = _config(args.root, Path(tmp) / "w1", args.quality, workers=1)
        two = _config(args.root, Path(tmp) / "w2", args.quality, workers=2)
        build1, count = _build_rate(one)
        build2, _ = _build_rate(two)
        ceiling = _cpu_ceiling()
        shard_train = _loader_rate(one, train=True)
        shard_train2 = _loader_rate(one, train=True, workers=2)
        fly = _on_the_fly_rate(one, limit=count, single_thread=False)
        fly1 = _on_the_fly_rate(one, limit=count, single_thread=True)
        shard_eval = _loader_rate(one, train=False)
        bare = _bare_png_rate(sorted((Path(tmp) / "w1").glob("*.tar")), f"hevc_q{args.quality}.png")
    rows = [
        ("training samples/s, shards (crop 256x512 + flip)", f"{shard_train:.2f}"),
        ("training samples/s, shards, 2 loader workers", f"{shard_train2:.2f}"),
        ("training samples/s, on-the-fly codec per sample", f"{fly:.2f}"),
        ("training samples/s, on-the-fly, x265 on one thread", f"{fly1:.2f}"),
        ("  speed-up, 1 process each (goal >= 30x)", f"{shard_train / fly:.1f}x"),
        ("  speed-up, shards with 2 loader workers", f"{shard_train2 / fly:.1f}x"),
        ("  speed-up, 1 process each, x265 on one thread", f"{shard_train / fly1:.1f}x"),
        ("shard read, full samples/s (decode + tensors)", f"{shard_eval:.2f}"),
        ("bare PNG decode of the same members, samples/s", f"{bare:.2f}"),
        ("  read cost vs bare decode (goal <= 1.5x)", f"{bare / shard_eval:.2f}x"),
        ("shard build samples/s, 1 worker", f"{build1:.2f}"),
        ("shard build samples/s, 2 workers", f"{build2:.2f}"),
        ("  build scaling (goal >= 1.8x)", f"{build2 / build1:.2f}x"),
        ("  CPU ceiling: pure-Python loop, 2 processes vs 1", f"{ceiling:.2f}x"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{count} samples")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
