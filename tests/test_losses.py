"""GAN, feature-matching, VGG19 perceptual and distortion losses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.config import LossConfig, LossWeights, ModelConfig
from pipeline.model.inputs import discriminator_input, generator_input, semantic_channels
from pipeline.model.losses import (
    GANLoss,
    GeneratorLosses,
    VGGLoss,
    discriminator_loss,
    distortion_loss,
    feature_matching_loss,
    load_vgg19,
)
from pipeline.model.networks import build_models

VGG_FILE = "vgg19-dcbb9e9d.pth"
# torchvision vgg19: index of every conv in ``features`` and its (in, out) channels.
TORCHVISION_CONVS = {
    0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128),
    10: (128, 256), 12: (256, 256), 14: (256, 256), 16: (256, 256),
    19: (256, 512), 21: (512, 512), 23: (512, 512), 25: (512, 512),
    28: (512, 512), 30: (512, 512), 32: (512, 512), 34: (512, 512),
}  # fmt: skip


def torchvision_style_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random VGG19 weights in torchvision's key layout (the ignored classifier kept tiny)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for index, (cin, cout) in TORCHVISION_CONVS.items():
        std = math.sqrt(2.0 / (cin * 9))
        state[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * std
        state[f"features.{index}.bias"] = torch.randn(cout, generator=gen) * 0.01
    for index in (0, 3, 6):
        state[f"classifier.{index}.weight"] = torch.zeros(2, 2)
        state[f"classifier.{index}.bias"] = torch.zeros(2)
    return state


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vgg") / VGG_FILE
    torch.save(torchvision_style_state(), path)
    return path


def scales(*values: float, shape: tuple[int, ...] = (2, 1, 3, 5)) -> list[list[torch.Tensor]]:
    """Multi-scale D outputs whose predictions are constant ``values`` (one per scale)."""
    return [[torch.randn(2, 4, 6, 6), torch.full(shape, v)] for v in values]


def test_lsgan() -> None:
    gan = GANLoss("lsgan")
    assert gan(scales(1.0, 1.0), True, True).item() == 0
    assert gan(scales(1.0, 0.0), False, True).item() == pytest.approx(0.5)
    assert gan(scales(0.5, 0.0), True, False).item() == pytest.approx((0.25 + 1.0) / 2)


def test_hinge() -> None:
    gan = GANLoss("hinge")
    assert gan(scales(2.0, 1.0), True, True).item() == 0
    assert gan(scales(0.0, -0.5), True, True).item() == pytest.approx((1.0 + 1.5) / 2)
    assert gan(scales(-3.0, 0.5), False, True).item() == pytest.approx((0.0 + 1.5) / 2)
    assert gan(scales(2.0, 4.0), True, False).item() == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="target_is_real=True"):
        gan(scales(1.0), False, False)
    with pytest.raises(ValueError, match="gan mode"):
        GANLoss("wgan")


def test_feature_matching() -> None:
    torch.manual_seed(0)
    real = [[torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 1, 3, 3)] for _ in range(2)]
    same = [[f.clone() for f in scale] for scale in real]
    assert feature_matching_loss(same, real, num_d=2, n_layers=1).item() == 0
    shifted = [[f + 0.5 for f in scale[:-1]] + [scale[-1] + 100] for scale in real]
    # 4 features each off by 0.5 (the predictions are excluded), weight 4 / (1 + 1) / 2.
    assert feature_matching_loss(shifted, real, num_d=2, n_layers=1).item() == pytest.approx(4 * 0.5 * 1.0)
    with pytest.raises(ValueError, match="expected 3 scales"):
        feature_matching_loss(shifted, real, num_d=3, n_layers=1)


def test_distortion() -> None:
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert distortion_loss("l1")(a, b).item() == pytest.approx(0.5)
    assert distortion_loss("mse")(a, b).item() == pytest.approx(0.25)
    # per sample: errors 0.5 (MSE 0.25, -6.02 dB) and 0.05 (MSE 0.0025, -26.02 dB), averaged
    c = torch.cat([b, torch.full((1, 3, 4, 4), 0.05)])
    assert distortion_loss("psnr")(torch.zeros(2, 3, 4, 4), c).item() == pytest.approx(-16.0206, abs=1e-3)
    # each sample weighs by its own error: the good one's gradient is 10x the poor one's per unit of error
    fake = torch.zeros(2, 3, 4, 4, requires_grad=True)
    distortion_loss("psnr")(fake, c).backward()
    assert (fake.grad[1].abs().mean() / fake.grad[0].abs().mean()).item() == pytest.approx(10.0, rel=1e-4)
    with pytest.raises(ValueError, match="distortion"):
        distortion_loss("l2")


def test_load_vgg19_from_path(vgg_file: Path) -> None:
    vgg = load_vgg19(str(vgg_file))
    state = torch.load(vgg_file, weights_only=True)
    assert torch.equal(vgg.features[34].weight, state["features.34.weight"])
    assert not vgg.training
    assert not any(p.requires_grad for p in vgg.parameters())


def test_load_vgg19_from_hub_cache(vgg_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # ignore any set_dir, so TORCH_HOME decides
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as missing:
        load_vgg19()
    expected = tmp_path / "home" / "hub" / "checkpoints" / VGG_FILE
    assert str(expected) in str(missing.value)
    expected.parent.mkdir(parents=True)
    expected.symlink_to(vgg_file)
    assert torch.equal(load_vgg19().features[0].bias, load_vgg19(str(vgg_file)).features[0].bias)

    torch.hub.set_dir(str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "elsewhere" / "checkpoints" / VGG_FILE)):
        load_vgg19()
    (tmp_path / "elsewhere" / "checkpoints").mkdir(parents=True)
    (tmp_path / "elsewhere" / "checkpoints" / VGG_FILE).symlink_to(vgg_file)
    assert isinstance(load_vgg19(), torch.nn.Module)


def test_load_vgg19_rejects_wrong_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_vgg19(str(tmp_path / "nowhere.pth"))
    state = torchvision_style_state()
    del state["features.16.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="features.16.weight"):
        load_vgg19(str(tmp_path / "partial.pth"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_vgg19(str(tmp_path / "junk.pth"))


def test_vgg_loss(vgg_file: Path) -> None:
    loss = VGGLoss(str(vgg_file))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 64, generator=gen) * 2 - 1
    y = torch.rand(2, 3, 32, 64, generator=gen) * 2 - 1
    assert loss(x, x.clone()).item() == 0
    state = torch.load(vgg_file, weights_only=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    normalised = ((x + 1) / 2 - mean) / std
    relu1_1 = torch.relu(
        torch.nn.functional.conv2d(
            normalised, state["features.0.weight"], state["features.0.bias"], padding=1
        )
    )
    feats = loss._features(x)
    assert torch.allclose(feats[0], relu1_1, atol=1e-5)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, 32, 64),
        (128, 16, 32),
        (256, 8, 16),
        (512, 4, 8),
        (512, 2, 4),
    ]
    x.requires_grad_(True)
    value = loss(x, y)
    assert value.dim() == 0 and value.item() > 0 and math.isfinite(value.item())
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())


def tiny_setup(label_nc: int = 6) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    # plain output: a fresh residual generator's zero head would keep every trunk gradient at zero
    cfg = ModelConfig(ngf=8, n_downsample=2, n_blocks=1, ndf=8, n_layers_d=2, num_d=2, residual=False)
    generator, discriminator = build_models(cfg, label_nc, use_instance=False)
    label = torch.randint(0, label_nc, (2, 32, 64))
    target = torch.rand(2, 3, 32, 64) * 2 - 1
    flags = {"use_instance": False, "zero_semantics": False, "visual_input": True}
    g_in = generator_input(label, None, target * 0.5, label_nc=label_nc, **flags)
    return generator, discriminator, g_in, target


@pytest.mark.parametrize("gan_mode", ["lsgan", "hinge"])
def test_generator_and_discriminator_objectives(vgg_file: Path, gan_mode: str) -> None:
    generator, discriminator, g_in, target = tiny_setup()
    semantics = g_in[:, : semantic_channels(6, False)]
    weights = LossWeights(gan=1.0, feat=10.0, vgg=10.0, dist=5.0)
    loss_cfg = LossConfig(gan_mode=gan_mode, distortion="mse", vgg_weights=str(vgg_file))
    losses = GeneratorLosses.from_config(weights, loss_cfg, ModelConfig(n_layers_d=2, num_d=2))
    fake = generator(g_in)
    real = target.clone().requires_grad_(True)
    terms = losses(
        fake,
        target,
        discriminator(discriminator_input(semantics, fake)),
        discriminator(discriminator_input(semantics, real)),
    )
    assert set(terms) == {"g_gan", "g_feat", "g_vgg", "g_dist", "g_total"}
    for value in terms.values():
        assert value.dim() == 0 and math.isfinite(value.item())
    parts = sum(v.item() for k, v in terms.items() if k != "g_total")
    assert terms["g_total"].item() == pytest.approx(parts, rel=1e-5)
    assert terms["g_dist"].item() == pytest.approx(5.0 * torch.mean((fake - target) ** 2).item(), rel=1e-5)
    terms["g_total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    assert real.grad is None  # real features are detached in feature matching

    discriminator.zero_grad()
    generator.zero_grad()
    d_terms = discriminator_loss(
        discriminator(discriminator_input(semantics, fake.detach())),
        discriminator(discriminator_input(semantics, target)),
        gan_mode,
    )
    assert set(d_terms) == {"d_real", "d_fake", "d_total"}
    assert d_terms["d_total"].item() == pytest.approx(0.5 * (d_terms["d_real"] + d_terms["d_fake"]).item())
    d_terms["d_total"].backward()
    assert all(p.grad is not None for p in discriminator.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in generator.parameters())


def test_terms_with_zero_weight_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty-hub"))
    distortion_only = GeneratorLosses(LossWeights(gan=0, feat=0, vgg=0, dist=1.0))
    assert distortion_only.vgg is None
    assert not distortion_only.needs_fake_outputs and not distortion_only.needs_real_outputs
    generator, _, g_in, target = tiny_setup()
    terms = distortion_only(generator(g_in), target)
    assert set(terms) == {"g_dist", "g_total"}
    with pytest.raises(FileNotFoundError, match="empty-hub"):
        GeneratorLosses(LossWeights(gan=0, feat=0, vgg=1.0, dist=0))
    with pytest.raises(ValueError, match="discriminator outputs"):
        GeneratorLosses(LossWeights(gan=1.0, feat=0, vgg=0, dist=0))(target, target)
    with pytest.raises(ValueError, match="every generator loss weight is zero"):
        GeneratorLosses(LossWeights(gan=0, feat=0, vgg=0, dist=0))(target, target)
