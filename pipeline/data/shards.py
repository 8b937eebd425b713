"""WebDataset shard builder: images, codec round trips and label maps, with manifest, resume and rejects.

Shard ``i`` of split ``s`` holds ``samples[i*n:(i+1)*n]`` of the source's sorted list, so the
assignment never depends on timing or worker count. A shard is written under a temporary name
in the output folder and renamed when complete; then a sidecar ``<split>-NNNNNN.json`` records
its keys, rejects and per-sample rates. A rerun skips every shard whose sidecar matches the
planned keys and build settings, so a killed build resumes where it stopped and still ends
with every input exactly once: in a shard or in the manifest's ``rejects``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
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
from pipeline.data.codecs import LabelCoder, get_codec
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
from pipeline.lock import folder_lock

log = logging.getLogger(__name__)


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


def _plan(worker: _Worker, per_shard: int) -> list[_ShardJob]:
    source = worker.source
    base = worker.ctx.fingerprint()
    jobs = []
    for split, samples in plan_splits(worker.ctx.data, source).items():
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
            old = _context(from_dict(manifest["config"]))
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
        raise ShardError(
            f"{out} holds shards built with other settings ({other}; differing: "
            f"{', '.join(changed) or 'unknown'}); build into another shards.output, or empty {out} first"
        )


def _clean(out: Path, jobs: list[_ShardJob]) -> None:
    """Remove temporary files of killed runs and shards of the built splits that the plan no longer has."""
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

    started = False
    if not ray.is_initialized():
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        runtime_env = {"env_vars": {"PYTHONPATH": path}}
        try:
            ray.init(address="auto", runtime_env=runtime_env, log_to_driver=False)
        except ConnectionError:
            ray.init(num_cpus=workers, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        task = ray.remote(num_cpus=1)(_build_whole_shard)
        pending = {task.remote(ctx, str(out.resolve()), job): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                yield ray.get(ref)
                bar.update(len(job.samples))
    finally:
        if started:
            ray.shutdown()


def _context(cfg: JobConfig) -> _Context:
    s = cfg.shards
    codecs = tuple(
        (spec.name, int(q), tuple(sorted(spec.options.items()))) for spec in s.codecs for q in spec.qualities
    )
    return _Context(cfg.data, codecs, s.label_coder, s.label_downsample, s.store_bitstreams, s.max_pixels)


def build_shards(cfg: JobConfig) -> Manifest:
    """Build (or finish) the shards of every split in ``cfg.data.splits``; returns the written manifest.

    With ``shards.workers`` > 1 the encoders run in spawned processes, so a script calling this
    needs the usual ``if __name__ == "__main__":`` guard.
    """
    ctx = _context(cfg)
    worker = _worker(ctx)  # fails early on a bad source, codec or label coder
    for name, quality, codec in worker.codecs:
        lo, hi = codec.quality_range
        if not lo <= quality <= hi:
            raise ShardError(f"shards.codecs: {name} quality must be in [{lo}, {hi}], got {quality}")
    jobs = _plan(worker, cfg.shards.samples_per_shard)
    out = Path(cfg.shards.output)
    with folder_lock(out, "shard build"):
        return _build_locked(cfg, ctx, worker, jobs, out)


def _build_locked(
    cfg: JobConfig, ctx: _Context, worker: _Worker, jobs: list[_ShardJob], out: Path
) -> Manifest:
    """:func:`build_shards` once it holds the folder's lock."""
    _refuse_other_build(out, ctx)
    _clean(out, jobs)
    sidecars = {job.name: sc for job in jobs if (sc := _completed(out, job)) is not None}
    pending = [job for job in jobs if job.name not in sidecars]
    if sidecars:
        log.info("%d of %d shards already complete in %s", len(sidecars), len(jobs), out)
    workers = cfg.shards.workers or os.cpu_count() or 1
    with tqdm(total=sum(len(j.samples) for j in pending), desc="shards", unit="sample", disable=None) as bar:
        if cfg.shards.use_ray:
            run = _run_ray(ctx, out, pending, workers, bar)
        elif workers == 1 or len(pending) == 0:
            run = _run_inline(ctx, out, pending, bar)
        else:
            run = _run_pool(ctx, out, pending, workers, bar)
        for sidecar in run:
            sidecars[sidecar["shard"]] = sidecar
    manifest = _manifest(cfg, worker, [sidecars[job.name] for job in jobs], out)
    manifest.write()
    return manifest


def _manifest(cfg: JobConfig, worker: _Worker, sidecars: list[dict[str, Any]], out: Path) -> Manifest:
    built: dict[str, tuple[list[str], list[str]]] = {}  # split: (tars, keys)
    for sc in sidecars:
        tars, keys = built.setdefault(sc["split"], ([], []))
        if sc["keys"]:
            tars.append(f"{sc['shard']}.tar")
            keys += sc["keys"]
    stats = [row for sc in sidecars for row in sc["stats"]]
    codecs = {}
    for name, quality, _ in worker.ctx.codecs:
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
    coders = sorted({row["label_coder"] for row in stats}) or [worker.label_coder.method]
    source = worker.source
    build = BuildEntry(worker.ctx.settings(), worker.ctx.fingerprint())
    return Manifest(
        version=VERSION,
        config=cfg.to_dict(),
        config_hash=cfg.digest(),
        dataset=DatasetEntry(
            source=source.name,
            root=str(source.root),
            label_nc=source.label_nc,
            label_names=tuple(source.label_names),
            has_instances=source.has_instances,
            width=cfg.data.width,
            height=cfg.data.height,
        ),
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
        build=build,
    )


def format_summary(manifest: Manifest, max_reasons: int = 5) -> str:
    """A few lines for people: samples and shards per split, rates, rejects."""
    ds = manifest.dataset
    lines = [
        f"shards in {manifest.config['shards']['output']} (config {manifest.config_hash}): "
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
