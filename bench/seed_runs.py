"""The quality benchmark's table across seeds, for separate runs: ``bench_quality.py --seeds N`` prints it
for N seeds that share one budget; this prints it for runs made one by one, each kept with ``--keep DIR``
(each its own ``train.seed``, at the steps its budget fitted or ``--steps`` fixed). Per QP: the held-out
gains of codec-SE and of its zero-semantics ablation over HEVC, and of codec-SE over the ablation, as the
mean over the runs with the lowest and highest; in how many runs codec-SE is ahead; then the PSNR BD-rates.

The runs must have scored the same held-out frames at the benchmark's QPs (their ``eval-test/rpd.csv``);
runs of other frames, or a folder that is not a finished single-seed run's, are refused.

Usage:  python bench/seed_runs.py DIR DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import HELD_OUT_EVAL, QUALITIES, seeds_table  # noqa: E402

from pipeline.eval.report import BDRATE_FILE, MEANS_FILE, ROWS_FILE  # noqa: E402


def scored(folder: Path) -> set[tuple[str, int]]:
    """The (frame, QP) pairs HEVC was scored on in an evaluation folder."""
    with (folder / ROWS_FILE).open(newline="") as f:
        return {(row["key"], int(row["quality"])) for row in csv.DictReader(f) if row["method"] == "hevc"}


def held_out_folders(runs: list[Path]) -> dict[str, Path]:
    """Each run's held-out evaluation folder, keyed by the run as given, once every run is checked."""
    held: dict[str, Path] = {}
    first: tuple[Path, set[tuple[str, int]]] | None = None
    for run in runs:
        if str(run) in held:
            raise SystemExit(f"{run} is given twice")
        folder = run / HELD_OUT_EVAL
        missing = [name for name in (ROWS_FILE, MEANS_FILE, BDRATE_FILE) if not (folder / name).is_file()]
        if missing:
            raise SystemExit(
                f"{run}: no {', '.join(missing)} in {HELD_OUT_EVAL}/: not the --keep folder of a finished "
                "single-seed run of bench/bench_quality.py"
            )
        pairs = scored(folder)
        qualities = sorted({q for _, q in pairs})
        if qualities != sorted(QUALITIES):
            raise SystemExit(f"{run}: scored QPs {qualities}, the benchmark's are {QUALITIES}")
        if first is None:
            first = (run, pairs)
        elif pairs != first[1]:
            raise SystemExit(f"{run} scored other held-out frames than {first[0]}: the runs do not compare")
        held[str(run)] = folder
    return held


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="--keep folders of bench_quality.py runs")
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("give two runs or more")
    print(seeds_table(held_out_folders(args.runs), what="runs"))


if __name__ == "__main__":
    main()
