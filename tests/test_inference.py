"""The one way to run an exported generator: input assembly by the spec, padding to the stride, the head."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model.inference import enhance_batch, enhance_image
from pipeline.model.inputs import edge_map, generator_input
from pipeline.model.networks import Generator, build_models
from pipeline.model.spec import GeneratorSpec

LABEL_NC = 5
TINY = ModelConfig(ngf=4, n_downsample=2, n_blocks=1)  # stride 4
H, W = 30, 50  # not multiples of the stride


def frame(seed: int = 0, height: int = H, width: int = W) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "decoded": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "label": rng.integers(0, LABEL_NC, (height, width), dtype=np.uint8),
        "instance": rng.integers(0, 3, (height, width), dtype=np.int32),
    }


def model(phase: int = 2, trained: bool = True, **changes: int) -> tuple[Generator, GeneratorSpec]:
    """A tiny generator with instances; ``trained``: its correction head is no longer zero."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, **changes)
    generator, _ = build_models(cfg, LABEL_NC, use_instance=True)
    if trained and generator.correction is not None:
        with torch.no_grad():
            generator.correction[-1].weight.normal_(0.0, 0.02)
    spec = GeneratorSpec.from_config(cfg, LABEL_NC, True, codec="hevc", quality=42, phase=phase)
    return generator.eval(), spec


def as_batch(f: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A frame as the network's batch of one: ids, decoded in [-1, 1], edges."""
    return {
        "label": torch.from_numpy(f["label"].astype(np.int64))[None],
        "decoded": torch.from_numpy(f["decoded"]).permute(2, 0, 1)[None].float() / 127.5 - 1,
        "edge": edge_map(torch.from_numpy(f["instance"]))[None, None],
    }


def test_a_fresh_residual_generator_returns_the_decoded_frame() -> None:
    generator, spec = model(trained=False)
    f = frame()
    out = enhance_image(generator, spec, f["decoded"], f["label"], f["instance"])
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert np.array_equal(out, f["decoded"])
    assert np.array_equal(enhance_image(generator, spec, f["decoded"], f["label"]), f["decoded"])


def test_both_entries_enhance_alike() -> None:
    """The image entry is the batch entry on one frame, in uint8."""
    generator, spec = model()
    f = frame()
    batch = enhance_batch(generator, spec, **as_batch(f))
    assert batch.shape == (1, 3, H, W) and batch.dtype == torch.float32
    expected = batch[0].clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(enhance_image(generator, spec, f["decoded"], f["label"], f["instance"]), expected)
    # numpy arrays are taken as well as tensors
    arrays = {k: v.numpy() for k, v in as_batch(f).items()}
    assert torch.equal(enhance_batch(generator, spec, **arrays), batch)


@pytest.mark.parametrize(("height", "width", "mode"), [(H, W, "reflect"), (7, 2, "edge")])
def test_padding_rule(height: int, width: int, mode: str) -> None:
    """Padded at the bottom and right to the stride: the decoded image by reflection (by replication when
    the padding is as wide as the frame), labels and edges by replication; cropped back."""
    generator, spec = model(n_blocks=0)  # no residual block: its reflection would not fit a 2 x 1 trunk
    f = frame(1, height, width)
    pad = ((0, -height % 4), (0, -width % 4))
    padded = as_batch(
        {
            "decoded": np.pad(f["decoded"], (*pad, (0, 0)), mode=mode),
            "label": np.pad(f["label"], pad, mode="edge"),
            "instance": f["instance"],
        }
    )
    edge = torch.from_numpy(np.pad(as_batch(f)["edge"][0, 0].numpy(), pad, mode="edge"))[None, None]
    flags = {"label_nc": LABEL_NC, "use_instance": True, "zero_semantics": False, "visual_input": True}
    with torch.no_grad():
        x = generator_input(padded["label"], edge, padded["decoded"], **flags)
        expected = generator(x)[..., :height, :width]
    assert torch.equal(enhance_batch(generator, spec, **as_batch(f)), expected)


def test_the_spec_decides_what_the_generator_sees() -> None:
    f, other = frame(0), frame(1)
    mixed = {"decoded": other["decoded"], "label": f["label"], "instance": f["instance"]}
    relabelled = {"decoded": f["decoded"], "label": other["label"], "instance": other["instance"]}

    def run(generator: Generator, spec: GeneratorSpec, x: dict[str, np.ndarray]) -> np.ndarray:
        return enhance_image(generator, spec, x["decoded"], x["label"], x["instance"])

    # phase 1: the synthesis head, from the labels alone
    prior, prior_spec = model(phase=1)
    assert np.array_equal(run(prior, prior_spec, f), run(prior, prior_spec, mixed))
    batch = as_batch(frame(0, 32, 48))
    flags = {"label_nc": LABEL_NC, "use_instance": True, "zero_semantics": False, "visual_input": False}
    with torch.no_grad():
        drawn = prior(
            generator_input(batch["label"], batch["edge"], batch["decoded"], **flags), synthesis=True
        )
    assert torch.equal(enhance_batch(prior, prior_spec, **batch), drawn)
    # later phases see the decoded image and the labels
    generator, spec = model(phase=3)
    assert not np.array_equal(run(generator, spec, f), run(generator, spec, mixed))
    assert not np.array_equal(run(generator, spec, f), run(generator, spec, relabelled))
    # the no-semantics model never sees the labels
    blind, blind_spec = model(phase=3, zero_semantics=True)
    assert np.array_equal(run(blind, blind_spec, f), run(blind, blind_spec, relabelled))


def test_bad_inputs_are_refused() -> None:
    generator, spec = model()
    f = frame()
    bad = f["label"].copy()
    bad[0, 0] = LABEL_NC
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        enhance_image(generator, spec, f["decoded"], bad, f["instance"])
    batch = as_batch(f)
    with pytest.raises(ValueError, match="no edge map"):
        enhance_batch(generator, spec, batch["label"], batch["decoded"])
    # a model without instances ignores an edge map it is given
    plain, _ = build_models(TINY, LABEL_NC, use_instance=False)
    plain_spec = dataclasses.replace(spec, use_instance=False)
    assert torch.equal(
        enhance_batch(plain.eval(), plain_spec, **batch),
        enhance_batch(plain, plain_spec, batch["label"], batch["decoded"]),
    )
