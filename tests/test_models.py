"""Generator input assembly, edge maps and the pix2pixHD networks (tiny CPU sizes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model.inputs import (
    discriminator_input,
    edge_map,
    generator_input,
    input_channels,
    semantic_channels,
)
from pipeline.model.networks import (
    Generator,
    MultiscaleDiscriminator,
    build_models,
    generator_from_state,
    zero_correction,
)

LABEL_NC = 34
B, H, W = 2, 64, 128
FLAGS = {"label_nc": LABEL_NC, "zero_semantics": False, "visual_input": True}
TINY = ModelConfig(ngf=8, n_downsample=2, n_blocks=1, ndf=8, n_layers_d=2, num_d=2)
PLAIN = dataclasses.replace(TINY, residual=False)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    instance = torch.randint(0, 4, (B, 1, H, W), generator=gen)
    return {
        "label": torch.randint(0, LABEL_NC, (B, H, W), generator=gen),
        "edge": edge_map(instance),
        "decoded": torch.rand(B, 3, H, W, generator=gen) * 2 - 1,
    }


def assemble(batch: dict[str, torch.Tensor], **flags: bool) -> torch.Tensor:
    kwargs = {"use_instance": True, "zero_semantics": False, "visual_input": True, **flags}
    return generator_input(batch["label"], batch["edge"], batch["decoded"], label_nc=LABEL_NC, **kwargs)


def test_edge_map_marks_both_sides_of_a_boundary() -> None:
    inst = torch.zeros(1, 1, 5, 6, dtype=torch.int32)
    inst[..., :, 3:] = 7
    edge = edge_map(inst)
    assert edge.shape == inst.shape and edge.dtype == torch.float32
    assert edge[0, 0, :, 2:4].eq(1).all()
    assert edge[0, 0, :, :2].eq(0).all() and edge[0, 0, :, 4:].eq(0).all()
    block = torch.zeros(4, 4, dtype=torch.int64)
    block[1:3, 1:3] = 2
    expected = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float32)
    assert torch.equal(edge_map(block), expected)


def test_generator_input_layout(batch: dict[str, torch.Tensor]) -> None:
    x = assemble(batch)
    assert x.shape == (B, input_channels(LABEL_NC, True), H, W) == (B, LABEL_NC + 4, H, W)
    onehot = x[:, :LABEL_NC]
    assert torch.equal(onehot.argmax(1), batch["label"])
    assert torch.equal(onehot.sum(1), torch.ones(B, H, W))
    assert torch.equal(x[:, LABEL_NC : LABEL_NC + 1], batch["edge"])
    assert torch.equal(x[:, -3:], batch["decoded"])
    no_inst = generator_input(batch["label"], None, batch["decoded"], **FLAGS, use_instance=False)
    assert no_inst.shape[1] == input_channels(LABEL_NC, False) == LABEL_NC + 3


def test_generator_input_zeroing(batch: dict[str, torch.Tensor]) -> None:
    sem = semantic_channels(LABEL_NC, True)
    blind = assemble(batch, visual_input=False)
    assert blind[:, sem:].abs().sum() == 0
    assert torch.equal(blind[:, :sem], assemble(batch)[:, :sem])
    plain = assemble(batch, zero_semantics=True)
    assert plain[:, :sem].abs().sum() == 0
    assert torch.equal(plain[:, sem:], batch["decoded"])


def test_generator_input_rejects_bad_labels(batch: dict[str, torch.Tensor]) -> None:
    bad = batch["label"].clone()
    bad[0, 0, 0] = LABEL_NC
    with pytest.raises(ValueError, match=r"\[0, 34\)"):
        generator_input(bad, batch["edge"], batch["decoded"], **FLAGS, use_instance=True)
    with pytest.raises(ValueError, match="edge"):
        generator_input(batch["label"], None, batch["decoded"], **FLAGS, use_instance=True)
    with pytest.raises(ValueError, match="decoded"):
        generator_input(
            batch["label"], batch["edge"], batch["decoded"][:, :, :32], **FLAGS, use_instance=True
        )


def test_generator_input_reads_no_device_tensor_back(batch: dict[str, torch.Tensor]) -> None:
    """Ids are checked on the CPU only: reading a device tensor's range would stall training every step.
    Meta tensors stand for a device's: reading one back raises."""
    meta = {k: v.to("meta") for k, v in batch.items()}
    bad = torch.full_like(meta["label"], LABEL_NC)
    x = generator_input(bad, meta["edge"], meta["decoded"], **FLAGS, use_instance=True)
    assert x.device.type == "meta" and x.shape == (B, input_channels(LABEL_NC, True), H, W)
    # a CPU label is checked, before it moves to the decoded image's device
    cpu_bad = batch["label"].clone()
    cpu_bad[0, 0, 0] = LABEL_NC
    with pytest.raises(ValueError, match=r"found ids in \[0, 34\]"):
        generator_input(cpu_bad, meta["edge"], meta["decoded"], **FLAGS, use_instance=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_input_on_a_cuda_device_never_syncs(batch: dict[str, torch.Tensor]) -> None:
    cuda = {k: v.cuda() for k, v in batch.items()}
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
    try:
        x = generator_input(cuda["label"], cuda["edge"], cuda["decoded"], **FLAGS, use_instance=True)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.equal(x.cpu(), assemble(batch))


def test_shapes_and_discriminator_features(batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    generator, discriminator = build_models(TINY, LABEL_NC, use_instance=True)
    x = assemble(batch)
    fake = generator(x)
    assert fake.shape == (B, 3, H, W)
    assert fake.abs().max() <= 1
    outputs = discriminator(discriminator_input(x[:, : semantic_channels(LABEL_NC, True)], fake))
    assert len(outputs) == TINY.num_d
    for scale, feats in enumerate(outputs):
        assert len(feats) == TINY.n_layers_d + 2
        assert feats[-1].shape[:2] == (B, 1)
        assert [f.shape[1] for f in feats[:-1]] == [8, 16, 32]
        # Each scale sees the input halved once more.
        assert feats[0].shape[-1] == (W // 2**scale) // 2 + 1
    assert outputs[1][-1].shape[-1] < outputs[0][-1].shape[-1]


@pytest.fixture(params=[PLAIN, TINY], ids=["plain", "residual"])
def trained_looking(request: pytest.FixtureRequest) -> Generator:
    """A plain and a residual generator whose outputs depend on every input channel."""
    torch.manual_seed(0)
    generator, _ = build_models(request.param, LABEL_NC, use_instance=True)
    perturb_correction(generator)
    return generator


def test_blind_generator_ignores_the_decoded_image(
    batch: dict[str, torch.Tensor], trained_looking: Generator
) -> None:
    generator = trained_looking
    other = dict(batch, decoded=-batch["decoded"])
    with torch.no_grad():
        a = generator(assemble(batch, visual_input=False))
        b = generator(assemble(other, visual_input=False))
        c = generator(assemble(batch))
        d = generator(assemble(other))
    assert torch.equal(a, b)
    assert not torch.allclose(c, d)


def perturb_correction(generator: Generator) -> None:
    """A trained-looking correction head (an untrained one is zero and ignores every input)."""
    if generator.correction is not None:
        with torch.no_grad():
            generator.correction[-1].weight.normal_(0.0, 0.02)


def test_residual_generator_starts_at_the_decoded_image(batch: dict[str, torch.Tensor]) -> None:
    """For every phase's input (decoded image zeroed or not, semantics zeroed or not) a fresh residual
    generator returns the decoded image it was given, exactly."""
    torch.manual_seed(0)
    generator, _ = build_models(TINY, LABEL_NC, use_instance=True)
    assert generator.residual
    for flags in ({}, {"visual_input": False}, {"zero_semantics": True}):
        x = assemble(batch, **flags)
        with torch.no_grad():
            assert torch.equal(generator(x), x[:, -3:].clamp(-1, 1))
    # the synthesis head (phase 1) is pix2pixHD's tanh output, not the identity
    with torch.no_grad():
        drawn = generator(assemble(batch, visual_input=False), synthesis=True)
    assert drawn.abs().max() < 1 and drawn.abs().sum() > 0


def test_residual_and_plain_generators_share_the_trunk_layout() -> None:
    plain, _ = build_models(PLAIN, 5, use_instance=False)
    residual, _ = build_models(TINY, 5, use_instance=False)
    extra = set(residual.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(residual.state_dict())
    assert extra == {"correction.1.weight", "correction.1.bias"}
    zero_correction(residual)
    with pytest.raises(ValueError, match="residual"):
        zero_correction(plain)


def test_zero_semantics_generator_ignores_labels(
    batch: dict[str, torch.Tensor], trained_looking: Generator
) -> None:
    generator = trained_looking
    other = dict(batch, label=(batch["label"] + 5) % LABEL_NC, edge=1 - batch["edge"])
    with torch.no_grad():
        assert torch.equal(
            generator(assemble(batch, zero_semantics=True)), generator(assemble(other, zero_semantics=True))
        )
        assert not torch.allclose(generator(assemble(batch)), generator(assemble(other)))


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_norms_and_init(norm: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(ngf=8, n_downsample=1, n_blocks=1, ndf=8, n_layers_d=1, num_d=1, norm=norm)
    generator, discriminator = build_models(cfg, 5, use_instance=False)
    perturb_correction(generator)
    assert generator(torch.zeros(1, input_channels(5, False), 16, 16)).shape == (1, 3, 16, 16)
    convs = [
        m.weight for m in generator.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
    ]
    stds = torch.cat([w.flatten() for w in convs]).std()
    assert 0.015 < stds < 0.025
    norms = [m for m in discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bool(norms) == (norm == "batch")
    for m in norms:
        assert torch.all(m.bias == 0) and abs(float(m.weight.detach().mean()) - 1) < 0.02


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_a_generator_from_a_state_copies_it_in_float32_and_draws_nothing(norm: str) -> None:
    source = Generator(5, ngf=4, n_downsample=1, n_blocks=1, norm=norm, residual=True)
    perturb_correction(source)
    state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    before = torch.get_rng_state()
    copy = generator_from_state(source.hparams, state)
    assert torch.equal(torch.get_rng_state(), before)
    for name, tensor in copy.state_dict().items():
        assert tensor.device.type == "cpu" and tensor.dtype == source.state_dict()[name].dtype
        assert torch.equal(tensor, state[name].to(tensor.dtype))
        assert tensor.data_ptr() != state[name].data_ptr()
    reference = Generator(**source.hparams)
    reference.load_state_dict(state)
    x = torch.rand(1, 5, 8, 8)
    assert torch.equal(copy.eval()(x), reference.eval()(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        generator_from_state({**source.hparams, "ngf": 8}, state)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="norm"):
        Generator(10, norm="group")
    with pytest.raises(ValueError, match="multiple of 4"):
        Generator(4, ngf=4, n_downsample=2, n_blocks=0)(torch.zeros(1, 4, 18, 16))
    with pytest.raises(ValueError, match="expects B x 7"):
        MultiscaleDiscriminator(7, ndf=4, n_layers=1, num_d=1)(torch.zeros(1, 6, 16, 16))
    with pytest.raises(ValueError, match="class_nc"):
        build_models(TINY, 0, use_instance=True)
    with pytest.raises(ValueError, match="residual"):
        Generator(2, residual=True)
