"""train.stochastic_depth: each residual block skipped per training sample, never in eval mode."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig, from_dict
from pipeline.model.networks import ResnetBlock, build_models, norm_layer

BATCH = 64


def _block() -> tuple[ResnetBlock, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    block = ResnetBlock(4, norm_layer("none"), "zeros", "leaky_relu")
    x = torch.randn(BATCH, 4, 8, 8)
    with torch.no_grad():
        return block, x, block.conv_block(x)


def test_a_share_of_samples_skips_the_block_and_the_rest_is_rescaled() -> None:
    block, x, convs = _block()
    block.drop = 0.5
    with torch.no_grad():
        out = block(x)
    skipped = (out - x).flatten(1).abs().amax(1) == 0
    assert 0.25 * BATCH < int(skipped.sum()) < 0.75 * BATCH
    torch.testing.assert_close(out[~skipped], x[~skipped] + convs[~skipped] / 0.5)


def test_eval_mode_and_zero_drop_take_every_block() -> None:
    block, x, convs = _block()
    with torch.no_grad():
        torch.manual_seed(1)
        state = torch.get_rng_state()
        assert torch.equal(block(x), x + convs)
        assert torch.equal(torch.get_rng_state(), state)  # no draw: trainings without it are unchanged
        block.drop = 0.5
        assert torch.equal(block.eval()(x), x + convs)


def test_the_generator_sets_every_block_and_keeps_its_weights() -> None:
    model = ModelConfig(ngf=4, n_downsample=1, n_blocks=3, norm="none")
    generator, _ = build_models(model, 3, False)
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    generator.set_stochastic_depth(0.2)
    blocks = [m for m in generator.modules() if isinstance(m, ResnetBlock)]
    assert len(blocks) == 3 and all(b.drop == 0.2 for b in blocks)
    assert generator.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in generator.state_dict().items())
    with pytest.raises(ValueError, match="stochastic depth must be in"):
        generator.set_stochastic_depth(1.0)


def test_the_setting_is_checked_and_part_of_the_training_digest() -> None:
    with pytest.raises(ConfigError, match=r"train\.stochastic_depth must be in \[0, 1\)"):
        from_dict({"train": {"stochastic_depth": 1.0}})
    plain = from_dict({}).training_digest()
    assert from_dict({"train": {"stochastic_depth": 0.0}}).training_digest() == plain
    assert from_dict({"train": {"stochastic_depth": 0.2}}).training_digest() != plain
