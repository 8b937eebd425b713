"""JPD-SE training losses: LSGAN/hinge, pix2pixHD feature matching, VGG19 perceptual, distortion.

Discriminator outputs are :class:`pipeline.model.networks.MultiscaleDiscriminator`'s: one list per scale of
feature maps whose last entry is the prediction. :class:`GeneratorLosses` and
:func:`discriminator_loss` combine the terms the way the trainer needs them.
"""

from __future__ import annotations

import typing
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import Distortion, GanMode, LossConfig, LossWeights, ModelConfig
from pipeline.model.export import read_state_dict

GAN_MODES = typing.get_args(GanMode)
DISTORTIONS = typing.get_args(Distortion)

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"
# torchvision's vgg19 "E" configuration: conv widths, "M" = 2x2 max-pool.
VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip
# pix2pixHD's slices of ``features`` ending at relu1_1, relu2_1, relu3_1, relu4_1, relu5_1, and their weights.
VGG_SLICES = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))
VGG_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Outputs = list[list[Tensor]]


def _predictions(outputs: Outputs | list[Tensor] | Tensor) -> list[Tensor]:
    """The prediction (last feature map) of every scale."""
    if isinstance(outputs, Tensor):
        return [outputs]
    if not outputs:
        raise ValueError("discriminator outputs are empty")
    return [scale[-1] if isinstance(scale, list | tuple) else scale for scale in outputs]


class GANLoss(nn.Module):
    """Adversarial loss averaged over the discriminator's scales.

    ``lsgan``: mean squared distance of the predictions to 1 (real) or 0 (fake), for D and G alike.
    ``hinge``: D gets ``relu(1 - pred)`` on real and ``relu(1 + pred)`` on fake; G gets ``-pred``
    (G must call it with ``target_is_real=True``).
    """

    def __init__(self, mode: str = "lsgan") -> None:
        super().__init__()
        if mode not in GAN_MODES:
            raise ValueError(f"unknown gan mode {mode!r}; expected one of {GAN_MODES}")
        self.mode = mode

    def _one(self, pred: Tensor, target_is_real: bool, for_discriminator: bool) -> Tensor:
        if self.mode == "lsgan":
            return F.mse_loss(pred, torch.full_like(pred, 1.0 if target_is_real else 0.0))
        if for_discriminator:
            return F.relu(1.0 - pred).mean() if target_is_real else F.relu(1.0 + pred).mean()
        if not target_is_real:
            raise ValueError("the hinge generator loss is only defined for target_is_real=True")
        return -pred.mean()

    def forward(
        self, outputs: Outputs | list[Tensor] | Tensor, target_is_real: bool, for_discriminator: bool
    ) -> Tensor:
        preds = _predictions(outputs)
        return torch.stack([self._one(p, target_is_real, for_discriminator) for p in preds]).mean()


def feature_matching_loss(fake_feats: Outputs, real_feats: Outputs, num_d: int, n_layers: int) -> Tensor:
    """pix2pixHD feature matching: L1 between D features of fake and (detached) real images.

    Every intermediate feature (not the prediction) of every scale counts with weight
    ``4 / (n_layers + 1) / num_d``.
    """
    if len(fake_feats) != len(real_feats) or len(fake_feats) != num_d:
        raise ValueError(
            f"expected {num_d} scales of features, got {len(fake_feats)} fake / {len(real_feats)} real"
        )
    weight = 4.0 / (n_layers + 1) / num_d
    terms = []
    for fake_scale, real_scale in zip(fake_feats, real_feats, strict=True):
        if len(fake_scale) != len(real_scale) or len(fake_scale) < 2:
            raise ValueError(
                f"each scale needs features plus a prediction, got {len(fake_scale)} / {len(real_scale)}"
            )
        terms += [F.l1_loss(f, r.detach()) for f, r in zip(fake_scale[:-1], real_scale[:-1], strict=True)]
    return weight * torch.stack(terms).sum()


class NegativePSNR(nn.Module):
    """Minus each sample's PSNR in dB (``10 log10 MSE`` of the sample), averaged over the batch.

    Its gradient weighs each sample by the inverse of its own squared error, so the samples of a good
    quality (small errors) count as much as those of a poor one: what it maximises is the mean PSNR gain
    over a batch mixing qualities, where plain MSE is dominated by the poorest quality. The value is the
    PSNR of the value range 1 (images in [-1, 1] add a constant 6.02 dB); ``eps`` caps it at 100 dB.
    """

    def __init__(self, eps: float = 1e-10) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, fake: Tensor, target: Tensor) -> Tensor:
        mse = (fake - target).pow(2).flatten(1).mean(dim=1)
        return (10.0 * torch.log10(mse + self.eps)).mean()


def distortion_loss(kind: str = "l1") -> nn.Module:
    """The pixel distortion criterion: ``l1`` or ``mse`` (mean over pixels), or ``psnr``
    (:class:`NegativePSNR`)."""
    if kind == "l1":
        return nn.L1Loss()
    if kind == "mse":
        return nn.MSELoss()
    if kind == "psnr":
        return NegativePSNR()
    raise ValueError(f"unknown distortion {kind!r}; expected one of {DISTORTIONS}")


class VGG19(nn.Module):
    """torchvision's vgg19 ``features`` (same layer indices, so its state dict keys match)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG19_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU()]
                channels = int(item)
        self.features = nn.Sequential(*layers)


def default_vgg19_path() -> Path:
    """Where torchvision would cache the weights: ``<torch.hub.get_dir()>/checkpoints/vgg19-dcbb9e9d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


def load_vgg19(path: str = "") -> VGG19:
    """ImageNet VGG19 ``features`` from a torchvision state dict, frozen and in eval mode.

    ``path`` empty: the torch hub cache (:func:`default_vgg19_path`). Classifier keys are ignored; the
    ``features.*`` keys must match exactly.
    """
    file = Path(path).expanduser() if path else default_vgg19_path()
    if not file.is_file():
        raise FileNotFoundError(
            f"VGG19 weights not found at {file}. Put torchvision's {VGG19_FILE} there "
            f"(or set loss.vgg_weights to its path). On a machine with internet: "
            f"curl -L -o {VGG19_FILE} {VGG19_URL} "
            f"(or python -c \"import torch; torch.hub.load_state_dict_from_url('{VGG19_URL}')\", "
            f"which saves it under $TORCH_HOME/hub/checkpoints), then copy it here. "
            f"Set loss weight vgg=0 to train without the perceptual loss."
        )
    state = read_state_dict(file, "VGG19 weights")
    features = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("features.")}
    model = VGG19()
    try:
        model.load_state_dict(features, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{file} is not a torchvision vgg19 state dict: {err}") from err
    model.eval()
    model.requires_grad_(False)
    return model


class VGGLoss(nn.Module):
    """pix2pixHD perceptual loss: weighted L1 between VGG19 relu{1..5}_1 features of ``x`` and ``y``.

    Images are in [-1, 1]; they are mapped to [0, 1] and normalised with the ImageNet mean and std.
    The target's features are computed without gradient.
    """

    def __init__(self, weights_path: str = "") -> None:
        super().__init__()
        features = load_vgg19(weights_path).features
        self.slices = nn.ModuleList(features[a:b] for a, b in VGG_SLICES)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _features(self, x: Tensor) -> list[Tensor]:
        x = ((x + 1.0) / 2.0 - self.mean) / self.std
        out = []
        for block in self.slices:
            x = block(x)
            out.append(x)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"VGGLoss needs two B x 3 x H x W images of one shape, got {x.shape} / {y.shape}"
            )
        with torch.no_grad():
            target = self._features(y)
        return sum(
            w * F.l1_loss(a, b) for w, a, b in zip(VGG_WEIGHTS, self._features(x), target, strict=True)
        )


class GeneratorLosses(nn.Module):
    """The generator objective of one phase; terms with zero weight are neither built nor computed.

    ``forward`` returns the *weighted* terms that are on (``g_gan``, ``g_feat``, ``g_vgg``, ``g_dist``)
    and their sum ``g_total``. The VGG19 weights are only loaded when ``weights.vgg > 0``.
    """

    def __init__(
        self,
        weights: LossWeights,
        gan_mode: str = "lsgan",
        distortion: str = "l1",
        vgg_weights: str = "",
        num_d: int = 2,
        n_layers_d: int = 3,
    ) -> None:
        super().__init__()
        for name in ("gan", "feat", "vgg", "dist"):
            if getattr(weights, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {getattr(weights, name)}")
        self.weights = weights
        self.num_d = num_d
        self.n_layers_d = n_layers_d
        self.gan = GANLoss(gan_mode)
        self.dist = distortion_loss(distortion)
        self.vgg = VGGLoss(vgg_weights) if weights.vgg > 0 else None

    @classmethod
    def from_config(
        cls, weights: LossWeights, loss_cfg: LossConfig, model_cfg: ModelConfig
    ) -> GeneratorLosses:
        return cls(
            weights,
            loss_cfg.gan_mode,
            loss_cfg.distortion,
            loss_cfg.vgg_weights,
            model_cfg.num_d,
            model_cfg.n_layers_d,
        )

    @property
    def needs_fake_outputs(self) -> bool:
        """Whether ``forward`` needs D's outputs on the generated image."""
        return self.weights.gan > 0 or self.weights.feat > 0

    @property
    def needs_real_outputs(self) -> bool:
        """Whether ``forward`` needs D's outputs on the real image (feature matching)."""
        return self.weights.feat > 0

    def forward(
        self,
        fake: Tensor,
        target: Tensor,
        fake_outputs: Outputs | None = None,
        real_outputs: Outputs | None = None,
    ) -> dict[str, Tensor]:
        if self.needs_fake_outputs and fake_outputs is None:
            raise ValueError(
                "the gan/feat terms are on but no discriminator outputs for the fake image were given"
            )
        if self.needs_real_outputs and real_outputs is None:
            raise ValueError("the feat term is on but no discriminator outputs for the real image were given")
        terms: dict[str, Tensor] = {}
        w = self.weights
        if w.gan > 0:
            terms["g_gan"] = w.gan * self.gan(fake_outputs, target_is_real=True, for_discriminator=False)
        if w.feat > 0:
            terms["g_feat"] = w.feat * feature_matching_loss(
                fake_outputs, real_outputs, self.num_d, self.n_layers_d
            )
        if self.vgg is not None:
            terms["g_vgg"] = w.vgg * self.vgg(fake, target)
        if w.dist > 0:
            terms["g_dist"] = w.dist * self.dist(fake, target)
        if not terms:
            raise ValueError("every generator loss weight is zero; nothing to optimise")
        terms["g_total"] = torch.stack(list(terms.values())).sum()
        return terms


def discriminator_loss(
    fake_outputs: Outputs, real_outputs: Outputs, gan_mode: str = "lsgan"
) -> dict[str, Tensor]:
    """D's objective (``fake_outputs`` of a detached fake image): ``d_total = (d_real + d_fake) / 2``."""
    gan = GANLoss(gan_mode)
    d_real = gan(real_outputs, target_is_real=True, for_discriminator=True)
    d_fake = gan(fake_outputs, target_is_real=False, for_discriminator=True)
    return {"d_real": d_real, "d_fake": d_fake, "d_total": 0.5 * (d_real + d_fake)}
