"""The three JPD-SE phases on two DeepSpeed engines, the hand-off between phases, and resume.

One phase, as :class:`PhaseRunner` runs it:

1. build G and D (``label_nc`` from the config or the shard manifest), initialise them from the
   previous phase's files, wrap them in DeepSpeed engines (:mod:`pipeline.train.engine`); with
   ``--resume``, load the phase's newest checkpoint (:mod:`pipeline.train.checkpoint`);
2. ``phase.steps`` optimizer steps; each step runs ``gradient_accumulation_steps`` micro-batches of
   a generator update (through the frozen D) followed, when the phase trains D, by a D update
   (:mod:`pipeline.train.gan_step`); then it logs, validates and checkpoints when they are due;
3. checkpoints every ``train.checkpoint_every`` steps and at the end; then the generator alone is
   exported to ``<output_dir>/phase<N>/generator.safetensors`` and D's weights are kept beside it.

Every step's loss terms are watched for NaN and infinity on the device; the watch is read where the
loop syncs anyway (log, validation) and always before a checkpoint or an export is written, so
training stops with a :class:`FloatingPointError` naming the first bad step and no non-finite weights
are ever saved.

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

Resume (``--resume``): the newest complete checkpoint decides where to start; the phases before its
phase are done, its phase continues from its step with the same RNG states and data position.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline.atomic import atomic_path, temporary_names
from pipeline.config import ConfigError, JobConfig, flatten
from pipeline.data.loader import training_qualities
from pipeline.data.manifest import DatasetInfo, dataset_info
from pipeline.data.predicted_labels import build_predicted_labels, check_predicted_labels
from pipeline.data.splits import refuse_overlap
from pipeline.lock import rank0_lock
from pipeline.model.export import (
    export_generator,
    load_generator,
    read_spec,
    read_train_frames,
    weights_sha256,
)
from pipeline.model.losses import GeneratorLosses
from pipeline.model.networks import Generator, build_models, generator_from_state, zero_correction
from pipeline.model.spec import GeneratorSpec, label_source_spec
from pipeline.tracking import Tracker, make_tracker, registry_name, run_tags
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
from pipeline.train.ema import WeightAverage
from pipeline.train.engine import DistEnv, Engines, barrier, build_engines, distributed, progress_bar, say
from pipeline.train.gan_step import FiniteWatch, discriminator_terms, generator_terms, step_inputs
from pipeline.train.preempt import STOP, Preempted
from pipeline.train.rng import seed_everything
from pipeline.train.validation import Validator, improves, load_frames

GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"


@dataclass(frozen=True)
class StepEvent:
    """What ``train(..., on_step=...)`` is called with after every optimizer step, on every rank."""

    phase: int
    step: int
    steps: int  # the phase's total
    generator: nn.Module  # the bare generator network (in training mode; the callback must not step it)
    # what validation scores and the phase exports: the weight average (train.ema_decay), else ``generator``
    scored: nn.Module
    losses: dict[str, Tensor]  # this rank's loss terms of the step


StepCallback = Callable[[StepEvent], None]


def output_dir(cfg: JobConfig) -> Path:
    return Path(cfg.train.output_dir).expanduser().resolve()


def phase_dir(out: Path, phase: int) -> Path:
    return out / f"phase{phase}"


class PhaseRunner:
    """Trains one phase: build, load (resume), steps (train, log, validate, save), export."""

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
        self.progress = Progress()
        self.saved_step = -1
        self.last_log = (0.0, 0)  # (time, samples of all ranks) at the last log line or checkpoint
        self.validating = cfg.validate.every > 0 and self.phase_cfg.visual_input
        self.validator: Validator | None = None
        # what the export records as seen in training: this phase's frames and its starting point's
        inherited = (read_train_frames(init) or []) if init is not None else []
        self.train_frames = tuple(sorted(set(data.train_frames) | set(inherited)))

    def run(self, resume_from: Checkpoint | None = None) -> Path:
        """Train the phase to ``phase.steps`` and return the exported generator file."""
        self._build()
        self._start(resume_from)
        while not self._finished():
            losses = self._train_step()
            self.bar.update(1)
            if self._due(self.cfg.train.log_every) or self._due(self.cfg.tracking.log_every):
                self._log(losses)
            if self.validating and self._due(self.cfg.validate.every):
                self._validate()
            if self._due(self.cfg.train.checkpoint_every) and not self._finished():
                self._save()
            if self.on_step is not None:
                generator = self.engines.generator.module
                event = StepEvent(
                    self.phase, self.progress.step, self.phase_cfg.steps, generator, self._scored(), losses
                )
                self.on_step(event)
            signum = STOP.due(self.progress.step, self.env.device)
            if signum and not self._finished():  # SIGUSR1/SIGTERM: checkpoint before the job is killed
                self.bar.close()
                if self.saved_step != self.progress.step:
                    self._save()
                say(self.env, f"phase {self.phase}: stop signal {signum}, saved step {self.progress.step}")
                raise Preempted(128 + signum)
        self.bar.close()
        if self.saved_step != self.progress.step:  # the last step (or the early stop) is saved here
            self._save()
        return self._export()

    def _start(self, resume_from: Checkpoint | None) -> None:
        """Resume from ``resume_from`` (or seed this rank afresh), open the progress bar, and validate
        the starting point of a fresh phase (the codec itself, for a fresh residual G): it is a candidate."""
        if resume_from is not None:
            self.progress = self.checkpoints.load(resume_from)
            self.saved_step = self.progress.step
        else:
            seed_everything(self.cfg.train.seed + self.env.rank)
        self.bar = progress_bar(self.env, self.phase_cfg.steps, self.progress.step, f"phase {self.phase}")
        self.last_log = (time.perf_counter(), all_samples(self.batches))
        if self.validating and self.progress.step == 0:
            self._validate()

    # ---- building -------------------------------------------------------------------------------

    def _build(self) -> None:
        cfg, data = self.cfg, self.data
        seed_everything(cfg.train.seed + self.phase)  # identical initial weights on every rank
        generator, discriminator = build_models(cfg.model, data.class_nc, data.use_instance)
        generator.set_stochastic_depth(cfg.train.stochastic_depth)
        if self.init is not None:
            self._load_init(generator, discriminator)
        self.engines: Engines = build_engines(generator, discriminator, cfg, self.phase_cfg, self.env)
        self.losses = GeneratorLosses.from_config(self.phase_cfg.loss, cfg.loss, cfg.model).to(
            self.env.device
        )
        self.accumulation = self.engines.generator.gradient_accumulation_steps()
        decay = cfg.train.ema_decay
        self.average = WeightAverage(self.engines.generator.module, decay) if decay > 0 else None
        self.batches = Batches(cfg, self.env, self.phase)
        self.watch = FiniteWatch()
        self.checkpoints = PhaseCheckpoints(
            cfg,
            self.env,
            self.out,
            self.phase,
            self.engines,
            self.batches,
            self.validating,
            average=self.average,
        )
        if self.validating and self.env.is_main:
            frames = load_frames(cfg, cfg.validate.split, cfg.validate.images)
            what = f"validate.split={cfg.validate.split!r}"
            refuse_overlap(what, (f.key for f in frames), self.train_frames, cfg.loader.split)
            self.validator = Validator(cfg, data, frames)

    def _load_init(self, generator: Generator, discriminator: nn.Module) -> None:
        assert self.init is not None
        previous, spec = load_generator(self.init)
        if previous.hparams != generator.hparams:
            raise ConfigError(
                f"{self.init} holds generator {previous.hparams} (label_nc={spec.label_nc}, "
                f"use_instance={spec.use_instance}) but phase {self.phase} builds {generator.hparams}"
            )
        if spec.label_classes != self.data.label_classes:
            raise ConfigError(
                f"{self.init} was trained on semantic_classes={spec.semantic_classes or 'labels'} but phase "
                f"{self.phase} maps the label ids to {self.data.label_classes or 'themselves'}; train every "
                "phase with the same model.semantic_classes"
            )
        generator.load_state_dict(previous.state_dict())
        if generator.residual and spec.phase == 1:
            zero_correction(generator)  # phase 1 never trains it; phase 2 starts at the codec regardless
        d_file = self.init.parent / DISCRIMINATOR_FILE
        if d_file.is_file():
            try:
                discriminator.load_state_dict(load_file(str(d_file)))
            except RuntimeError as err:
                raise ConfigError(f"{d_file} does not fit the configured discriminator: {err}") from err
            say(self.env, f"phase {self.phase}: G from {self.init}, D from {d_file}")
        else:
            say(
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
        """One optimizer step of both engines (``gradient_accumulation_steps`` micro-batches); returns
        this rank's loss terms, averaged over the micro-batches. No host sync: the terms stay on the
        device, and the watch for non-finite ones too."""
        totals: dict[str, Tensor] = {}
        for _ in range(self.accumulation):
            for key, value in self._micro_step(self.batches.next()).items():
                totals[key] = totals.get(key, 0) + value / self.accumulation
        self.progress.step += 1
        if self.average is not None:
            self.average.update(self.engines.generator.module, self.progress.step)
        self.watch.observe(self.progress.step, totals)
        return totals

    def _scored(self) -> nn.Module:
        """The generator validation scores and the phase exports: the weight average, when there is one."""
        return self.average.module if self.average is not None else self.engines.generator.module

    # ---- around the steps -------------------------------------------------------------------------

    def _finished(self) -> bool:
        return self.progress.step >= self.phase_cfg.steps or self.progress.stopped_early

    def _due(self, every: int) -> bool:
        return due(self.progress.step, self.phase_cfg.steps, every)

    def _log(self, losses: dict[str, Tensor]) -> None:
        """Rank means of the step's losses and the samples/s of all ranks since the last log line."""
        self.watch.check(self.phase)
        names = sorted(losses)
        values = torch.stack([losses[n].float() for n in names]).to(self.env.device)
        dist.all_reduce(values)
        values = (values / self.env.world_size).cpu()
        samples = all_samples(self.batches)
        elapsed = max(time.perf_counter() - self.last_log[0], 1e-9)
        logged = {n: float(v) for n, v in zip(names, values, strict=True)}
        logged["samples_per_s"] = (samples - self.last_log[1]) / elapsed
        logged["lr"] = float(self.engines.generator.get_lr()[0])
        step = self.progress.step
        if self.env.is_main:
            if self._due(self.cfg.tracking.log_every):
                self.tracker.log_metrics(logged, step=step)
            if self._due(self.cfg.train.log_every):
                self.bar.set_postfix({n: f"{v:.3g}" for n, v in logged.items()}, refresh=False)
                say(
                    self.env,
                    f"phase {self.phase} step {step} " + " ".join(f"{n}={v:.4g}" for n, v in logged.items()),
                )
        self.last_log = (time.perf_counter(), samples)

    def _validate(self) -> None:
        """Score the generator on the held-out frames (rank 0), keep the best, agree on an early stop."""
        self.watch.check(self.phase)
        stop = self._score() if self.env.is_main else False
        decision = [stop]
        dist.broadcast_object_list(decision, src=0)
        self.progress.stopped_early = bool(decision[0])

    def _score(self) -> bool:
        """Rank 0's part of :meth:`_validate`; returns whether the phase is to stop early."""
        assert self.validator is not None
        progress, metric = self.progress, self.cfg.validate.metric
        scores = self.validator(self._scored())
        if improves(scores[metric], progress.best.get("value"), metric, self.cfg.validate.min_delta):
            progress.best = {
                "step": progress.step,
                "metric": metric,
                "value": scores[metric],
                "scores": scores,
            }
            progress.best_weights = {
                k: v.detach().float().cpu().clone() for k, v in self._scored().state_dict().items()
            }
            progress.bad_validations = 0
        else:
            progress.bad_validations += 1
        patience = self.cfg.validate.patience
        stop = patience > 0 and progress.bad_validations >= patience
        self.tracker.log_metrics(
            {**{f"val_{k}": v for k, v in scores.items()}, "val_best_step": float(progress.best["step"])},
            step=progress.step,
        )
        self.bar.set_postfix(
            {"val_dPSNR": f"{scores['delta_psnr']:+.3f}", "best_step": progress.best["step"]}, refresh=False
        )
        say(
            self.env,
            f"phase {self.phase} step {progress.step} validation on {len(self.validator.keys)} "
            f"{self.cfg.validate.split} frames: PSNR {scores['psnr']:.3f} dB "
            f"({scores['delta_psnr']:+.3f} vs codec), MS-SSIM {scores['ms_ssim']:.5f}, "
            f"NIQE {scores['niqe']:.3f}; best {metric} at step {progress.best['step']}"
            + (f"; no improvement in {patience} validations, stopping" if stop else ""),
        )
        return stop

    def _save(self) -> None:
        """Checkpoint the step (never one with non-finite losses)."""
        self.watch.check(self.phase)
        self.checkpoints.save(self.progress)
        self.saved_step = self.progress.step
        self.last_log = (time.perf_counter(), all_samples(self.batches))  # samples/s leaves checkpointing out

    def _export(self) -> Path:
        """Export the best validated generator (the last one without validation) and D beside it."""
        self.watch.check(self.phase)
        folder = phase_dir(self.out, self.phase)
        path = folder / GENERATOR_FILE
        if self.env.is_main:
            extra: dict[str, Any] = {}
            if self.cfg.loader.qualities and self.phase_cfg.visual_input:
                extra["qualities"] = training_qualities(self.cfg)
            generator: nn.Module = self.engines.generator if self.average is None else self.average.module
            best = self.progress.best
            if self.progress.best_weights is not None:
                hparams = self.engines.generator.module.hparams
                generator = generator_from_state(hparams, self.progress.best_weights)
                extra["selected"] = {**best, "split": self.cfg.validate.split}
                say(
                    self.env,
                    f"phase {self.phase}: exporting step {best['step']} of {self.progress.step}, the best "
                    f"{best['metric']} on {self.cfg.validate.split} "
                    f"({best['scores']['delta_psnr']:+.3f} dB PSNR vs the codec)",
                )
            spec = GeneratorSpec.from_config(
                self.cfg.model,
                self.data.label_nc,
                self.data.use_instance,
                label_classes=self.data.label_classes,
                codec=self.cfg.loader.codec,
                codec_options=self.data.decode_options,
                quality=self.cfg.loader.quality,
                phase=self.phase,
                steps=self.progress.step,
                train_split=self.cfg.loader.split,
                **label_source_spec(self.cfg),
                **extra,
            )
            d_state = {
                k: v.detach().float().cpu().contiguous()
                for k, v in self.engines.discriminator_net.state_dict().items()
            }
            with atomic_path(folder / DISCRIMINATOR_FILE) as tmp:
                save_file(d_state, str(tmp))
            export_generator(path, generator, spec, train_frames=self.train_frames)
            say(self.env, f"phase {self.phase} done: {path}")
        barrier()
        return path


def remove_export_temporaries(out: Path) -> list[Path]:
    """Remove what a killed export left in the phase folders (the atomic writes' temporary files); the
    caller holds the lock of ``out``, so no other writer's file is among them."""
    removed = []
    for phase in (1, 2, 3):
        for name in (GENERATOR_FILE, DISCRIMINATOR_FILE, REGISTERED_FILE):
            for tmp in temporary_names(phase_dir(out, phase), name):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


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
        say(
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
    check_registration_settings(cfg, phases)
    with distributed() as env, rank0_lock(output_dir(cfg), "training", env.is_main), STOP.installed():
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
            f"{checkpoint_dir(out)} to start afresh in this one"
        )
    if env.is_main:
        checkpoint_dir(out).mkdir(parents=True, exist_ok=True)
        remove_export_temporaries(out)
        if not resume:
            discard_checkpoints(out)
        elif latest is None:
            say(env, f"--resume: no complete checkpoint in {checkpoint_dir(out)}, starting afresh")
        build_predicted_labels(cfg)
    barrier()
    check_predicted_labels(cfg)
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
            say(env, f"phase {phase} already complete: {export}")
            exports[phase] = export
            if env.is_main and not _registered(cfg, phase, export):  # killed between export and registry
                say(env, f"phase {phase}: its export was never registered; registering it now")
                tracker.log_artifact(export, artifact_path=f"phase{phase}")
                _register(cfg, tracker, phase, export)
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


def _registered_name(cfg: JobConfig, phase: int) -> str | None:
    """The registered-model name of the phase's export; None when it is not registered. Phase 3's
    generator (and phase 2's, the perception-leaning one, on request) goes to the registry."""
    tracking = cfg.tracking
    wanted = phase == 3 or (phase == 2 and tracking.register_phase2)
    if not (tracking.enabled and tracking.register and wanted):
        return None
    qualities = training_qualities(cfg) if cfg.phase(phase).visual_input else [cfg.loader.quality]
    name = registry_name(cfg.loader.codec, qualities, cfg.model.zero_semantics, cfg.data.label_source)
    return name + "-perceptual" if phase == 2 else name


def check_registration_settings(cfg: JobConfig, phases: list[int]) -> None:
    """Refuse a registered-model name or ``tracking.alias`` the registry would refuse, before training."""
    for phase in phases:
        name = _registered_name(cfg, phase)
        if name is not None:
            try:
                check_names(name, cfg.tracking.alias or None)
            except ValueError as err:
                raise ConfigError(f"tracking.alias / registered model of phase {phase}: {err}") from None


def _registered(cfg: JobConfig, phase: int, export: Path) -> bool:
    """Whether the export is registered as the config asks (its ``registered.json`` marker names it), or
    need not be."""
    name = _registered_name(cfg, phase)
    if name is None:
        return True
    return is_registered(export, name, cfg.tracking.alias or None, weights_sha256(export))


def _register(cfg: JobConfig, tracker: Tracker, phase: int, export: Path) -> None:
    """Register the phase's export (see :func:`_registered_name`); the ``registered.json`` marker beside
    it completes the phase, so a job killed before it registers on ``--resume``."""
    name = _registered_name(cfg, phase)
    if name is None:
        return
    alias = cfg.tracking.alias or None
    uri = tracker.register_generator(export, name, alias=alias, spec=read_spec(export))
    if uri:
        print(f"[train] registered {uri}" + (f" as @{alias}" if alias else ""))
        mark_registered(export, uri, name, alias, weights_sha256(export))
