"""Train a segmenter on the shards with the generator's machinery: engine, checkpoints, resume, tracking.

``python -m pipeline segment`` (settings: the ``segment`` section of the job config) runs under every
launcher the trainer runs under (single process, ``torchrun``, the ``deepspeed`` launcher, SLURM):

* the data is the generator's (:class:`~pipeline.train.batches.Batches` over ``loader.*``: the same shards,
  crops and flips; ``loader.qualities`` draws one decoded quality per sample); each sample is trained on
  its original image with probability ``segment.originals`` and on its decoded image otherwise, so that
  the segmenter stays accurate on codec output. Label ids become train ids once
  (:mod:`pipeline.segment.labels`); void pixels are left out of the cross-entropy;
* one DeepSpeed engine (:func:`~pipeline.train.engine.initialize_engine`): precision, ZeRO stage and
  clipping from ``segment.deepspeed_config`` (else ``train.deepspeed_config``), SegFormer's recipe for the
  rest: AdamW and DeepSpeed's ``WarmupDecayLR`` (linear warm-up over ``segment.warmup`` steps, at least 2,
  then linear decay to zero at ``segment.steps``);
* checkpoints through :class:`~pipeline.train.checkpoint.PhaseCheckpoints` in
  ``<segment.output_dir>/checkpoints`` (tags ``segment-step<N>``; every ``segment.checkpoint_every`` steps,
  the newest ``segment.keep_checkpoints`` kept): ``--resume`` continues bit for bit (weights, optimiser,
  schedule, step, RNG, data position) under the same :meth:`~pipeline.config.JobConfig.segment_digest`;
  SIGUSR1/SIGTERM save the step and stop (:mod:`pipeline.train.preempt`); the output folder is locked;
* the export, ``<segment.output_dir>/segmenter.safetensors`` (:func:`~pipeline.segment.base.save_segmenter`),
  is logged to the tracker's run (params, loss per log step) and registered as ``segment.register_name``
  (alias ``tracking.alias``; the version tagged with the file's sha256). ``registered.json`` beside it
  records the registration, so a run killed before it registers on ``--resume``.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.atomic import temporary_names
from pipeline.config import ConfigError, JobConfig
from pipeline.lock import rank0_lock
from pipeline.model.export import weights_sha256
from pipeline.segment.base import (
    Segmenter,
    available_segmenters,
    build_segmenter,
    load_weights,
    save_segmenter,
)
from pipeline.segment.labels import _LABEL_TO_TRAIN, IGNORE
from pipeline.tracking import Tracker, make_tracker, run_tags
from pipeline.tracking.registry import REGISTERED_FILE, check_names, is_registered, mark_registered
from pipeline.train.batches import Batches, all_samples, due
from pipeline.train.checkpoint import (
    Checkpoint,
    PhaseCheckpoints,
    Progress,
    checkpoint_dir,
    discard_checkpoints,
    read_latest,
)
from pipeline.train.engine import (
    DistEnv,
    Engines,
    barrier,
    distributed,
    engine_dtype,
    initialize_engine,
    progress_bar,
    read_deepspeed_config,
    say,
)
from pipeline.train.preempt import STOP, Preempted
from pipeline.train.rng import seed_everything

SEGMENTER_FILE = "segmenter.safetensors"
STEM = "segment"  # checkpoint tags: segment-step<NNNNNNNN>
# what the export's spec records of the settings (paths where the run writes and logging left out)
RECIPE = (
    "architecture",
    "options",
    "backbone",
    "init_from",
    "lr",
    "weight_decay",
    "warmup",
    "originals",
    "seed",
)


def output_dir(cfg: JobConfig) -> Path:
    return Path(cfg.segment.output_dir).expanduser().resolve()


def segmenter_file(cfg: JobConfig) -> Path:
    """Where ``python -m pipeline segment`` exports the segmenter."""
    return output_dir(cfg) / SEGMENTER_FILE


def check_settings(cfg: JobConfig) -> None:
    """Refuse, before any work, an unknown architecture, missing weight files, a label table other than
    Cityscapes', a DeepSpeed file the engine cannot use and a registered-model name or alias the registry
    would refuse."""
    seg = cfg.segment
    if seg.architecture not in available_segmenters():
        known = ", ".join(available_segmenters())
        raise ConfigError(f"segment.architecture: unknown segmenter {seg.architecture!r}; known: {known}")
    for key in ("init_from", "backbone"):
        path = getattr(seg, key)
        if path and not Path(path).expanduser().exists():
            raise ConfigError(f"segment.{key}: no such file or folder {path}")
    if cfg.data.source != "cityscapes":
        raise ConfigError(
            f"segment trains on Cityscapes train ids; data.source={cfg.data.source!r} has another label table"
        )
    engine_config(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # the DeepSpeed file
    if registered_name(cfg) is not None:
        try:
            check_names(seg.register_name, cfg.tracking.alias or None)
        except ValueError as err:
            raise ConfigError(f"segment.register_name / tracking.alias: {err}") from None


def engine_config(cfg: JobConfig, device: torch.device) -> dict[str, Any]:
    """The segmenter engine's DeepSpeed config: the file's precision, ZeRO and clipping; the loader's batch
    size; AdamW and the warm-up/decay schedule of the ``segment`` section."""
    seg = cfg.segment
    key = "segment.deepspeed_config" if seg.deepspeed_config else "train.deepspeed_config"
    ds = read_deepspeed_config(seg.deepspeed_config or cfg.train.deepspeed_config, device, key)
    ds["train_micro_batch_size_per_gpu"] = cfg.loader.batch_size
    params: dict[str, Any] = {"lr": seg.lr, "betas": [0.9, 0.999], "weight_decay": seg.weight_decay}
    if device.type == "cpu":
        params["torch_adam"] = True  # DeepSpeed's fused kernels are CUDA-only
    ds["optimizer"] = {"type": "AdamW", "params": params}
    ds["scheduler"] = {
        "type": "WarmupDecayLR",
        "params": {
            "total_num_steps": seg.steps,
            "warmup_min_lr": 0.0,
            "warmup_max_lr": seg.lr,
            "warmup_num_steps": max(1, seg.warmup),
            "warmup_type": "linear",
        },
    }
    return ds


def build_network(cfg: JobConfig) -> Segmenter:
    """A new segmenter of the ``segment`` settings (``backbone`` given only when set), its weights loaded
    from ``segment.init_from`` when set."""
    seg = cfg.segment
    options = {**seg.options, **({"backbone": seg.backbone} if seg.backbone else {})}
    with warnings.catch_warnings():
        if seg.init_from:  # every weight comes from the file: no word about missing ImageNet weights
            warnings.simplefilter("ignore")
        model = build_segmenter(seg.architecture, **options)
    if seg.init_from:
        load_weights(model, seg.init_from)
    return model


class SegmentRunner:
    """Trains the segmenter: build, resume, steps (train, log, checkpoint, stop signals), export."""

    def __init__(self, cfg: JobConfig, env: DistEnv, tracker: Tracker) -> None:
        self.env, self.tracker = env, tracker
        # the data order, the re-seeding after a world-size change and the checkpoints kept follow segment.*
        seg = cfg.segment
        self.cfg = replace(
            cfg, train=replace(cfg.train, seed=seg.seed, keep_checkpoints=seg.keep_checkpoints)
        )
        self.seg = cfg.segment
        self.out = output_dir(cfg)
        self.progress = Progress()
        self.saved_step = -1
        self.to_train = torch.from_numpy(_LABEL_TO_TRAIN).long()
        self.bad = torch.zeros((), dtype=torch.bool, device=env.device)  # a non-finite loss so far
        self.last_log = (0.0, 0)

    def run(self, resume_from: Checkpoint | None) -> Path:
        self._build()
        if resume_from is not None:
            self.progress = self.checkpoints.load(resume_from)
            self.saved_step = self.progress.step
        else:
            seed_everything(self.seg.seed + self.env.rank)
        self.bar = progress_bar(self.env, self.seg.steps, self.progress.step, "segmenter")
        self.last_log = (time.perf_counter(), all_samples(self.batches))
        while self.progress.step < self.seg.steps:
            loss = self._train_step()
            self.bar.update(1)
            if self._due(self.seg.log_every):
                self._log(loss)
            if self._due(self.seg.checkpoint_every) and self.progress.step < self.seg.steps:
                self._save()
            signum = STOP.due(self.progress.step, self.env.device)
            if signum and self.progress.step < self.seg.steps:  # checkpoint before the job is killed
                self.bar.close()
                if self.saved_step != self.progress.step:
                    self._save()
                say(self.env, f"segmenter: stop signal {signum}, saved step {self.progress.step}")
                raise Preempted(128 + signum)
        self.bar.close()
        if self.saved_step != self.progress.step:
            self._save()
        return self._export()

    def _build(self) -> None:
        seed_everything(self.seg.seed)  # identical initial weights on every rank
        network = build_network(self.cfg)
        engine = initialize_engine(network, engine_config(self.cfg, self.env.device))
        self.engine = engine
        self.dtype = engine_dtype(engine)
        self.accumulation = engine.gradient_accumulation_steps()
        self.batches = Batches(self.cfg, self.env, phase=0)
        engines = Engines(engine, None, nn.Identity(), self.dtype)
        self.checkpoints = PhaseCheckpoints(
            self.cfg,
            self.env,
            self.out,
            0,
            engines,
            self.batches,
            validating=False,
            stem=STEM,
            training_digest=self.cfg.segment_digest(),
        )

    def _inputs(self, batch: dict[str, Any], micro: int) -> tuple[Tensor, Tensor]:
        """The step's images (each sample's original or decoded image, drawn from the step, the micro-batch
        and the rank alone: no RNG state to restore) and its train-id targets."""
        images = batch["image"]
        if self.seg.originals < 1:
            draw = torch.Generator().manual_seed(
                ((self.seg.seed * 1_000_003 + self.progress.step) * 1_009 + micro) * 257 + self.env.rank
            )
            original = torch.rand(images.shape[0], generator=draw) < self.seg.originals
            images = torch.where(original[:, None, None, None], images, batch["decoded"])
        target = self.to_train[batch["label"].clamp(0, 255)]
        return images.to(self.env.device, self.dtype), target.to(self.env.device)

    def _train_step(self) -> Tensor:
        """One optimizer step (``gradient_accumulation_steps`` micro-batches); returns this rank's mean
        loss, on the device (no host sync)."""
        total = torch.zeros((), device=self.env.device)
        for micro in range(self.accumulation):
            images, target = self._inputs(self.batches.next(), micro)
            logits = self.engine(images).float()
            # mean over the labelled pixels; a crop of void alone gives 0, not NaN
            labelled = (target != IGNORE).sum().clamp(min=1)
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum") / labelled
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach() / self.accumulation
        self.progress.step += 1
        self.bad |= ~torch.isfinite(total)
        return total

    def _check_finite(self) -> None:
        """Raise when any rank's loss was not finite (a collective): before anything is logged or saved."""
        bad = self.bad.to(torch.int32)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise FloatingPointError(f"segmenter: non-finite loss by step {self.progress.step}")

    def _due(self, every: int) -> bool:
        return due(self.progress.step, self.seg.steps, every)

    def _log(self, loss: Tensor) -> None:
        """The rank mean of the step's loss, the learning rate and the samples/s of all ranks."""
        self._check_finite()
        value = loss.clone()
        dist.all_reduce(value)
        samples = all_samples(self.batches)
        elapsed = max(time.perf_counter() - self.last_log[0], 1e-9)
        logged = {
            "loss": float(value) / self.env.world_size,
            "lr": float(self.engine.get_lr()[0]),
            "samples_per_s": (samples - self.last_log[1]) / elapsed,
        }
        if self.env.is_main:
            self.tracker.log_metrics(logged, step=self.progress.step)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in logged.items()}, refresh=False)
            say(
                self.env,
                f"segmenter step {self.progress.step} " + " ".join(f"{k}={v:.4g}" for k, v in logged.items()),
            )
        self.last_log = (time.perf_counter(), samples)

    def _save(self) -> None:
        self._check_finite()
        self.checkpoints.save(self.progress)
        self.saved_step = self.progress.step
        self.last_log = (time.perf_counter(), all_samples(self.batches))

    def _export(self) -> Path:
        """Rank 0 writes the segmenter file (float32, CPU); every rank returns its path."""
        self._check_finite()
        path = self.out / SEGMENTER_FILE
        if self.env.is_main:
            model = copy.deepcopy(self.engine.module).float().cpu()
            save_segmenter(model, path, extra={"training": training_record(self.cfg, self.progress.step)})
            say(self.env, f"segmenter done: {path}")
        barrier()
        return path


def training_record(cfg: JobConfig, steps: int) -> dict[str, Any]:
    """What the export's spec says of its training (independent of where the run wrote its files)."""
    settings = asdict(cfg.segment)
    return {
        "steps": steps,
        "digest": cfg.segment_digest(),
        "data": {
            "split": cfg.loader.split,
            "codec": cfg.loader.codec,
            "qualities": cfg.loader.qualities or [cfg.loader.quality],
            "crop": cfg.loader.crop,
            "batch_size": cfg.loader.batch_size,
        },
        "recipe": {key: settings[key] for key in RECIPE},
    }


def registered_name(cfg: JobConfig) -> str | None:
    """The registered-model name of the export; None when it is not registered."""
    tracking = cfg.tracking
    if not (tracking.enabled and tracking.register and cfg.segment.register_name):
        return None
    return cfg.segment.register_name


def _registered(cfg: JobConfig, export: Path) -> bool:
    """Whether the export is registered as the config asks (``registered.json`` names it), or need not be."""
    name = registered_name(cfg)
    if name is None:
        return True
    return is_registered(export, name, cfg.tracking.alias or None, weights_sha256(export))


def _register(cfg: JobConfig, tracker: Tracker, export: Path) -> str | None:
    """Register the export (see :func:`registered_name`) and write the ``registered.json`` marker."""
    name = registered_name(cfg)
    if name is None:
        return None
    alias = cfg.tracking.alias or None
    uri = tracker.register_segmenter(export, name, alias=alias)
    if uri:
        print(f"[segment] registered {uri}" + (f" as @{alias}" if alias else ""))
        mark_registered(export, uri, name, alias, weights_sha256(export))
    return uri


def train_segmenter(cfg: JobConfig, resume: bool = False, tracker: Tracker | None = None) -> Path:
    """Train the segmenter of ``cfg.segment`` and export it; returns the segmenter file.

    With ``resume`` the newest complete checkpoint in ``segment.output_dir`` decides where to start (a
    finished run is only registered, if it was not yet). The tracker gets one run,
    ``<name>-segment``.
    """
    check_settings(cfg)
    out = output_dir(cfg)
    with distributed() as env, rank0_lock(out, "segmenter training", env.is_main), STOP.installed():
        tracker = tracker if tracker is not None else make_tracker(cfg, rank=env.rank)
        tags = {**run_tags(cfg), "stage": "segment", "world_size": str(env.world_size)}
        with tracker.start_run(f"{cfg.name}-segment", params=cfg.flat(), tags=tags):
            export, trained = _train(cfg, resume, tracker, env)
            if env.is_main:
                registered = _registered(cfg, export)
                if trained or not registered:
                    tracker.log_artifact(export, artifact_path="segmenter")
                if not registered:
                    _register(cfg, tracker, export)
            return export


def _train(cfg: JobConfig, resume: bool, tracker: Tracker, env: DistEnv) -> tuple[Path, bool]:
    """The export, and whether this call trained it (False: a finished run found on ``resume``)."""
    out = output_dir(cfg)
    latest = read_latest(out) if resume else None
    if latest is not None and latest.state.get("training_digest") != cfg.segment_digest():
        raise ConfigError(
            f"{latest.path} was trained under other segment, data or loader settings; use a new "
            f"segment.output_dir, or delete {checkpoint_dir(out)} to start afresh in this one"
        )
    export = out / SEGMENTER_FILE
    if env.is_main:
        checkpoint_dir(out).mkdir(parents=True, exist_ok=True)
        for name in (SEGMENTER_FILE, REGISTERED_FILE):
            for tmp in temporary_names(out, name):  # what a killed export left (the lock is ours)
                tmp.unlink(missing_ok=True)
        if not resume:
            discard_checkpoints(out)
            export.unlink(missing_ok=True)
            (out / REGISTERED_FILE).unlink(missing_ok=True)
        elif latest is None:
            say(env, f"--resume: no complete checkpoint in {checkpoint_dir(out)}, starting afresh")
    barrier()
    if latest is not None and latest.step >= cfg.segment.steps and export.is_file():
        say(env, f"segmenter already trained ({latest.step} steps): {export}")
        return export, False
    return SegmentRunner(cfg, env, tracker).run(latest), True
