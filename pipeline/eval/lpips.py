"""LPIPS v0.1 (Zhang et al. 2018), AlexNet or VGG16 backbone, from local weight files only
(:mod:`pipeline.eval.weights`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.eval.fidelity import ImageLike, rgb_pair
from pipeline.eval.weights import Unavailable, hub_checkpoint
from pipeline.model.export import read_state_dict


def _vgg16_layout() -> tuple[Any, ...]:
    layout: list[Any] = []
    for spec in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        layout += [("M", 2)] if spec == "M" else [("C", spec, 3, 1, 1), "R"]
    return tuple(layout)


# name: (torchvision state dict file, ``features`` layout, indices of the tapped ReLUs); layout items are
# "R" (ReLU), ("M", kernel) (max pool, stride 2) and ("C", out, kernel, stride, padding) (conv).
LPIPS_BACKBONES: dict[str, tuple[str, tuple[Any, ...], tuple[int, ...]]] = {
    "alex": (
        "alexnet-owt-7be5be79.pth",
        (
            ("C", 64, 11, 4, 2),
            "R",
            ("M", 3),
            ("C", 192, 5, 1, 2),
            "R",
            ("M", 3),
            ("C", 384, 3, 1, 1),
            "R",
            ("C", 256, 3, 1, 1),
            "R",
            ("C", 256, 3, 1, 1),
            "R",
        ),
        (1, 4, 7, 9, 11),
    ),
    "vgg": ("vgg16-397923af.pth", _vgg16_layout(), (3, 8, 15, 22, 29)),
}
_LPIPS_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


def _backbone_layers(layout: tuple[Any, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in layout:
        if item == "R":
            layers.append(nn.ReLU())
        elif item[0] == "M":
            layers.append(nn.MaxPool2d(kernel_size=item[1], stride=2))
        else:
            _, out, kernel, stride, pad = item
            layers.append(nn.Conv2d(channels, out, kernel, stride=stride, padding=pad))
            channels = out
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018): unit-normalised backbone features, squared differences, learned
    1x1 channel weights, spatial mean, summed over five layers."""

    def __init__(self, net: str) -> None:
        super().__init__()
        if net not in LPIPS_BACKBONES:
            raise ValueError(f"LPIPS backbone must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
        self.net = net
        self.features = _backbone_layers(LPIPS_BACKBONES[net][1])
        self.taps = LPIPS_BACKBONES[net][2]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS[net])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        x = (x - self.shift) / self.scale
        for index, layer in enumerate(self.features[: self.taps[-1] + 1]):
            x = layer(x)
            if index in self.taps:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    @torch.no_grad()
    def forward(self, a: ImageLike, b: ImageLike) -> float:
        """LPIPS distance of two uint8 RGB images (lower = more similar)."""
        x, y = rgb_pair(a, b)
        param = next(self.parameters())
        tx, ty = (torch.from_numpy(v).permute(2, 0, 1)[None].to(param) / 127.5 - 1 for v in (x, y))
        total = sum(
            lin((fx - fy) ** 2).mean(dim=(2, 3))
            for lin, fx, fy in zip(self.lins, self._taps(tx), self._taps(ty), strict=True)
        )
        return float(total)


def load_lpips(weights: str = "", device: str | torch.device = "cpu") -> LPIPS | Unavailable:
    """LPIPS from local files: the linear layers (``weights``: the lpips package's ``v0.1/alex.pth`` or
    ``vgg.pth``; empty: that file from the installed ``lpips`` package, if any) and the torchvision
    backbone (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``) beside it or in the torch hub cache.
    """
    if not weights:
        spec = importlib.util.find_spec("lpips")
        if spec is None or not spec.origin:
            return Unavailable(
                "LPIPS weights absent: the lpips package is not installed and eval.lpips_weights is empty "
                "(set it to lpips' weights/v0.1/alex.pth and put alexnet-owt-7be5be79.pth beside it or in "
                "the torch hub cache)"
            )
        weights = str(Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth")
    lin_path = Path(weights).expanduser()
    if not lin_path.is_file():
        return Unavailable(f"LPIPS linear-layer weights not found at {lin_path}")
    try:
        lin_state = read_state_dict(lin_path, "LPIPS linear layers")
        lins = {
            int(m.group(1)): v
            for k, v in lin_state.items()
            if (m := re.fullmatch(r"lin(\d)\.model\.\d\.weight", k))
        }
        widths = tuple(int(lins[i].shape[1]) for i in sorted(lins))
        net = next((n for n, c in _LPIPS_CHANNELS.items() if c == widths), None)
        if net is None:
            return Unavailable(
                f"{lin_path} is not an LPIPS v0.1 alex/vgg linear-layer file (widths {widths})"
            )
        backbone_name = LPIPS_BACKBONES[net][0]
        candidates = [lin_path.parent / backbone_name, hub_checkpoint(backbone_name)]
        backbone = next((p for p in candidates if p.is_file()), None)
        if backbone is None:
            return Unavailable(
                f"LPIPS-{net} backbone weights {backbone_name} not found in {[str(p) for p in candidates]}"
            )
        model = LPIPS(net)
        features = {
            k[len("features.") :]: v
            for k, v in read_state_dict(backbone, "LPIPS backbone").items()
            if k.startswith("features.")
        }
        model.features.load_state_dict(features, strict=True)
        for i, lin in enumerate(model.lins):
            lin.weight.data.copy_(lins[i])
    except (ValueError, RuntimeError, KeyError) as err:
        return Unavailable(f"LPIPS weights unusable: {err}")
    return model.to(device).eval().requires_grad_(False)
