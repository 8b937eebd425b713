"""model.semantic_classes: categories. The generator's one-hot holds the Cityscapes category of each label id
(8 channels) instead of the id; the mapping travels in the spec (format version 5), so every inference path
applies it to the label ids it is handed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import name2label

from pipeline.cli import main
from pipeline.compress.container import read_container
from pipeline.config import ModelConfig
from pipeline.data.codecs import LabelCoder, get_codec
from pipeline.data.sources import SourceError, label_categories
from pipeline.eval.inputs import EvalSample
from pipeline.eval.label_rate import LabelRates
from pipeline.eval.methods import Method
from pipeline.model.export import export_generator, load_generator, read_spec
from pipeline.model.inference import enhance_image
from pipeline.model.inputs import class_count, class_map, generator_input, input_channels
from pipeline.model.networks import build_models
from pipeline.model.spec import SPEC_KEYS, GeneratorSpec

LABEL_NC = 34
CATEGORIES = label_categories("cityscapes", LABEL_NC)
TINY = ModelConfig(ngf=4, n_downsample=1, n_blocks=1, norm="none", semantic_classes="categories")
H, W = 16, 24
ROAD, SIDEWALK, CAR, SKY = (name2label[n].id for n in ("road", "sidewalk", "car", "sky"))


def test_the_category_table_is_cityscapes() -> None:
    assert len(CATEGORIES) == LABEL_NC and class_count(LABEL_NC, CATEGORIES) == 8
    assert [CATEGORIES[i] for i in (ROAD, SIDEWALK, CAR, SKY)] == [1, 1, 7, 5]  # flat, flat, vehicle, sky
    assert CATEGORIES[0] == 0  # unlabeled: void
    assert label_categories("cityscapes", 40)[34:] == (0,) * 6  # ids beyond the table: void
    with pytest.raises(SourceError, match="'ade20k' has none, use model.semantic_classes=labels"):
        label_categories("ade20k", 151)


def test_the_one_hot_holds_the_categories() -> None:
    label = torch.tensor([[[ROAD, SIDEWALK], [CAR, SKY]]])
    decoded = torch.zeros(1, 3, 2, 2)
    kwargs = {"label_nc": LABEL_NC, "use_instance": False, "zero_semantics": False, "visual_input": True}
    x = generator_input(label, None, decoded, label_classes=CATEGORIES, **kwargs)
    assert x.shape[1] == input_channels(8, False) == 11
    assert x[0, :8].argmax(0).tolist() == [[1, 1], [7, 5]] and torch.equal(x[0, :8].sum(0), torch.ones(2, 2))
    with pytest.raises(ValueError, match="a class >= 0 to each of the 34 label ids, got 33"):
        generator_input(label, None, decoded, label_classes=CATEGORIES[:-1], **kwargs)
    with pytest.raises(ValueError, match=r"label ids must lie in \[0, 34\)"):
        generator_input(label + 30, None, decoded, label_classes=CATEGORIES, **kwargs)


def trained_like() -> tuple[torch.nn.Module, GeneratorSpec]:
    torch.manual_seed(0)
    generator, _ = build_models(TINY, class_count(LABEL_NC, CATEGORIES), use_instance=False)
    with torch.no_grad():
        generator.correction[-1].weight.normal_(0.0, 0.05)  # no longer the identity
    spec = GeneratorSpec.from_config(TINY, LABEL_NC, False, label_classes=CATEGORIES, codec="hevc", phase=3)
    return generator.eval(), spec


def test_the_spec_carries_the_mapping_as_format_version_5(tmp_path: Path) -> None:
    generator, spec = trained_like()
    assert spec.format_version == 5 and spec.class_nc == 8
    assert spec.to_json()["label_classes"] == list(CATEGORIES)
    assert {"semantic_classes", "label_classes"} <= SPEC_KEYS[5] and not SPEC_KEYS[4] & {"label_classes"}
    path = export_generator(tmp_path / "g.safetensors", generator, spec)
    loaded, read = load_generator(path)
    assert read == spec and read_spec(path).label_classes == CATEGORIES
    assert loaded.hparams == generator.hparams
    labels = GeneratorSpec.from_config(dataclasses.replace(TINY, semantic_classes="labels"), LABEL_NC, False)
    assert labels.semantic_classes is None and "semantic_classes" not in labels.to_json()
    assert labels.format_version == 2  # label ids: written as before the option existed
    with pytest.raises(ValueError, match="semantic_classes and label_classes come together"):
        GeneratorSpec.from_config(TINY, LABEL_NC, False)
    with pytest.raises(ValueError, match="label_classes must give each of the 34 label ids a class"):
        GeneratorSpec.from_config(TINY, LABEL_NC, False, label_classes=CATEGORIES[:8])


def test_inference_maps_the_ids_it_is_handed() -> None:
    """Ids of one category give the same output; another category changes it."""
    generator, spec = trained_like()
    rng = np.random.default_rng(0)
    decoded = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    road = np.full((H, W), ROAD, np.uint8)
    sidewalk = np.full((H, W), SIDEWALK, np.uint8)
    car = np.full((H, W), CAR, np.uint8)
    out = enhance_image(generator, spec, decoded, road)
    assert np.array_equal(out, enhance_image(generator, spec, decoded, sidewalk))
    assert not np.array_equal(out, enhance_image(generator, spec, decoded, car))


def test_training_on_categories(small_shards: Path, tmp_path: Path) -> None:
    """A short phase 3: the generator is built for 8 classes, validates and exports the mapping; a phase
    started from a generator trained on label ids is refused."""
    from pipeline.config import ConfigError, load_config
    from pipeline.data.manifest import dataset_info
    from pipeline.tracking import Tracker
    from pipeline.train import trainer

    def config(out: Path, *extra: str):
        return load_config(
            None,
            [
                f"shards.output={small_shards}", f"train.output_dir={out}",
                "model.ngf=4", "model.n_downsample=1", "model.n_blocks=1", "model.norm=none",
                "loader.crop=[32, 64]", "loader.batch_size=2", "loss.distortion=mse",
                "phase3.steps=2", "train.checkpoint_every=0", "validate.every=2", "validate.images=1", *extra,
            ],
        )  # fmt: skip

    cfg = config(tmp_path / "cat", "model.semantic_classes=categories")
    assert dataset_info(cfg).label_classes == CATEGORIES and dataset_info(cfg).class_nc == 8
    export = trainer.train(cfg, [3], tracker=Tracker())[3]
    spec = read_spec(export)
    assert spec.semantic_classes == "categories" and spec.label_classes == CATEGORIES
    assert load_generator(export)[0].hparams["input_nc"] == input_channels(8, False)
    assert spec.selected is not None

    ids = trainer.train(config(tmp_path / "ids"), [3], tracker=Tracker())[3]
    mixed = config(tmp_path / "mixed", "model.semantic_classes=categories", f"train.init_from={ids}")
    with pytest.raises(ConfigError, match="holds generator"):
        trainer.train(mixed, [3], tracker=Tracker())
    generator, spec = trained_like()  # the same network, trained on another mapping of the ids
    other = dataclasses.replace(spec, label_classes=tuple((c + 1) % 8 for c in CATEGORIES))
    shuffled = export_generator(tmp_path / "shuffled.safetensors", generator, other)
    init = f"train.init_from={shuffled}"
    remapped = config(tmp_path / "remapped", "model.semantic_classes=categories", init)
    with pytest.raises(ConfigError, match="train every phase with the same model.semantic_classes"):
        trainer.train(remapped, [3], tracker=Tracker())


def test_the_class_map_keeps_the_classes_only() -> None:
    label = np.array([[ROAD, SIDEWALK, CAR], [SKY, 0, 4]], np.uint8)
    coarse = class_map(label, CATEGORIES)
    assert coarse.dtype == np.uint8 and coarse.tolist() == [[ROAD, ROAD, CAR], [SKY, 0, 0]]
    assert [CATEGORIES[i] for i in coarse.ravel()] == [CATEGORIES[i] for i in label.ravel()]


def cityscapes_label(cityscapes_root: Path) -> np.ndarray:
    path = sorted((cityscapes_root / "gtFine").rglob("*_gtFine_labelIds.png"))[0]
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return cv2.resize(label, (256, 128), interpolation=cv2.INTER_NEAREST)


def test_a_model_on_categories_is_charged_its_class_map(cityscapes_root: Path) -> None:
    """The total rate of a categories model counts the bits of the class map its decoder receives: fewer
    than the label map's, which a label-id model is charged; nothing without semantics or sent maps."""
    coder = LabelCoder("png")
    label = cityscapes_label(cityscapes_root)
    ids_bpp = 8 * len(coder.encode(label)) / label.size
    sample = EvalSample("k", np.zeros((*label.shape, 3), np.uint8), label, None, label_bpp=ids_bpp)
    data = SimpleNamespace(label_coder=coder)
    rates = LabelRates(data)  # type: ignore[arg-type]
    _, spec = trained_like()
    labels = dataclasses.replace(spec, semantic_classes=None, label_classes=None)
    categories = rates(sample, 42, Method("hevc-SE", 42, spec=spec))
    assert categories == 8 * len(coder.encode(class_map(label, CATEGORIES))) / label.size
    assert 0 < categories < ids_bpp
    assert rates(sample, 42, Method("hevc-SE", 42, spec=labels)) == ids_bpp
    assert rates(sample, 42, Method("abl", 42, spec=dataclasses.replace(spec, zero_semantics=True))) == 0
    decoder_maps = dataclasses.replace(sample, label_bpp=0.0)
    assert rates(decoder_maps, 42, Method("hevc-SE", 42, spec=spec)) == 0

    coded: list[int] = []  # one sample's map, sent at every quality, is coded once
    counting = SimpleNamespace(encode=lambda m: coded.append(1) or coder.encode(m))
    once = LabelRates(SimpleNamespace(label_coder=counting))  # type: ignore[arg-type]
    assert [once(sample, q, Method("hevc-SE", q, spec=spec)) for q in (37, 42)] == [categories] * 2
    assert len(coded) == 1


def test_compress_sends_the_class_map(cityscapes_root: Path, tmp_path: Path) -> None:
    """The container carries the class map, and decompressing gives the frame enhanced from the label map."""
    generator, spec = trained_like()
    model = export_generator(tmp_path / "g.safetensors", generator, dataclasses.replace(spec, quality=42))
    image = next((cityscapes_root / "leftImg8bit").rglob("*_leftImg8bit.png"))
    rgb = cv2.resize(cv2.imread(str(image)), (256, 128), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(tmp_path / "x.png"), rgb)
    label = cityscapes_label(cityscapes_root)
    cv2.imwrite(str(tmp_path / "x_label.png"), label)
    out, png = tmp_path / "x.jse", tmp_path / "out.png"
    args = ["compress", str(tmp_path / "x.png"), "--label", str(tmp_path / "x_label.png"), "-o", str(out)]
    assert main([*args, "--model", str(model)]) == 0
    container = read_container(out)
    coder = LabelCoder(container.label_coder)
    assert np.array_equal(coder.decode(container.label_bitstream), class_map(label, CATEGORIES))
    assert len(container.label_bitstream) < len(coder.encode(label))
    assert main(["decompress", str(out), "-o", str(png), "--model", str(model)]) == 0
    # decoded as the generator's spec says (an export without codec_options: libheif's own picture)
    codec = get_codec("hevc", **spec.decode_options("hevc"))
    decoded = codec.roundtrip(cv2.cvtColor(rgb, cv2.COLOR_BGR2RGB), 42).decoded
    expected = enhance_image(generator, spec, decoded, label, quality=42)
    assert np.array_equal(cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB), expected)


def test_the_main_jobs_label_cost_is_the_class_maps(cityscapes_root: Path) -> None:
    from pipeline.config import load_config
    from pipeline.job import format_label_costs, label_costs

    base = [f"data.root={cityscapes_root}", "data.width=256", "data.height=128"]
    ids = label_costs(load_config(None, base), (1, 4))
    classes = label_costs(load_config(None, [*base, "model.semantic_classes=categories"]), (1, 4))
    assert all(0 < classes[f] < ids[f] for f in (1, 4)) and classes[4] < classes[1]
    table = format_label_costs(classes, {42: 0.1}, 4, "class map")
    assert table.startswith("class map cost on the reported frames")
