"""``bench/seed_runs.py``: the quality benchmark's table across separate runs, and the runs it refuses."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import ModuleType

import pytest

from pipeline.eval.gains import WITHHELD_SUFFIX
from pipeline.eval.methods import CHOSEN_SUFFIX
from pipeline.eval.report import BDRATE_FILE, MEANS_FILE, ROWS_FILE

SE, AB = "hevc-SE", "hevc-SE (no semantics)"


def write_rows(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def fake_run(
    root: Path,
    qualities: list[int],
    se_gain: float,
    ablation_gain: float,
    frames: tuple[str, ...] = ("a", "b"),
    later_seeds: dict[int, tuple[float, float]] | None = None,
) -> Path:
    """A ``--keep`` folder with what a finished run leaves in ``eval-test``: HEVC at 30 dB, codec-SE and
    its ablation the given gains above it, codec-SE 0.01 dB less with its map withheld; ``later_seeds``
    adds a ``--seeds N`` run's ``eval-test-seed<S>`` folders, each with its (codec-SE, ablation) gains."""
    run = root / f"run-{len(list(root.iterdir()))}"
    fake_evaluation(run / "eval-test", qualities, se_gain, ablation_gain, frames)
    for seed, (se, ablation) in (later_seeds or {}).items():
        fake_evaluation(run / f"eval-test-seed{seed}", qualities, se, ablation, frames)
    return run


def fake_evaluation(
    folder: Path, qualities: list[int], se_gain: float, ablation_gain: float, frames: tuple[str, ...]
) -> None:
    folder.mkdir(parents=True)
    write_rows(
        folder / ROWS_FILE,
        [{"key": key, "method": "hevc", "quality": q, "psnr": 30.0} for key in frames for q in qualities],
    )
    psnr = {"hevc": 30.0, SE: 30.0 + se_gain, AB: 30.0 + ablation_gain, SE + WITHHELD_SUFFIX: 29.99 + se_gain}
    write_rows(
        folder / MEANS_FILE,
        [{"method": m, "quality": q, "psnr": p, "niqe": 5.0} for m, p in psnr.items() for q in qualities],
    )
    rates = {"available": True, "bd_rate_pct": {"psnr/bpp_codec": -7.0, "psnr/bpp_total": 5.0 + se_gain}}
    methods = {name: rates for name in (SE, AB, SE + CHOSEN_SUFFIX)}
    (folder / BDRATE_FILE).write_text(json.dumps({"methods": methods}))


def test_the_table_gives_the_mean_lowest_and_highest_over_the_runs(
    seed_runs: ModuleType, tmp_path: Path
) -> None:
    qualities = seed_runs.QUALITIES
    runs = [fake_run(tmp_path, qualities, 0.30, 0.29), fake_run(tmp_path, qualities, 0.34, 0.35)]
    table = seed_runs.seeds_table(seed_runs.held_out_folders(runs), what="runs")
    lines = table.splitlines()
    assert lines[0].startswith(f"held-out gains across the runs {[str(r) for r in runs]}")
    for q in qualities:
        row = next(line for line in lines if line.startswith(f"{q:>3} |"))
        # codec-SE, the ablation, codec-SE over it (ahead in one run of two), codec-SE over itself withheld
        assert "+0.320 [+0.300, +0.340]" in row and "+0.320 [+0.290, +0.350]" in row
        # the 95 % interval of two runs 0.02 dB apart: t(0.975, 1) = 12.706 times a standard error of 0.01
        assert "+0.000 ±0.127 [-0.010, +0.010] | 1/2 runs" in row
        assert "+0.010 [+0.010, +0.010] | 2/2 runs" in row


def test_a_multi_seed_folder_counts_each_seed_as_a_run(seed_runs: ModuleType, tmp_path: Path) -> None:
    qualities = seed_runs.QUALITIES
    single = fake_run(tmp_path, qualities, 0.30, 0.28)
    multi = fake_run(tmp_path, qualities, 0.31, 0.30, later_seeds={5: (0.32, 0.29), 6: (0.33, 0.31)})
    (multi / "eval-test-dec").mkdir()  # a --segmenter run's decoder-map evaluation: not a seed
    held = seed_runs.held_out_folders([single, multi])
    assert held == {
        str(single): single / "eval-test",
        f"{multi} seed 4": multi / "eval-test",
        f"{multi} seed 5": multi / "eval-test-seed5",
        f"{multi} seed 6": multi / "eval-test-seed6",
    }
    row = next(line for line in seed_runs.seeds_table(held, "runs").splitlines() if line.startswith(" 32 |"))
    # codec-SE over its ablation: +0.02, +0.01, +0.03, +0.02 dB; mean +0.02, sd 0.00816, t(0.975, 3) 3.182
    assert "+0.020 ±0.013 [+0.010, +0.030] | 4/4 runs" in row


def test_each_run_prints_its_own_gains_and_bd_rates(seed_runs: ModuleType, tmp_path: Path) -> None:
    qualities = seed_runs.QUALITIES
    multi = fake_run(tmp_path, qualities, 0.31, 0.30, later_seeds={5: (0.33, 0.35)})
    lines = seed_runs.seeds_table(seed_runs.held_out_folders([multi]), "runs").splitlines()
    rows = {
        line.split(" | ")[0].strip(): line.split(" | ")[1:]
        for line in lines
        if line.startswith(f"  {multi} seed")
    }
    n = len(qualities)
    bd_rate = next(line for line in lines if line.startswith(f"  {SE} "))
    assert "codec bits   -7.00 % (runs: -7.00 -7.00), total bits   +5.32 % (runs: +5.31 +5.33)" in bd_rate
    assert rows == {
        f"{multi} seed 4": [" ".join(["+0.310"] * n), " ".join(["+0.300"] * n), " ".join(["+0.010"] * n)],
        f"{multi} seed 5": [" ".join(["+0.330"] * n), " ".join(["+0.350"] * n), " ".join(["-0.020"] * n)],
    }


def test_runs_of_other_frames_or_qps_are_refused(seed_runs: ModuleType, tmp_path: Path) -> None:
    qualities = seed_runs.QUALITIES
    first = fake_run(tmp_path, qualities, 0.3, 0.3)
    other_frames = fake_run(tmp_path, qualities, 0.3, 0.3, frames=("a", "c"))
    with pytest.raises(SystemExit, match="other held-out frames than"):
        seed_runs.held_out_folders([first, other_frames])
    fewer_qps = fake_run(tmp_path, qualities[:-1], 0.3, 0.3)
    with pytest.raises(SystemExit, match=r"scored QPs .* the benchmark's are"):
        seed_runs.held_out_folders([first, fewer_qps])
    with pytest.raises(SystemExit, match="given twice"):
        seed_runs.held_out_folders([first, first])


def test_a_folder_without_a_finished_run_is_refused(seed_runs: ModuleType, tmp_path: Path) -> None:
    run = fake_run(tmp_path, seed_runs.QUALITIES, 0.3, 0.3)
    (run / seed_runs.HELD_OUT_EVAL / BDRATE_FILE).unlink()
    with pytest.raises(SystemExit, match=r"no bdrate.json in eval-test/: not the --keep folder"):
        seed_runs.held_out_folders([run])
