import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import (
    REPO_ROOT,
    ConfigError,
    JobConfig,
    LoaderConfig,
    PhaseConfig,
    flatten,
    from_dict,
    load_config,
    with_overrides,
)

CONFIGS = REPO_ROOT / "configs"
JOB_FILES = ["default.yaml", "tune.yaml", "cityscapes_full.yaml"]  # presets are overlays, not jobs


def test_default_has_the_three_phases_and_the_small_preset() -> None:
    cfg = load_config()
    assert cfg.phase1.visual_input is False and cfg.phase1.loss.dist == 0.0
    assert cfg.phase2.loss.dist > 0 and cfg.phase2.train_discriminator
    assert cfg.phase3.train_discriminator is False and cfg.phase3.loss.gan == 0.0
    assert cfg.model.ngf == 8  # small preset
    # the phases' learning rates, where JobConfig() and the YAML files once disagreed
    assert (cfg.phase1.lr, cfg.phase2.lr, cfg.phase3.lr) == (2e-4, 2e-4, 1e-4)
    assert cfg.phase3 == dataclasses.replace(JobConfig().phase3, steps=10)


def test_an_empty_yaml_file_gives_jobconfig(tmp_path: Path) -> None:
    """The dataclasses are the one source of defaults: a file without keys changes nothing."""
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert load_config(tmp_path / "empty.yaml") == JobConfig()
    assert from_dict({}) == JobConfig() == from_dict(JobConfig().to_dict())


def _own_tree(path: Path) -> tuple[dict[str, Any], list[Path]]:
    tree = yaml.safe_load(path.read_text()) or {}
    return tree, [path.parent / parent for parent in tree.pop("defaults", []) or []]


def _named(path: Path) -> set[str]:
    """Dotted keys a config file names, itself or through its ``defaults:``."""
    tree, parents = _own_tree(path)
    return set(flatten(tree)).union(*(_named(parent) for parent in parents))


def _covers(named: set[str], key: str) -> bool:
    return any(n == key or n.startswith(key + ".") or key.startswith(n + ".") for n in named)


@pytest.mark.parametrize("name", JOB_FILES)
def test_yaml_differs_from_jobconfig_only_where_it_says_so(name: str) -> None:
    """A value may differ from ``JobConfig()`` only at a key the file or one of its ``defaults:`` names."""
    default, loaded = JobConfig().flat(), load_config(CONFIGS / name).flat()
    named = _named(CONFIGS / name)
    differ = {k for k in default.keys() | loaded.keys() if default.get(k) != loaded.get(k)}
    assert differ and all(_covers(named, key) for key in differ), differ - named


@pytest.mark.parametrize("name", JOB_FILES)
def test_yaml_states_no_default_again(name: str, tmp_path: Path) -> None:
    """Every key a job file sets itself changes a value: it differs from the dataclass default, or it
    undoes a change of one of its ``defaults:`` (a preset's, say). Presets state every value they set."""
    own, parents = _own_tree(CONFIGS / name)
    (tmp_path / "parents.yaml").write_text(yaml.safe_dump({"defaults": [str(p) for p in parents]}))
    default = JobConfig().flat()
    inherited = load_config(tmp_path / "parents.yaml").flat()
    loaded = load_config(CONFIGS / name).flat()
    for key in flatten(own):
        restated = loaded.get(key) == default.get(key) and inherited.get(key) == default.get(key)
        assert not restated, f"{name}: {key} restates the default {default.get(key)!r}"


def _literal_keys(cls: type = JobConfig, prefix: str = "") -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update(_literal_keys(hint, f"{prefix}{name}."))
        elif typing.get_origin(hint) is Literal:
            out[f"{prefix}{name}"] = typing.get_args(hint)
    return out


def test_enumerations_are_literals_checked_by_the_loader() -> None:
    keys = _literal_keys()
    assert set(keys) >= {
        "data.source",
        "shards.label_coder",
        "model.norm",
        "loss.gan_mode",
        "loss.distortion",
        "phase1.lr_schedule",
        "phase3.lr_schedule",
        "validate.metric",
        "eval.input",
        "tune.metric",
        "tune.mode",
    }
    for key, choices in keys.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}=bogus"])
        assert str(err.value) == f"{key} must be one of {list(choices)}, got 'bogus'"
        for choice in choices:
            extra = ["tune.mode=min"] if choice == "val_niqe" else []
            if key != "tune.mode":
                assert flatten(load_config(None, [f"{key}={choice}", *extra]).to_dict())[key] == choice


@pytest.mark.parametrize(
    "override, message",
    [
        (["data.width=0"], r"^data.width must be >= 1, got 0$"),
        (["data.splits=[]"], r"^data.splits is empty$"),
        (["data.label_nc=-1"], r"^data.label_nc must be >= 0 \(0: the source's label table\), got -1$"),
        (["shards.samples_per_shard=0"], r"^shards.samples_per_shard must be >= 1, got 0$"),
        (["shards.workers=-1"], r"^shards.workers must be >= 0 \(0: every core\), got -1$"),
        (["shards.label_downsample=0"], r"^shards.label_downsample must be >= 1"),
        (["shards.codecs=[]"], r"^shards.codecs needs at least one codec, each with at least one quality$"),
        (["shards.codecs=[{name: hevc, qualities: []}]"], r"^shards.codecs needs at least one codec"),
        (["shards.codecs=[{qualities: [37]}, {qualities: [37]}]"], r"^shards.codecs names the same codec"),
        (["loader.batch_size=0"], r"^loader.batch_size must be >= 1, got 0$"),
        (["loader.crop=[0, 8]"], r"^loader.crop must be \[\] or \[height, width\] of positive sizes"),
        (["loader.crop=[8, 8, 8]"], r"^loader.crop must be \[\]"),
        (["loader.num_workers=-1"], r"^loader.num_workers must be >= 0, got -1$"),
        (["loader.shuffle=-1"], r"^loader.shuffle must be >= 0"),
        (["loader.quality_weights=[1, 2]"], r"^loader.quality_weights needs one weight per entry of loader"),
        (
            ["loader.qualities=[37, 37]", "loader.quality_weights=[1, 2]"],
            r"^loader.quality_weights needs .* each quality once",
        ),
        (
            ["loader.qualities=[37, 42]", "loader.quality_weights=[1, 0]"],
            r"^loader.quality_weights must be positive numbers, got \[1.0, 0.0\]$",
        ),
        (["loader.qualities=[37, 42]", "loader.quality_weights=[1, .nan]"], r"^loader.quality_weights must"),
        (["loader.transpose=true", "loader.crop=[]"], r"^loader.transpose needs loader.crop: whole"),
        (["loader.cache_mb=8", "loader.num_workers=1"], r"^loader.cache_mb needs loader.num_workers=0"),
        (["model.residual=false", "model.correction_scale=channels"], r"^model.correction_scale=channels"),
        (["model.ngf=0"], r"^model.ngf must be >= 1, got 0$"),
        (["model.n_blocks=-1"], r"^model.n_blocks must be >= 0"),
        (["phase2.loss.dist=-1"], r"^phase2.loss.dist must be >= 0, got -1.0$"),
        (["phase3.lr=0"], r"^phase3.lr must be > 0, got 0.0$"),
        (["phase1.steps=-1"], r"^phase1.steps must be >= 0, got -1$"),
        (["train.betas=[0.5]"], r"^train.betas must be two values in \[0, 1\), got \[0.5\]$"),
        (["train.betas=[0.5, 1.0]"], r"^train.betas must be two values"),
        (["train.keep_checkpoints=-1"], r"^train.keep_checkpoints must be >= 0"),
        (["validate.every=-1"], r"^validate.every must be >= 0"),
        (["validate.min_delta=-0.1"], r"^validate.min_delta must be >= 0"),
        (["tracking.log_every=-1"], r"^tracking.log_every must be >= 0"),
        (["eval.max_images=-1"], r"^eval.max_images must be >= 0"),
        (["tune.metric=val_niqe"], r"^tune.mode must be 'min' for val_niqe"),
        (["tune.num_samples=0"], r"^tune.num_samples must be >= 1, got 0$"),
    ],
)
def test_each_section_checks_its_ranges(override: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_sections_check_their_values_however_they_are_built() -> None:
    cfg = JobConfig()
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        LoaderConfig(batch_size=0)
    with pytest.raises(ConfigError, match="crop must be"):
        dataclasses.replace(cfg.loader, crop=[0, 8])
    with pytest.raises(ConfigError, match="lr must be > 0"):
        PhaseConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="^phase2.loss.dist must be >= 0"):
        with_overrides(cfg, {"phase2.loss.dist": -2.0})


def test_label_nc_belongs_to_the_data() -> None:
    assert load_config(None, ["data.label_nc=19"]).data.label_nc == 19
    assert "label_nc" not in {f.name for f in dataclasses.fields(JobConfig().model)}
    for attempt in (
        lambda: load_config(None, ["model.label_nc=19"]),
        lambda: from_dict({"model": {"label_nc": 3}}),
    ):
        with pytest.raises(ConfigError, match=r"^model.label_nc moved to data.label_nc$"):
            attempt()


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
    for harmless in (
        ["phase2.steps=999"],
        ["train.output_dir=elsewhere"],
        ["tracking.enabled=false"],
        ["tracking.experiment=other", "tracking.log_every=1"],
        ["name=other"],
        ["shards.output=elsewhere", "shards.workers=3", "shards.samples_per_shard=2"],
        ["loader.num_workers=2", "loader.shards=x-{0..1}.tar"],
        ["loader.cache_mb=512"],
        ["train.checkpoint_every=3", "train.log_every=1", "train.keep_checkpoints=0", "train.init_from=g"],
        ["validate.every=5", "eval.split=val", "tune.max_steps=10"],
    ):
        assert load_config(None, harmless).training_digest() == same.training_digest(), harmless
    for changes in (
        ["data.root=/other"],
        ["data.label_nc=19"],
        ["phase2.loss.dist=1"],
        ["phase2.lr=1e-3"],
        ["phase1.visual_input=true"],
        ["loader.quality=37"],
        ["model.ngf=4"],
        ["loss.gan_mode=hinge"],
        ["shards.label_downsample=2"],
        ["train.seed=1"],
        ["train.betas=[0.9, 0.999]"],
        ["loader.transpose=true"],
        ["model.correction_scale=frame"],  # it decides the exported step: a resumed run must keep it
        ["phase3.lr_schedule=cosine", "phase3.warmup_steps=2"],
        ["model.padding=zeros"],
        ["model.end_kernel=3"],
        ["model.activation=leaky_relu"],
        ["model.self_ensemble=hflip"],
        ["model.semantic_modulation=true"],
    ):
        assert load_config(None, changes).training_digest() != same.training_digest(), changes
    uniform = load_config(None, ["loader.qualities=[37, 42]"])
    weighted = load_config(None, ["loader.qualities=[37, 42]", "loader.quality_weights=[1, 2]"])
    assert weighted.training_digest() != uniform.training_digest()


def _previous_training_digest(cfg: JobConfig) -> str:
    """``training_digest`` as the previous version computed it, from its hand list of fields (its
    ``model.label_nc``, now ``data.label_nc``, at its default 0)."""
    tree = cfg.to_dict()
    # loader.extra_shards, transpose and quality_weights came later: at their defaults (unused, off,
    # uniform) they must leave the digest as it was; loader.cache_mb came later too and never enters it
    # (the batches are the same)
    assert not cfg.loader.extra_shards and not cfg.loader.transpose and not cfg.loader.quality_weights
    skipped = ("num_workers", "shards", "extra_shards", "transpose", "cache_mb", "quality_weights")
    loader = {k: v for k, v in tree["loader"].items() if k not in skipped}
    # phaseN.warmup_steps came later: at its default (5 % of the steps) it leaves the digest as it was
    names = ("phase1", "phase2", "phase3")
    assert all(tree[n]["warmup_steps"] == 0 for n in names)
    phases = {n: {k: v for k, v in tree[n].items() if k not in ("steps", "warmup_steps")} for n in names}
    train = {k: tree["train"][k] for k in ("seed", "betas", "deepspeed_config")}
    # model.quality_input, semantic_classes, correction_scale, padding, end_kernel, activation,
    # self_ensemble and semantic_modulation came later too: at their defaults they leave it as it was
    assert not cfg.model.quality_input and cfg.model.semantic_classes == "labels"
    assert cfg.model.correction_scale == "none" and cfg.model.padding == "reflect"
    assert cfg.model.end_kernel == 7 and cfg.model.activation == "relu" and cfg.model.self_ensemble == "none"
    assert not cfg.model.semantic_modulation
    later = ("quality_input", "semantic_classes", "correction_scale", "padding", "end_kernel", "activation")
    later += ("self_ensemble", "semantic_modulation")
    model = {**{k: v for k, v in tree["model"].items() if k not in later}, "label_nc": 0}
    # data.label_source and data.segmenter came later: at their defaults they leave the digest as it was
    assert cfg.data.label_source == "gt" and not cfg.data.segmenter
    data = {k: v for k, v in tree["data"].items() if k not in ("label_source", "segmenter")}
    parts = [data, tree["shards"]["label_downsample"], loader, model, tree["loss"], phases, train]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    "path, overrides",
    [
        (None, []),
        (CONFIGS / "tune.yaml", []),
        (CONFIGS / "cityscapes_full.yaml", ["data.label_nc=19", "loader.qualities=[37, 42]"]),
        (None, ["phase3.lr_schedule=cosine", "model.residual=false", "shards.label_downsample=4"]),
    ],
)
def test_training_digest_walks_the_fields_the_hand_list_named(
    path: Path | None, overrides: list[str]
) -> None:
    """The marked fields are the ones the previous version listed by hand, and the value is the same:
    checkpoints it wrote keep resuming."""
    cfg = load_config(path, overrides)
    assert cfg.training_digest() == _previous_training_digest(cfg)


def test_cli_reports_missing_inputs_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", f"shards.output={tmp_path}", "tracking.enabled=false"]) == 2
    assert "no shard manifest" in capsys.readouterr().err
