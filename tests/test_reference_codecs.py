"""Issue 13 item 5: reference codecs (eval.reference_codecs: AVIF, lossy JPEG XL) scored beside the evaluated
codec on the same originals, each a curve of its own and an anchor of the BD-rate table."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from pipeline.cli import main
from pipeline.config import ConfigError, JobConfig, ModelConfig, from_dict, load_config
from pipeline.eval.evaluate import check_reference_codecs, evaluate
from pipeline.eval.report import bdrate_report, format_reference_bdrate, tracked_metrics
from pipeline.eval.rows import MeanRow, Measures
from pipeline.model.export import export_generator
from pipeline.model.networks import build_models
from pipeline.model.spec import GeneratorSpec
from pipeline.segment import base as segment_base
from pipeline.segment.base import Segmenter, register_segmenter, save_segmenter
from pipeline.tracking import Tracker

WIDTH, HEIGHT = 256, 128
HEVC = [32, 37, 42, 47]
LADDERS = {"avif": [0, 15, 30, 50], "jxl": [0, 15, 30, 60]}  # EvalConfig's defaults
TINY = ModelConfig(ngf=4, n_downsample=2, n_blocks=1, ndf=4, n_layers_d=1, num_d=1)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURVES = {"hevc", "hevc-SE", "hevc-SE (no semantics)"}


class Recorder(Tracker):
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.artifacts: list[Path] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(path))


class RefJudge(Segmenter):
    """A tiny judging segmenter, enough to score downstream accuracy on the CPU."""

    architecture = "tiny-judge-references"

    def __init__(self, num_classes: int = 19) -> None:
        super().__init__(num_classes)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def _subset(root: Path, out: Path, frames: int = 2) -> Path:
    """A Cityscapes layout of a few sample frames, as symlinks (the sample itself stays read-only)."""
    for image in sorted((root / "leftImg8bit" / "val").glob("lindau/*_leftImg8bit.png"))[:frames]:
        key, city = image.name[: -len("_leftImg8bit.png")], image.parent.name
        for folder in ("leftImg8bit", "gtFine"):
            (out / folder / "val" / city).mkdir(parents=True, exist_ok=True)
        (out / "leftImg8bit" / "val" / city / image.name).symlink_to(image)
        for kind in ("labelIds", "instanceIds"):
            name = f"{key}_gtFine_{kind}.png"
            (out / "gtFine" / "val" / city / name).symlink_to(root / "gtFine" / "val" / city / name)
    return out


@pytest.fixture
def cfg(tmp_path: Path, cityscapes_root: Path) -> JobConfig:
    """Two lindau frames at 256x128, HEVC at four QPs encoded on the fly, AVIF and JPEG XL as references."""
    return from_dict(
        {
            "data": {
                "root": str(_subset(cityscapes_root, tmp_path / "data")),
                "width": WIDTH,
                "height": HEIGHT,
            },
            "shards": {"codecs": [{"name": "hevc", "qualities": HEVC}]},
            "loader": {"codec": "hevc", "quality": 42},
            "eval": {
                "output_dir": str(tmp_path / "eval"),
                "input": "source",
                "max_images": 2,
                "crops": 1,
                "reference_codecs": ["avif", "jxl"],
            },
        }
    )


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _models(folder: Path, label_nc: int = 34) -> list[Path]:
    """codec-SE and its ablation: one tiny generator each for the four QPs (a point of its curve at each)."""
    paths = []
    for name, zero in (("se", False), ("nosem", True)):
        model = dataclasses.replace(TINY, zero_semantics=zero)
        torch.manual_seed(len(paths))
        generator, _ = build_models(model, label_nc, True)
        with torch.no_grad():
            generator.correction[-1].weight.normal_(0.0, 0.02)  # not the identity
        spec = GeneratorSpec.from_config(
            model, label_nc, True, codec="hevc", quality=42, phase=3, qualities=HEVC
        )
        paths.append(export_generator(folder / f"{name}.safetensors", generator, spec))
    return paths


@pytest.mark.slow
def test_reference_codecs_are_curves_and_anchors(
    cfg: JobConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    segment_base.available_segmenters()
    monkeypatch.setattr(segment_base, "_REGISTRY", dict(segment_base._REGISTRY))
    register_segmenter(RefJudge)
    torch.manual_seed(3)
    judge = save_segmenter(RefJudge(), tmp_path / "judge.safetensors")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, segmenter=str(judge)))
    tracker = Recorder()
    out = evaluate(cfg, [str(p) for p in _models(tmp_path / "models")], tracker)
    printed = capsys.readouterr().out

    rows = _csv(out / "rpd.csv")
    keys = sorted({r["key"] for r in rows})
    assert len(keys) == 2
    for name, ladder in LADDERS.items():
        own = [r for r in rows if r["method"] == name]
        assert {(r["key"], int(r["quality"])) for r in own} == {(k, q) for k in keys for q in ladder}
        assert {r["model"] for r in own} == {r["codec"] for r in own} == {name}
        for row in own:  # no label map: the decoder receives the codec's bits only
            assert float(row["bpp_total"]) == float(row["bpp_codec"]) > 0
            assert 0 < float(row["psnr"]) < 100 and row["miou"] != ""
        for key in keys:  # each image's rate rises with the quality
            mine = sorted((r for r in own if r["key"] == key), key=lambda r: int(r["quality"]))
            rates = [float(r["bpp_codec"]) for r in mine]
            assert rates == sorted(rates) and len(set(rates)) == len(ladder)
    # the evaluated codec's rows keep their own rates and codec
    assert {r["codec"] for r in rows if r["method"] in CURVES} == {"hevc"}

    means = _csv(out / "rpd_mean.csv")
    for name, ladder in LADDERS.items():
        own = sorted((m for m in means if m["method"] == name), key=lambda m: int(m["quality"]))
        assert [int(m["quality"]) for m in own] == ladder and all(int(m["images"]) == 2 for m in own)
        rates = [float(m["bpp_codec"]) for m in own]
        assert rates == sorted(rates)
        assert [float(m["psnr"]) for m in own][-1] > [float(m["psnr"]) for m in own][0]

    report = json.loads((out / "bdrate.json").read_text())
    assert set(report["methods"]) == CURVES - {"hevc"}  # against the evaluated codec: codec-SE and ablation
    assert set(report["references"]) == set(LADDERS)
    for name, block in report["references"].items():
        assert block["qualities"] == LADDERS[name] and set(block["methods"]) == CURVES
        for curve, entry in block["methods"].items():
            assert entry["available"] is True, (name, curve)
            assert set(entry["bd_rate_pct"]) == {"psnr/bpp_codec", "psnr/bpp_total", "ms_ssim/bpp_codec",
                                                 "ms_ssim/bpp_total"}  # fmt: skip
        hevc = block["methods"]["hevc"]["bd_rate_pct"]["psnr/bpp_codec"]
        assert hevc is not None and math.isfinite(hevc)
        assert tracker.metrics[f"eval.bdrate_vs_{name}.hevc.psnr_bpp_codec"] == pytest.approx(hevc)
        # codec-SE reads the label map: its total bits cost more than its codec bits against the same anchor
        se = block["methods"]["hevc-SE"]["bd_rate_pct"]
        if se["psnr/bpp_codec"] is not None and se["psnr/bpp_total"] is not None:
            assert se["psnr/bpp_total"] > se["psnr/bpp_codec"]

    assert "BD-rate against the reference codecs" in printed
    assert "reference codecs (no model; q on each codec's own scale): avif q0/q15/q30/q50" in printed
    for curve in CURVES:
        for name in LADDERS:
            assert any(line.split() and line.startswith(f"  {curve} ") and f" {name} " in line
                       for line in printed.splitlines()), (curve, name)  # fmt: skip
    assert tracker.metrics["eval.avif.q30.psnr"] > 0 and "eval.jxl.q60.miou" in tracker.metrics
    for plot in (
        "rpd_psnr.png",
        "rpd_msssim.png",
        "rpd_niqe.png",
        "rate_miou.png",
        "rate_pixel_accuracy.png",
    ):
        assert (out / plot).read_bytes()[:8] == PNG_SIGNATURE and out / plot in tracker.artifacts
    crops = {p.name for p in (out / "crops").glob("*.png")}
    assert any(crops >= {f"{key}_avif.png", f"{key}_jxl.png"} for key in keys)  # eval.crops=1: one image
    accuracy = json.loads((out / "segmentation.json").read_text())
    assert {m["method"] for m in accuracy["methods"]} == CURVES | set(LADDERS)


def test_without_references_nothing_is_added(cfg: JobConfig) -> None:
    values = {"reference_codecs": [], "max_images": 1, "crops": 0, "qualities": [42]}
    out = evaluate(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **values)), [])
    assert {r["method"] for r in _csv(out / "rpd.csv")} == {"hevc"}
    assert json.loads((out / "bdrate.json").read_text())["references"] == {}


def _mean(method: str, quality: int, bpp: float, psnr: float, label_bpp: float = 0.0) -> MeanRow:
    measures = Measures(bpp_codec=bpp, bpp_total=bpp + label_bpp, psnr=psnr, ms_ssim=1 - 10 ** (-psnr / 20),
                        niqe=5.0, lpips=math.nan)  # fmt: skip
    return MeanRow(method, method, method, method, quality, 2, measures, math.nan, "", "", False)


def test_bdrate_against_references_on_codec_and_total_bits() -> None:
    curve = [(0.05, 30.0), (0.09, 32.0), (0.16, 34.0), (0.30, 36.0)]
    means = []
    for qp, (bpp, psnr) in zip((47, 42, 37, 32), curve, strict=True):
        means.append(_mean("hevc", qp, bpp, psnr))
        means.append(_mean("hevc-SE", qp, bpp, psnr + 0.5, label_bpp=0.05))
    for q, (bpp, psnr) in zip((10, 20, 30, 40), curve, strict=True):
        means.append(_mean("avif", q, 0.8 * bpp, psnr))  # AVIF: 20 % fewer bits at equal PSNR
    report = bdrate_report(means, "hevc", [32, 37, 42, 47], ["avif"])
    assert set(report["methods"]) == {"hevc-SE"}  # a reference is no test curve of the codec's deltas
    block = report["references"]["avif"]
    assert block["qualities"] == [10, 20, 30, 40] and set(block["methods"]) == {"hevc", "hevc-SE"}
    hevc = block["methods"]["hevc"]["bd_rate_pct"]
    assert hevc["psnr/bpp_codec"] == pytest.approx(25.0, abs=1e-6) == pytest.approx(hevc["psnr/bpp_total"])
    se = block["methods"]["hevc-SE"]["bd_rate_pct"]
    assert se["psnr/bpp_codec"] < hevc["psnr/bpp_codec"] < se["psnr/bpp_total"]
    text = format_reference_bdrate(report)
    assert "hevc-SE" in text and "+25.00 %" in text
    metrics = tracked_metrics(means, report)
    assert metrics["eval.bdrate_vs_avif.hevc.psnr_bpp_codec"] == pytest.approx(25.0, abs=1e-6)
    # too few qualities: said, not computed
    short = bdrate_report([m for m in means if m.quality not in (40, 32)], "hevc", [37, 42, 47], ["avif"])
    entry = short["references"]["avif"]["methods"]["hevc"]
    assert entry["available"] is False and "avif 3" in entry["reason"]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "eval.reference_codecs=[avif, vvc]",
            "eval.reference_codecs: unknown codec 'vvc'; known codecs: avif",
        ),
        ("eval.reference_codecs=[avif, avif]", "eval.reference_codecs names a codec twice"),
        (
            "eval.reference_codecs=[webp]",
            "eval.reference_qualities has no qualities for the reference codec webp",
        ),
        ("eval.reference_qualities={avif: [0, 101]}", "eval.reference_qualities.avif must lie in [0, 100]"),
        (
            "eval.reference_qualities={jxl: [30, 30]}",
            "eval.reference_qualities.jxl must be a list of distinct",
        ),
        ("eval.reference_qualities={jxl: 30}", "eval.reference_qualities.jxl must be a list of distinct"),
        ("eval.reference_qualities={jxl: [1.5]}", "eval.reference_qualities.jxl must be a list of distinct"),
        ("eval.reference_qualities={avfi: [1]}", "eval.reference_qualities: unknown codec 'avfi'"),
    ],
)
def test_bad_references_are_one_line_config_errors(
    override: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert main(["evaluate", override]) == 2
    assert capsys.readouterr().err == f"error: {err.value}\n"


def test_defaults_and_the_job_config() -> None:
    default = load_config()
    assert default.eval.reference_codecs == ["avif", "jxl"] and default.eval.reference_qualities == LADDERS
    assert from_dict({}).eval.reference_codecs == []  # the dataclass default: nothing extra
    ladder = load_config(None, ["eval.reference_qualities={avif: [5, 10, 20, 40]}"]).eval.reference_qualities
    assert ladder == {"avif": [5, 10, 20, 40], "jxl": LADDERS["jxl"]}  # the other ladder stays


def test_missing_or_evaluated_codec_is_refused_before_work(
    cfg: JobConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {"reference_codecs": ["avif", "hevc"], "reference_qualities": {**LADDERS, "hevc": [42]}}
    same = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **values))
    with pytest.raises(ConfigError, match="eval.reference_codecs holds hevc, the evaluated codec"):
        check_reference_codecs(same)
    from PIL import features

    monkeypatch.setattr(features, "check", lambda name: name != "avif")
    with pytest.raises(ConfigError) as err:
        evaluate(cfg, [])
    assert str(err.value).startswith("eval.reference_codecs: codec 'avif': the avif codec needs Pillow")
    assert not Path(cfg.eval.output_dir).exists()  # refused before anything was scored or written


def test_the_main_job_refuses_them_before_building_shards(
    tmp_path: Path, cityscapes_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [f"data.root={cityscapes_root}", "shards.output=shards", "tracking.enabled=false"]
    assert main(["run", *args, "eval.reference_codecs=[hevc]", "eval.reference_qualities={hevc: [42]}"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: eval.reference_codecs holds hevc, the evaluated codec (loader.codec)"
    )
    assert not (tmp_path / "shards").exists()
