"""pix2pixHD-style networks: the generator (with JPD-SE's residual correction head) and the multi-scale
PatchGAN discriminator, their norms and initialisation.

What the networks see is assembled in :mod:`pipeline.model.inputs`.
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import Activation, ModelConfig, Norm, Padding
from pipeline.model.inputs import IMAGE_CHANNELS, input_channels, semantic_channels

NORMS = typing.get_args(Norm)
PADDINGS = typing.get_args(Padding)
ACTIVATIONS = typing.get_args(Activation)
LEAKY_SLOPE = 0.2  # pix2pixHD's discriminator's
# The generator's options beside pix2pixHD's architecture, with pix2pixHD's value (ModelConfig's default):
# an option is recorded (hparams, spec) only where it differs, so that every earlier file stays valid
PIX2PIXHD_OPTIONS = {name: getattr(ModelConfig(), name) for name in ("padding", "end_kernel", "activation")}


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """pix2pixHD's norms: InstanceNorm without affine parameters, BatchNorm with them, or none."""
    if norm == "instance":
        return lambda channels: nn.InstanceNorm2d(channels, affine=False)
    if norm == "batch":
        return lambda channels: nn.BatchNorm2d(channels, affine=True)
    if norm == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def activation_layer(activation: str) -> Callable[[], nn.Module]:
    """The generator's activation: pix2pixHD's ReLU, or a leaky ReLU that never stops passing a gradient."""
    if activation == "relu":
        return lambda: nn.ReLU(True)
    if activation == "leaky_relu":
        return lambda: nn.LeakyReLU(LEAKY_SLOPE, True)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def same_conv(in_nc: int, out_nc: int, kernel: int, padding: str) -> list[nn.Module]:
    """A stride-1 conv that keeps the size: pix2pixHD's reflection pad before it (``reflect``), or zeros
    padded inside the conv itself (``zeros``), which skips a copy of the input each way (a shorter step on
    CPU: ``bench/bench_generator_step.py``)."""
    if padding == "reflect":
        return [nn.ReflectionPad2d(kernel // 2), nn.Conv2d(in_nc, out_nc, kernel_size=kernel)]
    if padding == "zeros":
        return [nn.Conv2d(in_nc, out_nc, kernel_size=kernel, padding=kernel // 2)]
    raise ValueError(f"unknown padding {padding!r}; expected one of {PADDINGS}")


class ResnetBlock(nn.Module):
    """Two padded 3x3 convs with a skip connection. In training, with ``drop`` > 0 (stochastic depth,
    :meth:`Generator.set_stochastic_depth`), each sample skips the convs with that probability and the
    others' outputs are scaled by ``1 / (1 - drop)``; in eval mode every sample takes them.

    With ``semantic_nc`` > 0 (``model.semantic_modulation``) the convs read ``x * (1 + gamma) + beta``, where
    ``gamma`` and ``beta`` are a 1x1 conv of the ``semantics`` given to :meth:`forward` (its
    ``semantic_nc`` channels at the block's resolution); :func:`build_models` starts that conv at zero."""

    drop: float = 0.0

    def __init__(
        self,
        dim: int,
        norm: Callable[[int], nn.Module],
        padding: str = "reflect",
        activation: str = "relu",
        semantic_nc: int = 0,
    ) -> None:
        super().__init__()
        self.modulation = nn.Conv2d(semantic_nc, 2 * dim, 1) if semantic_nc else None
        self.conv_block = nn.Sequential(
            *same_conv(dim, dim, 3, padding),
            norm(dim),
            activation_layer(activation)(),
            *same_conv(dim, dim, 3, padding),
            norm(dim),
        )

    def forward(self, x: Tensor, semantics: Tensor | None = None) -> Tensor:
        if self.modulation is None:
            out = self.conv_block(x)
        else:
            if semantics is None:
                raise ValueError("a semantically modulated block needs the semantics")
            gamma, beta = self.modulation(semantics).chunk(2, 1)
            out = self.conv_block(x * (1 + gamma) + beta)
        if self.training and self.drop > 0:
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.drop
            out = out * keep.to(out.dtype) / (1 - self.drop)
        return x + out


class Generator(nn.Module):
    """pix2pixHD GlobalGenerator: 7x7 front, stride-2 downsamplings, residual blocks, upsamplings, tanh.

    Input height and width must be multiples of ``2 ** n_downsample``. ``end_kernel`` sets the kernel of
    the full-resolution convs at both ends (the front and both heads; pix2pixHD's 7x7 below), and
    ``activation`` every activation of the trunk (pix2pixHD's ReLU, or ``leaky_relu``).

    Two output heads share the trunk:

    * the **synthesis head** (pix2pixHD's 7x7 conv + tanh, the last layers of ``self.model``) draws an image
      from the trunk's features; phase 1 (the semantic prior, decoded image zeroed) and every phase of a
      plain (``residual=False``) generator use it;
    * the **correction head** (``residual=True`` only; a 7x7 conv initialised at zero) outputs a correction
      added to the decoded image: ``clamp(decoded + correction, -1, 1)``. At initialisation it returns the
      decoded image exactly, so phases 2-3 start at the codec and every step is a measurable gain.

    The phase-1 prior hands its trunk (and its synthesis head, unused afterwards) to phases 2-3 weight for
    weight; the correction head stays at zero until phase 2 trains it. ``forward(x, synthesis=True)``
    picks the synthesis head; a plain generator ignores the flag. ``forward(x, gains=g)`` scales each part
    of the correction (:meth:`correction_parts`) by the encoder's per-frame gains.

    With ``semantic_nc`` > 0 the input's first ``semantic_nc`` channels (the one-hot classes and instance
    edges, :func:`pipeline.model.inputs.generator_input`) also modulate every residual block
    (:class:`ResnetBlock`), average-pooled to the blocks' resolution.
    """

    def __init__(
        self,
        input_nc: int,
        output_nc: int = IMAGE_CHANNELS,
        ngf: int = 64,
        n_downsample: int = 4,
        n_blocks: int = 9,
        norm: str = "instance",
        residual: bool = False,
        padding: str = "reflect",
        end_kernel: int = 7,
        activation: str = "relu",
        semantic_nc: int = 0,
    ) -> None:
        super().__init__()
        if end_kernel < 1 or end_kernel % 2 == 0:
            raise ValueError(f"end_kernel must be odd and positive (a size-keeping conv), got {end_kernel}")
        if min(input_nc, output_nc, ngf) <= 0 or n_downsample < 0 or n_blocks < 0 or semantic_nc < 0:
            raise ValueError(
                f"invalid generator size: input_nc={input_nc} output_nc={output_nc} ngf={ngf} "
                f"n_downsample={n_downsample} n_blocks={n_blocks} semantic_nc={semantic_nc}"
            )
        if semantic_nc and semantic_nc > input_nc - IMAGE_CHANNELS:
            raise ValueError(
                f"semantic_nc={semantic_nc}: the semantic channels lead the input, before the decoded "
                f"image's {IMAGE_CHANNELS}; input_nc={input_nc} leaves room for {input_nc - IMAGE_CHANNELS}"
            )
        self.hparams = {
            "input_nc": input_nc,
            "output_nc": output_nc,
            "ngf": ngf,
            "n_downsample": n_downsample,
            "n_blocks": n_blocks,
            "norm": norm,
            "residual": residual,
        }
        options = {"padding": padding, "end_kernel": end_kernel, "activation": activation}
        self.hparams.update({k: v for k, v in options.items() if v != PIX2PIXHD_OPTIONS[k]})
        if semantic_nc:  # recorded only when set, as the options above
            self.hparams["semantic_nc"] = semantic_nc
        if residual and (input_nc < IMAGE_CHANNELS or output_nc != IMAGE_CHANNELS):
            raise ValueError(
                f"a residual generator adds its output to the decoded RGB image (the last {IMAGE_CHANNELS} "
                f"input channels): needs input_nc >= {IMAGE_CHANNELS} and output_nc == {IMAGE_CHANNELS}, "
                f"got {input_nc} and {output_nc}"
            )
        make_norm, act = norm_layer(norm), activation_layer(activation)
        layers: list[nn.Module] = [
            *same_conv(input_nc, ngf, end_kernel, padding),
            make_norm(ngf),
            act(),
        ]
        for i in range(n_downsample):
            mult = 2**i
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1),
                make_norm(ngf * mult * 2),
                act(),
            ]
        mult = 2**n_downsample
        layers += [
            ResnetBlock(ngf * mult, make_norm, padding, activation, semantic_nc) for _ in range(n_blocks)
        ]
        for i in range(n_downsample):
            mult = 2 ** (n_downsample - i)
            layers += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, kernel_size=3, stride=2, padding=1, output_padding=1
                ),
                make_norm(ngf * mult // 2),
                act(),
            ]
        # the synthesis head stays inside ``model`` so that plain generators keep pix2pixHD's layout
        synthesis_head = [*same_conv(ngf, output_nc, end_kernel, padding), nn.Tanh()]
        self.synthesis_layers = len(synthesis_head)
        self.model = nn.Sequential(*layers, *synthesis_head)
        self.correction: nn.Sequential | None = None
        if residual:
            self.correction = nn.Sequential(*same_conv(ngf, output_nc, end_kernel, padding))
            zero_correction(self)

    def set_stochastic_depth(self, drop: float) -> None:
        """Let each residual block be skipped per sample with probability ``drop`` in training
        (``train.stochastic_depth``); weights, hparams and eval-mode outputs are unchanged."""
        if not 0 <= drop < 1:
            raise ValueError(f"stochastic depth must be in [0, 1), got {drop}")
        for block in self.modules():
            if isinstance(block, ResnetBlock):
                block.drop = drop

    @property
    def semantic_nc(self) -> int:
        """The leading input channels that modulate the residual blocks (0: none)."""
        return self.hparams.get("semantic_nc", 0)

    @property
    def residual(self) -> bool:
        return self.correction is not None

    def forward(self, x: Tensor, synthesis: bool = False, gains: Tensor | None = None) -> Tensor:
        factor, input_nc = 2 ** self.hparams["n_downsample"], self.hparams["input_nc"]
        if x.dim() != 4 or x.shape[1] != input_nc:
            raise ValueError(f"generator expects B x {input_nc} x H x W, got {tuple(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"generator input size {tuple(x.shape[2:])} must be a multiple of {factor}")
        if self.correction is None or synthesis:
            if gains is not None:
                raise ValueError("gains scale the correction head: a residual generator's, not synthesis")
            features = self.trunk(x)
            for layer in self.model[len(self.model) - self.synthesis_layers :]:
                features = layer(features)
            return features
        return self.corrected(x, self.trunk(x), gains)

    def corrected(self, x: Tensor, features: Tensor, gains: Tensor | None = None) -> Tensor:
        """The residual output for input ``x`` from its trunk ``features``: what ``forward`` returns, for an
        encoder that has fitted ``gains`` to those features (:meth:`correction_parts`)."""
        assert self.correction is not None
        decoded = x[:, -IMAGE_CHANNELS:]
        if gains is None:
            correction = self.correction(features)
        else:  # the sum of the gained parts, in one convolution of the gained features
            conv = self.correction[-1]
            expected = (features.shape[0], features.shape[1] + 1)
            if tuple(gains.shape) != expected:
                raise ValueError(
                    f"correction gains must be {expected[0]} x {expected[1]}, got {tuple(gains.shape)}"
                )
            part_gains = gains.to(features.device, features.dtype)[:, :, None, None]
            correction = self._correction_conv(features * part_gains[:, :-1], conv.weight)
            correction = correction + conv.bias.view(1, -1, 1, 1) * part_gains[:, -1:]
        return (decoded + correction.to(decoded.dtype)).clamp(-1.0, 1.0)

    def trunk(self, x: Tensor) -> Tensor:
        """The features both heads read (``B x ngf x H x W``)."""
        semantics = None
        if self.semantic_nc:  # the residual blocks' resolution: each pooled value a share of its classes
            semantics = F.avg_pool2d(x[:, : self.semantic_nc], 2 ** self.hparams["n_downsample"])
        for layer in itertools.islice(self.model, len(self.model) - self.synthesis_layers):
            x = layer(x, semantics) if isinstance(layer, ResnetBlock) else layer(x)
        return x

    def correction_parts(self, features: Tensor) -> Tensor:
        """The correction head's output split by what it reads: ``B x (ngf + 1) x 3 x H x W``, the
        contribution of each trunk channel and, last, the bias. They sum to the correction, so the per-frame
        gains of ``forward`` (each part's factor; :mod:`pipeline.model.correction_scale`) are a linear
        least-squares fit for an encoder that holds the original."""
        if self.correction is None:
            raise ValueError("correction_parts needs a residual generator")
        conv = self.correction[-1]
        ngf, batch = features.shape[1], features.shape[0]
        # one group per trunk channel: group c outputs that channel's 3 colour contributions
        weight = conv.weight.transpose(0, 1).reshape(ngf * IMAGE_CHANNELS, 1, *conv.weight.shape[2:])
        parts = self._correction_conv(features, weight, groups=ngf).unflatten(1, (ngf, IMAGE_CHANNELS))
        bias = conv.bias.view(1, 1, IMAGE_CHANNELS, 1, 1).expand(batch, 1, -1, *parts.shape[-2:])
        return torch.cat([parts, bias], 1)

    def _correction_conv(self, features: Tensor, weight: Tensor, groups: int = 1) -> Tensor:
        """``weight`` (no bias) over ``features`` padded as the correction head pads them."""
        assert self.correction is not None
        *pad, conv = self.correction
        padded = pad[0](features) if pad else features
        return F.conv2d(padded, weight, padding=conv.padding, groups=groups)


def generator_from_state(
    hparams: dict[str, typing.Any], state: dict[str, Tensor], device: str | torch.device = "cpu"
) -> Generator:
    """A float32 generator of ``hparams`` on ``device`` holding copies of ``state`` (any dtype or device),
    built on the meta device: it draws no initial weights, so it neither spends the time nor moves the torch
    RNG (a validation between training steps must not change what the steps draw next)."""
    with torch.device("meta"):
        generator = Generator(**hparams)
    copies = {
        name: t.detach().to(device, torch.float32 if t.is_floating_point() else t.dtype, copy=True)
        for name, t in state.items()
    }
    generator.load_state_dict(copies, strict=True, assign=True)
    return generator


def zero_correction(generator: Generator) -> None:
    """Set the correction head's conv to zero: the generator then returns its decoded input exactly."""
    if generator.correction is None:
        raise ValueError("zero_correction needs a residual generator")
    conv = generator.correction[-1]
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)


class NLayerDiscriminator(nn.Module):
    """pix2pixHD PatchGAN with intermediate features: returns every block's output, the last is the score."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3, norm: str = "instance") -> None:
        super().__init__()
        make_norm = norm_layer(norm)
        kw, pad = 4, 2
        blocks: list[nn.Sequential] = [
            nn.Sequential(nn.Conv2d(input_nc, ndf, kw, stride=2, padding=pad), nn.LeakyReLU(0.2, True))
        ]
        nf = ndf
        for _ in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(nf_prev, nf, kw, stride=2, padding=pad), make_norm(nf), nn.LeakyReLU(0.2, True)
                )
            )
        nf_prev, nf = nf, min(nf * 2, 512)
        blocks.append(
            nn.Sequential(
                nn.Conv2d(nf_prev, nf, kw, stride=1, padding=pad), make_norm(nf), nn.LeakyReLU(0.2, True)
            )
        )
        blocks.append(nn.Sequential(nn.Conv2d(nf, 1, kw, stride=1, padding=pad)))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


class MultiscaleDiscriminator(nn.Module):
    """``num_d`` PatchGANs; scale ``i`` sees the input average-pooled ``i`` times (scale 0: full size).

    ``forward`` returns one list per scale of ``n_layers + 2`` feature maps; the last of each is the
    prediction, the others feed the feature-matching loss.
    """

    def __init__(
        self, input_nc: int, ndf: int = 64, n_layers: int = 3, num_d: int = 2, norm: str = "instance"
    ) -> None:
        super().__init__()
        if num_d < 1 or n_layers < 1 or ndf <= 0 or input_nc <= 0:
            raise ValueError(
                f"invalid discriminator size: input_nc={input_nc} ndf={ndf} n_layers={n_layers} num_d={num_d}"
            )
        self.input_nc = input_nc
        self.scales = nn.ModuleList(NLayerDiscriminator(input_nc, ndf, n_layers, norm) for _ in range(num_d))
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def forward(self, x: Tensor) -> list[list[Tensor]]:
        if x.dim() != 4 or x.shape[1] != self.input_nc:
            raise ValueError(f"discriminator expects B x {self.input_nc} x H x W, got {tuple(x.shape)}")
        outputs = []
        for i, scale in enumerate(self.scales):
            if i:
                x = self.downsample(x)
            outputs.append(scale(x))
        return outputs


def init_weights(module: nn.Module) -> None:
    """pix2pixHD init: conv weights ~ N(0, 0.02); norm weights ~ N(1, 0.02) with zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d | nn.InstanceNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_models(
    model_cfg: ModelConfig, class_nc: int, use_instance: bool
) -> tuple[Generator, MultiscaleDiscriminator]:
    """The generator and discriminator for ``class_nc`` one-hot classes (the caller resolves them: the
    data's ``label_nc``, or its categories, :func:`pipeline.model.inputs.class_count`)."""
    if class_nc <= 0:
        raise ValueError(f"class_nc must be positive, got {class_nc}")
    generator = Generator(
        input_channels(class_nc, use_instance, model_cfg.quality_input),
        IMAGE_CHANNELS,
        ngf=model_cfg.ngf,
        n_downsample=model_cfg.n_downsample,
        n_blocks=model_cfg.n_blocks,
        norm=model_cfg.norm,
        residual=model_cfg.residual,
        padding=model_cfg.padding,
        end_kernel=model_cfg.end_kernel,
        activation=model_cfg.activation,
        semantic_nc=semantic_channels(class_nc, use_instance) if model_cfg.semantic_modulation else 0,
    )
    discriminator = MultiscaleDiscriminator(
        semantic_channels(class_nc, use_instance) + IMAGE_CHANNELS,
        ndf=model_cfg.ndf,
        n_layers=model_cfg.n_layers_d,
        num_d=model_cfg.num_d,
        norm=model_cfg.norm,
    )
    init_weights(generator)
    if generator.residual:
        zero_correction(generator)  # init_weights drew it from N(0, 0.02)
    for block in generator.modules():
        if isinstance(block, ResnetBlock) and block.modulation is not None:
            # no modulation at first: the trunk starts as the unmodulated generator's
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
    init_weights(discriminator)
    return generator, discriminator
