"""Training-step benchmark: DeepSpeed engines vs a plain PyTorch loop (issue: DeepSpeed overhead, MFU).

Times the same phase-2 step (G update on GAN + feature matching + distortion, plus VGG when its
weights are at hand, then the D update) two ways, in one process, on the same model, weights and data:

  plain      torch.optim.Adam per network with the DeepSpeed config's lr, betas, weight decay and
             gradient clipping; zero_grad / backward / clip / step;
  DeepSpeed  the trainer's own step, ``PhaseRunner._train_step`` over the engines of
             ``pipeline.train.engine.build_engines`` (engine.backward / engine.step): the number is the
             real trainer's, with checkpointing, logging and the data loader left out.

Shards are built once into a temporary folder (or ``--shards DIR`` reuses a built folder); a fixed
list of batches is read into memory on the target device first, so neither loop pays for data
loading and both see the same batches in the same order. Both loops warm up, then run ``--repeats``
timed blocks of ``--steps`` steps, alternating which loop goes first; the table gives the median
samples/s of each, the ratio and the DeepSpeed overhead (goal <= 15% on CPU). Model FLOPs per step
are counted on one plain step with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
matmuls, forward and backward); with ``--peak-tflops`` the table also gives the model FLOPs
utilisation. With ``--bf16`` the DeepSpeed side uses a bf16 engine and the plain side autocast.

Usage:
  python bench/bench_train.py                                      # CPU, small preset, zero0_fp32
  python bench/bench_train.py --device cuda --preset full --bf16 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import REPO_ROOT, JobConfig, load_config
from pipeline.data.loader import make_dataset
from pipeline.data.manifest import DatasetInfo, dataset_info
from pipeline.data.shards import build_shards
from pipeline.model.losses import GeneratorLosses, default_vgg19_path
from pipeline.model.networks import build_models
from pipeline.tracking import Tracker
from pipeline.train.engine import deepspeed_config, distributed
from pipeline.train.gan_step import discriminator_terms, generator_terms, step_inputs
from pipeline.train.rng import seed_everything
from pipeline.train.trainer import PhaseRunner

PHASE = 2
FULL_CONFIG = REPO_ROOT / "configs" / "cityscapes_full.yaml"
DS_FP32 = "configs/deepspeed/zero0_fp32.json"
DS_BF16 = "configs/deepspeed/zero1_bf16.json"


def _config(args: argparse.Namespace, shards: Path, out: Path, vgg: float) -> JobConfig:
    """The small preset (``configs/default.yaml``, 512x256, crop 128x256, batch 2) or the full one
    (``configs/cityscapes_full.yaml``, 1024x512, crop 512x1024, batch 1), on the Cityscapes sample."""
    overrides = [
        f"data.root={args.root}",
        "data.splits=[val]",
        "loader.split=val",
        "loader.codec=hevc",
        f"loader.quality={args.quality}",
        f"shards.output={shards}",
        f"shards.codecs=[{{name: hevc, qualities: [{args.quality}]}}]",
        f"shards.workers={args.workers}",
        f"train.output_dir={out}",
        f"train.deepspeed_config={args.ds_config or (DS_BF16 if args.bf16 else DS_FP32)}",
        f"phase{PHASE}.loss.vgg={vgg}",
        f"loss.vgg_weights={args.vgg_weights}",
    ]
    if args.batch_size:
        overrides.append(f"loader.batch_size={args.batch_size}")
    return load_config(FULL_CONFIG if args.preset == "full" else None, overrides)


def _preload(cfg: JobConfig, count: int, device: torch.device) -> list[dict[str, Any]]:
    """``count`` training batches (crop + flip as in training), on ``device``; epochs repeat as needed."""
    batches: list[dict[str, Any]] = []
    epoch = 0
    while len(batches) < count:
        before = len(batches)
        for batch in make_dataset(cfg, train=True, seed=epoch):
            batches.append({k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()})
            if len(batches) == count:
                break
        if len(batches) == before:
            raise RuntimeError(f"no training batches in {cfg.shards.output}")
        epoch += 1
    return batches


class Cycle:
    """The preloaded batches, round and round (stands in for the trainer's ``Batches``)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches, self.index = batches, 0

    def next(self) -> dict[str, Any]:
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch


class PlainLoop:
    """The trainer's phase step written against bare modules and ``torch.optim.Adam``."""

    def __init__(
        self, cfg: JobConfig, data: DatasetInfo, device: torch.device, ds: dict[str, Any], bf16: bool
    ) -> None:
        if int(ds.get("gradient_accumulation_steps", 1)) != 1:
            raise SystemExit(
                "the plain loop does one micro-batch per step: use gradient_accumulation_steps 1"
            )
        self.cfg, self.data, self.device = cfg, data, device
        self.phase_cfg = cfg.phase(PHASE)
        seed_everything(cfg.train.seed + PHASE)  # what PhaseRunner._build does: same initial weights
        generator, discriminator = build_models(cfg.model, data.class_nc, data.use_instance)
        self.generator, self.discriminator = generator.to(device), discriminator.to(device)
        self.losses = GeneratorLosses.from_config(self.phase_cfg.loss, cfg.loss, cfg.model).to(device)
        params = ds["optimizer"]["params"]
        adam = {"lr": params["lr"], "betas": tuple(params["betas"]), "weight_decay": params["weight_decay"]}
        if device.type == "cuda":
            adam["fused"] = True  # the counterpart of DeepSpeed's FusedAdam on GPU
        self.g_opt = torch.optim.Adam(self.generator.parameters(), **adam)
        self.d_opt = torch.optim.Adam(self.discriminator.parameters(), **adam)
        self.clip = float(ds.get("gradient_clipping", 0.0))
        self.bf16 = bf16

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _update(self, loss: Tensor, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            nn.utils.clip_grad_norm_(module.parameters(), self.clip)
        optimizer.step()

    def _autocast_call(self, module: nn.Module) -> Callable[..., Any]:
        def call(x: Tensor, **kwargs: Any) -> Any:
            with self._autocast():
                return module(x, **kwargs)

        return call

    def step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The trainer's step functions, with bare modules and ``torch.optim`` instead of engines."""
        x = step_inputs(self.cfg, self.phase_cfg, self.data, batch, self.device, torch.float32)
        d_net = self.discriminator
        fake, terms = generator_terms(
            self._autocast_call(self.generator), self._autocast_call(d_net), d_net, self.losses, x
        )
        self._update(terms["g_total"], self.generator, self.g_opt)
        d_terms = discriminator_terms(self._autocast_call(d_net), d_net, x, fake, self.cfg.loss.gan_mode)
        self._update(d_terms["d_total"], d_net, self.d_opt)
        terms.update(d_terms)
        return {k: v.detach() for k, v in terms.items()}


def _same_weights(plain: nn.Module, engine_module: nn.Module) -> bool:
    pairs = zip(plain.parameters(), engine_module.parameters(), strict=True)
    return all(torch.equal(a.detach().to(b.dtype).cpu(), b.detach().cpu()) for a, b in pairs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], object], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``run``."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    _sync(device)
    return time.perf_counter() - start


def _step_flops(loop: PlainLoop, batch: dict[str, Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        loop.step(batch)
    return counter.get_total_flops()


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _vgg_weight(path: str) -> tuple[float, str]:
    """pix2pixHD's VGG weight (10) when the VGG19 weights exist, else 0 (the small preset's CPU setting)."""
    file = Path(path).expanduser() if path else default_vgg19_path()
    if file.is_file():
        return 10.0, f"on (weight 10, {file})"
    return 0.0, f"off (no VGG19 weights at {file})"


@contextlib.contextmanager
def _shard_dir(given: str) -> Iterator[Path]:
    if given:
        yield Path(given).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        yield Path(tmp)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=["small", "full"], default="small")
    parser.add_argument("--bf16", action="store_true", help="bf16 DeepSpeed engine vs bf16 autocast")
    parser.add_argument(
        "--ds-config", default="", help=f"DeepSpeed config (default {DS_FP32}, {DS_BF16} with --bf16)"
    )
    parser.add_argument("--root", default=JobConfig().data.root, help="Cityscapes (sample) folder")
    parser.add_argument("--shards", default="", help="reuse this built shard folder instead of building one")
    parser.add_argument("--quality", type=int, default=42, help="HEVC QP of the decoded input")
    parser.add_argument("--workers", type=int, default=1, help="shard build processes (0: every core)")
    parser.add_argument("--batch-size", type=int, default=0, help="override the preset's batch size")
    parser.add_argument("--batches", type=int, default=8, help="distinct batches held in memory")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each loop")
    parser.add_argument("--steps", type=int, default=6, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks of each loop")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, for MFU")
    parser.add_argument("--vgg-weights", default="", help="VGG19 weights (default: the torch hub cache)")
    args = parser.parse_args()
    if min(args.batches, args.warmup + 1, args.steps, args.repeats, args.threads) < 1:
        parser.error("--batches, --steps, --repeats and --threads must be >= 1, --warmup >= 0")
    if args.bf16 and args.device == "cpu":
        parser.error("--bf16 needs --device cuda (DeepSpeed's bf16 engines need a GPU)")
    return args


def main() -> None:
    args = _parse()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the engine module picks CUDA whenever it sees one
    elif not torch.cuda.is_available():
        print("CUDA is not available on this machine: nothing measured (run without --device cuda for CPU)")
        sys.exit(2)
    torch.set_num_threads(args.threads)
    vgg, vgg_note = _vgg_weight(args.vgg_weights)
    with _shard_dir(args.shards) as shards, tempfile.TemporaryDirectory(prefix="bench-train-out-") as out:
        cfg = _config(args, shards, Path(out), vgg)
        if not args.shards:
            build_shards(cfg)
        data = dataset_info(cfg)
        with distributed() as env:
            if env.device.type != args.device:
                raise SystemExit(f"asked for {args.device} but the engines would run on {env.device}")
            batches = _preload(cfg, args.batches, env.device)
            ds = deepspeed_config(cfg, cfg.phase(PHASE), env.device)
            plain = PlainLoop(cfg, data, env.device, ds, args.bf16)
            runner = PhaseRunner(cfg, PHASE, env, Tracker(), data, init=None)
            runner._build()
            runner.batches = Cycle(batches)
            if not (
                _same_weights(plain.generator, runner.engines.generator.module)
                and _same_weights(plain.discriminator, runner.engines.discriminator_net)
            ):
                raise RuntimeError("the two loops do not start from the same weights")
            torch.set_num_threads(args.threads)  # in case DeepSpeed's set-up changed it
            plain_data = Cycle(batches)
            loops: dict[str, Callable[[], dict[str, Tensor]]] = {
                "plain": lambda: plain.step(plain_data.next()),
                "deepspeed": runner._train_step,
            }
            first = {name: loop() for name, loop in loops.items()}
            for loop in loops.values():
                _timed(loop, args.warmup, env.device)
            per_step = len(batches[0]["key"]) * runner.accumulation
            rates: dict[str, list[float]] = {name: [] for name in loops}
            for repeat in range(args.repeats):
                order = list(loops) if repeat % 2 == 0 else list(loops)[::-1]
                for name in order:
                    rates[name].append(args.steps * per_step / _timed(loops[name], args.steps, env.device))
            flops = _step_flops(plain, batches[0])
            device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else _cpu_name()
            dtype = str(runner.engines.dtype).removeprefix("torch.")

    plain_rate, ds_rate = (statistics.median(rates[name]) for name in loops)
    paired = [d / p for p, d in zip(rates["plain"], rates["deepspeed"], strict=True)]
    height, width = batches[0]["image"].shape[-2:]
    print(
        f"machine: {device_name}; {os.cpu_count()} cores, {args.threads} torch threads; "
        f"torch {torch.__version__}, deepspeed {version('deepspeed')}, python {platform.python_version()}"
    )
    print(
        f"{args.preset} preset on {args.device}, {dtype}: {cfg.data.width}x{cfg.data.height} "
        f"hevc QP {args.quality}, crop {width}x{height}, batch {per_step}, "
        f"G ngf {cfg.model.ngf}/{cfg.model.n_blocks} blocks, D ndf {cfg.model.ndf} x{cfg.model.num_d}; "
        f"{Path(cfg.train.deepspeed_config).name}; VGG term {vgg_note}"
    )
    print(
        f"{args.batches} batches in memory, {args.warmup} warm-up steps, "
        f"{args.repeats} x {args.steps} timed steps per loop"
    )

    def spread(name: str) -> str:
        return f"{statistics.median(rates[name]):.3f} ({min(rates[name]):.3f}-{max(rates[name]):.3f})"

    def loss(name: str) -> str:
        return f"{float(first['plain'][name]):.6f} / {float(first['deepspeed'][name]):.6f}"

    def tflops(rate: float) -> float:
        return flops * rate / per_step / 1e12

    rows = [
        ("first-step g_total, plain / DeepSpeed", loss("g_total")),
        ("first-step d_total, plain / DeepSpeed", loss("d_total")),
        ("plain PyTorch samples/s, median (min-max)", spread("plain")),
        ("DeepSpeed samples/s, median (min-max)", spread("deepspeed")),
        ("  DeepSpeed / plain, ratio of the medians", f"{ds_rate / plain_rate:.3f}"),
        ("  DeepSpeed / plain, median of adjacent blocks", f"{statistics.median(paired):.3f}"),
        ("  DeepSpeed overhead (goal <= 15%)", f"{100 * (plain_rate / ds_rate - 1):+.1f}%"),
        ("model GFLOP per step (conv+matmul, fwd+bwd)", f"{flops / 1e9:.3f}"),
        ("achieved TFLOP/s, plain / DeepSpeed", f"{tflops(plain_rate):.4f} / {tflops(ds_rate):.4f}"),
    ]
    if args.peak_tflops > 0:
        plain_mfu, ds_mfu = (100 * tflops(rate) / args.peak_tflops for rate in (plain_rate, ds_rate))
        rows.append(
            (
                f"  MFU, plain / DeepSpeed (peak {args.peak_tflops:g} TFLOP/s)",
                f"{plain_mfu:.1f}% / {ds_mfu:.1f}%",
            )
        )
    else:
        rows.append(("  MFU", "n/a (pass --peak-tflops)"))
    width_col = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width_col}}  {value}")


if __name__ == "__main__":
    main()
