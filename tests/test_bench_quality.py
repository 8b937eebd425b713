"""The quality benchmark's command line: what it accepts before it builds or trains anything."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType

import pytest
import torch


@pytest.mark.parametrize(("text", "size"), [("none", None), ("1024x512", (1024, 512))])
def test_extra_sizes_that_are_accepted(
    bench_quality: ModuleType, text: str, size: tuple[int, int] | None
) -> None:
    assert bench_quality.size_choice(text) == size


@pytest.mark.parametrize("text", ["1024", "x512", "0x512", "1024x-5", "1024x512x2", "big", "auto"])
def test_a_malformed_extra_size_is_refused(bench_quality: ModuleType, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected none or WIDTHxHEIGHT"):
        bench_quality.size_choice(text)


def test_the_fitted_steps_fill_the_planned_share_of_the_budget(bench_quality: ModuleType) -> None:
    bq = bench_quality
    budget, spent, step_s, unit, seeds, rounds = 900.0, 60.0, 0.1, 0.25, 2, 1
    steps = bq.fitted_steps(budget, spent, step_s, unit, seeds, rounds)

    def reckoned(n: int) -> float:
        return spent + unit * bq.EVAL_COST * rounds + seeds * (unit * bq.TRAIN_FIXED + n * step_s)

    assert steps % 100 == 0 and steps >= bq.MIN_STEPS
    assert reckoned(steps) <= budget * bq.PLANNED_SHARE < reckoned(steps + 100)


@pytest.mark.parametrize(
    ("cores", "seeds", "decoder_maps", "rounds"),
    [
        (2, 1, False, lambda bq: 1.0),  # the training frames' pair beside the held-out pair
        (2, 1, True, lambda bq: bq.TRAIN_EVAL_SHARE + bq.DECODER_EVAL_SHARE),  # decoder maps after it
        (2, 2, False, lambda bq: bq.TRAIN_EVAL_SHARE + 1.0),  # the second seed's pair after it
        (1, 1, False, lambda bq: 1.0 + bq.TRAIN_EVAL_SHARE),  # one worker: one after the other
        (4, 3, False, lambda bq: 1.0),  # a worker a job
    ],
)
def test_the_evaluation_is_reckoned_as_its_workers_take_its_jobs(
    bench_quality: ModuleType, monkeypatch: pytest.MonkeyPatch, cores: int, seeds: int, decoder_maps: bool,
    rounds: Callable[[ModuleType], float],
) -> None:  # fmt: skip
    monkeypatch.setattr(bench_quality.os, "cpu_count", lambda: cores)
    assert bench_quality.evaluation_rounds(seeds, decoder_maps) == pytest.approx(rounds(bench_quality))


def test_a_budget_under_the_floor_of_steps_is_refused(bench_quality: ModuleType) -> None:
    with pytest.raises(SystemExit, match="under the floor"):
        bench_quality.fitted_steps(300.0, 60.0, 0.2, 0.25, 1, 1)


@pytest.mark.parametrize(("autocast_s", "expected"), [(0.13, "AUTOCAST"), (0.5, "FP32")])
def test_the_fitted_steps_train_in_the_faster_precision(
    bench_quality: ModuleType, monkeypatch: pytest.MonkeyPatch, autocast_s: float, expected: str
) -> None:
    """bf16 autocast where its trainer's step is the faster on this machine, fp32 where it is not (a CPU
    without bf16 units); the steps fitted at that precision's pace."""
    bq = bench_quality
    fp32_s = 0.26

    def paced(recipes: list[list[str]], processes: int) -> list[float]:
        assert processes == 2
        return [fp32_s if recipe[-1] == bq.FP32 else autocast_s for recipe in recipes]

    monkeypatch.setattr(bq, "step_seconds", paced)
    fitted: list[tuple[float, ...]] = []
    monkeypatch.setattr(bq, "fitted_steps", lambda *args: fitted.append(args) or 4200)
    chosen = getattr(bq, expected)
    assert bq.budget_steps(900.0, bq.time.perf_counter(), 1, decoder_maps=False) == (4200, chosen)
    _, _, step_s, unit, seeds, _ = fitted[0]
    paced_s = autocast_s if chosen == bq.AUTOCAST else fp32_s
    assert (step_s, unit, seeds) == (paced_s * bq.STEP_COST[chosen], fp32_s, 1)


def test_the_paced_step_autocasts_as_the_recipe_trains(bench_quality: ModuleType) -> None:
    import step_pace  # on the path once bench_quality is loaded

    bq = bench_quality
    assert step_pace.step_autocast(step_pace.step_config(bq.RECIPE)) is torch.bfloat16
    assert step_pace.step_autocast(step_pace.step_config(bq.RECIPE, bq.FP32)) is None
