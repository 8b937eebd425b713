"""Which frames train, which validate, which are reported: held-out splits carved out of a dataset split.

A dataset may have a single split with labels (the embedded Cityscapes sample has only ``val``), yet the
figure that matters is measured on frames training never saw, and checkpoints must be selected on yet
other frames. ``data.holdout`` moves chosen frames of one split into splits of their own, before any
shard is written::

    data:
      splits: [val]
      holdout:
        - {name: valid, from_split: val, cities: [munster]}   # checkpoint selection, tuning
        - {name: test, from_split: val, cities: [lindau]}     # the reported figures

The shards then hold three disjoint splits, ``val`` (what is left: the training frames), ``valid`` and
``test``, and the manifest lists every split's keys, so any two can be checked for overlap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from pipeline.config import ConfigError, DataConfig, HoldoutConfig, JobConfig
from pipeline.data.manifest import Manifest
from pipeline.data.sources import Sample, Source


class SplitError(ConfigError):
    """A held-out split that cannot be made, or splits that overlap where they must not."""


def read_key_list(path: str | Path) -> list[str]:
    """Sample keys, one per line; blank lines and ``#`` comments are skipped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SplitError(f"holdout list_file not found: {file}")
    keys = []
    for line in file.read_text().splitlines():
        key = line.split("#", 1)[0].strip()
        if key:
            keys.append(key)
    return keys


def _city(sample: Sample) -> str:
    """A Cityscapes sample's city: the folder it lies in (``leftImg8bit/<split>/<city>/``)."""
    return sample.image.parent.name


def _check_holdouts(data: DataConfig, source: Source) -> None:
    names = [h.name for h in data.holdout]
    for holdout in data.holdout:
        if not holdout.name:
            raise SplitError("data.holdout: every held-out split needs a name")
        if holdout.name in data.splits:
            raise SplitError(f"data.holdout: {holdout.name!r} is also a dataset split in data.splits")
        if holdout.from_split not in data.splits:
            raise SplitError(
                f"data.holdout {holdout.name!r}: from_split {holdout.from_split!r} is not in data.splits "
                f"{data.splits}"
            )
        if not holdout.cities and not holdout.list_file:
            raise SplitError(f"data.holdout {holdout.name!r}: give cities or a list_file")
        if holdout.cities and source.name != "cityscapes":
            raise SplitError(
                f"data.holdout {holdout.name!r}: cities apply to the cityscapes source only "
                f"(this one is {source.name}); use a list_file of keys"
            )
    if len(set(names)) != len(names):
        raise SplitError(f"data.holdout names a split twice: {names}")


def _take(holdout: HoldoutConfig, pool: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """``(taken, left)``: the samples of ``pool`` that ``holdout`` selects, and the others."""
    cities = set(holdout.cities)
    listed = set(read_key_list(holdout.list_file)) if holdout.list_file else set()
    present = {s.key for s in pool}
    missing = sorted(listed - present)
    if missing:
        raise SplitError(
            f"data.holdout {holdout.name!r}: {len(missing)} key(s) of {holdout.list_file} are not in split "
            f"{holdout.from_split!r} (or were taken by an earlier holdout): {missing[:3]}"
        )
    if cities:
        known = {_city(s) for s in pool}
        absent = sorted(cities - known)
        if absent:
            raise SplitError(
                f"data.holdout {holdout.name!r}: no frames of {absent} left in split {holdout.from_split!r}; "
                f"cities there: {sorted(known)}"
            )
    taken = [s for s in pool if s.key in listed or _city(s) in cities]
    chosen = {s.key for s in taken}
    return taken, [s for s in pool if s.key not in chosen]


def plan_splits(data: DataConfig, source: Source) -> dict[str, list[Sample]]:
    """``{split name: sorted samples}`` for every dataset split and held-out split, disjoint.

    Held-out splits take their frames out of ``from_split`` in the order listed; a split left empty is
    an error, since it would silently train (or report) on nothing.
    """
    _check_holdouts(data, source)
    plan: dict[str, list[Sample]] = {}
    for split in dict.fromkeys(data.splits):
        plan[split] = source.samples(split)
    for holdout in data.holdout:
        taken, left = _take(holdout, plan[holdout.from_split])
        plan[holdout.name] = [dataclasses.replace(s, split=holdout.name) for s in taken]
        if not left:
            raise SplitError(
                f"data.holdout {holdout.name!r} takes every frame of split {holdout.from_split!r}; "
                "nothing would be left to train on"
            )
        plan[holdout.from_split] = left
    return plan


def refuse_overlap(what: str, scored: Iterable[str], trained: Iterable[str], train_split: str) -> None:
    """Raise when frames that ``what`` scores were trained on (``train_split``'s, or a starting point's)."""
    overlap = sorted(set(scored) & set(trained))
    if overlap:
        raise SplitError(
            f"{what} shares {len(overlap)} frame(s) with the training split loader.split={train_split!r} "
            f"(e.g. {overlap[:3]}); scores there would be on training frames. Carve held-out splits with "
            "data.holdout"
        )


def check_disjoint(manifest: Manifest, cfg: JobConfig) -> list[str]:
    """Refuse training on frames that validation or evaluation score; return warnings for the rest.

    Training (``loader.split``) must share no frame with ``validate.split`` (when validation is on) or
    ``eval.split``. Validating on the reported frames (``validate.split == eval.split``) is allowed but
    is tuning on them: it comes back as a warning.
    """
    train = manifest.split(cfg.loader.split).keys
    scored = {"eval.split": cfg.eval.split}
    if cfg.validate.every > 0:
        scored["validate.split"] = cfg.validate.split
    for what, split in scored.items():
        refuse_overlap(f"{what}={split!r}", manifest.split(split).keys, train, cfg.loader.split)
    warnings = []
    if cfg.validate.every > 0 and cfg.validate.split == cfg.eval.split:
        warnings.append(
            f"validate.split and eval.split are both {cfg.eval.split!r}: checkpoints are selected on the "
            "frames the results are reported on"
        )
    return warnings
