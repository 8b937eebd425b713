"""The generator's options beside pix2pixHD's: model.padding, model.end_kernel and model.activation. Its
size-keeping convs pad with zeros inside the conv instead of pix2pixHD's reflection pad before it, its front
conv and heads may be smaller than pix2pixHD's 7x7, and its activations may be leaky ReLUs; the residual
generator still starts at the codec, the correction's parts still sum to it, and the spec records each
(format versions 7, 9 and 10) so the export rebuilds them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError, JobConfig, ModelConfig, with_overrides
from pipeline.model.export import export_generator, load_generator
from pipeline.model.networks import Generator, build_models
from pipeline.model.spec import SPEC_KEYS, GeneratorSpec

TINY = ModelConfig(ngf=4, n_downsample=1, n_blocks=2, norm="none", correction_scale="channels")
LABEL_NC = 5


def _generator(padding: str, seed: int = 0, end_kernel: int = 7, activation: str = "relu") -> Generator:
    """A generator whose correction head looks trained (an untrained one is zero)."""
    torch.manual_seed(seed)
    model = dataclasses.replace(TINY, padding=padding, end_kernel=end_kernel, activation=activation)
    generator, _ = build_models(model, LABEL_NC, use_instance=False)
    with torch.no_grad():
        generator.correction[-1].weight.normal_(0.0, 0.05)
        generator.correction[-1].bias.fill_(0.02)
    return generator.eval()


def _spec(**changes: object) -> GeneratorSpec:
    model = dataclasses.replace(TINY, **changes)  # type: ignore[arg-type]
    return GeneratorSpec.from_config(model, LABEL_NC, False, codec="hevc", quality=42, phase=3)


def test_zero_padding_has_no_pad_layers_and_starts_at_the_codec() -> None:
    torch.manual_seed(0)
    zeros, _ = build_models(dataclasses.replace(TINY, padding="zeros"), LABEL_NC, use_instance=False)
    reflect, _ = build_models(TINY, LABEL_NC, use_instance=False)
    assert not any(isinstance(m, nn.ReflectionPad2d) for m in zeros.modules())
    assert sum(isinstance(m, nn.ReflectionPad2d) for m in reflect.modules()) == 2 * 2 + 3
    # the same weights, fewer layers: one pad each for the front, every block conv and both heads
    assert sum(p.numel() for p in zeros.parameters()) == sum(p.numel() for p in reflect.parameters())
    assert zeros.hparams["padding"] == "zeros" and "padding" not in reflect.hparams
    x = torch.rand(2, zeros.hparams["input_nc"], 16, 24) * 2 - 1
    with torch.no_grad():
        assert torch.equal(zeros(x), x[:, -3:])
        features = zeros.trunk(x)
        assert features.shape == (2, TINY.ngf, 16, 24)
        drawn = zeros(x, synthesis=True)
        torch.testing.assert_close(drawn, torch.tanh(zeros.model[-2](features)), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("padding", "end_kernel"), [("reflect", 7), ("zeros", 7), ("zeros", 3), ("reflect", 1)]
)
def test_the_heads_pad_as_named_and_the_parts_sum_to_the_correction(padding: str, end_kernel: int) -> None:
    generator = _generator(padding, end_kernel=end_kernel)
    x = torch.randn(2, generator.hparams["input_nc"], 16, 16)
    conv = generator.correction[-1]
    front = next(m for m in generator.model if isinstance(m, nn.Conv2d))
    assert (
        conv.kernel_size == front.kernel_size == generator.model[-2].kernel_size == (end_kernel, end_kernel)
    )
    assert generator.hparams.get("end_kernel", 7) == end_kernel  # recorded only when not pix2pixHD's
    untrained, _ = build_models(dataclasses.replace(TINY, end_kernel=end_kernel), LABEL_NC, False)
    with torch.no_grad():  # starts at the codec
        assert torch.equal(untrained(x), x[:, -3:].clamp(-1, 1))
    mode = {"reflect": "reflect", "zeros": "constant"}[padding]
    pad = (end_kernel // 2,) * 4
    with torch.no_grad():
        features = generator.trunk(x)
        expected = F.conv2d(F.pad(features, pad, mode=mode), conv.weight, conv.bias)
        torch.testing.assert_close(generator.correction(features), expected, atol=1e-6, rtol=0)
        parts = generator.correction_parts(features)
        torch.testing.assert_close(parts.sum(1), expected, atol=1e-6, rtol=0)
        gains = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5], [1.0, 1.0, 1.0, 1.0, 0.0]])
        gained = (x[:, -3:] + (parts * gains.view(2, 5, 1, 1, 1)).sum(1)).clamp(-1, 1)
        torch.testing.assert_close(generator(x, gains=gains), gained, atol=1e-6, rtol=0)


def test_the_two_paddings_differ_only_at_the_border() -> None:
    zeros, reflect = _generator("zeros"), _generator("reflect")
    reflect.load_state_dict(
        dict(zip(reflect.state_dict(), zeros.state_dict().values(), strict=True))  # same weights, in order
    )
    x = torch.randn(1, zeros.hparams["input_nc"], 48, 48)
    with torch.no_grad():
        difference = (zeros(x) - reflect(x)).abs()
    # every conv reaches at most 3 pixels out, and 2 x 2 block convs + 2 x 7x7 + 1 stride-2 conv reach ~15
    assert difference[..., 20:-20, 20:-20].max() == 0
    assert difference[..., :3, :].max() > 0


def test_the_spec_records_zero_padding_as_format_version_7(tmp_path: Path) -> None:
    spec = _spec(padding="zeros")
    assert spec.format_version == 7 and spec.to_json()["padding"] == "zeros"
    assert "padding" in SPEC_KEYS[7] and "padding" not in SPEC_KEYS[6]
    generator = _generator("zeros")
    loaded, read = load_generator(export_generator(tmp_path / "g.safetensors", generator, spec))
    assert read == spec and loaded.hparams == generator.hparams
    x = torch.randn(1, generator.hparams["input_nc"], 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), generator(x))
    reflect = _spec()
    assert reflect.padding is None and "padding" not in reflect.to_json()
    assert reflect.format_version == 6  # as before the option existed (correction_scale is version 6)
    assert _spec(padding="reflect") == reflect
    with pytest.raises(ValueError, match="unknown to generator format version 6"):
        GeneratorSpec.from_json(spec.to_json(), 6)
    with pytest.raises(ValueError, match=r"padding='circular' is not one of \['reflect', 'zeros'\]"):
        _spec(padding="circular")
    with pytest.raises(ValueError, match="the generator is"):  # a spec that would rebuild another network
        export_generator(tmp_path / "other.safetensors", _generator("reflect"), spec)


def test_the_spec_records_the_end_kernel_as_format_version_9(tmp_path: Path) -> None:
    spec = _spec(padding="zeros", end_kernel=3)
    assert spec.format_version == 9 and spec.to_json()["end_kernel"] == 3
    assert "end_kernel" in SPEC_KEYS[9] and "end_kernel" not in SPEC_KEYS[8]
    generator = _generator("zeros", end_kernel=3)
    loaded, read = load_generator(export_generator(tmp_path / "g.safetensors", generator, spec))
    assert (
        read == spec and loaded.hparams == generator.hparams and loaded.correction[-1].kernel_size == (3, 3)
    )
    assert _spec(end_kernel=7) == _spec() and "end_kernel" not in _spec().to_json()  # pix2pixHD's: no key
    with pytest.raises(ValueError, match="unknown to generator format version 8"):
        GeneratorSpec.from_json(spec.to_json(), 8)
    with pytest.raises(ValueError, match=r"end_kernel=4 is not one of \[1, 3, 5, 7\]"):
        dataclasses.replace(spec, end_kernel=4)
    with pytest.raises(ValueError, match="the generator is"):  # 7x7 weights are not this spec's network
        export_generator(tmp_path / "other.safetensors", _generator("zeros"), spec)
    with pytest.raises(ConfigError, match=r"model.end_kernel must be one of \[1, 3, 5, 7\], got 9"):
        with_overrides(JobConfig(), {"model.end_kernel": 9})
    with pytest.raises(ValueError, match="end_kernel must be odd"):
        Generator(8, end_kernel=2)


def test_leaky_relus_replace_every_relu_and_start_at_the_codec() -> None:
    leaky, relu = _generator("zeros", activation="leaky_relu"), _generator("zeros")
    # the front, the down-sampling, one per block and the up-sampling (TINY: 1 + 1 + 2 + 1)
    assert sum(isinstance(m, nn.LeakyReLU) for m in leaky.modules()) == 5
    assert not any(isinstance(m, nn.ReLU) for m in leaky.modules())
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 5
    assert all(m.negative_slope == 0.2 for m in leaky.modules() if isinstance(m, nn.LeakyReLU))
    assert leaky.hparams["activation"] == "leaky_relu" and "activation" not in relu.hparams
    untrained, _ = build_models(dataclasses.replace(TINY, activation="leaky_relu"), LABEL_NC, False)
    x = torch.rand(2, leaky.hparams["input_nc"], 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(untrained(x), x[:, -3:])
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        Generator(8, activation="gelu")


@pytest.mark.parametrize(("activation", "reaches_the_head"), [("relu", False), ("leaky_relu", True)])
def test_a_trunk_below_zero_passes_a_gradient_only_through_leaky_relus(
    activation: str, reaches_the_head: bool
) -> None:
    """What ``model.activation=leaky_relu`` is for: a trunk whose last layer's outputs are all below zero
    (a dead ReLU layer) gives the correction head nothing to learn from."""
    generator = _generator("zeros", activation=activation).train()
    last_conv = [m for m in generator.model if isinstance(m, nn.ConvTranspose2d)][-1]
    with torch.no_grad():
        last_conv.bias.fill_(-100.0)
    x = torch.rand(2, generator.hparams["input_nc"], 16, 16) * 2 - 1
    target = torch.rand(2, 3, 16, 16) * 2 - 1
    F.mse_loss(generator(x), target).backward()
    assert bool(generator.correction[-1].weight.grad.abs().sum() > 0) is reaches_the_head
    assert bool(last_conv.weight.grad.abs().sum() > 0) is reaches_the_head


def test_the_spec_records_the_activation_as_format_version_10(tmp_path: Path) -> None:
    spec = _spec(padding="zeros", end_kernel=3, activation="leaky_relu")
    assert spec.format_version == 10 and spec.to_json()["activation"] == "leaky_relu"
    assert "activation" in SPEC_KEYS[10] and "activation" not in SPEC_KEYS[9]
    generator = _generator("zeros", end_kernel=3, activation="leaky_relu")
    loaded, read = load_generator(export_generator(tmp_path / "g.safetensors", generator, spec))
    assert read == spec and loaded.hparams == generator.hparams
    x = torch.randn(1, generator.hparams["input_nc"], 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), generator(x))
    assert _spec(activation="relu") == _spec() and "activation" not in _spec().to_json()  # pix2pixHD's
    with pytest.raises(ValueError, match="unknown to generator format version 9"):
        GeneratorSpec.from_json(spec.to_json(), 9)
    with pytest.raises(ValueError, match=r"activation='gelu' is not one of \['relu', 'leaky_relu'\]"):
        dataclasses.replace(spec, activation="gelu")
    with pytest.raises(ValueError, match="the generator is"):  # ReLU weights run as another network
        export_generator(tmp_path / "other.safetensors", _generator("zeros", end_kernel=3), spec)
    with pytest.raises(ConfigError, match="activation"):
        with_overrides(JobConfig(), {"model.activation": "gelu"})


def test_the_config_takes_and_checks_the_padding() -> None:
    assert JobConfig().model.padding == "reflect"
    assert with_overrides(JobConfig(), {"model.padding": "zeros"}).model.padding == "zeros"
    with pytest.raises(ConfigError, match="padding"):
        with_overrides(JobConfig(), {"model.padding": "circular"})
    with pytest.raises(ValueError, match="unknown padding 'circular'"):
        Generator(8, padding="circular")


def test_a_phase_trains_and_exports_zero_padding_and_refuses_to_start_from_the_other(
    small_shards: Path, tmp_path: Path
) -> None:
    from pipeline.config import load_config
    from pipeline.data.manifest import Manifest
    from pipeline.model.export import read_spec
    from pipeline.tracking import Tracker
    from pipeline.train import trainer

    def config(out: Path, *extra: str) -> JobConfig:
        return load_config(
            None,
            [
                f"shards.output={small_shards}", f"train.output_dir={out}",
                "model.ngf=4", "model.n_downsample=1", "model.n_blocks=1", "model.norm=none",
                "loader.crop=[32, 64]", "loader.batch_size=2", "loss.distortion=mse",
                "phase3.steps=2", "train.checkpoint_every=0", "validate.every=0", *extra,
            ],
        )  # fmt: skip

    options = ("model.padding=zeros", "model.end_kernel=3", "model.activation=leaky_relu")
    # and the decoder's self-ensemble, which tests/test_self_ensemble.py tests: the trainer records it too
    zeros = config(tmp_path / "zeros", *options, "model.self_ensemble=hflip")
    export = trainer.train(zeros, [3], tracker=Tracker())[3]
    assert read_spec(export).padding == "zeros" and read_spec(export).end_kernel == 3
    assert read_spec(export).activation == "leaky_relu" and read_spec(export).self_ensemble == "hflip"
    assert read_spec(export).format_version == 11
    # with the options of the shards' decoded pictures (hevc's chroma), which compress decodes with
    assert (
        read_spec(export).codec_options
        == Manifest.read(small_shards).decode_options("hevc")
        == {"chroma_upsampling": "linear"}
    )
    generator, _ = load_generator(export)
    assert not any(isinstance(m, nn.ReflectionPad2d) for m in generator.modules())
    assert any(isinstance(m, nn.LeakyReLU) for m in generator.modules())
    reflect = config(tmp_path / "reflect", f"train.init_from={export}")
    with pytest.raises(ConfigError, match="holds generator .*'padding': 'zeros'"):
        trainer.train(reflect, [3], tracker=Tracker())
