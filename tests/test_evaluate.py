"""R-PD evaluation end to end on shards of three sample frames (256x128, hevc QP 37/45) with tiny
untrained generators, plus the on-the-fly source input and the BD-rate report glue."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from pipeline import tracking
from pipeline.config import JobConfig, ModelConfig, from_dict
from pipeline.evaluate import MEAN_COLUMNS, Method, _bdrate_report, enhance, evaluate, load_methods
from pipeline.export import export_generator, make_spec
from pipeline.models import build_models
from pipeline.shards import build_shards
from pipeline.tracking import Tracker

WIDTH, HEIGHT = 256, 128
QUALITIES = [37, 45]
FRAMES = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ModelConfig(ngf=4, n_downsample=2, n_blocks=1, ndf=4, n_layers_d=1, num_d=1)


class RecordingTracker(Tracker):
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.artifacts: list[Path] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(path))


def _subset(root: Path, out: Path) -> Path:
    """A Cityscapes layout of a few sample frames, as symlinks (the sample itself stays read-only)."""
    for image in sorted((root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))[:FRAMES]:
        key = image.name[: -len("_leftImg8bit.png")]
        city = image.parent.name
        (out / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
        (out / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
        (out / "leftImg8bit" / "val" / city / image.name).symlink_to(image)
        for kind in ("labelIds", "instanceIds"):
            name = f"{key}_gtFine_{kind}.png"
            (out / "gtFine" / "val" / city / name).symlink_to(root / "gtFine" / "val" / city / name)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, cityscapes_root: Path) -> tuple[JobConfig, dict, Path]:
    base = tmp_path_factory.mktemp("eval")
    cfg = from_dict(
        {
            "data": {"root": str(_subset(cityscapes_root, base / "data")), "width": WIDTH, "height": HEIGHT},
            "shards": {
                "output": str(base / "shards"),
                "codecs": [{"name": "hevc", "qualities": QUALITIES}],
                "samples_per_shard": 2,
                "workers": 1,
            },
            "loader": {"codec": "hevc", "quality": 45},
            "eval": {"output_dir": str(base / "out"), "max_images": 2, "crops": 1, "input": "shards"},
        }
    )
    manifest = build_shards(cfg)
    label_nc = int(manifest["dataset"]["label_nc"])
    torch.manual_seed(0)
    models = base / "models"
    for name, quality, zero in (("se37", 37, False), ("se45", 45, False), ("nosem45", 45, True)):
        generator, _ = build_models(dataclasses.replace(TINY, zero_semantics=zero), label_nc, True)
        spec = make_spec(
            dataclasses.replace(TINY, zero_semantics=zero),
            label_nc,
            True,
            codec="hevc",
            quality=quality,
            phase=3,
        )
        export_generator(models / f"{name}.safetensors", generator, spec)
    return cfg, manifest, models


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_end_to_end(setup: tuple[JobConfig, dict, Path]) -> None:
    cfg, _, models = setup
    tracker = RecordingTracker()
    paths = [str(models / f"{n}.safetensors") for n in ("se37", "se45", "nosem45")]
    out = evaluate(cfg, paths, tracker=tracker)
    assert out == Path(cfg.eval.output_dir)

    rows = _read_csv(out / "rpd.csv")
    images = cfg.eval.max_images
    # codec at both qualities, hevc-SE at both, the no-semantics model at 45 only
    assert len(rows) == images * (len(QUALITIES) + 2 + 1)
    methods = {(r["method"], int(r["quality"])) for r in rows}
    assert methods == {
        ("hevc", 37),
        ("hevc", 45),
        ("hevc-SE", 37),
        ("hevc-SE", 45),
        ("hevc-SE (no semantics)", 45),
    }
    assert len({r["key"] for r in rows}) == images

    # rates: codec bits from the shard metadata, label bits only where the method reads labels
    by = {(r["key"], r["method"], int(r["quality"])): r for r in rows}
    for (key, method, q), row in by.items():
        codec_row = by[(key, "hevc", q)]
        assert float(row["bpp_codec"]) == float(codec_row["bpp_codec"]) > 0
        if method == "hevc-SE":
            assert float(row["bpp_total"]) > float(row["bpp_codec"])
        else:
            assert float(row["bpp_total"]) == float(row["bpp_codec"])
        assert 0 < float(row["psnr"]) <= 100 and 0 <= float(row["ms_ssim"]) <= 1
        assert math.isfinite(float(row["niqe"])) and math.isnan(float(row["lpips"]))
    assert float(by[(rows[0]["key"], "hevc", 37)]["bpp_codec"]) > float(
        by[(rows[0]["key"], "hevc", 45)]["bpp_codec"]
    )

    means = _read_csv(out / "rpd_mean.csv")
    assert len(means) == len(methods) and list(means[0]) == MEAN_COLUMNS
    for mean in means:
        group = [r for r in rows if r["method"] == mean["method"] and r["quality"] == mean["quality"]]
        assert int(mean["images"]) == len(group) == images
        for col in ("bpp_codec", "bpp_total", "psnr", "ms_ssim", "niqe"):
            assert float(mean[col]) == pytest.approx(np.mean([float(r[col]) for r in group]), rel=1e-12)
        assert math.isnan(float(mean["lpips"])) and "LPIPS" in mean["lpips_note"]
        assert math.isnan(float(mean["fid"])) and "FID" in mean["fid_note"]

    report = json.loads((out / "bdrate.json").read_text())
    for name in ("hevc-SE", "hevc-SE (no semantics)"):
        entry = report["methods"][name]
        assert entry["available"] is False and ">= 4 qualities" in entry["reason"]
        assert entry["per_quality"]
    assert len(report["methods"]["hevc-SE"]["per_quality"]) == 2

    for plot in ("rpd_psnr.png", "rpd_msssim.png", "rpd_niqe.png"):
        assert (out / plot).read_bytes()[:8] == PNG_SIGNATURE
        assert cv2.imread(str(out / plot)) is not None
    crops = sorted((out / "crops").glob("*.png"))
    assert len(crops) == len(QUALITIES)  # one image (eval.crops=1), at each quality with a codec-SE model
    crop = cv2.imread(str(crops[0]))
    assert crop is not None and crop.shape[0] == HEIGHT + 22 and crop.shape[1] > 3 * WIDTH

    assert json.loads((out / "niqe_model.json").read_text())["fitted_on"].startswith("uncompressed")
    assert out / "rpd.csv" in tracker.artifacts and out / "crops" in tracker.artifacts
    assert tracker.metrics["eval.hevc-SE.q45.psnr"] == pytest.approx(
        float(next(m["psnr"] for m in means if m["method"] == "hevc-SE" and m["quality"] == "45"))
    )


def test_evaluate_source_input_without_models(setup: tuple[JobConfig, dict, Path], tmp_path: Path) -> None:
    cfg, manifest, _ = setup
    cfg = dataclasses.replace(
        cfg,
        eval=dataclasses.replace(
            cfg.eval, input="source", max_images=1, output_dir=str(tmp_path), qualities=[45]
        ),
    )
    rows = _read_csv(evaluate(cfg, []) / "rpd.csv")
    assert [(r["method"], r["quality"]) for r in rows] == [("hevc", "45")]
    # the same frame through the shards' codec gives the same rate
    assert float(rows[0]["bpp_codec"]) > 0
    assert (
        manifest["codecs"]["hevc_q45"]["bpp_min"]
        <= float(rows[0]["bpp_codec"])
        <= manifest["codecs"]["hevc_q45"]["bpp_max"]
    )


def test_model_for_another_quality_is_refused(setup: tuple[JobConfig, dict, Path], tmp_path: Path) -> None:
    cfg, _, models = setup
    cfg = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, qualities=[37], output_dir=str(tmp_path))
    )
    with pytest.raises(ValueError, match="not evaluated"):
        evaluate(cfg, [str(models / "se45.safetensors")])


def test_registry_uris_go_through_tracking(
    setup: tuple[JobConfig, dict, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, manifest, models = setup
    asked: list[tuple[str, str]] = []

    def fake_resolve(uri: str, *, tracking_uri: str = "", dst_dir: str | Path | None = None) -> Path:
        asked.append((uri, tracking_uri))
        return models / "nosem45.safetensors"

    monkeypatch.setattr(tracking, "resolve_model_uri", fake_resolve)
    label_nc = int(manifest["dataset"]["label_nc"])
    methods = load_methods(
        ["models:/jpdse@champion"], "hevc", QUALITIES, label_nc, torch.device("cpu"), "sqlite:///x"
    )
    assert asked == [("models:/jpdse@champion", "sqlite:///x")]
    assert [(m.name, m.quality, m.uses_labels) for m in methods] == [
        ("hevc", None, False),
        ("hevc-SE (no semantics)", 45, False),
    ]
    with pytest.raises(ValueError, match="label_nc"):
        load_methods(["models:/jpdse@champion"], "hevc", QUALITIES, label_nc + 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="codec 'hevc'"):
        load_methods(["models:/jpdse@champion"], "jpeg", QUALITIES, label_nc, torch.device("cpu"))


def test_enhance_pads_and_crops_back() -> None:
    torch.manual_seed(0)
    generator, _ = build_models(TINY, 5, True)
    spec = make_spec(TINY, 5, True, codec="hevc", quality=45, phase=3)
    rng = np.random.default_rng(0)
    decoded = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (30, 50), dtype=np.uint8)
    out = enhance(Method("hevc-SE", 45, generator.eval(), spec), decoded, label, None, torch.device("cpu"))
    assert out.shape == (30, 50, 3) and out.dtype == np.uint8


def _means(name: str, factor: float, gain: float) -> list[dict[str, Any]]:
    base = [
        (0.05, 30.0, 0.90),
        (0.09, 32.0, 0.93),
        (0.16, 34.0, 0.95),
        (0.30, 36.0, 0.97),
        (0.55, 38.0, 0.98),
    ]
    out = []
    for q, (bpp, p, m) in zip((47, 42, 37, 32, 27), base, strict=True):
        out.append(
            {
                "method": "hevc",
                "quality": q,
                "bpp_codec": bpp,
                "bpp_total": bpp,
                "psnr": p,
                "ms_ssim": m,
                "niqe": 5.0,
            }
        )
        out.append(
            {
                "method": name,
                "quality": q,
                "bpp_codec": bpp * factor,
                "bpp_total": bpp * factor * 1.1,
                "psnr": p + gain,
                "ms_ssim": m,
                "niqe": 4.0,
            }
        )
    return out


def test_bdrate_report_with_enough_qualities() -> None:
    report = _bdrate_report(_means("hevc-SE", 0.9, 0.0), "hevc", [27, 32, 37, 42, 47])
    entry = report["methods"]["hevc-SE"]
    assert entry["available"] is True
    assert entry["bd_rate_pct"]["psnr/bpp_codec"] == pytest.approx(-10.0, abs=1e-9)
    assert entry["bd_rate_pct"]["psnr/bpp_total"] == pytest.approx((0.9 * 1.1 - 1) * 100, abs=1e-9)
    assert entry["bd_rate_pct"]["ms_ssim/bpp_codec"] == pytest.approx(-10.0, abs=1e-9)
    assert [p["delta_niqe"] for p in entry["per_quality"]] == [-1.0] * 5
