"""Issue 13: a generator trained on the label maps it gets when decoding (data.label_source decoder or
encoder): predicted maps beside the shards, the loader and trainer reading them, the export recording them,
and the encoder source in evaluation and compress/decompress."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_label_source import JudgeSegmenter as TinySegmenter
from torch import Tensor

from pipeline.cli import main
from pipeline.compress.container import read_container
from pipeline.config import JobConfig, load_config
from pipeline.data import predicted_labels
from pipeline.data.codecs import LabelCoder
from pipeline.data.loader import make_dataset
from pipeline.data.predicted_labels import (
    INDEX,
    PredictedLabelsError,
    build_predicted_labels,
    check_predicted_labels,
)
from pipeline.eval.inputs import open_input
from pipeline.model.export import export_generator, read_spec, weights_sha256
from pipeline.model.spec import GeneratorSpec
from pipeline.segment import base as segment_base
from pipeline.segment.base import load_segmenter, register_segmenter, save_segmenter
from pipeline.tracking import Tracker
from pipeline.train import trainer

QUALITIES = [37, 42]


@pytest.fixture
def segmenter_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    segment_base.available_segmenters()
    monkeypatch.setattr(segment_base, "_REGISTRY", dict(segment_base._REGISTRY))
    register_segmenter(TinySegmenter)
    torch.manual_seed(5)
    return save_segmenter(TinySegmenter(), tmp_path / "predictor.safetensors")


@pytest.fixture
def shards(small_shards: Path, tmp_path: Path) -> Path:
    """A private copy: predicted maps are written beside the shards."""
    return Path(
        shutil.copytree(small_shards, tmp_path / "shards", ignore=shutil.ignore_patterns(".pipeline.lock"))
    )


def _cfg(shards: Path, segmenter: Path, source: str, out: Path, *extra: str) -> JobConfig:
    return load_config(
        None,
        [
            f"shards.output={shards}",
            f"shards.codecs=[{{name: hevc, qualities: {QUALITIES}}}]",
            f"data.label_source={source}",
            f"data.segmenter={segmenter}",
            f"loader.qualities={QUALITIES}",
            "loader.batch_size=1",
            "loader.shuffle=0",
            "loader.flip=false",
            f"train.output_dir={out}",
            *extra,
        ],
    )


def _uint8(image: Tensor) -> np.ndarray:
    return ((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _batches(cfg: JobConfig) -> list[dict]:
    return list(make_dataset(cfg, cfg.loader.split, train=True, seed=1))


def test_decoder_maps_are_the_segmenters_prediction_on_the_drawn_decoded_image(
    shards: Path, segmenter_file: Path, tmp_path: Path
) -> None:
    cfg = _cfg(shards, segmenter_file, "decoder", tmp_path / "run")
    with pytest.raises(PredictedLabelsError, match="run python -m pipeline labels"):
        check_predicted_labels(cfg)
    (folder,) = build_predicted_labels(cfg, progress=False)
    check_predicted_labels(cfg)
    index = json.loads((folder / INDEX).read_text())
    assert index["segmenter"] == weights_sha256(segmenter_file) and index["source"] == "decoder"
    assert all(entry["members"] == [f"hevc_q{q}" for q in QUALITIES] for entry in index["shards"].values())
    segmenter = load_segmenter(segmenter_file)
    batches = _batches(cfg)
    assert len(batches) == sum(entry["samples"] for entry in index["shards"].values())
    for batch in batches:
        decoded = _uint8(batch["decoded"][0])
        assert np.array_equal(batch["label"][0].numpy(), segmenter.predict_label_ids(decoded))
        assert float(batch["label_bpp"][0]) == 0.0
    gt = _batches(_cfg(shards, segmenter_file, "gt", tmp_path / "run"))
    differs_from_gt = sum(not torch.equal(a["label"], b["label"]) for a, b in zip(batches, gt, strict=True))
    assert differs_from_gt == len(gt)


def test_encoder_maps_are_coded_predictions_on_the_original_with_their_bits(
    shards: Path, segmenter_file: Path, tmp_path: Path
) -> None:
    cfg = _cfg(shards, segmenter_file, "encoder", tmp_path / "run")
    (folder,) = build_predicted_labels(cfg, progress=False)
    assert folder.name.startswith("labels-encoder-")
    segmenter = load_segmenter(segmenter_file)
    coder = LabelCoder(cfg.shards.label_coder, cfg.shards.label_downsample)
    for batch in _batches(cfg):
        predicted = segmenter.predict_label_ids(_uint8(batch["image"][0]))
        assert np.array_equal(batch["label"][0].numpy(), coder.reconstruct(predicted))
        expected = 8 * len(coder.encode(predicted)) / predicted.size
        assert float(batch["label_bpp"][0]) == pytest.approx(expected, rel=1e-6)


def test_an_interrupted_build_resumes_and_another_segmenter_gets_its_own_maps(
    shards: Path, segmenter_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(shards, segmenter_file, "decoder", tmp_path / "run")
    (folder,) = build_predicted_labels(cfg, progress=False)
    tars = sorted(folder.glob("*.tar"))
    before = {p.name: p.read_bytes() for p in tars}
    index = json.loads((folder / INDEX).read_text())
    lost = tars[-1].name
    del index["shards"][lost]  # as if killed after its tar, before the index listed it
    (folder / INDEX).write_text(json.dumps(index))
    done: list[str] = []
    real = predicted_labels._predict_shard
    monkeypatch.setattr(
        predicted_labels,
        "_predict_shard",
        lambda cfg, shard, *a: done.append(shard.name) or real(cfg, shard, *a),
    )
    build_predicted_labels(cfg, progress=False)
    assert done == [lost]
    assert {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))} == before
    torch.manual_seed(9)
    other = save_segmenter(TinySegmenter(), tmp_path / "other.safetensors")
    (second,) = build_predicted_labels(_cfg(shards, other, "decoder", tmp_path / "run"), progress=False)
    assert second != folder and second.name.endswith(weights_sha256(other)[:12])


def test_settings_that_cannot_give_the_decoder_its_maps_are_refused(
    shards: Path, segmenter_file: Path, tmp_path: Path
) -> None:
    cfg = _cfg(shards, segmenter_file, "decoder", tmp_path / "run", "model.use_instance=true")
    with pytest.raises(PredictedLabelsError, match="model.use_instance needs instance maps"):
        check_predicted_labels(cfg)
    with pytest.raises(PredictedLabelsError, match="unset loader.shards"):
        build_predicted_labels(
            _cfg(shards, segmenter_file, "decoder", tmp_path, f"loader.shards={shards}/x.tar")
        )
    bare = _cfg(shards, segmenter_file, "decoder", tmp_path / "run", "data.segmenter=''")
    with pytest.raises(PredictedLabelsError, match="needs data.segmenter"):
        build_predicted_labels(bare)


def test_training_on_decoder_maps_records_them_in_the_export(
    shards: Path, segmenter_file: Path, tmp_path: Path
) -> None:
    extra = [
        "loader.crop=[64, 128]",
        "model.ngf=8",
        "model.n_blocks=1",
        "phase3.steps=2",
        "train.checkpoint_every=0",
        "validate.every=1",
        "validate.images=1",
        "tracking.enabled=false",
    ]
    cfg = _cfg(shards, segmenter_file, "decoder", tmp_path / "run", *extra)
    export = trainer.train(cfg, [3], tracker=Tracker())[3]
    spec = read_spec(export)
    assert spec.label_source == "decoder" and spec.segmenter == weights_sha256(segmenter_file)
    assert spec.format_version == 8  # with the hevc shards' codec_options
    assert any(shards.glob("labels-decoder-*/predicted.json"))  # the trainer built the maps it needs


# ---- the encoder source in evaluation and compress/decompress --------------------------------------------


def test_evaluation_with_encoder_maps_counts_their_bits(
    shards: Path, segmenter_file: Path, tmp_path: Path
) -> None:
    extra = ["eval.input=shards", "eval.split=test", "eval.max_images=1", f"eval.qualities={QUALITIES}"]
    cfg = _cfg(shards, segmenter_file, "encoder", tmp_path / "run", *extra)
    (sample,) = list(open_input(cfg).samples())
    coder = LabelCoder(cfg.shards.label_coder, cfg.shards.label_downsample)
    predicted = load_segmenter(segmenter_file).predict_label_ids(sample.image)
    assert sample.label_bpp == pytest.approx(8 * len(coder.encode(predicted)) / predicted.size)
    assert all(np.array_equal(sample.label_at(q), coder.reconstruct(predicted)) for q in QUALITIES)
    assert not np.array_equal(sample.label, sample.label_at(QUALITIES[0]))  # ground truth kept for judging


def _generator(path: Path, **spec: object) -> Path:
    values: dict[str, object] = {"ngf": 4, "n_downsample": 1, "n_blocks": 1, "norm": "none", "label_nc": 34}
    values |= {"use_instance": False, "residual": True, "codec": "hevc", "quality": 42, "phase": 3, **spec}
    gen_spec = GeneratorSpec(**values)  # type: ignore[arg-type]
    torch.manual_seed(1)
    return export_generator(path, gen_spec.build_generator(), gen_spec)


def test_encoder_compression_codes_the_predicted_map(
    segmenter_file: Path, cityscapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = sorted((cityscapes_root / "leftImg8bit").rglob("*_leftImg8bit.png"))[0]
    frame = tmp_path / "frame.png"
    cv2.imwrite(str(frame), cv2.resize(cv2.imread(str(image)), (256, 128), interpolation=cv2.INTER_AREA))
    sha = weights_sha256(segmenter_file)
    enc_model = _generator(tmp_path / "enc.safetensors", label_source="encoder", segmenter=sha)
    gt_model = _generator(tmp_path / "gt.safetensors")
    dec_model = _generator(tmp_path / "dec.safetensors", label_source="decoder", segmenter=sha)
    jse, seg = tmp_path / "x.jse", ["--segmenter", str(segmenter_file)]
    assert main(["compress", str(frame), "--model", str(enc_model), *seg, "-o", str(jse)]) == 0
    container = read_container(jse)
    rgb = cv2.cvtColor(cv2.imread(str(frame)), cv2.COLOR_BGR2RGB)
    expected = LabelCoder(container.label_coder).encode(load_segmenter(segmenter_file).predict_label_ids(rgb))
    assert container.label_bitstream == expected and not container.segmenter
    for model in (enc_model, gt_model):  # a coded map fits either
        assert (
            main(["decompress", str(jse), "-o", str(tmp_path / "y.png"), "--model", str(model), "--force"])
            == 0
        )
    capsys.readouterr()
    assert (
        main(["decompress", str(jse), "-o", str(tmp_path / "z.png"), "--model", str(dec_model), "--force"])
        == 2
    )
    assert "was trained on decoder label maps, but the file has gt label maps" in capsys.readouterr().err
    argv = [
        "compress",
        str(frame),
        "--model",
        str(gt_model),
        "--label-source",
        "encoder",
        *seg,
        "-o",
        str(jse),
    ]
    assert main(argv) == 2
    assert (
        "was trained on gt label maps, but the compression has encoder label maps" in capsys.readouterr().err
    )


def test_a_later_config_with_more_qualities_redoes_the_shards_with_all_of_them(
    shards: Path, segmenter_file: Path, tmp_path: Path
) -> None:
    one = _cfg(shards, segmenter_file, "decoder", tmp_path / "run", "loader.qualities=[42]")
    (folder,) = build_predicted_labels(one, progress=False)
    check_predicted_labels(one)
    both = _cfg(shards, segmenter_file, "decoder", tmp_path / "run")
    with pytest.raises(PredictedLabelsError, match=r"for members \['hevc_q37'\]"):
        check_predicted_labels(both)
    build_predicted_labels(both, progress=False)
    check_predicted_labels(both)
    check_predicted_labels(one)  # what was there stays
    index = json.loads((folder / INDEX).read_text())
    assert all(entry["members"] == ["hevc_q37", "hevc_q42"] for entry in index["shards"].values())
    assert len(_batches(both)) == sum(entry["samples"] for entry in index["shards"].values())
