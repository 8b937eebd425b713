"""Held-out splits: carved out of a dataset split, disjoint, complete, and checked before training."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import DataConfig, HoldoutConfig, from_dict
from pipeline.data.sources import open_source
from pipeline.data.splits import SplitError, check_disjoint, plan_splits, read_key_list

HOLDOUT = [
    HoldoutConfig(name="valid", from_split="val", cities=["munster"]),
    HoldoutConfig(name="test", from_split="val", cities=["lindau"]),
]


def data(root: Path, holdout: list[HoldoutConfig]) -> DataConfig:
    return DataConfig(root=str(root), splits=["val"], holdout=holdout)


def test_held_out_cities_are_disjoint_and_complete(cityscapes_root: Path) -> None:
    cfg = data(cityscapes_root, HOLDOUT)
    plan = plan_splits(cfg, open_source(cfg))
    keys = {name: {s.key for s in samples} for name, samples in plan.items()}
    everything = {s.key for s in open_source(cfg).samples("val")}
    assert set(plan) == {"val", "valid", "test"}
    assert keys["val"] | keys["valid"] | keys["test"] == everything and len(everything) == 22
    assert (
        not keys["val"] & keys["test"]
        and not keys["val"] & keys["valid"]
        and not keys["valid"] & keys["test"]
    )
    assert {k.split("_")[0] for k in keys["test"]} == {"lindau"} and len(keys["test"]) == 10
    assert {k.split("_")[0] for k in keys["valid"]} == {"munster"}
    assert all(s.split == "test" for s in plan["test"])


def test_a_list_file_selects_keys(cityscapes_root: Path, tmp_path: Path) -> None:
    listing = tmp_path / "heldout.txt"
    listing.write_text("# two frames\nfrankfurt_000000_005898\n\nlindau_000005_000019  # a comment\n")
    assert read_key_list(listing) == ["frankfurt_000000_005898", "lindau_000005_000019"]
    cfg = data(cityscapes_root, [HoldoutConfig(name="test", list_file=str(listing))])
    plan = plan_splits(cfg, open_source(cfg))
    assert [s.key for s in plan["test"]] == ["frankfurt_000000_005898", "lindau_000005_000019"]
    assert len(plan["val"]) == 20


@pytest.mark.parametrize(
    ("holdout", "message"),
    [
        ([HoldoutConfig(name="test", cities=["paris"])], r"no frames of \['paris'\]"),
        ([HoldoutConfig(name="test", from_split="train", cities=["lindau"])], "not in data.splits"),
        ([HoldoutConfig(name="val", cities=["lindau"])], "also a dataset split"),
        ([HoldoutConfig(name="test")], "cities or a list_file"),
        ([HoldoutConfig(name="test", cities=["lindau", "munster", "frankfurt"])], "nothing would be left"),
        ([HoldoutConfig(name="a", cities=["lindau"]), HoldoutConfig(name="a", cities=["munster"])], "twice"),
        (  # the second holdout asks for a city the first one took
            [HoldoutConfig(name="a", cities=["lindau"]), HoldoutConfig(name="b", cities=["lindau"])],
            "no frames of",
        ),
    ],
)
def test_bad_holdouts_are_refused(cityscapes_root: Path, holdout: list[HoldoutConfig], message: str) -> None:
    cfg = data(cityscapes_root, holdout)
    with pytest.raises(SplitError, match=message):
        plan_splits(cfg, open_source(cfg))


def test_a_missing_listed_key_is_refused(cityscapes_root: Path, tmp_path: Path) -> None:
    listing = tmp_path / "keys.txt"
    listing.write_text("lindau_000005_000019\nnowhere_000000_000000\n")
    cfg = data(cityscapes_root, [HoldoutConfig(name="test", list_file=str(listing))])
    with pytest.raises(SplitError, match="nowhere_000000_000000"):
        plan_splits(cfg, open_source(cfg))
    with pytest.raises(SplitError, match="not found"):
        read_key_list(tmp_path / "absent.txt")


def test_training_on_scored_frames_is_refused(small_shards: Path) -> None:
    from pipeline.data.manifest import Manifest

    manifest = Manifest.read(small_shards)
    assert manifest.version == 2 and len(manifest.splits["test"].keys) == 10

    def cfg(**sections: dict) -> object:
        return from_dict({"loader": {"split": "val"}, "validate": {"split": "valid", "every": 5}, **sections})

    assert check_disjoint(manifest, cfg(eval={"split": "test"})) == []
    warnings = check_disjoint(manifest, cfg(eval={"split": "valid"}))
    assert len(warnings) == 1 and "selected on the frames the results are reported on" in warnings[0]
    with pytest.raises(SplitError, match="eval.split='val' shares 10 frame"):
        check_disjoint(manifest, cfg(eval={"split": "val"}))
    with pytest.raises(SplitError, match="validate.split='val'"):
        check_disjoint(manifest, cfg(eval={"split": "test"}, validate={"split": "val", "every": 5}))
