"""``model.semantic_modulation``: every residual block scales and shifts its input by a 1x1 conv of the
semantic channels pooled to its resolution. It starts at zero, so the generator starts as the unmodulated
one (the residual one at the codec); once trained, the blocks read the classes wherever the front conv
does not; the spec records it (format version 12) so that the export rebuilds those layers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.config import JobConfig, ModelConfig, load_config, with_overrides
from pipeline.model.export import export_generator, load_generator, read_spec
from pipeline.model.networks import Generator, ResnetBlock, build_models
from pipeline.model.spec import SPEC_KEYS, GeneratorSpec

TINY = ModelConfig(ngf=4, n_downsample=1, n_blocks=2, norm="none", padding="zeros", end_kernel=3)
LABEL_NC = 5


def _pair(seed: int = 0) -> tuple[Generator, Generator]:
    """The modulated generator and the plain one, holding the same weights where they share layers."""
    torch.manual_seed(seed)
    modulated, _ = build_models(dataclasses.replace(TINY, semantic_modulation=True), LABEL_NC, False)
    plain, _ = build_models(TINY, LABEL_NC, False)
    shared = {k: v for k, v in modulated.state_dict().items() if "modulation" not in k}
    plain.load_state_dict(shared, strict=True)
    return modulated, plain


def _input(generator: Generator, seed: int = 1) -> torch.Tensor:
    """A batch of one-hot semantics (first LABEL_NC channels) before random decoded images."""
    torch.manual_seed(seed)
    label = torch.randint(0, LABEL_NC, (2, 16, 24))
    onehot = torch.nn.functional.one_hot(label, LABEL_NC).permute(0, 3, 1, 2).float()
    rest = torch.rand(2, generator.hparams["input_nc"] - LABEL_NC, 16, 24) * 2 - 1
    return torch.cat([onehot, rest], 1)


def _trained_like(generator: Generator) -> Generator:
    with torch.no_grad():
        generator.correction[-1].weight.normal_(0.0, 0.05)
        for block in generator.modules():
            if isinstance(block, ResnetBlock) and block.modulation is not None:
                block.modulation.weight.normal_(0.0, 0.5)
    return generator.eval()


def test_it_starts_as_the_unmodulated_generator_and_the_residual_one_at_the_codec() -> None:
    modulated, plain = _pair()
    assert modulated.hparams == {**plain.hparams, "semantic_nc": LABEL_NC}
    blocks = [m for m in modulated.modules() if isinstance(m, ResnetBlock)]
    assert len(blocks) == TINY.n_blocks
    for block in blocks:  # gamma and beta per trunk channel, from the classes
        assert block.modulation.weight.shape == (2 * TINY.ngf * 2, LABEL_NC, 1, 1)
        assert not block.modulation.weight.any() and not block.modulation.bias.any()
    assert all(m.modulation is None for m in plain.modules() if isinstance(m, ResnetBlock))
    x = _input(modulated)
    with torch.no_grad():
        assert torch.equal(modulated(x), x[:, -3:])
        assert torch.equal(modulated.trunk(x), plain.trunk(x))
        assert torch.equal(modulated(x, synthesis=True), plain(x, synthesis=True))  # phase 1's head


def test_the_blocks_read_the_classes_the_front_conv_does_not() -> None:
    modulated, plain = _pair()
    for generator in (modulated, plain):
        _trained_like(generator)
        with torch.no_grad():  # the front conv blind to the semantic channels
            generator.model[0].weight[:, :LABEL_NC] = 0
    x = _input(modulated)
    other = x.clone()
    other[:, :LABEL_NC] = other[:, :LABEL_NC].roll(1, dims=1)  # every pixel another class
    with torch.no_grad():
        assert torch.equal(plain(x), plain(other))
        assert not torch.allclose(modulated(x), modulated(other))
        for head in (False, True):
            assert not torch.allclose(modulated(x, synthesis=head), plain(x, synthesis=head))


def test_a_step_trains_the_modulation_from_zero() -> None:
    modulated, _ = _pair()
    x = _input(modulated)
    with torch.no_grad():
        modulated.correction[-1].weight.normal_(0.0, 0.05)  # a gradient reaches the trunk
    (modulated(x) - x[:, -3:] - 0.1).square().mean().backward()
    for block in modulated.modules():
        if isinstance(block, ResnetBlock):
            assert block.modulation.weight.grad.abs().sum() > 0


def test_the_spec_records_it_as_format_version_12_and_the_export_rebuilds_it(tmp_path: Path) -> None:
    on = dataclasses.replace(TINY, semantic_modulation=True)
    spec = GeneratorSpec.from_config(on, LABEL_NC, False, codec="hevc", quality=42, phase=3)
    assert spec.format_version == 12 and spec.to_json()["semantic_modulation"] is True
    assert "semantic_modulation" in SPEC_KEYS[12] and "semantic_modulation" not in SPEC_KEYS[11]
    assert spec.generator_kwargs["semantic_nc"] == LABEL_NC
    generator = _trained_like(_pair()[0])
    loaded, read = load_generator(export_generator(tmp_path / "g.safetensors", generator, spec))
    assert read == spec and loaded.hparams == generator.hparams
    x = _input(generator)
    with torch.no_grad():
        assert torch.equal(loaded(x), generator(x))
    off = GeneratorSpec.from_config(TINY, LABEL_NC, False, codec="hevc", quality=42, phase=3)
    assert (
        off == dataclasses.replace(spec, semantic_modulation=None)
        and "semantic_modulation" not in off.to_json()
    )
    assert off.format_version < 12 and "semantic_nc" not in off.generator_kwargs
    # with instance edges, the edge channel is modulated from too: it is semantic side information
    edges = GeneratorSpec.from_config(on, LABEL_NC, True, codec="hevc", quality=42, phase=3)
    assert edges.generator_kwargs["semantic_nc"] == LABEL_NC + 1
    with pytest.raises(ValueError, match="unknown to generator format version 11"):
        GeneratorSpec.from_json(spec.to_json(), 11)
    with pytest.raises(ValueError, match="must be true or false"):
        GeneratorSpec.from_json({**spec.to_json(), "semantic_modulation": 1}, 12)
    with pytest.raises(ValueError, match="the generator is"):  # the same weights without those layers
        export_generator(tmp_path / "other.safetensors", _pair()[1], spec)


def test_the_generator_refuses_more_semantic_channels_than_its_input_holds() -> None:
    with pytest.raises(ValueError, match="semantic_nc=10.*leaves room for 5"):
        Generator(8, semantic_nc=10)
    with pytest.raises(ValueError, match="semantic_nc=-1"):
        Generator(8, semantic_nc=-1)
    assert with_overrides(JobConfig(), {"model.semantic_modulation": True}).model.semantic_modulation


def test_a_phase_trains_and_exports_it(small_shards: Path, tmp_path: Path) -> None:
    from pipeline.tracking import Tracker
    from pipeline.train import trainer

    cfg = load_config(
        None,
        [
            f"shards.output={small_shards}", f"train.output_dir={tmp_path}",
            "model.ngf=4", "model.n_downsample=1", "model.n_blocks=1", "model.norm=none",
            "model.semantic_modulation=true", "loader.crop=[32, 64]", "loader.batch_size=2",
            "loss.distortion=mse", "phase3.steps=2", "train.checkpoint_every=0", "validate.every=0",
        ],
    )  # fmt: skip
    export = trainer.train(cfg, [3], tracker=Tracker())[3]
    assert read_spec(export).semantic_modulation is True and read_spec(export).format_version == 12
    generator, _ = load_generator(export)
    block = next(m for m in generator.modules() if isinstance(m, ResnetBlock))
    assert block.modulation is not None and block.modulation.weight.any()  # trained away from zero
