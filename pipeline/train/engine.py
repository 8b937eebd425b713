"""Distributed set-up and the DeepSpeed engines: the generator's two (generator, discriminator) and the
segmenter's one (:mod:`pipeline.segment.train`).

The entry point is launcher-agnostic: ``torchrun``, the ``deepspeed`` launcher (with
``--no_local_rank``) and ``srun`` + ``torchrun`` all export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
a plain ``python -m pipeline train`` has none of them and becomes a world of one.

DeepSpeed is imported lazily, after :func:`init_distributed` has chosen its accelerator
(``DS_ACCELERATOR=cpu`` without CUDA, so DeepSpeed does not guess and warn). On CPU, DeepSpeed's
first process group JIT-compiles its shared-memory collective op into the torch extensions cache
(``~/.cache/torch_extensions``; about half a minute once per machine).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from pipeline.config import ConfigError, JobConfig, PhaseConfig, resolve_path

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Engines:
    """The generator engine, the discriminator engine (``None`` when the phase does not train D) and
    the bare discriminator network that the generator step runs (frozen there, no DeepSpeed hooks)."""

    generator: DeepSpeedEngine
    discriminator: DeepSpeedEngine | None
    discriminator_net: nn.Module
    dtype: torch.dtype


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistEnv:
    """Join the launcher's process group (gloo on CPU, NCCL on GPU) or make a world of one.

    Idempotent: a second call in the same process returns the same world.
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    launched = all(var in os.environ for var in ("RANK", "WORLD_SIZE"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # DeepSpeed's engine reads LOCAL_RANK from the environment even in a single process.
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")

    import deepspeed

    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if launched:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        else:
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
                verbose=False,
            )
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


@contextlib.contextmanager
def distributed() -> Iterator[DistEnv]:
    """:func:`init_distributed` for the duration of a block; a process group created here is torn
    down at its end (one the caller had set up is left alone), so training can run again in the
    same process and other code never sees a stale world of one.

    On a normal exit the ranks leave together (a barrier) before the group is torn down, so that no
    rank closes its connections while another is still working (rank 0 registering a model): a gloo
    rank torn down under a live peer can abort at exit. After an error there is no barrier; the
    launcher stops the other ranks."""
    created = not dist.is_initialized()
    env = init_distributed()
    try:
        yield env
        if created and env.world_size > 1:
            dist.barrier()
    finally:
        if created and dist.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def progress_bar(env: DistEnv, total: int, initial: int, desc: str) -> tqdm:
    """The steps' progress bar, drawn on rank 0 only; ``TQDM_DISABLE=1`` turns it off there too (for logs
    written to files, where the ``[train]`` lines say it all)."""
    shown: dict[str, Any] = {} if env.is_main else {"disable": True}
    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, **shown
    )


def say(env: DistEnv, message: str) -> None:
    """Print ``[train] message`` once, on rank 0 (above a progress bar, if one is drawn)."""
    if env.is_main:
        tqdm.write(f"[train] {message}", file=sys.stdout)
        sys.stdout.flush()


def read_deepspeed_config(setting: str, device: torch.device, key: str) -> dict[str, Any]:
    """The DeepSpeed JSON file ``setting`` (config key ``key``), checked for what every engine here needs
    (ZeRO stage 0-2: the bare networks need whole parameters; fp16/bf16 only on a GPU), without its
    ``train_batch_size`` (the micro-batch is the loader's batch size)."""
    path = resolve_path(setting)
    if not path.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from err
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: top level must be an object")
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage > 2:
        raise ConfigError(
            f"{path}: ZeRO stage {stage} is not supported (the generator step runs the bare "
            "discriminator, which needs whole parameters); use stage 0, 1 or 2"
        )
    if device.type == "cpu" and (ds.get("fp16", {}).get("enabled") or ds.get("bf16", {}).get("enabled")):
        raise ConfigError(
            f"{path}: fp16/bf16 engines need a GPU; use configs/deepspeed/zero0_fp32.json on CPU"
        )
    ds.pop("train_batch_size", None)
    return ds


def deepspeed_config(cfg: JobConfig, phase_cfg: PhaseConfig, device: torch.device) -> dict[str, Any]:
    """``cfg.train.deepspeed_config`` with the job's batch size and the phase's Adam settings.

    The optimizer is pix2pixHD's: Adam without weight decay (DeepSpeed's "Adam" otherwise means AdamW
    with decay 0.01). On CPU it is ``torch.optim.Adam`` (``torch_adam``), DeepSpeed's fused kernels
    being CUDA-only.
    """
    ds = read_deepspeed_config(cfg.train.deepspeed_config, device, "train.deepspeed_config")
    ds["train_micro_batch_size_per_gpu"] = cfg.loader.batch_size
    optimizer = ds.setdefault("optimizer", {"type": "Adam", "params": {}})
    params = optimizer.setdefault("params", {})
    params.update(lr=phase_cfg.lr, betas=list(cfg.train.betas))
    if optimizer.get("type", "").lower() == "adam":
        params.setdefault("weight_decay", 0.0)
        params.setdefault("adam_w_mode", False)
    if device.type == "cpu":
        params["torch_adam"] = True
    if phase_cfg.lr_schedule == "cosine":
        if "scheduler" in ds:
            raise ConfigError(
                f"{resolve_path(cfg.train.deepspeed_config)} has a scheduler of its own; "
                "drop it or set lr_schedule: constant"
            )
        ds["scheduler"] = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(phase_cfg.steps, 2),
                "warmup_num_steps": phase_cfg.cosine_warmup,
                "warmup_min_ratio": 0.0,
                "warmup_type": "linear",
                "cos_min_ratio": 0.0,
            },
        }
    return ds


def autocast_dtype(ds: dict[str, Any], device_type: str = "cpu") -> torch.dtype | None:
    """The dtype a DeepSpeed config's ``torch_autocast`` section runs the engine's forward pass in on
    ``device_type`` (the parameters, gradients and optimizer staying fp32), or ``None`` when it does not
    autocast."""
    from deepspeed.runtime.config import get_torch_autocast_dtype, get_torch_autocast_enabled

    if not get_torch_autocast_enabled(ds):
        return None
    return get_torch_autocast_dtype(ds) or torch.get_autocast_dtype(device_type)


def engine_dtype(engine: DeepSpeedEngine) -> torch.dtype:
    """The dtype the engine's module computes in (its inputs must be cast to it)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def initialize_engine(module: nn.Module, config: dict[str, Any]) -> DeepSpeedEngine:
    """``module`` in a DeepSpeed engine of ``config`` (its trainable parameters optimised)."""
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=copy.deepcopy(config))
    return engine


def build_engines(
    generator: nn.Module,
    discriminator: nn.Module,
    cfg: JobConfig,
    phase_cfg: PhaseConfig,
    env: DistEnv | None = None,
) -> Engines:
    """Wrap both networks in DeepSpeed engines with the phase's learning rate.

    When the phase does not train the discriminator (phase 3), D gets no engine and no optimizer
    state: it is frozen, in eval mode, on the generator's device and dtype.
    """
    env = env or init_distributed()
    config = deepspeed_config(cfg, phase_cfg, env.device)
    g_engine = initialize_engine(generator, config)
    dtype = engine_dtype(g_engine)
    if phase_cfg.train_discriminator:
        d_engine = initialize_engine(discriminator, config)
        return Engines(g_engine, d_engine, d_engine.module, dtype)
    discriminator.requires_grad_(False)
    discriminator.eval()
    return Engines(g_engine, None, discriminator.to(env.device, dtype), dtype)
