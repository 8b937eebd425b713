"""The quality benchmark's table across seeds, for separate runs: ``bench_quality.py --seeds N`` prints it
for N seeds that share one budget; this prints it for runs made one by one, each kept with ``--keep DIR``
(each its own ``train.seed``, at the steps its budget fitted or ``--steps`` fixed). Per QP: the held-out
gains of codec-SE and of its zero-semantics ablation over HEVC, and of codec-SE over the ablation, as the
mean over the runs with the lowest and highest; in how many runs codec-SE is ahead; then the PSNR BD-rates.

A ``--keep`` folder of ``bench_quality.py --seeds N`` holds N runs: ``eval-test`` for its first seed and
``eval-test-seed<S>`` for each later one (its seeds are ``train.seed`` and the N-1 after it); each counts
as one run here, named ``DIR seed S``.

The runs must have scored the same held-out frames at the benchmark's QPs (their ``eval-test*/rpd.csv``);
runs of other frames, or a folder that is not a finished run's, are refused.

Usage:  python bench/seed_runs.py DIR DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import HELD_OUT_EVAL, QUALITIES, seeds_table  # noqa: E402

from pipeline.eval.report import BDRATE_FILE, MEANS_FILE, ROWS_FILE  # noqa: E402


def scored(folder: Path) -> set[tuple[str, int]]:
    """The (frame, QP) pairs HEVC was scored on in an evaluation folder."""
    with (folder / ROWS_FILE).open(newline="") as f:
        return {(row["key"], int(row["quality"])) for row in csv.DictReader(f) if row["method"] == "hevc"}


SEED_EVAL = re.compile(re.escape(HELD_OUT_EVAL) + r"-seed(\d+)")


def seed_folders(run: Path) -> dict[str, Path]:
    """The held-out evaluation folders of one ``--keep`` folder, keyed by the run each stands for: the
    folder as given for a single-seed run, ``DIR seed S`` for each seed of a ``--seeds N`` run."""
    later = {int(m[1]): p for p in run.glob(f"{HELD_OUT_EVAL}-seed*") if (m := SEED_EVAL.fullmatch(p.name))}
    if not later:
        return {str(run): run / HELD_OUT_EVAL}
    first = min(later) - 1  # the seeds are train.seed and the ones after it; eval-test is the first's
    folders = {first: run / HELD_OUT_EVAL, **later}
    return {f"{run} seed {seed}": folders[seed] for seed in sorted(folders)}


def held_out_folders(runs: list[Path]) -> dict[str, Path]:
    """Each run's held-out evaluation folder, keyed by the run (:func:`seed_folders`), once every run is
    checked."""
    held: dict[str, Path] = {}
    first: tuple[str, set[tuple[str, int]]] | None = None
    given: set[Path] = set()
    for run in runs:
        if run.resolve() in given:
            raise SystemExit(f"{run} is given twice")
        given.add(run.resolve())
        for name, folder in seed_folders(run).items():
            missing = [f for f in (ROWS_FILE, MEANS_FILE, BDRATE_FILE) if not (folder / f).is_file()]
            if missing:
                raise SystemExit(
                    f"{name}: no {', '.join(missing)} in {folder.name}/: not the --keep folder of a finished "
                    "run of bench/bench_quality.py"
                )
            pairs = scored(folder)
            qualities = sorted({q for _, q in pairs})
            if qualities != sorted(QUALITIES):
                raise SystemExit(f"{name}: scored QPs {qualities}, the benchmark's are {QUALITIES}")
            if first is None:
                first = (name, pairs)
            elif pairs != first[1]:
                raise SystemExit(
                    f"{name} scored other held-out frames than {first[0]}: the runs do not compare"
                )
            held[name] = folder
    return held


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="--keep folders of bench_quality.py runs")
    args = parser.parse_args()
    held = held_out_folders(args.runs)
    if len(held) < 2:
        parser.error("give two runs or more (a --seeds N folder holds N)")
    print(seeds_table(held, what="runs"))


if __name__ == "__main__":
    main()
