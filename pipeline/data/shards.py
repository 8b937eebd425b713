"""WebDataset shard builder: images, codec round trips and label maps, with manifest, resume and rejects.

Shard ``i`` of split ``s`` holds ``samples[i*n:(i+1)*n]`` of the source's sorted list, so the
assignment never depends on timing or worker count. A shard is written under a temporary name
in the output folder and renamed when complete; then a sidecar ``<split>-NNNNNN.json`` records
its keys, rejects and per-sample rates. A rerun skips every shard whose sidecar matches the
planned keys and build settings, so a killed build resumes where it stopped and still ends
with every input exactly once: in a shard or in the manifest's ``rejects``.

Across nodes (``shards.num_nodes`` > 1, ``launch/shards_slurm.sbatch``), every node plans the same shards
and node ``r`` builds shards ``r, r + N, r + 2N, ...`` of the plan (every split's, in order) into the same
``shards.output``, under the names a one-node build gives them; it then writes its part as
``manifest-node<r>of<N>.json`` (the plan, the build settings and its shards' sidecars). The node that
finds every part written merges them (:func:`merge_node_manifests`) into ``manifest.json``, equal to a
one-node build's on the same inputs. A rerun of a node resumes it, and merges again; a one-node build
over the folder finds every shard complete and only writes the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import re
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.atomic import atomic_path, temporary_names, write_atomic
from pipeline.config import REPO_ROOT, ConfigError, DataConfig, JobConfig, flatten, from_dict
from pipeline.data.codecs import LabelCoder, get_codec, with_output_defaults
from pipeline.data.manifest import (
    MANIFEST,
    VERSION,
    BuildEntry,
    CodecEntry,
    DatasetEntry,
    LabelEntry,
    Manifest,
    Reject,
    SplitEntry,
    codec_tag,
)
from pipeline.data.members import INSTANCE_MEMBER, encode_instance, relative_source
from pipeline.data.sources import BadSample, Sample, fit, open_source
from pipeline.data.splits import plan_splits
from pipeline.lock import LOCK_FILE, folder_lock, process_alive, read_holder
from pipeline.ray_session import ray_session

log = logging.getLogger(__name__)

NODE_LOCKS = ".nodes"  # <shards.output>/.nodes/<r>of<N>/: the lock of node r of a multi-node build
NODE_FORMAT = "jpdse-shards-node"
NODE_VERSION = 1


class ShardError(ConfigError):
    """Shard settings or an output folder that cannot be used."""


@dataclass(frozen=True)
class _Context:
    """Everything a worker needs to encode samples; picklable."""

    data: DataConfig
    codecs: tuple[tuple[str, int, tuple[tuple[str, Any], ...]], ...]  # (name, quality, options)
    label_coder: str
    label_downsample: int
    store_bitstreams: bool
    max_pixels: int  # decides rejects only: not part of the settings

    def settings(self) -> dict[str, Any]:
        """The build settings every shard depends on (recorded in the manifest, hashed in every sidecar)."""
        data = asdict(self.data)
        # a split's shards do not depend on which other splits are built; which frames a split holds is
        # part of each shard's own fingerprint (its planned keys).
        del data["splits"], data["holdout"]
        return {
            "data": data,
            "codecs": [[name, quality, dict(options)] for name, quality, options in self.codecs],
            "label_coder": self.label_coder,
            "label_downsample": self.label_downsample,
            "store_bitstreams": self.store_bitstreams,
        }

    def fingerprint(self) -> str:
        """The hash of :meth:`settings` (hashed as a list, as builds before the settings were recorded)."""
        settings = self.settings()
        text = json.dumps(
            [settings["data"], self.codecs, self.label_coder, self.label_downsample, self.store_bitstreams],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class _ShardJob:
    split: str
    name: str  # <split>-NNNNNN
    samples: tuple[Sample, ...]
    fingerprint: str  # build settings + planned keys
    build_hash: str  # build settings alone (_Context.fingerprint)


class _Worker:
    """A source, codecs and label coder, built once per process; single-threaded codecs, so that
    ``shards.workers`` processes use that many cores."""

    def __init__(self, ctx: _Context):
        self.ctx = ctx
        self.source = open_source(ctx.data, ctx.max_pixels)
        instances: dict[str, Any] = {}
        self.codecs = []
        for name, quality, options in ctx.codecs:
            ident = json.dumps([name, options], default=str)
            if ident not in instances:
                instances[ident] = get_codec(name, single_thread=True, **dict(options))
            self.codecs.append((name, quality, instances[ident]))
        self.label_coder = LabelCoder(method=ctx.label_coder, downsample=ctx.label_downsample)

    def encode(self, sample: Sample) -> dict[str, Any]:
        """``{"key", "members", "meta"}`` for a good sample, ``{"key", "reject"}`` for a bad one."""
        try:
            rgb, label, instance = self.source.read(sample)
        except BadSample as err:
            reject = {"key": sample.key, "split": sample.split, "path": str(sample.image), "reason": str(err)}
            return {"key": sample.key, "reject": reject}
        original = [int(rgb.shape[1]), int(rgb.shape[0])]
        root = self.ctx.data.root
        width, height = self.ctx.data.width, self.ctx.data.height
        rgb, label, instance = fit(rgb, label, instance, width, height)
        pixels = width * height
        # The label map as the decoder has it: with shards.label_downsample > 1, the nearest-neighbour
        # reconstruction of the down-sampled map whose bits are counted below.
        received = self.label_coder.reconstruct(label)
        members = {"image.png": _png(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), "label.png": _png(received)}
        if instance is not None:
            members[INSTANCE_MEMBER] = encode_instance(instance)
        codecs = {}
        for name, quality, codec in self.codecs:
            result = codec.roundtrip(rgb, quality)
            tag = codec_tag(name, quality)
            members[f"{tag}.png"] = _png(cv2.cvtColor(result.decoded, cv2.COLOR_RGB2BGR))
            if self.ctx.store_bitstreams:
                members[f"{tag}.bin"] = result.bitstream
            codecs[tag] = {
                "codec": name,
                "quality": quality,
                "bytes": len(result.bitstream),
                "bpp": 8 * len(result.bitstream) / pixels,
                "sha256": _sha(result.bitstream),
            }
        label_bits = self.label_coder.encode(label)
        if self.ctx.store_bitstreams:
            members["label.bin"] = label_bits
        meta = {
            "key": sample.key,
            "split": sample.split,
            "source": {  # relative to data.root: no build-machine folders in the shards
                "image": relative_source(sample.image, root),
                "label": relative_source(sample.label, root),
                "instance": relative_source(sample.instance, root) if instance is not None else None,
            },
            "width": width,
            "height": height,
            "original_size": original,
            "codecs": codecs,
            "label": {
                "coder": self.label_coder.method,
                "downsample": self.ctx.label_downsample,
                "bytes": len(label_bits),
                "bpp": 8 * len(label_bits) / pixels,
                "sha256": _sha(label_bits),
            },
            "sha256": {member: _sha(data) for member, data in members.items()},
        }
        members["json"] = json.dumps(meta, sort_keys=True).encode()
        return {"key": sample.key, "members": members, "meta": meta}


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an array of shape {array.shape} {array.dtype}")
    return buf.tobytes()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_WORKERS: dict[str, _Worker] = {}


def _worker(ctx: _Context) -> _Worker:
    key = f"{ctx.fingerprint()}-{ctx.max_pixels}"
    if key not in _WORKERS:
        _WORKERS[key] = _Worker(ctx)
    return _WORKERS[key]


def exit_with_parent(interval: float = 0.5) -> threading.Thread:
    """Watch the parent of this process in a daemon thread and exit when it is gone: a pool worker whose
    builder was killed (SIGKILL, out of memory) must not go on encoding as an orphan."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def _init_pool_worker(ctx: _Context) -> None:
    exit_with_parent()
    _worker(ctx)


def _encode_in_pool(ctx: _Context, sample: Sample) -> dict[str, Any]:
    return _worker(ctx).encode(sample)


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def _write_shard(out: Path, job: _ShardJob, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Tar the encoded samples (if any), then record the shard in its sidecar; returns the sidecar."""
    import webdataset as wds  # it imports torch: only where tars are written, not in encode workers

    good = [r for r in results if "reject" not in r]
    tar = out / f"{job.name}.tar"
    (out / f"{job.name}.json").unlink(missing_ok=True)  # an old sidecar must never vouch for a new tar

    if good:
        with (
            atomic_path(tar) as tmp,
            open(tmp, "wb") as f,
            wds.TarWriter(f, encoder=False, mtime=0) as writer,
        ):
            for r in good:
                writer.write({"__key__": r["key"], **r["members"]})
    else:
        tar.unlink(missing_ok=True)
    sidecar = {
        "shard": job.name,
        "split": job.split,
        "fingerprint": job.fingerprint,
        "build_hash": job.build_hash,
        "tar_bytes": tar.stat().st_size if good else None,
        "keys": [r["key"] for r in good],
        "rejects": [r["reject"] for r in results if "reject" in r],
        "stats": [
            {
                "key": r["key"],
                "codecs": {tag: c["bpp"] for tag, c in r["meta"]["codecs"].items()},
                "label_bpp": r["meta"]["label"]["bpp"],
                "label_coder": r["meta"]["label"]["coder"],
            }
            for r in good
        ],
    }
    _write_json(out / f"{job.name}.json", sidecar)
    return sidecar


def _build_whole_shard(ctx: _Context, out: str, job: _ShardJob) -> dict[str, Any]:
    """One shard start to end in this process (inline runs and Ray tasks)."""
    worker = _worker(ctx)
    return _write_shard(Path(out), job, [worker.encode(s) for s in job.samples])


def _completed(out: Path, job: _ShardJob) -> dict[str, Any] | None:
    """The shard's sidecar when the shard on disk is complete and built from the same plan."""
    try:
        sidecar = json.loads((out / f"{job.name}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(sidecar, dict) or sidecar.get("fingerprint") != job.fingerprint:
        return None
    tar = out / f"{job.name}.tar"
    if sidecar.get("keys"):
        complete = tar.is_file() and tar.stat().st_size == sidecar.get("tar_bytes")
    else:
        complete = not tar.exists()
    if complete and sidecar.get("build_hash") != job.build_hash:  # built before sidecars carried it
        sidecar["build_hash"] = job.build_hash
        _write_json(out / f"{job.name}.json", sidecar)
    return sidecar if complete else None


def _plan(worker: _Worker, per_shard: int, only: list[str]) -> list[_ShardJob]:
    """The shards of every split of the plan, or of the splits in ``only`` (``shards.splits``)."""
    source = worker.source
    base = worker.ctx.fingerprint()
    plan = plan_splits(worker.ctx.data, source)
    unknown = sorted(set(only) - set(plan))
    if unknown:
        raise ShardError(f"shards.splits names {unknown}, not splits of this build: {sorted(plan)}")
    jobs = []
    for split, samples in plan.items():
        if only and split not in only:
            continue
        if not samples:
            raise ShardError(f"split {split!r} of the {source.name} source at {source.root} has no images")
        keys = [s.key for s in samples]
        if len(set(keys)) != len(keys):
            raise ShardError(f"split {split!r} has duplicate sample keys")
        for index, start in enumerate(range(0, len(samples), per_shard)):
            chunk = tuple(samples[start : start + per_shard])
            text = json.dumps([base, split, [s.key for s in chunk]])
            fingerprint = hashlib.sha256(text.encode()).hexdigest()
            jobs.append(_ShardJob(split, f"{split}-{index:06d}", chunk, fingerprint, base))
    return jobs


def _refuse_other_build(out: Path, ctx: _Context) -> None:
    """Refuse to build into a folder that holds shards of other build settings: rebuilding there would mix
    two builds until the new one completes (and for good if it is interrupted)."""
    ours = ctx.fingerprint()
    theirs: dict[str, Any] | None = None  # the other build's settings, when its manifest records them
    other = ""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        build = manifest.get("build") or {}
        if build.get("hash") not in (None, ours):
            other, theirs = MANIFEST, build.get("settings")
        elif not build:  # written before the build settings were recorded: compare its config
            old = _context(from_dict(manifest["config"]), output_defaults=False)
            if old.fingerprint() != ours:
                other, theirs = MANIFEST, old.settings()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no (readable) manifest: the sidecars tell
    if not other:
        for path in sorted(out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].json")):
            try:
                sidecar = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(sidecar, dict) and sidecar.get("build_hash") not in (None, ours):
                other = path.name
                break
    if other:
        mine, old = flatten(ctx.settings()), flatten(theirs or {})
        changed = sorted(k for k in mine.keys() | old.keys() if mine.get(k) != old.get(k)) if theirs else []
        values = "".join(f"; {k}: {old.get(k)!r} there, {mine.get(k)!r} here" for k in changed)
        raise ShardError(
            f"{out} holds shards built with other settings ({other}; differing: "
            f"{', '.join(changed) or 'unknown'}){values}; build into another shards.output, "
            f"or empty {out} first"
        )


def _clean(out: Path, jobs: list[_ShardJob], own: list[_ShardJob] | None = None) -> None:
    """Remove temporary files of killed runs and shards of the built splits that the plan no longer has.

    ``own``: a node of a multi-node build removes only the temporaries of its own shards (the other nodes'
    temporaries are theirs, being written now)."""
    planned = {job.name for job in jobs}
    splits = {job.split for job in jobs}
    pattern = re.compile(r"^(?P<name>(?P<split>.+)-\d{6})\.(tar|json)$")
    # every file a build writes here, planned now or by an earlier plan: their temporaries are stale
    written = {MANIFEST} | {f"{name}.{ext}" for name in planned for ext in ("tar", "json")}
    for path in out.iterdir():
        match = pattern.match(path.name)
        if not path.is_file() or not match:
            continue
        written.add(path.name)
        if match["split"] in splits and match["name"] not in planned:
            log.info("removing %s: not part of this build's plan", path)
            path.unlink(missing_ok=True)
    if own is not None:
        written = {f"{job.name}.{ext}" for job in own for ext in ("tar", "json")}
    for name in written:
        for tmp in temporary_names(out, name):
            tmp.unlink(missing_ok=True)


def _run_inline(ctx: _Context, out: Path, jobs: list[_ShardJob], bar: tqdm) -> Iterable[dict[str, Any]]:
    for job in jobs:
        yield _build_whole_shard(ctx, str(out), job)
        bar.update(len(job.samples))


def _run_pool(
    ctx: _Context, out: Path, jobs: list[_ShardJob], workers: int, bar: tqdm
) -> Iterable[dict[str, Any]]:
    """Encode samples in a process pool (a bounded window of them in flight); tar shards here."""
    todo = deque((job, i) for job in jobs for i in range(len(job.samples)))
    results: dict[str, list[Any]] = {job.name: [None] * len(job.samples) for job in jobs}
    left = {job.name: len(job.samples) for job in jobs}
    running: dict[Future, tuple[_ShardJob, int]] = {}
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_pool_worker,
        initargs=(ctx,),
    )
    try:
        while todo or running:
            while todo and len(running) < 4 * workers:
                job, i = todo.popleft()
                running[pool.submit(_encode_in_pool, ctx, job.samples[i])] = (job, i)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job, i = running.pop(future)
                results[job.name][i] = future.result()
                bar.update(1)
                left[job.name] -= 1
                if not left[job.name]:
                    yield _write_shard(out, job, results.pop(job.name))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_ray(
    ctx: _Context, out: Path, jobs: list[_ShardJob], workers: int, bar: tqdm
) -> Iterable[dict[str, Any]]:
    """One Ray task per shard; needs ``shards.output`` on a filesystem every node sees."""
    import ray

    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
    cluster = {"address": "auto", "runtime_env": runtime_env, "log_to_driver": False}  # a running cluster
    local = {**cluster, "address": None, "num_cpus": workers, "include_dashboard": False}  # else this machine
    with ray_session(cluster, local):
        task = ray.remote(num_cpus=1)(_build_whole_shard)
        pending = {task.remote(ctx, str(out.resolve()), job): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                yield ray.get(ref)
                bar.update(len(job.samples))


def _context(cfg: JobConfig, *, output_defaults: bool = True) -> _Context:
    """The build settings of ``cfg``; with ``output_defaults`` every codec's options include the defaults
    of its :attr:`~pipeline.data.codecs.Codec.output_options` (a manifest written before they were
    recorded was decoded by older code, whose defaults they may not be)."""
    s = cfg.shards

    def options(name: str, given: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted((with_output_defaults(name, given) if output_defaults else given).items()))

    codecs = tuple(
        (spec.name, int(q), options(spec.name, spec.options)) for spec in s.codecs for q in spec.qualities
    )
    return _Context(cfg.data, codecs, s.label_coder, s.label_downsample, s.store_bitstreams, s.max_pixels)


def _cores() -> int:
    """The cores this process may run on (a SLURM task's or container's share, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_shards(cfg: JobConfig) -> Manifest:
    """Build (or finish) the shards of every split in ``cfg.data.splits`` and ``cfg.data.holdout`` (or of
    ``cfg.shards.splits``); returns the written manifest.

    With ``shards.num_nodes`` > 1 this builds node ``shards.node_rank``'s part (module docstring) and returns
    the merged manifest when this node completed the set, else this node's part (not written as
    ``manifest.json``). With ``shards.workers`` > 1 the encoders run in spawned processes, so a script
    calling this needs the usual ``if __name__ == "__main__":`` guard.
    """
    ctx = _context(cfg)
    worker = _worker(ctx)  # fails early on a bad source, codec or label coder
    for name, quality, codec in worker.codecs:
        lo, hi = codec.quality_range
        if not lo <= quality <= hi:
            raise ShardError(f"shards.codecs: {name} quality must be in [{lo}, {hi}], got {quality}")
    jobs = _plan(worker, cfg.shards.samples_per_shard, cfg.shards.splits)
    out = Path(cfg.shards.output)
    if cfg.shards.num_nodes > 1:
        return _build_node(cfg, ctx, worker, jobs, out)
    with folder_lock(out, "shard build"):
        _refuse_live_nodes(out)
        _refuse_other_build(out, ctx)
        _clean(out, jobs)
        sidecars = _run_jobs(cfg, ctx, out, jobs)
        manifest = _manifest(cfg, ctx, worker.label_coder.method, _dataset_entry(cfg, worker), sidecars, out)
        manifest.write()
        return manifest


def _run_jobs(cfg: JobConfig, ctx: _Context, out: Path, jobs: list[_ShardJob]) -> list[dict[str, Any]]:
    """Build the shards of ``jobs`` not complete on disk yet; returns every job's sidecar, in order."""
    sidecars = {job.name: sc for job in jobs if (sc := _completed(out, job)) is not None}
    pending = [job for job in jobs if job.name not in sidecars]
    if sidecars:
        log.info("%d of %d shards already complete in %s", len(sidecars), len(jobs), out)
    workers = cfg.shards.workers or _cores()
    with tqdm(total=sum(len(j.samples) for j in pending), desc="shards", unit="sample", disable=None) as bar:
        if cfg.shards.use_ray:
            run = _run_ray(ctx, out, pending, workers, bar)
        elif workers == 1 or len(pending) == 0:
            run = _run_inline(ctx, out, pending, bar)
        else:
            run = _run_pool(ctx, out, pending, workers, bar)
        for sidecar in run:
            sidecars[sidecar["shard"]] = sidecar
    return [sidecars[job.name] for job in jobs]


def _one_node(cfg: JobConfig) -> JobConfig:
    """``cfg`` as a one-node build's: what the manifest of a multi-node build records."""
    tree = cfg.to_dict()
    tree["shards"].update(node_rank=0, num_nodes=1)
    return from_dict(tree)


def _dataset_entry(cfg: JobConfig, worker: _Worker) -> DatasetEntry:
    source = worker.source
    return DatasetEntry(
        source=source.name,
        root=str(source.root),
        label_nc=source.label_nc,
        label_names=tuple(source.label_names),
        has_instances=source.has_instances,
        width=cfg.data.width,
        height=cfg.data.height,
    )


def node_manifest_name(rank: int, nodes: int) -> str:
    """The part of node ``rank`` of a ``nodes``-node build, beside the shards."""
    return f"manifest-node{rank}of{nodes}.json"


def _live_holder(folder: Path) -> str:
    """Who holds ``folder``'s lock, if a live process (or one on another host) does; else ``""``."""
    holder = read_holder(folder)
    if holder is None:
        return ""
    pid = holder.get("pid")
    here = holder.get("host") == socket.gethostname() and isinstance(pid, int)
    if here and not process_alive(pid, holder.get("pid_start")):
        return ""
    return f"{holder.get('command', '?')} (pid {pid} on {holder.get('host', '?')})"


def _refuse_live_nodes(out: Path) -> None:
    """A one-node build refuses a folder that nodes of a multi-node build are writing."""
    for lock in sorted((out / NODE_LOCKS).glob(f"*/{LOCK_FILE}")):
        holder = _live_holder(lock.parent)
        if holder:
            raise ShardError(f"{out} is being built by {holder}; wait for it, or delete {lock} if it is gone")


def _build_node(cfg: JobConfig, ctx: _Context, worker: _Worker, jobs: list[_ShardJob], out: Path) -> Manifest:
    """Node ``shards.node_rank``'s part of a multi-node build (module docstring)."""
    rank, nodes = cfg.shards.node_rank, cfg.shards.num_nodes
    mine = jobs[rank::nodes]
    out.mkdir(parents=True, exist_ok=True)
    holder = _live_holder(out)
    if holder:  # a one-node build (or a merge) holds the whole folder
        raise ShardError(f"{out} is in use by {holder}; wait for it to finish")
    single = _one_node(cfg)
    lock_folder = out / NODE_LOCKS / f"{rank}of{nodes}"
    part_path = out / node_manifest_name(rank, nodes)
    with folder_lock(lock_folder, f"shard build, node {rank} of {nodes}"):
        _refuse_other_build(out, ctx)
        part_path.unlink(missing_ok=True)  # an earlier run's part must not vouch for this run's shards
        _clean(out, jobs, own=mine)
        sidecars = _run_jobs(cfg, ctx, out, mine)
        dataset = _dataset_entry(cfg, worker)
        part = {
            "format": NODE_FORMAT,
            "version": NODE_VERSION,
            "node_rank": rank,
            "num_nodes": nodes,
            "plan": [[job.name, job.fingerprint] for job in jobs],
            "config": single.to_dict(),
            "dataset": dataset.to_json(),
            "label_coder": worker.label_coder.method,
            "build": {"settings": ctx.settings(), "hash": ctx.fingerprint()},
            "shards": sidecars,
        }
        _write_json(part_path, part)
    for folder in (lock_folder, lock_folder.parent):
        with contextlib.suppress(OSError):  # another node's lock is still there
            folder.rmdir()
    merged = merge_node_manifests(out, nodes, expected=json.loads(json.dumps(part)))
    if merged is not None:
        merged.write()
        log.info("node %d of %d completed the set: merged %d parts into %s", rank, nodes, nodes, MANIFEST)
        return merged
    log.info("node %d of %d done; %s is written by the node that completes the set", rank, nodes, MANIFEST)
    return _manifest(cfg, ctx, worker.label_coder.method, dataset, sidecars, out)


_AGREED = ("plan", "config", "dataset", "build", "label_coder")  # what every node's part must share


def merge_node_manifests(
    folder: str | Path, nodes: int, expected: dict[str, Any] | None = None
) -> Manifest | None:
    """The manifest of a ``nodes``-node build in ``folder`` from its nodes' parts (not written); None while
    a part is missing. Refused (:class:`ShardError`) when the parts disagree (plan, settings, config) or a
    shard on disk is not the one its node recorded. ``expected``: the calling node's own part; a part that
    disagrees with it is an earlier build's, not yet rewritten by its node, and counts as missing."""
    out = Path(folder)
    parts = []
    for rank in range(nodes):
        path = out / node_manifest_name(rank, nodes)
        try:
            part = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise ShardError(f"{path} is unreadable ({err}); rerun node {rank} of the build") from err
        if not isinstance(part, dict) or part.get("format") != NODE_FORMAT:
            raise ShardError(f"{path} is not a node's part of a shard build")
        if part.get("version") != NODE_VERSION:
            raise ShardError(f"{path}: version {part.get('version')!r}, this code merges {NODE_VERSION}")
        if expected is not None and any(part.get(key) != expected.get(key) for key in _AGREED):
            return None
        parts.append(part)
    first = parts[0]
    for rank, part in enumerate(parts):
        for key in _AGREED:
            if part.get(key) != first.get(key):
                raise ShardError(
                    f"{out}: node {rank} of {nodes} has another {key} than node 0 (do all nodes see the same "
                    "data.root and config?); rerun the build with one config"
                )
        if part.get("node_rank") != rank or part.get("num_nodes") != nodes:
            raise ShardError(f"{out / node_manifest_name(rank, nodes)} is the part of another node")
    try:
        plan = [(str(name), str(fingerprint)) for name, fingerprint in first["plan"]]
        by_name = {sc["shard"]: sc for part in parts for sc in part["shards"]}
        sidecars = []
        for index, (name, fingerprint) in enumerate(plan):
            sidecar = by_name.get(name)
            if sidecar is None or sidecar.get("fingerprint") != fingerprint:
                raise ShardError(
                    f"{out}: shard {name} is not in node {index % nodes}'s part; rerun node {index % nodes}"
                )
            _check_on_disk(out, sidecar)
            sidecars.append(sidecar)
        if len(by_name) != len(plan):
            raise ShardError(f"{out}: the nodes' parts hold shards the plan does not have")
        cfg = from_dict(first["config"])
        dataset = DatasetEntry.from_json(first["dataset"])
        build = BuildEntry.from_json(first["build"])
    except ShardError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise ShardError(f"{out}: a node's part is malformed ({err!r}); rerun the build") from err
    ctx = _context(cfg)
    if ctx.fingerprint() != build.hash:
        raise ShardError(f"{out}: the nodes' config does not give the build hash they recorded")
    return _manifest(cfg, ctx, str(first["label_coder"]), dataset, sidecars, out)


def _check_on_disk(out: Path, sidecar: dict[str, Any]) -> None:
    """Refuse a shard whose files on disk are no longer the ones its node recorded."""
    name = sidecar["shard"]
    try:
        on_disk = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError) as err:
        raise ShardError(
            f"{out}: the sidecar of shard {name} is unreadable ({err}); rerun the build"
        ) from err
    tar = out / f"{name}.tar"
    size = tar.stat().st_size if tar.is_file() else None
    if on_disk != sidecar or size != sidecar.get("tar_bytes"):
        raise ShardError(f"{out}: shard {name} changed after its node recorded it; rerun the build")


def _manifest(
    cfg: JobConfig,
    ctx: _Context,
    label_coder: str,
    dataset: DatasetEntry,
    sidecars: list[dict[str, Any]],
    out: Path,
) -> Manifest:
    built: dict[str, tuple[list[str], list[str]]] = {}  # split: (tars, keys)
    for sc in sidecars:
        tars, keys = built.setdefault(sc["split"], ([], []))
        if sc["keys"]:
            tars.append(f"{sc['shard']}.tar")
            keys += sc["keys"]
    stats = [row for sc in sidecars for row in sc["stats"]]
    codecs = {}
    for name, quality, _ in ctx.codecs:
        tag = codec_tag(name, quality)
        values = [row["codecs"][tag] for row in stats]
        codecs[tag] = CodecEntry(
            codec=name,
            quality=quality,
            bpp_mean=statistics.fmean(values) if values else None,
            bpp_min=min(values) if values else None,
            bpp_max=max(values) if values else None,
        )
    label_bpp = [row["label_bpp"] for row in stats]
    coders = sorted({row["label_coder"] for row in stats}) or [label_coder]
    return Manifest(
        version=VERSION,
        config=cfg.to_dict(),
        config_hash=cfg.digest(),
        dataset=dataset,
        splits={
            split: SplitEntry(tuple(tars), len(keys), tuple(keys)) for split, (tars, keys) in built.items()
        },
        codecs=codecs,
        label=LabelEntry(
            coder=coders[0] if len(coders) == 1 else ",".join(coders),
            downsample=cfg.shards.label_downsample,
            bpp_mean=statistics.fmean(label_bpp) if label_bpp else None,
        ),
        rejects=tuple(Reject.from_json(reject) for sc in sidecars for reject in sc["rejects"]),
        folder=out,
        build=BuildEntry(ctx.settings(), ctx.fingerprint()),
    )


def format_summary(manifest: Manifest, max_reasons: int = 5) -> str:
    """A few lines for people: samples and shards per split, rates, rejects."""
    ds = manifest.dataset
    shards = manifest.config["shards"]
    nodes = shards.get("num_nodes", 1)
    part = f"node {shards.get('node_rank', 0)} of {nodes}'s part of the " if nodes > 1 else ""
    lines = [
        f"{part}shards in {manifest.config['shards']['output']} (config {manifest.config_hash}): "
        f"{ds.source} at {ds.width}x{ds.height}, label_nc {ds.label_nc}, "
        f"instances {'yes' if ds.has_instances else 'no'}"
    ]
    for split, entry in manifest.splits.items():
        lines.append(f"  {split}: {entry.samples} samples in {len(entry.shards)} shards")
    lines.append(f"  {'codec':<16} {'bpp mean':>9} {'min':>9} {'max':>9}")

    def num(x: float | None) -> str:
        return f"{x:9.4f}" if x is not None else f"{'-':>9}"

    for tag, c in manifest.codecs.items():
        lines.append(f"  {tag:<16} {num(c.bpp_mean)} {num(c.bpp_min)} {num(c.bpp_max)}")
    lab = manifest.label
    rate = num(lab.bpp_mean).strip()
    lines.append(f"  label map ({lab.coder}, downsample {lab.downsample}): bpp mean {rate}")
    rejects = manifest.rejects
    lines.append(f"  rejects: {len(rejects)}")
    for r in rejects[:max_reasons]:
        lines.append(f"    {r.split}/{r.key}: {r.reason}")
    if len(rejects) > max_reasons:
        lines.append(f"    ... and {len(rejects) - max_reasons} more (see {MANIFEST})")
    return "\n".join(lines)
