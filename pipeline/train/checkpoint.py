"""Checkpoints of a training phase: what a resume needs, written so that a crash never leaves a
checkpoint that looks complete but is not.

``<output_dir>/checkpoints/phase<N>-step<NNNNNNNN>/`` holds

* ``generator/`` and ``discriminator/``: the DeepSpeed checkpoints of both engines (weights, optimizer,
  scheduler; no ``discriminator/`` in a phase that does not train D), each a DeepSpeed checkpoint folder of
  its own: DeepSpeed's plain-text ``latest`` tag file and the tag's sub-folder, so DeepSpeed's own
  ``engine.load_checkpoint(".../generator")`` loads it (checkpoints written before held both engines' files
  in ``generator/`` and ``discriminator/`` directly, without a tag file; a resume still reads them);
* ``rng_rank<R>.pt``: each rank's RNG states and data position (:meth:`Batches.state_dict`);
* ``trainer_state.json``: phase, step, early stop, the validation state, the config digests and each
  rank's generator digest;
* ``best_generator.safetensors``: the best validated generator so far (when the phase validates).
* ``average_generator.safetensors``: the generator's weight average (with ``train.ema_decay``).

``checkpoints/latest.json`` (``tag``, ``phase``, ``step``, ``history``) names the newest complete one (run
folders written before it was renamed hold it as ``checkpoints/latest``, which is still read: the name that
DeepSpeed gives its own plain-text tag file, so it is no longer written). It
is replaced only after every rank has written its part, so a checkpoint interrupted at any point (even
by SIGKILL) is never named, and a resume starts from the one before. Checkpoints beyond
``train.keep_checkpoints`` are deleted once the pointer has moved on. Every file the pipeline writes
itself here is written atomically (:mod:`pipeline.atomic`).

A resume with the world size of the checkpoint continues bit for bit: same RNG states, same data
position on every rank. With another world size the data order and RNG start afresh (the epoch after
the one rank 0 was in, seeded by the step).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline.atomic import atomic_path, temporary_names, write_atomic
from pipeline.config import JobConfig
from pipeline.train.batches import Batches
from pipeline.train.ema import WeightAverage
from pipeline.train.engine import DistEnv, Engines, barrier, say
from pipeline.train.rng import rng_state, seed_everything, set_rng_state

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
LEGACY_LATEST = "latest"  # the pointer's name before latest.json; read when resuming an old run folder
STATE_FILE = "trainer_state.json"
BEST_FILE = "best_generator.safetensors"  # in a checkpoint: the best validated generator so far
AVERAGE_FILE = "average_generator.safetensors"  # in a checkpoint: the generator's weight average
GENERATOR_DIR, DISCRIMINATOR_DIR = "generator", "discriminator"  # in a checkpoint: each engine's own folder
DEEPSPEED_LATEST = "latest"  # DeepSpeed's tag file in an engine's folder


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint, as ``checkpoints/latest.json`` names it."""

    tag: str
    phase: int
    step: int
    path: Path

    @property
    def state(self) -> dict[str, Any]:
        """Its ``trainer_state.json``."""
        return json.loads((self.path / STATE_FILE).read_text())


@dataclass
class Progress:
    """The training loop's own state, which a checkpoint keeps beside the engines, RNG and data position."""

    step: int = 0
    stopped_early: bool = False
    # rank 0, when the phase validates: the best validation so far (step, metric, value, scores),
    # that step's generator on the CPU, and the validations since without improvement
    best: dict[str, Any] = field(default_factory=dict)
    best_weights: dict[str, Tensor] | None = None
    bad_validations: int = 0


def checkpoint_dir(out: Path) -> Path:
    return out / CHECKPOINTS


def _pointer(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The pointer file under ``root`` and its JSON: ``latest.json``, else an old run's ``latest``."""
    for name in (LATEST, LEGACY_LATEST):
        pointer = root / name
        if pointer.is_file():
            try:
                entry = json.loads(pointer.read_text())
            except json.JSONDecodeError as err:
                raise RuntimeError(f"{pointer} is not a checkpoint pointer (JSON): {err}") from None
            if not isinstance(entry, dict) or "tag" not in entry:
                raise RuntimeError(f"{pointer} is not a checkpoint pointer (no 'tag')")
            return pointer, entry
    return None


def read_latest(out: Path) -> Checkpoint | None:
    """The newest complete checkpoint under ``out`` (the training output folder), or ``None``."""
    found = _pointer(checkpoint_dir(out))
    if found is None:
        return None
    pointer, entry = found
    path = checkpoint_dir(out) / entry["tag"]
    if not (path / STATE_FILE).is_file():
        raise RuntimeError(f"{pointer} names {entry['tag']} but {path / STATE_FILE} is missing")
    return Checkpoint(entry["tag"], int(entry["phase"]), int(entry["step"]), path)


def discard_checkpoints(out: Path) -> None:
    """Remove every checkpoint under ``out`` (a fresh run does not leave an earlier one's to pile up)."""
    root = checkpoint_dir(out)
    for name in (LATEST, LEGACY_LATEST):
        (root / name).unlink(missing_ok=True)
    for old in root.glob("*-step[0-9]*"):
        shutil.rmtree(old, ignore_errors=True)
    for tmp in temporary_names(root, LATEST) + temporary_names(root, LEGACY_LATEST):
        tmp.unlink(missing_ok=True)


def load_engine(engine: DeepSpeedEngine, path: Path, name: str) -> None:
    """Load engine ``name`` (:data:`GENERATOR_DIR`, :data:`DISCRIMINATOR_DIR`) of the checkpoint at ``path``:
    through its own folder's tag file, as DeepSpeed's own ``load_checkpoint(folder)`` does, or, for a
    checkpoint written before each engine had one, as the tag ``name`` of ``path``."""
    own = path / name
    if (own / DEEPSPEED_LATEST).is_file():
        loaded, _ = engine.load_checkpoint(str(own))
    elif any(own.glob("*model_states.pt")):
        loaded, _ = engine.load_checkpoint(str(path), tag=name)
    else:
        loaded = None
    if loaded is None:
        raise RuntimeError(f"no DeepSpeed checkpoint of the {name} in {own}")


def params_digest(module: nn.Module) -> str:
    """SHA-256 of a module's parameters (names and bytes): equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class PhaseCheckpoints:
    """Saves and restores one phase's checkpoints: both engines, every rank's RNG and data position, the
    loop's :class:`Progress`. ``save`` and ``load`` are collectives: every rank calls them.

    The segmenter's training uses it too (:mod:`pipeline.segment.train`): one engine (``generator``, no
    discriminator), its own ``stem`` (tags ``<stem>-step<NNNNNNNN>``) and ``training_digest`` (by default
    ``phase<N>`` and the config's training digest)."""

    def __init__(
        self,
        cfg: JobConfig,
        env: DistEnv,
        out: Path,
        phase: int,
        engines: Engines,
        batches: Batches,
        validating: bool,
        *,
        stem: str = "",
        training_digest: str = "",
        average: WeightAverage | None = None,
    ) -> None:
        self.cfg, self.env, self.root, self.phase = cfg, env, checkpoint_dir(out), phase
        self.average = average
        self.engines, self.batches, self.validating = engines, batches, validating
        self.stem = stem or f"phase{phase}"
        self.training_digest = training_digest or cfg.training_digest()

    def tag(self, step: int) -> str:
        return f"{self.stem}-step{step:08d}"

    def _rng_file(self, path: Path) -> Path:
        return path / f"rng_rank{self.env.rank}.pt"

    def save(self, progress: Progress) -> Checkpoint:
        """Write the checkpoint of ``progress.step`` and name it the newest complete one."""
        tag = self.tag(progress.step)
        path = self.root / tag
        if self.env.is_main and path.exists():
            shutil.rmtree(path)  # an incomplete save of an earlier attempt
        barrier()
        self.engines.generator.save_checkpoint(str(path / GENERATOR_DIR), tag=tag, save_latest=True)
        if self.engines.discriminator is not None:
            self.engines.discriminator.save_checkpoint(
                str(path / DISCRIMINATOR_DIR), tag=tag, save_latest=True
            )
        with atomic_path(self._rng_file(path)) as tmp:
            torch.save({**rng_state(), "data": self.batches.state_dict()}, tmp)
        digests: list[str | None] = [None] * self.env.world_size
        dist.all_gather_object(digests, params_digest(self.engines.generator.module))
        samples = torch.tensor(self.batches.samples, dtype=torch.int64, device=self.env.device)
        dist.all_reduce(samples)
        barrier()
        if self.env.is_main:
            if len(set(digests)) > 1:
                say(
                    self.env,
                    f"WARNING: generator replicas differ across ranks at step {progress.step}: {digests}",
                )
            if progress.best_weights is not None:
                with atomic_path(path / BEST_FILE) as tmp:
                    save_file(progress.best_weights, str(tmp))
            if self.average is not None:
                with atomic_path(path / AVERAGE_FILE) as tmp:
                    save_file(self.average.state_dict(), str(tmp))
            position = self.batches.state_dict()
            state = {
                "phase": self.phase,
                "step": progress.step,
                "stopped_early": progress.stopped_early,
                "validation": {**progress.best, "bad_validations": progress.bad_validations}
                if self.validating
                else None,
                "epoch": position["epoch"],
                "batches_in_epoch": position["batches_in_epoch"],
                "samples_seen": int(samples),
                "world_size": self.env.world_size,
                "config_digest": self.cfg.digest(),
                "training_digest": self.training_digest,
                "generator_sha256": digests,
                "time": time.time(),
            }
            write_atomic(path / STATE_FILE, json.dumps(state, indent=2))
            self._point_latest(tag, progress.step)
        barrier()
        return Checkpoint(tag, self.phase, progress.step, path)

    def _point_latest(self, tag: str, step: int) -> None:
        """Name ``tag`` the newest complete checkpoint, then drop the ones beyond ``keep_checkpoints``."""
        pointer = self.root / LATEST
        found = _pointer(self.root)
        history = found[1].get("history", []) if found is not None else []
        history = [t for t in history if t != tag] + [tag]
        entry = {"tag": tag, "phase": self.phase, "step": step}
        write_atomic(pointer, json.dumps({**entry, "history": history}))
        (self.root / LEGACY_LATEST).unlink(missing_ok=True)  # an old run's pointer, now superseded
        keep = self.cfg.train.keep_checkpoints
        if keep > 0 and len(history) > keep:
            for old in history[:-keep]:
                shutil.rmtree(self.root / old, ignore_errors=True)
            write_atomic(pointer, json.dumps({**entry, "history": history[-keep:]}))

    def load(self, checkpoint: Checkpoint) -> Progress:
        """Restore the engines, RNG states and data position of ``checkpoint``; return its progress."""
        state = checkpoint.state
        load_engine(self.engines.generator, checkpoint.path, GENERATOR_DIR)
        if self.engines.discriminator is not None:
            load_engine(self.engines.discriminator, checkpoint.path, DISCRIMINATOR_DIR)
        progress = Progress(step=int(state["step"]), stopped_early=bool(state.get("stopped_early", False)))
        validation = dict(state.get("validation") or {})
        if self.validating and self.env.is_main and validation.get("step") is not None:
            progress.bad_validations = int(validation.pop("bad_validations", 0))
            progress.best = validation
            progress.best_weights = load_file(str(checkpoint.path / BEST_FILE))
        if self.average is not None:  # every rank: a sweep's callbacks score it on each
            self.average.load_state_dict(load_file(str(checkpoint.path / AVERAGE_FILE)))
        rng_file = self._rng_file(checkpoint.path)
        if state["world_size"] == self.env.world_size and rng_file.is_file():
            rank_state = torch.load(rng_file, weights_only=True)
            self.batches.load_state_dict(rank_state["data"])
            set_rng_state(rank_state)  # last: reopening the data draws from the torch RNG
        else:
            say(
                self.env,
                f"checkpoint written by {state['world_size']} ranks: data order and RNG start afresh",
            )
            seed_everything(self.cfg.train.seed + self.env.rank + progress.step)
            self.batches.load_state_dict(
                {
                    "epoch": int(state["epoch"]) + 1,
                    "batches_in_epoch": 0,
                    "samples": int(state["samples_seen"]) // self.env.world_size,
                }
            )
        if self.env.is_main:
            for tmp in temporary_names(self.root, LATEST):  # a pointer update cut short
                tmp.unlink(missing_ok=True)
        what = f"phase {self.phase}" if self.stem == f"phase{self.phase}" else self.stem
        say(self.env, f"resuming {what} at step {progress.step} from {checkpoint.path}")
        return progress
