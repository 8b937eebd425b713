"""``tune.search_alg=optuna``: a tiny 2-trial sweep on CPU driven by Ray's OptunaSearch (TPE, seeded by
``train.seed``) runs its trials, writes best.json and the Pareto front; its values replay from the seed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from test_tune import BOUNDS, base_cfg, ray_results, sweep_cfg, trial_dirs

from pipeline.config import JobConfig, with_overrides
from pipeline.tracking import Tracker
from pipeline.train.trainer import train
from pipeline.train.tune import BEST_FILE, search_space, tune
from pipeline.train.tune.pareto import CONFIG_DIR, CSV_FILE, PLOT_FILE
from pipeline.train.tune.sweep import _search_alg

TRIALS = 2


@pytest.fixture(scope="module")
def optuna_sweep(small_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    phase1 = train(base_cfg(small_shards, tmp_path_factory.mktemp("prior")), [1], tracker=Tracker())[1]
    root = tmp_path_factory.mktemp("optuna")
    cfg = sweep_cfg(
        small_shards,
        phase1,
        root,
        "tune.search_alg=optuna",
        "train.seed=7",
        f"tune.num_samples={TRIALS}",
        "tune.max_concurrent_trials=1",  # TPE asks one trial at a time: the order of its draws is fixed
        "tune.scheduler=fifo",  # every trial completes
        "tracking.enabled=false",
        "tune.max_steps=2",  # one report, at the end
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield {"cfg": cfg, "result": tune(cfg), "experiment": root / "tune" / "sweep"}
    finally:
        ray.shutdown()


def replay(cfg: JobConfig, n: int) -> list[dict[str, Any]]:
    """The first ``n`` values a fresh searcher of ``cfg`` suggests (no trial run)."""
    searcher = _search_alg(cfg).searcher  # OptunaSearch inside the ConcurrencyLimiter
    searcher.set_search_properties(cfg.tune.metric, cfg.tune.mode, search_space(cfg))
    return [searcher.suggest(f"replay{i}") for i in range(n)]


def unordered(values: list[dict[str, Any]]) -> list[tuple[tuple[str, Any], ...]]:
    return sorted(tuple(sorted(v.items())) for v in values)


@pytest.mark.slow
def test_optuna_sweep_runs_its_trials_and_writes_best_and_pareto(optuna_sweep: dict[str, Any]) -> None:
    experiment, result = optuna_sweep["experiment"], optuna_sweep["result"]
    assert len(result.trials) == TRIALS and all(t.status == "done" for t in result.trials)
    for trial in result.trials:
        for key, (lo, hi) in BOUNDS.items():
            assert lo <= trial.params[key] <= hi
    for trial_dir in trial_dirs(experiment):
        assert [r["step"] for r in ray_results(trial_dir)] == [2]
    best = json.loads((experiment / BEST_FILE).read_text())
    assert best["best"]["trial_id"] == max(result.trials, key=lambda t: t.metrics["val_psnr"]).trial_id
    assert (experiment / CSV_FILE).is_file() and (experiment / PLOT_FILE).stat().st_size > 0
    assert result.pareto and best["pareto"] == result.pareto
    assert all(Path(p).parent == experiment / CONFIG_DIR for p in result.pareto_configs.values())


@pytest.mark.slow
def test_optuna_values_replay_from_train_seed(optuna_sweep: dict[str, Any]) -> None:
    cfg = optuna_sweep["cfg"]
    swept = unordered([t.params for t in optuna_sweep["result"].trials])  # Ray's trial ids are random
    assert unordered(replay(cfg, TRIALS)) == swept
    assert unordered(replay(with_overrides(cfg, {"train.seed": 8}), TRIALS)) != swept
