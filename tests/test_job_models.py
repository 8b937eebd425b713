"""What the main job trains: one model per quality (the paper) or one for all of them (job.models), the
phases each trains (job.phases), and the recipe's config (configs/recipe.yaml) against the benchmark's."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from pipeline.config import REPO_ROOT, ConfigError, load_config
from pipeline.job import _for_qualities, model_groups, model_tag
from pipeline.tracking import registry_name

QUALITIES = [32, 37, 42, 47]


@pytest.mark.parametrize("phases", ["[1, 2]", "[]", "[3, 2]", "[2, 3, 3]", "[0, 3]", "[3, 4]"])
def test_phases_that_do_not_end_in_phase_3_or_repeat_are_refused(phases: str) -> None:
    with pytest.raises(ConfigError, match=r"job\.phases must be increasing phases of 1, 2 and 3 ending in 3"):
        load_config(None, [f"job.phases={phases}"])


@pytest.mark.parametrize("phases", [[3], [2, 3], [1, 3], [1, 2, 3]])
def test_phases_that_end_in_phase_3_are_accepted(phases: list[int]) -> None:
    assert load_config(None, [f"job.phases={phases}"]).job.phases == phases


def test_per_quality_trains_a_model_per_quality_and_shared_one_for_all() -> None:
    assert model_groups(load_config(), QUALITIES) == [[32], [37], [42], [47]]
    assert model_groups(load_config(None, ["job.models=shared"]), QUALITIES) == [QUALITIES]
    # loader.qualities, when set, is what the shared model trains on; it may hold more than the job scores
    wider = load_config(None, ["job.models=shared", "loader.qualities=[47, 30, 37, 42, 32]"])
    assert model_groups(wider, QUALITIES) == [[30, 32, 37, 42, 47]]


def test_a_shared_model_that_would_miss_a_job_quality_is_refused() -> None:
    cfg = load_config(None, ["job.models=shared", "loader.qualities=[32, 37]"])
    with pytest.raises(ConfigError, match=r"lacks the job's qualities \[42, 47\]"):
        model_groups(cfg, QUALITIES)


def test_a_shared_model_trains_on_every_quality_in_its_own_folder() -> None:
    cfg = load_config(None, ["job.models=shared", "train.output_dir=out"])
    shared = _for_qualities(cfg, QUALITIES, None, ablation=False)
    assert shared.loader.qualities == QUALITIES and shared.loader.quality == 42  # loader.quality, trained
    assert shared.train.output_dir == str(Path("out") / "hevc_q32-37-42-47")
    ablation = _for_qualities(cfg, QUALITIES, Path("prior.safetensors"), ablation=True)
    assert ablation.model.zero_semantics and ablation.train.output_dir.endswith("hevc_q32-37-42-47_nosem")
    # one quality: as the paper's per-quality models always were
    single = _for_qualities(load_config(None, ["train.output_dir=out"]), [42], None, ablation=False)
    assert single.loader.quality == 42 and single.loader.qualities == []
    assert single.train.output_dir == str(Path("out") / "hevc_q42")
    assert model_tag([42]) == "q42" and model_tag(QUALITIES) == "q32-37-42-47"


def test_a_model_of_several_qualities_is_registered_under_all_of_them() -> None:
    assert registry_name("hevc", 42) == "hevc-se-q42"
    assert registry_name("hevc", [47, 32, 42, 37]) == "hevc-se-q32-37-42-47"
    assert registry_name("hevc", [42, 37], zero_semantics=True) == "hevc-nosem-q37-42"
    assert registry_name("hevc", [42]) == "hevc-se-q42"


def test_the_recipe_job_trains_the_benchmark_models(bench_quality: ModuleType) -> None:
    """configs/recipe.yaml's codec-SE model has the training digest of bench/bench_quality.py's codec-SE at
    the same steps: the same data, model, loss, optimiser and schedule (paths, step counts, validation and
    tracking are not in the digest)."""
    recipe = load_config(REPO_ROOT / "configs" / "recipe.yaml")
    assert recipe.job.models == "shared" and recipe.job.phases == [3]
    job_model = _for_qualities(recipe, model_groups(recipe, QUALITIES)[0], None, ablation=False)
    bench_model = load_config(None, bench_quality.overrides(Path("work"), recipe.phase3.steps))
    assert job_model.training_digest() == bench_model.training_digest()
    assert job_model.phase3 == bench_model.phase3 and job_model.model == bench_model.model
