from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, JobConfig, from_dict, load_config


def test_default_composes_phase_files_and_preset() -> None:
    cfg = load_config()
    assert cfg.phase1.visual_input is False and cfg.phase1.loss.dist == 0.0
    assert cfg.phase2.loss.dist > 0 and cfg.phase2.train_discriminator
    assert cfg.phase3.train_discriminator is False and cfg.phase3.loss.gan == 0.0
    assert cfg.model.ngf == 8  # small preset


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(None, ["phase2.loss.dist=2.5", "shards.codecs=[{name: jpeg, qualities: [30, 60]}]"])
    assert cfg.phase2.loss.dist == 2.5
    assert cfg.shards.codecs[0].name == "jpeg" and cfg.shards.codecs[0].qualities == [30, 60]
    assert cfg.phase1.loss.dist == 0.0  # other phases keep their own values


def test_partial_phase_section_keeps_that_phase_defaults() -> None:
    cfg = from_dict({"phase3": {"steps": 7}})
    assert cfg.phase3.steps == 7 and cfg.phase3.train_discriminator is False


@pytest.mark.parametrize(
    "override, message",
    [
        (["model.ngff=3"], "unknown key"),
        (["model.ngf=abc"], "expected int"),
        (["model.ngf=1.5"], "expected an integer"),
        (["loader.flip=maybe"], "expected true/false"),
        (["noequals"], "key.sub=value"),
        (["model=5"], "expected a section"),
        (["shards.workers=true"], "expected int"),
        (["name=[1, 2]"], "expected str"),
    ],
)
def test_bad_overrides_fail_clearly(override: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_defaults_cycle_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_digest_and_flat_follow_the_values() -> None:
    a, b = JobConfig(), load_config(None, ["phase2.loss.vgg=1"])
    assert a.digest() == JobConfig().digest() != b.digest()
    assert a.flat()["phase2.loss.dist"] == 10.0


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shards", "model.bogus=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_training_digest_ignores_steps_paths_and_logging_only() -> None:
    base = JobConfig()
    same = load_config(None, [])
    assert from_dict(base.to_dict()).training_digest() == base.training_digest()
    for harmless in (["phase2.steps=999"], ["train.output_dir=elsewhere"], ["tracking.enabled=false"]):
        assert load_config(None, harmless).training_digest() == same.training_digest(), harmless
    for changes in (["data.root=/other"], ["phase2.loss.dist=1"], ["loader.quality=37"], ["model.ngf=4"]):
        assert load_config(None, changes).training_digest() != same.training_digest(), changes


def test_cli_reports_missing_inputs_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", f"shards.output={tmp_path}", "tracking.enabled=false"]) == 2
    assert "no shard manifest" in capsys.readouterr().err
