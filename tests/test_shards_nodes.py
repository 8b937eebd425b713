"""The shard builder across nodes: node r of N builds shards r, r+N, ... of the plan; the parts merge into a
manifest equal to a one-node build's; the SLURM script's dry run gives every node its rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_shards import config, overrides, read_tars, shard_paths
from test_sources import copy_frames

from pipeline.config import REPO_ROOT, ConfigError, from_dict
from pipeline.data.loader import make_dataset
from pipeline.data.manifest import MANIFEST, Manifest
from pipeline.data.shards import (
    NODE_LOCKS,
    ShardError,
    build_shards,
    format_summary,
    merge_node_manifests,
    node_manifest_name,
)

FRAMES = 5


@pytest.fixture(scope="module")
def data(cityscapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("nodes-data")
    return root, sorted(copy_frames(cityscapes_root, root, FRAMES))


def tree(root: Path, out: Path, **shards: Any) -> dict[str, Any]:
    cfg = config(root, out, width=128, height=64)
    cfg["shards"].update(codecs=[{"name": "hevc", "qualities": [42]}], samples_per_shard=1, workers=1)
    cfg["shards"].update(shards)
    return cfg


@pytest.fixture(scope="module")
def single(data: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return build_shards(from_dict(tree(data[0], tmp_path_factory.mktemp("single") / "out")))


def same_build(merged: Manifest, single: Manifest) -> bool:
    """Equal manifests, but for the output folder in the config (and so the config's hash)."""
    for manifest in (merged, single):  # the recorded hash is the recorded config's
        assert manifest.config_hash == from_dict(manifest.config).digest()
    a, b = (json.loads(json.dumps(m.to_json())) for m in (merged, single))  # copies: to_json shares config
    for m in (a, b):
        m["config"]["shards"]["output"] = "<out>"
        del m["config_hash"]
    return a == b


def build_nodes(root: Path, out: Path, nodes: int, order: list[int] | None = None) -> list[Manifest]:
    return [
        build_shards(from_dict(tree(root, out, node_rank=rank, num_nodes=nodes)))
        for rank in (order if order is not None else range(nodes))
    ]


@pytest.mark.parametrize("nodes", [2, 3])
def test_nodes_cover_every_input_once_and_merge_to_the_single_build(
    data: tuple[Path, list[str]], single: Manifest, tmp_path: Path, nodes: int
) -> None:
    root, keys = data
    out = tmp_path / "out"
    parts = build_nodes(root, out, nodes, order=list(reversed(range(nodes))))
    # each node built its slice: shards r, r+N, ... of the plan, under the one-node names
    for rank, part in zip(reversed(range(nodes)), parts[:-1], strict=False):
        assert part.splits["val"].shards == tuple(f"val-{i:06d}.tar" for i in range(rank, FRAMES, nodes))
        assert f"node {rank} of {nodes}'s part" in format_summary(part)
    built = [key for part in parts[:-1] for key in part.splits["val"].keys] + list(
        parts[-1].splits["val"].keys[0::nodes]
    )
    assert sorted(built) == keys  # together the nodes cover every input exactly once
    merged = parts[-1]  # node 0 ran last: it completed the set and merged the parts
    assert same_build(merged, single) and Manifest.read(out) == merged
    assert json.loads((out / MANIFEST).read_text())["config"]["shards"]["num_nodes"] == 1
    assert sorted(read_tars(shard_paths(out, merged))) == keys
    for name in merged.splits["val"].shards:
        assert (out / name).read_bytes() == (single.folder / name).read_bytes()
    assert not (out / NODE_LOCKS).exists()
    assert [p.name for p in sorted(out.glob("manifest-node*"))] == [
        node_manifest_name(r, nodes) for r in range(nodes)
    ]
    assert merge_node_manifests(out, nodes) == merged

    # the loader reads the merged folder
    cfg = from_dict(
        {**tree(root, out), "loader": {"split": "val", "crop": [], "quality": 42, "batch_size": 2}}
    )
    batches = list(make_dataset(cfg, train=False))
    assert sorted(k for b in batches for k in b["key"]) == keys


def test_a_rerun_node_resumes_and_a_one_node_build_writes_the_manifest(
    data: tuple[Path, list[str]], single: Manifest, tmp_path: Path
) -> None:
    root, _ = data
    out = tmp_path / "out"
    build_nodes(root, out, 2, order=[1])
    assert not (out / MANIFEST).exists()
    assert merge_node_manifests(out, 2) is None  # node 0's part is missing
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    # with one node the same config finds node 1's shards complete and builds the rest
    assert same_build(build_shards(from_dict(tree(root, out))), single)
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in before.items())

    # a node rerun over a complete folder skips its shards and merges again
    (out / MANIFEST).unlink()
    assert build_nodes(root, out, 2, order=[0])[0] == Manifest.read(out)


def test_merge_refuses_parts_that_disagree(data: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, _ = data
    out = tmp_path / "out"
    build_nodes(root, out, 2)
    part = out / node_manifest_name(1, 2)
    good = part.read_text()
    changed = json.loads(good)
    changed["plan"] = changed["plan"][:-1]
    part.write_text(json.dumps(changed))
    with pytest.raises(ShardError, match="node 1 of 2 has another plan than node 0"):
        merge_node_manifests(out, 2)
    part.write_text(good)
    tar = out / "val-000001.tar"  # node 1's first shard
    tar.write_bytes(tar.read_bytes() + b"\0" * 512)
    with pytest.raises(ShardError, match="shard val-000001 changed after its node recorded it"):
        merge_node_manifests(out, 2)
    part.write_text("{not json")
    with pytest.raises(ShardError, match="unreadable.*rerun node 1"):
        merge_node_manifests(out, 2)


def test_node_settings_are_checked(data: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, _ = data
    for bad in ({"node_rank": 2, "num_nodes": 2}, {"node_rank": -1, "num_nodes": 2}, {"num_nodes": 0}):
        with pytest.raises(ConfigError, match="node_rank|num_nodes"):
            from_dict(tree(root, tmp_path / "out", **bad))


@pytest.mark.slow
def test_two_node_processes_at_once_build_the_single_build(
    data: tuple[Path, list[str]], single: Manifest, tmp_path: Path
) -> None:
    """Two concurrent `python -m pipeline shards` processes, as the SLURM script starts them."""
    root, _ = data
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                "shards",
                *overrides(tree(root, out)),
                f"shards.node_rank={rank}",
                "shards.num_nodes=2",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    merged = Manifest.read(out)  # the CLI's config is configs/default.yaml's: compare all but the config
    assert merged.config["shards"]["num_nodes"] == 1 and merged.build == single.build
    assert (merged.dataset, merged.splits, merged.codecs, merged.label, merged.rejects) == (
        single.dataset,
        single.splits,
        single.codecs,
        single.label,
        single.rejects,
    )


def test_dry_run_gives_every_node_its_rank() -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "DRY_RUN": "1",
        "SLURM_JOB_NODELIST": "cpu[3-5]",
        "SLURM_NNODES": "3",
        "SLURM_JOB_ID": "77",
        "SLURM_SUBMIT_DIR": str(REPO_ROOT),
        "SLURM_CPUS_PER_TASK": "32",
    }
    script = REPO_ROOT / "launch" / "shards_slurm.sbatch"
    done = subprocess.run(
        ["bash", str(script), "--config", "configs/default.yaml", "data.root=/d"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    per_node = [line for line in done.stdout.splitlines() if not line.startswith("#")]
    assert [line.split(":")[0] for line in per_node] == ["cpu3", "cpu4", "cpu5"]
    for rank, line in enumerate(per_node):
        assert f"--nodelist=cpu{rank + 3}" in line and "--cpus-per-task=32" in line
        assert line.endswith(
            f"python -m pipeline shards --config configs/default.yaml data.root=/d "
            f"shards.node_rank={rank} shards.num_nodes=3"
        )
