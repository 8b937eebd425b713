"""R-PD evaluation end to end on shards of three sample frames (256x128, hevc QP 37/45) with tiny
untrained generators, plus the on-the-fly source input, model identities, the training-frames guard and
the BD-rate report glue."""

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
from pipeline.config import ConfigError, JobConfig, ModelConfig, from_dict
from pipeline.data.codecs.hevc import HEVCCodec
from pipeline.data.shards import build_shards
from pipeline.data.sources import label_categories
from pipeline.eval.evaluate import evaluate
from pipeline.eval.fidelity import psnr
from pipeline.eval.inputs import EvalSample, ShardInput
from pipeline.eval.methods import Method, load_methods, map_choice_methods, reconstruct
from pipeline.eval.report import bdrate_report, describe_frames, slug
from pipeline.eval.rows import MEAN_COLUMNS, ROW_COLUMNS, MeanRow, Measures
from pipeline.model.export import export_generator, weights_sha256
from pipeline.model.inputs import class_count
from pipeline.model.map_choice import MapChoice
from pipeline.model.networks import Generator, build_models
from pipeline.model.spec import GeneratorSpec
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
    label_nc = int(manifest.dataset.label_nc)
    torch.manual_seed(0)
    models = base / "models"
    for name, quality, zero in (("se37", 37, False), ("se45", 45, False), ("nosem45", 45, True)):
        generator, _ = build_models(dataclasses.replace(TINY, zero_semantics=zero), label_nc, True)
        spec = GeneratorSpec.from_config(
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


def _with_eval(cfg: JobConfig, **values: Any) -> JobConfig:
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **values))


def _fitted_columns(columns: list[str]) -> list[str]:
    """``columns`` with eval.niqe_fitted's extra column right after ``niqe``."""
    at = columns.index("niqe") + 1
    return [*columns[:at], "niqe_fitted", *columns[at:]]


def _export(path: Path, label_nc: int, seed: int, quality: int = 45, **kwargs: Any) -> Path:
    """A tiny residual generator whose correction head is not zero (so each seed gives other images)."""
    torch.manual_seed(seed)
    generator, _ = build_models(TINY, label_nc, True)
    assert isinstance(generator, Generator) and generator.correction is not None
    with torch.no_grad():
        generator.correction[-1].weight.normal_(0.0, 0.02)
    spec = GeneratorSpec.from_config(TINY, label_nc, True, codec="hevc", quality=quality, phase=3)
    return export_generator(path, generator, spec, **kwargs)


@pytest.mark.slow
def test_evaluate_end_to_end(setup: tuple[JobConfig, dict, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _, models = setup
    cfg = _with_eval(cfg, niqe_fitted=True)
    tracker = RecordingTracker()
    paths = [str(models / f"{n}.safetensors") for n in ("se37", "se45", "nosem45")]
    out = evaluate(cfg, paths, tracker=tracker)
    assert out == Path(cfg.eval.output_dir)
    printed = capsys.readouterr().out

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
    assert list(rows[0]) == _fitted_columns(ROW_COLUMNS)
    identities = {f"{p}#{weights_sha256(p)[:12]}": p for p in paths}
    assert {r["model"] for r in rows} == {"hevc", *identities}
    assert all(r["on_training_frames"] == "False" for r in rows)

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
        assert math.isfinite(float(row["niqe_fitted"]))
    assert float(by[(rows[0]["key"], "hevc", 37)]["bpp_codec"]) > float(
        by[(rows[0]["key"], "hevc", 45)]["bpp_codec"]
    )

    means = _read_csv(out / "rpd_mean.csv")
    assert len(means) == len(methods) and list(means[0]) == _fitted_columns(MEAN_COLUMNS)
    for mean in means:
        group = [r for r in rows if r["model"] == mean["model"] and r["quality"] == mean["quality"]]
        assert {r["method"] for r in group} == {mean["method"]}
        assert int(mean["images"]) == len(group) == images
        for col in ("bpp_codec", "bpp_total", "psnr", "ms_ssim", "niqe", "niqe_fitted"):
            assert float(mean[col]) == pytest.approx(np.mean([float(r[col]) for r in group]), rel=1e-12)
        assert math.isnan(float(mean["lpips"])) and "LPIPS" in mean["lpips_note"]
        assert math.isnan(float(mean["fid"])) and "FID" in mean["fid_note"]

    report = json.loads((out / "bdrate.json").read_text())
    for name in ("hevc-SE", "hevc-SE (no semantics)"):
        entry = report["methods"][name]
        assert entry["available"] is False and ">= 4 qualities" in entry["reason"]
        assert entry["per_quality"]
    assert len(report["methods"]["hevc-SE"]["per_quality"]) == 2
    se37 = f"{paths[0]}#{weights_sha256(paths[0])[:12]}"
    assert report["methods"]["hevc-SE"]["per_quality"][0]["model"] == se37
    keys = list(dict.fromkeys(r["key"] for r in rows))
    assert report["frames"] == {"split": "val", "count": images, "keys": keys}
    assert math.isfinite(report["original_niqe"]) and math.isfinite(report["original_niqe_fitted"])
    # frame-paired gains: each curve against the codec where both were scored, codec-SE against its
    # ablation at the one quality both have
    pairs = {(g["test"], g["anchor"], g["quality"], g["measure"]): g for g in report["frame_gains"]}
    assert {k[:3] for k in pairs} == {
        ("hevc-SE", "hevc", 37),
        ("hevc-SE", "hevc", 45),
        ("hevc-SE (no semantics)", "hevc", 45),
        ("hevc-SE", "hevc-SE (no semantics)", 45),
    }
    gain = pairs[("hevc-SE", "hevc-SE (no semantics)", 45, "psnr")]
    by_method = {(r["method"], r["key"]): float(r["psnr"]) for r in rows if r["quality"] == "45"}
    diffs = [
        by_method[("hevc-SE", k)] - by_method[("hevc-SE (no semantics)", k)]
        for k in dict.fromkeys(r["key"] for r in rows)
    ]
    assert gain["frames"] == images and gain["mean"] == pytest.approx(np.mean(diffs), abs=1e-12)
    assert "hevc-SE - hevc-SE (no semantics)" in printed
    tracked = tracker.metrics["eval.gain.hevc-SE.vs.hevc-SE_no_semantics.q45.psnr"]
    assert tracked == pytest.approx(gain["mean"])
    assert "eval.gain.hevc-SE.vs.hevc.q37.niqe_ci95" in tracker.metrics
    assert f"scored {images} frames of split 'val': {', '.join(keys)}" in printed
    for mean in means:
        assert mean["label"] in printed
    assert printed.count("does not record its training frames") == 3

    for plot in ("rpd_psnr.png", "rpd_msssim.png", "rpd_niqe.png"):
        assert (out / plot).read_bytes()[:8] == PNG_SIGNATURE
        assert cv2.imread(str(out / plot)) is not None
    crops = sorted((out / "crops").glob("*.png"))
    assert len(crops) == len(QUALITIES)  # one image (eval.crops=1), at each quality with a codec-SE model
    crop = cv2.imread(str(crops[0]))
    assert crop is not None and crop.shape[0] == HEIGHT + 22 and crop.shape[1] > 3 * WIDTH

    assert json.loads((out / "niqe_model.json").read_text())["fitted_on"].startswith("uncompressed")
    assert out / "rpd.csv" in tracker.artifacts and out / "crops" in tracker.artifacts
    se45 = next(m for m in means if m["method"] == "hevc-SE" and m["quality"] == "45")
    assert se45["label"] == f"models/se45#{weights_sha256(paths[1])[:12]}"
    assert tracker.metrics[f"eval.hevc-SE.{slug(se45['label'])}.q45.psnr"] == pytest.approx(
        float(se45["psnr"])
    )
    codec45 = next(m for m in means if m["method"] == "hevc" and m["quality"] == "45")
    assert tracker.metrics["eval.hevc.q45.niqe_fitted"] == pytest.approx(float(codec45["niqe_fitted"]))


def test_evaluate_source_input_without_models(setup: tuple[JobConfig, dict, Path], tmp_path: Path) -> None:
    cfg, manifest, _ = setup
    cfg = _with_eval(cfg, input="source", max_images=1, output_dir=str(tmp_path), qualities=[45])
    rows = _read_csv(evaluate(cfg, []) / "rpd.csv")
    assert [(r["method"], r["model"], r["quality"]) for r in rows] == [("hevc", "hevc", "45")]
    assert list(rows[0]) == ROW_COLUMNS  # no niqe_fitted column, no fitted model, without eval.niqe_fitted
    assert not (tmp_path / "niqe_model.json").exists()
    assert json.loads((tmp_path / "bdrate.json").read_text())["frames"]["keys"] == [rows[0]["key"]]
    # the same frame through the shards' codec gives the same rate
    assert float(rows[0]["bpp_codec"]) > 0
    assert (
        manifest.codecs["hevc_q45"].bpp_min
        <= float(rows[0]["bpp_codec"])
        <= manifest.codecs["hevc_q45"].bpp_max
    )


def test_model_for_another_quality_is_refused(setup: tuple[JobConfig, dict, Path], tmp_path: Path) -> None:
    cfg, _, models = setup
    cfg = _with_eval(cfg, qualities=[37], output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not evaluated"):
        evaluate(cfg, [str(models / "se45.safetensors")])


def test_a_model_of_several_qualities_is_one_point_at_each(
    setup: tuple[JobConfig, dict, Path], tmp_path: Path
) -> None:
    """A model trained on several qualities (loader.qualities) scores at each of them, as one model."""
    cfg, manifest, _ = setup
    torch.manual_seed(1)
    generator, _ = build_models(TINY, int(manifest.dataset.label_nc), True)
    with torch.no_grad():
        generator.correction[-1].weight.normal_(0.0, 0.02)  # not the identity: its rows differ from HEVC's
    spec = GeneratorSpec.from_config(
        TINY, int(manifest.dataset.label_nc), True, codec="hevc", quality=45, phase=3, qualities=QUALITIES
    )
    path = export_generator(tmp_path / "both.safetensors", generator, spec)
    out = evaluate(_with_eval(cfg, output_dir=str(tmp_path / "out")), [str(path)])
    means = [r for r in _read_csv(out / "rpd_mean.csv") if r["method"] == "hevc-SE"]
    assert sorted(int(r["quality"]) for r in means) == QUALITIES
    assert len({r["model"] for r in means}) == 1 and all(int(r["images"]) == 2 for r in means)


def test_a_model_on_categories_is_charged_its_class_map(
    setup: tuple[JobConfig, dict, Path], tmp_path: Path
) -> None:
    """A model that sees categories (model.semantic_classes) is charged the class map its decoder receives
    (pipeline.eval.label_rate), fewer bits than the label map a label-id model of the same quality is."""
    cfg, manifest, models = setup
    label_nc = int(manifest.dataset.label_nc)
    classes = label_categories("cityscapes", label_nc)
    model = dataclasses.replace(TINY, semantic_classes="categories")
    generator, _ = build_models(model, class_count(label_nc, classes), True)
    spec = GeneratorSpec.from_config(
        model, label_nc, True, label_classes=classes, codec="hevc", quality=45, phase=3
    )
    path = export_generator(tmp_path / "cat45.safetensors", generator, spec)
    out = evaluate(
        _with_eval(cfg, output_dir=str(tmp_path / "out")), [str(path), str(models / "se45.safetensors")]
    )
    maps: dict[str, list[float]] = {}
    for row in _read_csv(out / "rpd.csv"):
        if row["method"].startswith("hevc-SE") and int(row["quality"]) == 45:
            maps.setdefault(row["model"].split("#")[0], []).append(
                float(row["bpp_total"]) - float(row["bpp_codec"])
            )
    cat, ids = maps[str(path)], maps[str(models / "se45.safetensors")]
    assert len(cat) == len(ids) == 2 and all(0 < c < i for c, i in zip(cat, ids, strict=True))


def test_registry_uris_go_through_tracking(
    setup: tuple[JobConfig, dict, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, manifest, models = setup
    asked: list[tuple[str, str]] = []

    def fake_pin(uri: str, *, tracking_uri: str = "") -> str:
        asked.append((uri, tracking_uri))
        return "models:/jpdse/7"

    def fake_resolve(uri: str, *, tracking_uri: str = "", dst_dir: str | Path | None = None) -> Path:
        asked.append((uri, tracking_uri))
        return models / "nosem45.safetensors"

    monkeypatch.setattr(tracking, "pin_model_uri", fake_pin)
    monkeypatch.setattr(tracking, "resolve_model_uri", fake_resolve)
    label_nc = int(manifest.dataset.label_nc)
    methods = load_methods(
        ["models:/jpdse@champion"], "hevc", QUALITIES, label_nc, torch.device("cpu"), "sqlite:///x"
    )
    # the alias is pinned once, and the pinned version is what is downloaded and named
    assert asked == [("models:/jpdse@champion", "sqlite:///x"), ("models:/jpdse/7", "sqlite:///x")]
    assert [(m.name, m.quality, m.uses_labels, m.model, m.label) for m in methods] == [
        ("hevc", None, False, "hevc", "hevc"),
        ("hevc-SE (no semantics)", 45, False, "models:/jpdse/7", "jpdse/7"),
    ]
    with pytest.raises(ValueError, match="label_nc"):
        load_methods(["models:/jpdse@champion"], "hevc", QUALITIES, label_nc + 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="codec 'hevc'"):
        load_methods(["models:/jpdse@champion"], "jpeg", QUALITIES, label_nc, torch.device("cpu"))


def test_enhance_pads_and_crops_back() -> None:
    torch.manual_seed(0)
    generator, _ = build_models(TINY, 5, True)
    spec = GeneratorSpec.from_config(TINY, 5, True, codec="hevc", quality=45, phase=3)
    rng = np.random.default_rng(0)
    decoded = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (30, 50), dtype=np.uint8)

    def enhance(method: Method, decoded: np.ndarray) -> np.ndarray:
        sample = EvalSample("k", decoded, label, None, decoded={45: decoded}, bpp={45: 0.5})
        made = reconstruct(method, sample, 45)
        assert made.bpp == 0.5 and made.scale is None  # no correction scale: the codec's rate
        return made.image

    out = enhance(Method("hevc-SE", 45, generator.eval(), spec), decoded)
    assert out.shape == (30, 50, 3) and out.dtype == np.uint8
    # a fresh residual generator outputs the decoded image through its correction head (phases 2-3) ...
    assert np.array_equal(out, decoded)
    # ... and a phase-1 export draws from the labels alone with the synthesis head
    phase1 = dataclasses.replace(spec, phase=1)
    prior = enhance(Method("prior", 45, generator, phase1), decoded)
    other = enhance(Method("prior", 45, generator, phase1), 255 - decoded)
    assert np.array_equal(prior, other) and not np.array_equal(prior, decoded)
    # the codec's method is its decoded image
    assert enhance(Method("hevc", None), decoded) is decoded


def test_models_are_never_pooled(
    setup: tuple[JobConfig, dict, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three exports of one codec and quality, all named generator.safetensors: three models, three curves;
    the same file given twice is one model."""
    cfg, manifest, _ = setup
    label_nc = int(manifest.dataset.label_nc)
    paths = [
        str(_export(tmp_path / run / "generator.safetensors", label_nc, seed))
        for seed, run in enumerate("abc")
    ]
    cfg = _with_eval(cfg, qualities=[45], output_dir=str(tmp_path / "out"))
    out = evaluate(cfg, [*paths, paths[0]])
    printed = capsys.readouterr().out
    assert f"{paths[0]} is the model {paths[0]}#{weights_sha256(paths[0])[:12]} again" in printed

    rows = _read_csv(out / "rpd.csv")
    images = cfg.eval.max_images
    assert len(rows) == images * (1 + len(paths))
    identities = [f"{p}#{weights_sha256(p)[:12]}" for p in paths]
    by_model = {m: [r for r in rows if r["model"] == m] for m in ["hevc", *identities]}
    assert all(len(group) == images for group in by_model.values())
    assert [{r["method"] for r in by_model[m]} for m in identities] == [
        {"hevc-SE [a]"},
        {"hevc-SE [b]"},
        {"hevc-SE [c]"},
    ]

    means = _read_csv(out / "rpd_mean.csv")
    assert [(m["method"], m["model"], int(m["images"])) for m in means] == [
        ("hevc", "hevc", images),
        *((f"hevc-SE [{run}]", identity, images) for run, identity in zip("abc", identities, strict=True)),
    ]
    for mean in means:
        group = by_model[mean["model"]]
        assert float(mean["psnr"]) == pytest.approx(np.mean([float(r["psnr"]) for r in group]), rel=1e-12)
    assert len({m["psnr"] for m in means}) == len(means)  # four different models, four different results
    labels = [m["label"] for m in means]
    assert len(set(labels)) == len(labels) and all(label in printed for label in labels)
    assert labels[1] == f"a/generator#{weights_sha256(paths[0])[:12]}"
    report = json.loads((out / "bdrate.json").read_text())
    assert sorted(report["methods"]) == ["hevc-SE [a]", "hevc-SE [b]", "hevc-SE [c]"]


def test_same_folder_names_fall_back_to_hashes(setup: tuple[JobConfig, dict, Path], tmp_path: Path) -> None:
    _, manifest, _ = setup
    label_nc = int(manifest.dataset.label_nc)
    paths = [
        str(_export(tmp_path / run / "phase3" / "generator.safetensors", label_nc, i))
        for i, run in enumerate("xy")
    ]
    paths.append(str(_export(tmp_path / "x" / "phase3" / "other.safetensors", label_nc, 2)))
    methods = load_methods(paths, "hevc", [45], label_nc, torch.device("cpu"))
    # "phase3" is shared by all, "x" by two: the hashes tell them apart
    assert [m.name for m in methods[1:]] == [f"hevc-SE [{weights_sha256(p)[:12]}]" for p in paths]
    # a lone model keeps the plain curve name
    assert [m.name for m in load_methods(paths[:1], "hevc", [45], label_nc, torch.device("cpu"))[1:]] == [
        "hevc-SE"
    ]


def test_scored_frames_are_listed_short() -> None:
    assert describe_frames("val", ["a", "b"]) == "scored 2 frames of split 'val': a, b"
    keys = [f"k{i:02d}" for i in range(25)]
    assert describe_frames("test", keys) == (
        "scored 25 frames of split 'test': k00, k01, k02, k03, k04, ... 15 more ..., k20, k21, k22, k23, k24"
    )


def test_training_frames_are_never_scored_unless_allowed(
    setup: tuple[JobConfig, dict, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, manifest, _ = setup
    label_nc = int(manifest.dataset.label_nc)
    cfg = _with_eval(cfg, qualities=[45], output_dir=str(tmp_path / "out"))
    keys = ShardInput(cfg).keys()
    assert len(keys) == cfg.eval.max_images
    trained = str(
        _export(tmp_path / "trained" / "g.safetensors", label_nc, 0, train_frames=[keys[0], "zz_1"])
    )
    clean = str(_export(tmp_path / "clean" / "g.safetensors", label_nc, 1, train_frames=["zz_1", "zz_2"]))
    trained_id = f"{trained}#{weights_sha256(trained)[:12]}"

    with pytest.raises(
        ValueError, match=rf"model {trained_id} was trained on 1 of the evaluated frames \({keys[0]}\)"
    ):
        evaluate(cfg, [clean, trained])
    assert not (tmp_path / "out" / "rpd.csv").exists()
    capsys.readouterr()

    out = evaluate(_with_eval(cfg, allow_training_frames=True), [clean, trained])
    printed = capsys.readouterr().out
    assert (
        f"WARNING: SCORED ON TRAINING FRAMES: model {trained_id} was trained on 1 of the evaluated frames"
        in printed
    )
    assert "does not record" not in printed
    rows = _read_csv(out / "rpd.csv")
    flagged = {r["model"] for r in rows if r["on_training_frames"] == "True"}
    assert flagged == {trained_id} and len(rows) == 3 * cfg.eval.max_images
    means = _read_csv(out / "rpd_mean.csv")
    assert [m["on_training_frames"] for m in means] == ["False", "False", "True"]
    table = [line for line in printed.splitlines() if means[2]["label"] in line]
    assert len(table) == 1 and table[0].startswith("!")
    report = json.loads((out / "bdrate.json").read_text())
    assert report["methods"]["hevc-SE [trained]"]["per_quality"][0]["on_training_frames"] is True


def _mean(method: str, model: str, quality: int, **measures: float) -> MeanRow:
    return MeanRow(
        method=method,
        model=model,
        label=model,
        codec="hevc",
        quality=quality,
        images=1,
        measures=Measures(lpips=math.nan, **measures),
        fid=math.nan,
        lpips_note="",
        fid_note="",
        on_training_frames=False,
    )


def _means(name: str, factor: float, gain: float) -> list[MeanRow]:
    base = [
        (0.05, 30.0, 0.90),
        (0.09, 32.0, 0.93),
        (0.16, 34.0, 0.95),
        (0.30, 36.0, 0.97),
        (0.55, 38.0, 0.98),
    ]
    out = []
    for q, (bpp, p, m) in zip((47, 42, 37, 32, 27), base, strict=True):
        out.append(_mean("hevc", "hevc", q, bpp_codec=bpp, bpp_total=bpp, psnr=p, ms_ssim=m, niqe=5.0))
        out.append(
            _mean(
                name,
                f"{name}.safetensors#0123456789ab",
                q,
                bpp_codec=bpp * factor,
                bpp_total=bpp * factor * 1.1,
                psnr=p + gain,
                ms_ssim=m,
                niqe=4.0,
            )
        )
    return out


def test_bdrate_report_with_enough_qualities() -> None:
    report = bdrate_report(_means("hevc-SE", 0.9, 0.0), "hevc", [27, 32, 37, 42, 47])
    entry = report["methods"]["hevc-SE"]
    assert entry["available"] is True
    assert entry["bd_rate_pct"]["psnr/bpp_codec"] == pytest.approx(-10.0, abs=1e-9)
    assert entry["bd_rate_pct"]["psnr/bpp_total"] == pytest.approx((0.9 * 1.1 - 1) * 100, abs=1e-9)
    assert entry["bd_rate_pct"]["ms_ssim/bpp_codec"] == pytest.approx(-10.0, abs=1e-9)
    assert [p["delta_niqe"] for p in entry["per_quality"]] == [-1.0] * 5


def test_withheld_maps_score_the_same_weights_without_their_map(
    setup: tuple[JobConfig, dict, Path], tmp_path: Path
) -> None:
    """eval.withheld_maps: a curve of its own for a model that receives a map, scored on zero semantics and
    charged no label bits, image for image what the same weights exported as a zero-semantics model give;
    paired frame by frame with the model's own curve. A zero-semantics model gets no such curve."""
    cfg, manifest, models = setup
    label_nc = int(manifest.dataset.label_nc)
    torch.manual_seed(3)
    generator, _ = build_models(TINY, label_nc, True)
    with torch.no_grad():  # semantics that change the output: the first conv and the head drawn anew
        generator.model[1].weight.normal_(0.0, 0.5)
        generator.correction[-1].weight.normal_(0.0, 0.02)
    sees = export_generator(
        tmp_path / "sees" / "g.safetensors",
        generator,
        GeneratorSpec.from_config(TINY, label_nc, True, codec="hevc", quality=45, phase=3),
    )
    blind = dataclasses.replace(TINY, zero_semantics=True)
    zeroed = export_generator(
        tmp_path / "zeroed" / "g.safetensors",
        generator,
        GeneratorSpec.from_config(blind, label_nc, True, codec="hevc", quality=45, phase=3),
    )
    out = evaluate(
        _with_eval(cfg, output_dir=str(tmp_path / "out"), withheld_maps=True, crops=0),
        [str(sees), str(zeroed)],
    )
    rows: dict[str, dict[str, dict[str, str]]] = {}
    for row in _read_csv(out / "rpd.csv"):
        rows.setdefault(row["method"], {})[row["key"]] = row
    assert set(rows) == {"hevc", "hevc-SE", "hevc-SE (no semantics)", "hevc-SE (map withheld)"}
    for key, withheld in rows["hevc-SE (map withheld)"].items():
        full, ablation = rows["hevc-SE"][key], rows["hevc-SE (no semantics)"][key]
        assert withheld["bpp_total"] == withheld["bpp_codec"] == full["bpp_codec"]
        assert float(full["bpp_total"]) > float(full["bpp_codec"])
        assert withheld["psnr"] == ablation["psnr"] != full["psnr"]
    report = json.loads((out / "bdrate.json").read_text())
    assert {(g["test"], g["anchor"]) for g in report["frame_gains"]} >= {
        ("hevc-SE", "hevc-SE (map withheld)"),
        ("hevc-SE", "hevc-SE (no semantics)"),
    }


def test_map_choice_scores_each_frame_as_its_encoder_chose(
    setup: tuple[JobConfig, dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """eval.map_choice: a curve of its own whose every frame is, as the encoder's rule chose, either the
    model on its map (at its label bits) or the same weights on zero semantics (no label bits), plus the
    flag bit; the column map says which, and its mean is the share of frames sent their map. The rule
    (tested in tests/test_map_choice.py) is replaced by one that sends every other frame's map, so both
    branches are scored; it is handed the two images and the map's bits."""
    cfg, manifest, _ = setup
    label_nc = int(manifest.dataset.label_nc)
    torch.manual_seed(5)
    generator, _ = build_models(TINY, label_nc, True)
    with torch.no_grad():  # semantics that change the output
        generator.model[1].weight.normal_(0.0, 0.5)
        generator.correction[-1].weight.normal_(0.0, 0.02)
    spec = GeneratorSpec.from_config(TINY, label_nc, True, codec="hevc", quality=45, phase=3)
    sees = export_generator(tmp_path / "sees" / "g.safetensors", generator, spec)
    calls: list[tuple[float, float, bool]] = []

    def every_other(original, with_map, without, map_bits, slope):  # type: ignore[no-untyped-def]
        sent = len(calls) % 2 == 0
        calls.append((psnr(original, with_map), map_bits, sent))
        assert slope > 0 and not np.array_equal(with_map, without)
        return MapChoice(sent, 0.0, 0.0)

    monkeypatch.setattr("pipeline.eval.methods.choose_map", every_other)
    out = evaluate(
        _with_eval(cfg, output_dir=str(tmp_path / "out"), withheld_maps=True, map_choice=True, crops=0),
        [str(sees)],
    )
    rows: dict[str, dict[str, dict[str, str]]] = {}
    for row in _read_csv(out / "rpd.csv"):
        rows.setdefault(row["method"], {})[row["key"]] = row
    assert set(rows) == {"hevc", "hevc-SE", "hevc-SE (map withheld)", "hevc-SE (map chosen)"}
    pixels = WIDTH * HEIGHT
    chosen = list(rows["hevc-SE (map chosen)"].items())
    assert len(chosen) == len(calls) == 2
    for (key, row), (with_map_psnr, map_bits, sent) in zip(chosen, calls, strict=True):
        full, withheld = rows["hevc-SE"][key], rows["hevc-SE (map withheld)"][key]
        assert float(full["psnr"]) == pytest.approx(with_map_psnr)
        assert map_bits == pytest.approx((float(full["bpp_total"]) - float(full["bpp_codec"])) * pixels)
        picked = full if sent else withheld
        assert row["map_sent"] == str(float(sent)) and row["psnr"] == picked["psnr"]
        assert float(row["bpp_codec"]) == pytest.approx(float(picked["bpp_codec"]) + 1 / pixels)
        assert float(row["bpp_total"]) == pytest.approx(float(picked["bpp_total"]) + 1 / pixels)
        assert full["map_sent"] == ""
    (mean,) = [r for r in _read_csv(out / "rpd_mean.csv") if r["method"] == "hevc-SE (map chosen)"]
    assert float(mean["map_sent"]) == 0.5


def test_map_choice_needs_the_codec_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HEVCCodec, "is_available", lambda self: False)
    with pytest.raises(ConfigError, match="eval.map_choice prices a label map on hevc's own slope"):
        map_choice_methods([], "hevc")


def test_map_choice_leaves_out_models_whose_map_costs_nothing() -> None:
    """Only a model that receives a coded map gets a chosen curve: not one on decoder-side maps, nor the
    ablation, nor the codec."""
    spec = GeneratorSpec.from_config(TINY, 34, True, codec="hevc", quality=45, phase=3)
    blind = dataclasses.replace(spec, zero_semantics=True)
    decoder = dataclasses.replace(spec, label_source="decoder", segmenter="c" * 64)
    models = [Method(f"m{i}", 45, spec=s) for i, s in enumerate((spec, blind, decoder))]
    methods = [Method("hevc", None), *models]
    assert [m.name for m in map_choice_methods(methods, "hevc")] == ["m0 (map chosen)"]
