"""The three JPD-SE phases on two DeepSpeed engines, the hand-off between phases, and resume.

One phase, as :class:`PhaseRunner` runs it:

1. build G and D (``label_nc`` from the config or the shard manifest), initialise them from the
   previous phase's files, wrap them in DeepSpeed engines (:mod:`pipeline.train.engine`);
2. ``phase.steps`` optimizer steps; each step runs ``gradient_accumulation_steps`` micro-batches of
   a generator update (through the frozen D) followed, when the phase trains D, by a D update;
3. checkpoints every ``train.checkpoint_every`` steps and at the end; then the generator alone is
   exported to ``<output_dir>/phase<N>/generator.safetensors`` and D's weights are kept beside it.

Hand-off: phase N starts G from phase N-1's export (``train.init_from`` for the first phase of a
job that does not start at phase 1) and D from the ``discriminator.safetensors`` beside that export
when there is one: phase 2 fine-tunes the phase-1 GAN as a whole rather than pitting the phase-1
generator against an untrained D. Without the file D starts fresh, with a notice. Phase 3 does not
train D (no engine, no optimizer state); it only runs it, frozen, when its GAN/feature weights are on.
With the residual generator (``model.residual``, the default) phase 1 trains the trunk and the synthesis
head; phase 2 takes them over weight for weight and trains the correction head, which starts at zero, so
phase 2's step 0 is the codec itself. Without a phase-1 export (and no ``train.init_from``) a residual
phase 2 or 3 starts from that identity generator, with a notice.

Validation (``validate.every`` > 0, phases that see the decoded image): at step 0 and every
``validate.every`` steps rank 0 scores the generator on the held-out frames of ``validate.split``
(:mod:`pipeline.train.validation`); the best by ``validate.metric`` (step 0 included) is kept in
each checkpoint and is what the phase exports (a later step must beat it by more than
``validate.min_delta``); ``validate.patience`` stops a phase after that many validations without
improvement.

Checkpoints: ``<output_dir>/checkpoints/<tag>/`` holds both engines' DeepSpeed checkpoints, each
rank's RNG state and ``trainer_state.json``; ``checkpoints/latest`` names the newest *complete* one
and is replaced atomically only after every rank has written its part. ``--resume`` continues from
it: same phase, same step, same RNG states and data position (the epoch's loader is rebuilt from
its seed and the consumed batches are read and dropped; with a different world size the data order
and RNG start afresh instead).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.config import ConfigError, JobConfig, PhaseConfig, flatten
from pipeline.data.loader import make_loader, training_qualities
from pipeline.data.shards import read_manifest
from pipeline.data.splits import refuse_overlap, split_keys
from pipeline.model.export import export_generator, load_generator, make_spec, read_spec, read_train_frames
from pipeline.model.losses import GeneratorLosses, discriminator_loss
from pipeline.model.networks import (
    Generator,
    build_models,
    discriminator_input,
    generator_input,
    semantic_channels,
    zero_correction,
)
from pipeline.tracking import Tracker, make_tracker, registry_name, run_tags
from pipeline.train.engine import DistEnv, Engines, barrier, build_engines, distributed
from pipeline.train.validation import Validator, check_metric, improves, load_frames

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
BEST_FILE = "best_generator.safetensors"  # in a checkpoint: the best validated generator so far
GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint, as ``checkpoints/latest`` names it."""

    tag: str
    phase: int
    step: int
    path: Path

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE_FILE).read_text())


@dataclass(frozen=True)
class StepEvent:
    """What ``train(..., on_step=...)`` is called with after every optimizer step, on every rank."""

    phase: int
    step: int
    steps: int  # the phase's total
    generator: nn.Module  # the bare generator network (in training mode; the callback must not step it)
    losses: dict[str, Tensor]  # this rank's loss terms of the step


StepCallback = Callable[[StepEvent], None]


@dataclass(frozen=True)
class DatasetInfo:
    label_nc: int
    use_instance: bool
    train_frames: tuple[str, ...] = ()  # keys of loader.split; empty when shards are given by pattern


def output_dir(cfg: JobConfig) -> Path:
    return Path(cfg.train.output_dir).expanduser().resolve()


def phase_dir(out: Path, phase: int) -> Path:
    return out / f"phase{phase}"


def _say(env: DistEnv, message: str) -> None:
    if env.is_main:
        tqdm.write(f"[train] {message}", file=sys.stdout)
        sys.stdout.flush()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_tensors_atomic(path: Path, tensors: dict[str, Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_latest(out: Path) -> Checkpoint | None:
    """The newest complete checkpoint under ``out``, or ``None``."""
    pointer = out / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    entry = json.loads(pointer.read_text())
    path = out / CHECKPOINTS / entry["tag"]
    if not (path / STATE_FILE).is_file():
        raise RuntimeError(f"{pointer} names {entry['tag']} but {path / STATE_FILE} is missing")
    return Checkpoint(entry["tag"], int(entry["phase"]), int(entry["step"]), path)


def params_digest(module: nn.Module) -> str:
    """SHA-256 of a module's parameters (names and bytes): equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def dataset_info(cfg: JobConfig) -> DatasetInfo:
    """``label_nc`` (config, else manifest) and whether the generator gets instance edges."""
    manifest_dir = Path(cfg.shards.output)
    manifest = read_manifest(manifest_dir) if (manifest_dir / "manifest.json").is_file() else None
    dataset = manifest["dataset"] if manifest else None
    label_nc = cfg.model.label_nc or (dataset["label_nc"] if dataset else 0)
    if label_nc <= 0:
        raise ConfigError(
            f"model.label_nc is 0 and there is no shard manifest in {manifest_dir} to take it from; "
            "set model.label_nc or shards.output"
        )
    has_instances = bool(dataset["has_instances"]) if dataset else cfg.model.use_instance
    frames: tuple[str, ...] = ()
    if manifest and not cfg.loader.shards:
        frames = tuple(sorted(split_keys(manifest, cfg.loader.split)))
    return DatasetInfo(int(label_nc), cfg.model.use_instance and has_instances, frames)


class Batches:
    """Endless batches for one rank: epoch after epoch, each from a fresh loader seeded by
    ``(seed, phase, epoch)``, so a position ``(epoch, batch)`` can be found again after a restart."""

    def __init__(self, cfg: JobConfig, env: DistEnv, phase: int, epoch: int = 0, skip: int = 0) -> None:
        self.cfg, self.env, self.phase = cfg, env, phase
        self.epoch, self.in_epoch = epoch, 0
        self._iter = self._open()
        for _ in range(skip):
            self.next()

    def _open(self) -> Iterator[dict[str, Any]]:
        seed = self.cfg.train.seed * 1_000_003 + self.phase * 10_007 + self.epoch
        loader = make_loader(
            self.cfg, rank=self.env.rank, world_size=self.env.world_size, train=True, seed=seed
        )
        return iter(loader)

    def next(self) -> dict[str, Any]:
        try:
            batch = next(self._iter)
        except StopIteration:
            if self.in_epoch == 0:
                raise RuntimeError(
                    f"rank {self.env.rank} got no batches from split {self.cfg.loader.split!r}"
                ) from None
            self.epoch, self.in_epoch = self.epoch + 1, 0
            self._iter = self._open()
            return self.next()
        self.in_epoch += 1
        return batch


class PhaseRunner:
    """Trains one phase: build, (resume), steps, checkpoints, export."""

    def __init__(
        self,
        cfg: JobConfig,
        phase: int,
        env: DistEnv,
        tracker: Tracker,
        data: DatasetInfo,
        init: Path | None,
        on_step: StepCallback | None = None,
    ) -> None:
        self.cfg, self.phase, self.env, self.tracker = cfg, phase, env, tracker
        self.data, self.init, self.on_step = data, init, on_step
        self.phase_cfg = cfg.phase(phase)
        self.out = output_dir(cfg)
        self.step = 0
        self.samples = 0  # this rank's
        self.saved_step = -1
        self.last_log = (0.0, 0)  # (time, samples of all ranks) at the last log line or checkpoint
        self.validating = cfg.validate.every > 0 and self.phase_cfg.visual_input
        self.validator: Validator | None = None
        self.best: dict[str, Any] = {}  # rank 0: step, value and scores of the best validation
        self.best_weights: dict[str, Tensor] | None = None  # rank 0, on the CPU
        self.bad_validations = 0
        self.stopped_early = False
        # what the export records as seen in training: this phase's frames and its starting point's
        inherited = (read_train_frames(init) or []) if init is not None else []
        self.train_frames = tuple(sorted(set(data.train_frames) | set(inherited)))

    # ---- building -------------------------------------------------------------------------------

    def _build(self) -> None:
        cfg, data = self.cfg, self.data
        seed_everything(cfg.train.seed + self.phase)  # identical initial weights on every rank
        generator, discriminator = build_models(cfg.model, data.label_nc, data.use_instance)
        if self.init is not None:
            self._load_init(generator, discriminator)
        self.engines: Engines = build_engines(generator, discriminator, cfg, self.phase_cfg, self.env)
        self.losses = GeneratorLosses.from_config(self.phase_cfg.loss, cfg.loss, cfg.model).to(
            self.env.device
        )
        self.accumulation = self.engines.generator.gradient_accumulation_steps()
        if self.validating:
            check_metric(cfg.validate.metric)  # on every rank: a bad setting stops them all alike
        if self.validating and self.env.is_main:
            frames = load_frames(cfg, cfg.validate.split, cfg.validate.images)
            what = f"validate.split={cfg.validate.split!r}"
            refuse_overlap(what, (f.key for f in frames), self.train_frames, cfg.loader.split)
            self.validator = Validator(cfg, data.label_nc, data.use_instance, frames)

    def _load_init(self, generator: Generator, discriminator: nn.Module) -> None:
        previous, spec = load_generator(self.init)
        if previous.hparams != generator.hparams:
            raise ConfigError(
                f"{self.init} holds generator {previous.hparams} (label_nc={spec.get('label_nc')}, "
                f"use_instance={spec.get('use_instance')}) but phase {self.phase} builds {generator.hparams}"
            )
        generator.load_state_dict(previous.state_dict())
        if generator.residual and int(spec.get("phase", 0)) == 1:
            zero_correction(generator)  # phase 1 never trains it; phase 2 starts at the codec regardless
        d_file = self.init.parent / DISCRIMINATOR_FILE
        if d_file.is_file():
            try:
                discriminator.load_state_dict(load_file(str(d_file)))
            except RuntimeError as err:
                raise ConfigError(f"{d_file} does not fit the configured discriminator: {err}") from err
            _say(self.env, f"phase {self.phase}: G from {self.init}, D from {d_file}")
        else:
            _say(
                self.env,
                f"phase {self.phase}: G from {self.init}; no {d_file.name} beside it, D starts fresh",
            )

    # ---- one step ---------------------------------------------------------------------------------

    def _micro_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        g_engine, d_engine, d_net = (
            self.engines.generator,
            self.engines.discriminator,
            self.engines.discriminator_net,
        )
        x = step_inputs(self.cfg, self.phase_cfg, self.data, batch, self.env.device, self.engines.dtype)
        fake, terms = generator_terms(g_engine, d_net, d_net, self.losses, x)
        g_engine.backward(terms["g_total"])
        g_engine.step()
        if d_engine is not None:
            d_terms = discriminator_terms(d_engine, d_net, x, fake, self.cfg.loss.gan_mode)
            d_engine.backward(d_terms["d_total"])
            d_engine.step()
            terms.update(d_terms)
        return {k: v.detach() for k, v in terms.items()}

    def _train_step(self) -> dict[str, Tensor]:
        """One optimizer step of both engines (``gradient_accumulation_steps`` micro-batches)."""
        totals: dict[str, Tensor] = {}
        for _ in range(self.accumulation):
            batch = self.batches.next()
            self.samples += len(batch["key"])
            for key, value in self._micro_step(batch).items():
                totals[key] = totals.get(key, 0) + value / self.accumulation
        return totals

    # ---- checkpoints --------------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        root = self.out / CHECKPOINTS
        tag = f"phase{self.phase}-step{self.step:08d}"
        path = root / tag
        if self.env.is_main and path.exists():
            shutil.rmtree(path)  # an incomplete save of an earlier attempt
        barrier()
        self.engines.generator.save_checkpoint(str(path), tag="generator", save_latest=False)
        if self.engines.discriminator is not None:
            self.engines.discriminator.save_checkpoint(str(path), tag="discriminator", save_latest=False)
        # Ranks read different numbers of batches per epoch: each keeps its own data position.
        position = {
            "epoch": self.batches.epoch,
            "batches_in_epoch": self.batches.in_epoch,
            "samples": self.samples,
        }
        torch.save({**_rng_state(), "data": position}, path / f"rng_rank{self.env.rank}.pt")
        digests = [None] * self.env.world_size
        dist.all_gather_object(digests, params_digest(self.engines.generator.module))
        samples = self._all_samples()
        barrier()
        if self.env.is_main:
            if len(set(digests)) > 1:
                _say(
                    self.env,
                    f"WARNING: generator replicas differ across ranks at step {self.step}: {digests}",
                )
            if self.best_weights is not None:
                _save_tensors_atomic(path / BEST_FILE, self.best_weights)
            state = {
                "phase": self.phase,
                "step": self.step,
                "stopped_early": self.stopped_early,
                "validation": {**self.best, "bad_validations": self.bad_validations}
                if self.validating
                else None,
                "epoch": self.batches.epoch,
                "batches_in_epoch": self.batches.in_epoch,
                "samples_seen": samples,
                "world_size": self.env.world_size,
                "config_digest": self.cfg.digest(),
                "training_digest": self.cfg.training_digest(),
                "generator_sha256": digests,
                "time": time.time(),
            }
            _write_atomic(path / STATE_FILE, json.dumps(state, indent=2))
            self._point_latest(root, tag)
        barrier()
        self.saved_step = self.step
        self.last_log = (time.perf_counter(), samples)  # samples/s leaves checkpointing out

    def _point_latest(self, root: Path, tag: str) -> None:
        """Name ``tag`` the newest complete checkpoint, then drop the ones beyond ``keep_checkpoints``."""
        pointer = root / LATEST
        history = json.loads(pointer.read_text()).get("history", []) if pointer.is_file() else []
        history = [t for t in history if t != tag] + [tag]
        _write_atomic(
            pointer, json.dumps({"tag": tag, "phase": self.phase, "step": self.step, "history": history})
        )
        keep = self.cfg.train.keep_checkpoints
        if keep > 0 and len(history) > keep:
            for old in history[:-keep]:
                shutil.rmtree(root / old, ignore_errors=True)
            _write_atomic(
                pointer,
                json.dumps({"tag": tag, "phase": self.phase, "step": self.step, "history": history[-keep:]}),
            )

    def _load_checkpoint(self, ckpt: Checkpoint) -> None:
        state = ckpt.state
        self.engines.generator.load_checkpoint(str(ckpt.path), tag="generator")
        if self.engines.discriminator is not None:
            self.engines.discriminator.load_checkpoint(str(ckpt.path), tag="discriminator")
        self.step = self.saved_step = int(state["step"])
        validation = state.get("validation") or {}
        if self.validating and self.env.is_main and validation.get("step") is not None:
            self.bad_validations = int(validation.pop("bad_validations", 0))
            self.best = validation
            self.best_weights = load_file(str(ckpt.path / BEST_FILE))
        rng_file = ckpt.path / f"rng_rank{self.env.rank}.pt"
        if state["world_size"] == self.env.world_size and rng_file.is_file():
            rank_state = torch.load(rng_file, weights_only=True)
            _set_rng_state(rank_state)
            position = rank_state["data"]
            self.batches = Batches(
                self.cfg, self.env, self.phase, position["epoch"], position["batches_in_epoch"]
            )
            self.samples = int(position["samples"])
        else:
            _say(
                self.env,
                f"checkpoint written by {state['world_size']} ranks: data order and RNG start afresh",
            )
            seed_everything(self.cfg.train.seed + self.env.rank + self.step)
            self.batches = Batches(self.cfg, self.env, self.phase, state["epoch"] + 1)
            self.samples = int(state["samples_seen"]) // self.env.world_size
        _say(self.env, f"resuming phase {self.phase} at step {self.step} from {ckpt.path}")

    # ---- the phase ------------------------------------------------------------------------------------

    def _due(self, every: int) -> bool:
        """Whether something done every ``every`` steps (0: only at the end) is due at this step."""
        return self.step == self.phase_cfg.steps or (every > 0 and self.step % every == 0)

    def _all_samples(self) -> int:
        """Samples consumed by all ranks in this phase (a collective: every rank must call it)."""
        samples = torch.tensor(self.samples, dtype=torch.int64, device=self.env.device)
        dist.all_reduce(samples)
        return int(samples)

    def _log(self, metrics: dict[str, Tensor]) -> None:
        """Rank means of the step's losses and the samples/s of all ranks since the last log line."""
        names = sorted(metrics)
        values = torch.stack([metrics[n].float() for n in names]).to(self.env.device)
        dist.all_reduce(values)
        values = (values / self.env.world_size).cpu()
        samples = self._all_samples()
        elapsed = max(time.perf_counter() - self.last_log[0], 1e-9)
        logged = {n: float(v) for n, v in zip(names, values, strict=True)}
        logged["samples_per_s"] = (samples - self.last_log[1]) / elapsed
        logged["lr"] = float(self.engines.generator.get_lr()[0])
        bad = [n for n, v in logged.items() if not np.isfinite(v)]
        if bad:
            raise FloatingPointError(f"phase {self.phase} step {self.step}: non-finite {bad}: {logged}")
        if self.env.is_main:
            if self._due(self.cfg.tracking.log_every):
                self.tracker.log_metrics(logged, step=self.step)
            if self._due(self.cfg.train.log_every):
                self.bar.set_postfix({n: f"{v:.3g}" for n, v in logged.items()}, refresh=False)
                _say(
                    self.env,
                    f"phase {self.phase} step {self.step} "
                    + " ".join(f"{n}={v:.4g}" for n, v in logged.items()),
                )
        self.last_log = (time.perf_counter(), samples)

    def _validate(self) -> None:
        """Score the generator on the held-out frames (rank 0), keep the best, agree on an early stop."""
        stop = False
        if self.env.is_main:
            assert self.validator is not None
            metric = self.cfg.validate.metric
            scores = self.validator(self.engines.generator.module)
            if improves(scores[metric], self.best.get("value"), metric, self.cfg.validate.min_delta):
                self.best = {"step": self.step, "metric": metric, "value": scores[metric], "scores": scores}
                self.best_weights = {
                    k: v.detach().float().cpu().clone()
                    for k, v in self.engines.generator.module.state_dict().items()
                }
                self.bad_validations = 0
            else:
                self.bad_validations += 1
            patience = self.cfg.validate.patience
            stop = patience > 0 and self.bad_validations >= patience
            self.tracker.log_metrics(
                {**{f"val_{k}": v for k, v in scores.items()}, "val_best_step": float(self.best["step"])},
                step=self.step,
            )
            self.bar.set_postfix(
                {"val_dPSNR": f"{scores['delta_psnr']:+.3f}", "best_step": self.best["step"]}, refresh=False
            )
            _say(
                self.env,
                f"phase {self.phase} step {self.step} validation on {len(self.validator.keys)} "
                f"{self.cfg.validate.split} frames: PSNR {scores['psnr']:.3f} dB "
                f"({scores['delta_psnr']:+.3f} vs codec), MS-SSIM {scores['ms_ssim']:.5f}, "
                f"NIQE {scores['niqe']:.3f}; best {metric} at step {self.best['step']}"
                + (f"; no improvement in {patience} validations, stopping" if stop else ""),
            )
        decision = [stop]
        dist.broadcast_object_list(decision, src=0)
        self.stopped_early = bool(decision[0])

    def run(self, resume_from: Checkpoint | None = None) -> Path:
        """Train the phase to ``phase.steps`` and return the exported generator file."""
        self._build()
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        else:
            seed_everything(self.cfg.train.seed + self.env.rank)
            self.batches = Batches(self.cfg, self.env, self.phase)
        steps = self.phase_cfg.steps
        self.bar = tqdm(
            total=steps,
            initial=self.step,
            desc=f"phase {self.phase}",
            unit="step",
            disable=not self.env.is_main,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self.last_log = (time.perf_counter(), self._all_samples())
        if self.validating and self.step == 0:
            self._validate()  # the starting point (the codec itself, for a fresh residual G) is a candidate
        while self.step < steps and not self.stopped_early:
            metrics = self._train_step()
            self.step += 1
            self.bar.update(1)
            if self._due(self.cfg.train.log_every) or self._due(self.cfg.tracking.log_every):
                self._log(metrics)
            if self.validating and self._due(self.cfg.validate.every):
                self._validate()
            if self._due(self.cfg.train.checkpoint_every) and self.step < steps and not self.stopped_early:
                self._save_checkpoint()
            if self.on_step is not None:
                self.on_step(StepEvent(self.phase, self.step, steps, self.engines.generator.module, metrics))
        self.bar.close()
        if self.saved_step != self.step:  # the last step (or the early stop) is not checkpointed in the loop
            self._save_checkpoint()
        return self._export()

    def _export(self) -> Path:
        """Export the best validated generator (the last one without validation) and D beside it."""
        folder = phase_dir(self.out, self.phase)
        path = folder / GENERATOR_FILE
        if self.env.is_main:
            extra: dict[str, Any] = {}
            if self.cfg.loader.qualities and self.phase_cfg.visual_input:
                extra["qualities"] = training_qualities(self.cfg)
            generator: nn.Module = self.engines.generator
            if self.best_weights is not None:
                generator = Generator(**self.engines.generator.module.hparams)
                generator.load_state_dict(self.best_weights)
                extra["selected"] = {**self.best, "split": self.cfg.validate.split}
                _say(
                    self.env,
                    f"phase {self.phase}: exporting step {self.best['step']} of {self.step}, the best "
                    f"{self.best['metric']} on {self.cfg.validate.split} "
                    f"({self.best['scores']['delta_psnr']:+.3f} dB PSNR vs the codec)",
                )
            spec = make_spec(
                self.cfg.model,
                self.data.label_nc,
                self.data.use_instance,
                codec=self.cfg.loader.codec,
                quality=self.cfg.loader.quality,
                phase=self.phase,
                steps=self.step,
                train_split=self.cfg.loader.split,
                **extra,
            )
            d_state = {
                k: v.detach().float().cpu().contiguous()
                for k, v in self.engines.discriminator_net.state_dict().items()
            }
            _save_tensors_atomic(folder / DISCRIMINATOR_FILE, d_state)
            export_generator(path, generator, spec, train_frames=self.train_frames)
            _say(self.env, f"phase {self.phase} done: {path}")
        barrier()
        return path


def _as_float(outputs: list[list[Tensor]] | None) -> list[list[Tensor]] | None:
    """Discriminator outputs in float32 for the losses (bf16/fp16 engines compute in half)."""
    if outputs is None:
        return None
    return [[t.float() for t in scale] for scale in outputs]


@dataclass(frozen=True)
class StepInputs:
    """One batch as the GAN step sees it: generator input, its semantic channels, the real image."""

    g_in: Tensor
    semantics: Tensor
    real: Tensor
    synthesis: bool = False  # phase 1: the generator's synthesis head (see pipeline.model.networks.Generator)

    @property
    def real_d(self) -> Tensor:
        return discriminator_input(self.semantics, self.real.to(self.semantics.dtype))


def step_inputs(
    cfg: JobConfig,
    phase_cfg: PhaseConfig,
    data: DatasetInfo,
    batch: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> StepInputs:
    g_in = generator_input(
        batch["label"].to(device),
        batch["edge"].to(device),
        batch["decoded"].to(device),
        label_nc=data.label_nc,
        use_instance=data.use_instance,
        zero_semantics=cfg.model.zero_semantics,
        visual_input=phase_cfg.visual_input,
    ).to(dtype)
    semantic_nc = semantic_channels(data.label_nc, data.use_instance)
    return StepInputs(
        g_in, g_in[:, :semantic_nc], batch["image"].to(device), synthesis=not phase_cfg.visual_input
    )


def generator_terms(
    generator: Callable[[Tensor], Tensor],
    frozen_d: Callable[[Tensor], Any],
    d_net: nn.Module,
    losses: GeneratorLosses,
    x: StepInputs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The fake image and the generator's loss terms, through the discriminator with its gradients off
    (``frozen_d`` calls ``d_net``; DeepSpeed refuses a backward through the D engine inside G's loss)."""
    fake = generator(x.g_in, synthesis=x.synthesis)
    d_net.requires_grad_(False)
    fake_out = frozen_d(discriminator_input(x.semantics, fake)) if losses.needs_fake_outputs else None
    real_out = None
    if losses.needs_real_outputs:
        with torch.no_grad():
            real_out = frozen_d(x.real_d)
    return fake, losses(fake.float(), x.real, _as_float(fake_out), _as_float(real_out))


def discriminator_terms(
    discriminator: Callable[[Tensor], Any], d_net: nn.Module, x: StepInputs, fake: Tensor, gan_mode: str
) -> dict[str, Tensor]:
    """The discriminator's loss terms on the (detached) fake and the real image."""
    d_net.requires_grad_(True)
    d_fake = discriminator(discriminator_input(x.semantics, fake.detach()))
    d_real = discriminator(x.real_d)
    return discriminator_loss(_as_float(d_fake), _as_float(d_real), gan_mode)


def _init_source(cfg: JobConfig, phase: int, phases: list[int], out: Path, env: DistEnv) -> Path | None:
    """Where phase ``phase`` starts from: nothing (phase 1), ``train.init_from`` for the first phase of
    a job that does not start at 1, else the previous phase's export."""
    if phase == 1:
        return None
    if phase == phases[0] and cfg.train.init_from:
        source = Path(cfg.train.init_from).expanduser().resolve()
        if not source.is_file():
            raise ConfigError(f"train.init_from: no such file {source}")
        return source
    source = phase_dir(out, phase - 1) / GENERATOR_FILE
    if not source.is_file() and cfg.model.residual and phase == phases[0]:
        _say(
            env,
            f"phase {phase}: no phase-{phase - 1} export at {source} and no train.init_from; "
            "starting from the identity generator (the residual generator returns the codec's image)",
        )
        return None
    if not source.is_file():
        raise ConfigError(
            f"phase {phase} starts from phase {phase - 1}'s generator, but {source} does not exist; "
            f"train phase {phase - 1} first or set train.init_from=<exported generator>"
        )
    return source


def _phase_params(cfg: JobConfig, phase: int) -> dict[str, Any]:
    """``{"phase2.lr": ..., "phase2.loss.dist": ...}``: the phase's section of the config."""
    return flatten(cfg.to_dict()[f"phase{phase}"], prefix=f"phase{phase}.")


def train(
    cfg: JobConfig,
    phases: list[int],
    resume: bool = False,
    tracker: Tracker | None = None,
    run_name: str | None = None,
    on_step: StepCallback | None = None,
) -> dict[int, Path]:
    """Train ``phases`` (e.g. ``[1, 2, 3]``) in order; return ``{phase: exported generator file}``.

    With ``resume`` the newest complete checkpoint decides where to start: phases before its phase
    are taken as done (their exports must exist), its phase continues from its step. The tracker
    gets one run (``run_name``, default ``cfg.name``) with a nested run per phase. ``on_step`` is
    called after every optimizer step (e.g. to evaluate and report to a hyperparameter search).
    """
    if not phases or phases != sorted(set(phases)) or any(p not in (1, 2, 3) for p in phases):
        raise ConfigError(f"phases must be increasing values out of 1, 2, 3, got {phases}")
    with distributed() as env:
        tracker = tracker if tracker is not None else make_tracker(cfg, rank=env.rank)
        tags = {**run_tags(cfg), "phases": ",".join(map(str, phases)), "world_size": str(env.world_size)}
        with tracker.start_run(run_name or cfg.name, params=cfg.flat(), tags=tags):
            return _train_phases(cfg, phases, resume, tracker, env, on_step)


def _train_phases(
    cfg: JobConfig,
    phases: list[int],
    resume: bool,
    tracker: Tracker,
    env: DistEnv,
    on_step: StepCallback | None = None,
) -> dict[int, Path]:
    out = output_dir(cfg)
    data = dataset_info(cfg)
    latest = read_latest(out) if resume else None
    if latest is not None and latest.state.get("training_digest") != cfg.training_digest():
        raise ConfigError(
            f"{latest.path} was trained under different data, model, loss or optimiser settings; "
            f"resuming (or reusing its exports) would mix the two. Use a new train.output_dir, or delete "
            f"{out / CHECKPOINTS} to start afresh in this one"
        )
    if env.is_main:
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        if not resume:  # a fresh run: the checkpoints of an earlier one are discarded, not left to pile up
            (out / CHECKPOINTS / LATEST).unlink(missing_ok=True)
            for old in (out / CHECKPOINTS).glob("phase*-step*"):
                shutil.rmtree(old, ignore_errors=True)
        elif latest is None:
            _say(env, f"--resume: no complete checkpoint in {out / CHECKPOINTS}, starting afresh")
    barrier()
    exports: dict[int, Path] = {}
    for phase in phases:
        export = phase_dir(out, phase) / GENERATOR_FILE
        done = latest is not None and (
            phase < latest.phase
            or (
                phase == latest.phase
                and (latest.state.get("stopped_early", False) or latest.step >= cfg.phase(phase).steps)
            )
        )
        if done and export.is_file():
            _say(env, f"phase {phase} already complete: {export}")
            exports[phase] = export
            continue
        if latest is not None and phase < latest.phase:
            raise RuntimeError(f"resuming at phase {latest.phase}, but phase {phase}'s {export} is missing")
        start = latest if latest is not None and latest.phase == phase else None
        runner = PhaseRunner(
            cfg, phase, env, tracker, data, _init_source(cfg, phase, phases, out, env), on_step
        )
        with tracker.start_run(f"phase{phase}", params=_phase_params(cfg, phase), tags=run_tags(cfg, phase)):
            exports[phase] = runner.run(resume_from=start)
            if env.is_main:
                tracker.log_artifact(exports[phase], artifact_path=f"phase{phase}")
                _register(cfg, tracker, phase, exports[phase])
    return exports


def _register(cfg: JobConfig, tracker: Tracker, phase: int, export: Path) -> None:
    """Phase 3's generator (and phase 2's, the perception-leaning one, on request) goes to the registry."""
    if not cfg.tracking.register or phase == 1 or (phase == 2 and not cfg.tracking.register_phase2):
        return
    name = registry_name(cfg.loader.codec, cfg.loader.quality, cfg.model.zero_semantics)
    if phase == 2:
        name += "-perceptual"
    uri = tracker.register_generator(export, name, alias=cfg.tracking.alias or None, spec=read_spec(export))
    if uri:
        print(f"[train] registered {uri}" + (f" as @{cfg.tracking.alias}" if cfg.tracking.alias else ""))
