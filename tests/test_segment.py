"""The segmenter: interface, SegFormer built offline, files (spec, refusals), training on the shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from pipeline.config import JobConfig, from_dict, with_overrides
from pipeline.model.export import weights_sha256
from pipeline.segment import base as segment_base
from pipeline.segment.base import (
    Segmenter,
    SegmenterError,
    build_segmenter,
    load_segmenter,
    read_spec,
    register_segmenter,
    save_segmenter,
)
from pipeline.segment.train import train_segmenter
from pipeline.tracking import Tracker


class TinySegmenter(Segmenter):
    """What a cluster user's torchvision model looks like to the pipeline: one forward, nothing else."""

    architecture = "tiny-test"

    def __init__(self, num_classes: int = 19, width: int = 8) -> None:
        super().__init__(num_classes)
        self.width = width
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, num_classes, 1)
        )

    def options(self) -> dict[str, int]:
        return {"width": self.width}

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


@pytest.fixture
def tiny_registered(monkeypatch: pytest.MonkeyPatch) -> type[Segmenter]:
    segment_base.available_segmenters()  # the built-in ones registered before the registry is copied
    monkeypatch.setattr(segment_base, "_REGISTRY", dict(segment_base._REGISTRY))
    return register_segmenter(TinySegmenter)


@pytest.fixture(scope="module")
def cfg(small_shards: Path, cityscapes_root: Path) -> JobConfig:
    return from_dict(
        {
            "data": {"root": str(cityscapes_root), "width": 256, "height": 128, "splits": ["val"]},
            "shards": {"output": str(small_shards), "codecs": [{"name": "hevc", "qualities": [37, 42]}]},
            "loader": {"split": "val", "quality": 42, "qualities": [37, 42], "crop": [64, 128], "shuffle": 4},
        }
    )


def segment_job(cfg: JobConfig, out: Path, **segment: object) -> JobConfig:
    """``cfg`` with a segmenter run into ``out`` (no tracking)."""
    return with_overrides(
        cfg,
        {
            "segment.output_dir": str(out),
            "tracking.enabled": False,
            **{f"segment.{k}": v for k, v in segment.items()},
        },
    )


def test_interface_trains_exports_and_reloads(tiny_registered: type, cfg: JobConfig, tmp_path: Path) -> None:
    run = segment_job(cfg, tmp_path / "a", architecture="tiny-test", options={"width": 4}, steps=6, warmup=2)
    path = train_segmenter(run, tracker=Tracker())
    spec = read_spec(path)
    assert (
        spec["architecture"] == "tiny-test" and spec["num_classes"] == 19 and spec["options"] == {"width": 4}
    )
    assert spec["label_space"] == "cityscapes-train-ids" and spec["training"]["steps"] == 6
    model = load_segmenter(path, architecture="tiny-test")
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    train_ids = model.predict(image)
    assert train_ids.shape == (32, 48) and train_ids.dtype == np.uint8 and train_ids.max() < 19
    assert model.predict_label_ids(image).max() <= 33
    assert len(weights_sha256(path)) == 64
    # same seed, same steps, another folder: the same file, byte for byte (its sha256 is its identity)
    again = train_segmenter(
        with_overrides(run, {"segment.output_dir": str(tmp_path / "b")}), tracker=Tracker()
    )
    assert again != path and weights_sha256(again) == weights_sha256(path)
    first, second = load_segmenter(path).state_dict(), load_segmenter(again).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_wrong_architecture_or_class_count_is_refused(tiny_registered: type, tmp_path: Path) -> None:
    path = save_segmenter(TinySegmenter(num_classes=19), tmp_path / "tiny.safetensors")
    with pytest.raises(SegmenterError, match="holds a 'tiny-test' segmenter, not 'segformer'"):
        load_segmenter(path, architecture="segformer")
    with pytest.raises(SegmenterError, match="predicts 19 classes, not 20"):
        load_segmenter(path, num_classes=20)
    other = save_segmenter(TinySegmenter(num_classes=7), tmp_path / "seven.safetensors")
    with pytest.raises(SegmenterError, match="predicts 7 classes, not 19"):
        load_segmenter(other)
    # an external state dict of the wrong class count
    external = tmp_path / "external.safetensors"
    save_file(TinySegmenter(num_classes=7).state_dict(), str(external))
    model = build_segmenter("tiny-test")
    with pytest.raises(
        SegmenterError, match=r"does not fit a tiny-test segmenter with 19 classes .*mis-shaped"
    ):
        segment_base.load_weights(model, external)
    with pytest.raises(SegmenterError, match="not a segmenter file"):
        load_segmenter(external)
    with pytest.raises(SegmenterError, match="does not exist"):
        load_segmenter(tmp_path / "missing.safetensors")
    with pytest.raises(SegmenterError, match="unknown segmenter architecture 'unet'"):
        build_segmenter("unet")


def test_segformer_backbone_from_a_local_file_or_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.segment import segformer

    monkeypatch.setattr(segformer, "_cached_backbone", lambda variant: None)
    with pytest.warns(UserWarning, match="random weights"):
        donor = build_segmenter("segformer")
    assert sum(p.numel() for p in donor.parameters()) == pytest.approx(3.72e6, rel=0.01)  # B0
    # an ImageNet classification checkpoint's layout: segformer.encoder.* plus a classifier
    backbone = {f"segformer.{k}": v for k, v in donor.net.segformer.state_dict().items()}
    backbone["classifier.weight"] = torch.zeros(1000, 256)
    save_file(backbone, str(tmp_path / "mit-b0.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_segmenter("segformer", backbone=str(tmp_path / "mit-b0.safetensors"))
    for name, tensor in donor.net.segformer.state_dict().items():
        assert torch.equal(model.net.segformer.state_dict()[name], tensor), name
    torch.save({k: v for k, v in list(backbone.items())[:5]}, tmp_path / "partial.pth")
    with pytest.raises(SegmenterError, match="not a SegFormer-b0 encoder"):
        build_segmenter("segformer", backbone=str(tmp_path / "partial.pth"))
    with pytest.raises(SegmenterError, match="unknown SegFormer variant"):
        build_segmenter("segformer", variant="b9")


@pytest.mark.slow
def test_segformer_trains_exports_and_loads_in_a_fresh_process(small_shards: Path, tmp_path: Path) -> None:
    """``python -m pipeline segment`` with the default SegFormer-B0 (random encoder: no weights here), then
    the file loads in another fresh process and predicts what it predicts here."""
    # the interpreter's own bin first, as in an activated environment: DeepSpeed builds its CPU shared-memory
    # op with the ninja found on PATH, and another ninja's log makes it rebuild the op (a minute of C++)
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    env = {"OMP_NUM_THREADS": "1", "PATH": path, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "seg"
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "segment",
        f"shards.output={small_shards}",
        "loader.crop=[64, 128]",
        "loader.shuffle=4",
        "segment.steps=2",
        "segment.warmup=1",
        f"segment.output_dir={out}",
        "tracking.enabled=false",
    ]
    trained = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False
    )
    assert trained.returncode == 0, trained.stderr
    path = out / "segmenter.safetensors"
    assert json.loads(trained.stdout[trained.stdout.index("{") :])["sha256"] == weights_sha256(path)
    assert read_spec(path)["options"] == {"variant": "b0"}
    image = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    np.save(tmp_path / "image.npy", image)
    expected = load_segmenter(path, architecture="segformer").predict(image)
    script = (
        "import sys, numpy as np\n"
        "from pipeline.segment.base import load_segmenter\n"
        "m = load_segmenter(sys.argv[1], architecture='segformer', num_classes=19)\n"
        "np.save(sys.argv[3], m.predict(np.load(sys.argv[2])))\n"
    )
    pred = tmp_path / "pred.npy"
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::UserWarning",
            "-c",
            script,
            str(path),
            str(tmp_path / "image.npy"),
            str(pred),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(pred), expected)
