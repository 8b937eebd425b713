"""train.semantic_dropout: a share of the training samples loses its semantic channels (the generator's
input only), in the phases that see the decoded image."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, from_dict
from pipeline.data.manifest import DatasetInfo
from pipeline.train.gan_step import step_inputs

LABEL_NC, BATCH = 5, 64


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "label": torch.randint(0, LABEL_NC, (BATCH, 8, 8)),
        "edge": torch.zeros(BATCH, 1, 8, 8),
        "decoded": torch.rand(BATCH, 3, 8, 8) * 2 - 1,
        "image": torch.rand(BATCH, 3, 8, 8) * 2 - 1,
    }


def _inputs(dropout: float, phase: int):
    cfg = from_dict({"train": {"semantic_dropout": dropout}})
    data = DatasetInfo(label_nc=LABEL_NC, use_instance=False)
    torch.manual_seed(1)
    return step_inputs(cfg, cfg.phase(phase), data, _batch(), torch.device("cpu"), torch.float32)


def test_a_share_of_samples_loses_its_semantics_but_keeps_its_image() -> None:
    plain, dropped = _inputs(0.0, 3), _inputs(0.5, 3)
    zeroed = dropped.g_in[:, :LABEL_NC].flatten(1).abs().sum(1) == 0
    assert 0.25 * BATCH < int(zeroed.sum()) < 0.75 * BATCH
    assert torch.equal(dropped.g_in[~zeroed], plain.g_in[~zeroed])
    assert torch.equal(dropped.g_in[:, LABEL_NC:], plain.g_in[:, LABEL_NC:])  # the decoded image stays
    assert torch.equal(dropped.semantics, plain.semantics)  # the discriminator's conditioning stays
    assert torch.equal(_inputs(0.5, 3).g_in, dropped.g_in)  # drawn from the seeded generator


def test_phase_1_keeps_its_semantics_and_the_setting_is_checked() -> None:
    assert torch.equal(_inputs(0.5, 1).g_in, _inputs(0.0, 1).g_in)  # semantics are phase 1's only input
    with pytest.raises(ConfigError, match="semantic_dropout must be in"):
        from_dict({"train": {"semantic_dropout": 1.0}})
    assert (
        from_dict({"train": {"semantic_dropout": 0.0}}).training_digest() == from_dict({}).training_digest()
    )
    assert (
        from_dict({"train": {"semantic_dropout": 0.5}}).training_digest() != from_dict({}).training_digest()
    )
