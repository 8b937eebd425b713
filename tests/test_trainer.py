"""Three-phase training in one process (a DeepSpeed world of one on CPU), tiny crops, few steps."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import pipeline.train.engine as engine
import pipeline.train.trainer as trainer
from pipeline.config import ConfigError, JobConfig, load_config
from pipeline.data.manifest import dataset_info
from pipeline.model.export import load_generator
from pipeline.model.losses import VGG19
from pipeline.model.networks import ResnetBlock
from pipeline.tracking import Tracker
from pipeline.train.checkpoint import read_latest
from pipeline.train.gan_step import FiniteWatch, generator_terms, step_inputs

REPO = Path(__file__).resolve().parents[1]


class RecordingTracker(Tracker):
    """Keeps every run, metric and artifact it is given."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, int]] = []  # (name, nesting depth)
        self.metrics: list[tuple[str, int, dict[str, float]]] = []
        self.artifacts: list[Path] = []
        self._stack: list[str] = []

    @contextlib.contextmanager
    def start_run(
        self, name: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[None]:
        self.runs.append((name, len(self._stack)))
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((self._stack[-1], int(step or 0), dict(metrics)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(path))


@pytest.fixture(scope="module")
def shards(small_shards: Path) -> Path:
    return small_shards


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init VGG19 in torchvision's key layout (no download needed)."""
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.manual_seed(0)
    torch.save(VGG19().state_dict(), path)
    return path


def make_cfg(shards: Path, vgg_file: Path, out: Path, *extra: str) -> JobConfig:
    return load_config(
        None,
        [
            f"shards.output={shards}",
            f"train.output_dir={out}",
            f"loss.vgg_weights={vgg_file}",
            "model.use_instance=true",  # the sample has instance maps: exercise the edge channel
            "loader.crop=[64, 128]",
            "loader.batch_size=1",
            "loader.shuffle=4",
            "phase1.steps=2",
            "phase2.steps=2",
            "phase3.steps=2",
            "phase1.loss.vgg=10",  # the small preset has no VGG term; phase 1 exercises it here
            "phase2.loss.vgg=0",  # VGG dominates a CPU step
            "phase3.loss.gan=1.0",  # the generator step then runs the frozen discriminator
            "train.checkpoint_every=0",
            "train.log_every=1",
            "tracking.log_every=1",
            "validate.every=0",  # the validation tests switch it on
            *extra,
        ],
    )


def recording_build_engines(seen: list[dict[str, torch.Tensor]]) -> Callable[..., Any]:
    """``build_engines`` that first keeps the generator weights it gets, i.e. before the first step."""

    def spy(generator, discriminator, cfg, phase_cfg, env=None):
        seen.append({k: v.detach().clone() for k, v in generator.state_dict().items()})
        return engine.build_engines(generator, discriminator, cfg, phase_cfg, env)

    return spy


@pytest.fixture
def initial_generators(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    seen: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(trainer, "build_engines", recording_build_engines(seen))
    return seen


@pytest.fixture(scope="module")
def chain(shards: Path, vgg_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Phases 1, 2, 3 with decoded images at QP 42."""
    out = tmp_path_factory.mktemp("chain")
    tracker = RecordingTracker()
    seen: list[dict[str, torch.Tensor]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "build_engines", recording_build_engines(seen))
        exports = trainer.train(make_cfg(shards, vgg_file, out), [1, 2, 3], tracker=tracker)
    return {"out": out, "exports": exports, "tracker": tracker, "initial": seen}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exports_and_specs(chain: dict[str, Any]) -> None:
    out = chain["out"]
    assert chain["exports"] == {n: out / f"phase{n}" / "generator.safetensors" for n in (1, 2, 3)}
    for phase, path in chain["exports"].items():
        _, spec = load_generator(path)
        assert (spec.phase, spec.codec, spec.quality, spec.steps) == (phase, "hevc", 42, 2)
        assert spec.label_nc == 34 and spec.use_instance is True and spec.zero_semantics is False
    assert chain["tracker"].artifacts == list(chain["exports"].values())


def test_each_phase_starts_from_the_previous_export(chain: dict[str, Any]) -> None:
    initial, exports = chain["initial"], chain["exports"]
    assert len(initial) == 3
    assert same(initial[1], weights(exports[1]))
    assert same(initial[2], weights(exports[2]))
    assert not same(initial[0], weights(exports[1]))  # phase 1 trained
    assert not same(weights(exports[1]), weights(exports[2]))
    assert not same(weights(exports[2]), weights(exports[3]))


def test_phase3_leaves_the_discriminator_unchanged(chain: dict[str, Any]) -> None:
    d = {n: weights(chain["out"] / f"phase{n}" / "discriminator.safetensors") for n in (1, 2, 3)}
    assert not same(d[1], d[2])  # phase 2 trains D (carried over from phase 1)
    assert same(d[2], d[3])


def test_losses_are_finite_and_follow_the_phase_weights(chain: dict[str, Any]) -> None:
    tracker = chain["tracker"]
    assert tracker.runs == [("cityscapes-hevc", 0), ("phase1", 1), ("phase2", 1), ("phase3", 1)]
    by_phase: dict[str, set[str]] = {}
    for run, _, metrics in tracker.metrics:
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert metrics["samples_per_s"] > 0
        by_phase.setdefault(run, set()).update(metrics)
    d_terms = {"d_real", "d_fake", "d_total"}
    assert by_phase["phase1"] >= {"g_gan", "g_feat", "g_vgg", "g_total"} | d_terms
    assert "g_dist" not in by_phase["phase1"]
    assert by_phase["phase2"] >= {"g_gan", "g_feat", "g_dist", "g_total"} | d_terms
    assert by_phase["phase3"] == {"g_gan", "g_dist", "g_total", "samples_per_s", "lr"}


def test_phase1_ignores_the_decoded_image(
    chain: dict[str, Any], shards: Path, vgg_file: Path, tmp_path: Path
) -> None:
    """Same seed, decoded images at QP 37 instead of 42: phase 1 is bit-identical, phase 2 is not."""
    cfg = make_cfg(shards, vgg_file, tmp_path, "loader.quality=37")
    exports = trainer.train(cfg, [1, 2], tracker=Tracker())
    assert same(weights(exports[1]), weights(chain["exports"][1]))
    assert not same(weights(exports[2]), weights(chain["exports"][2]))


def test_init_from_starts_a_later_phase(
    chain: dict[str, Any], shards: Path, vgg_file: Path, tmp_path: Path, initial_generators: list
) -> None:
    source = chain["exports"][2]
    cfg = make_cfg(shards, vgg_file, tmp_path, f"train.init_from={source}", "phase3.steps=1")
    tracker = RecordingTracker()
    exports = trainer.train(cfg, [3], tracker=tracker, run_name="refine")
    assert same(initial_generators[0], weights(source))
    assert exports[3].is_file()
    assert tracker.runs == [("refine", 0), ("phase3", 1)]


def test_a_plain_later_phase_without_a_source_is_refused(
    shards: Path, vgg_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="init_from"):
        trainer.train(make_cfg(shards, vgg_file, tmp_path, "model.residual=false"), [2], tracker=Tracker())
    assert not torch.distributed.is_initialized()  # the world of one is torn down, also on errors


def first_batch(cfg: JobConfig) -> dict[str, torch.Tensor]:
    from pipeline.data.loader import make_loader

    return next(iter(make_loader(cfg, rank=0, world_size=1, train=True, seed=0)))


def test_residual_phases_2_3_without_a_prior_start_at_the_codec(
    shards: Path, vgg_file: Path, tmp_path: Path, initial_generators: list, capsys: pytest.CaptureFixture
) -> None:
    cfg = make_cfg(shards, vgg_file, tmp_path)
    exports = trainer.train(cfg, [2, 3], tracker=Tracker())
    assert "starting from the identity generator" in capsys.readouterr().out
    assert exports[3].is_file()
    generator, _ = load_generator(exports[3])
    net = type(generator)(**generator.hparams)
    net.load_state_dict(initial_generators[0])
    batch = first_batch(cfg)
    x = step_inputs(cfg, cfg.phase2, dataset_info(cfg), batch, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        assert torch.equal(net(x.g_in), batch["decoded"])  # step 0: codec-SE is the codec, exactly
        assert not torch.equal(generator(x.g_in), batch["decoded"])  # and training moved it


def test_stochastic_depth_reaches_the_trained_generator_and_not_its_export(
    shards: Path, vgg_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.stochastic_depth is set on every residual block of the network that trains; the export
    (built again from its hparams) is the same network without it."""
    drops: list[list[float]] = []

    def spy(generator: torch.nn.Module, *args: Any) -> Any:
        drops.append([b.drop for b in generator.modules() if isinstance(b, ResnetBlock)])
        return engine.build_engines(generator, *args)

    monkeypatch.setattr(trainer, "build_engines", spy)
    cfg = make_cfg(shards, vgg_file, tmp_path, "train.stochastic_depth=0.25")
    export = trainer.train(cfg, [3], tracker=Tracker())[3]
    assert drops == [[0.25] * cfg.model.n_blocks]
    generator, _ = load_generator(export)
    assert all(b.drop == 0 for b in generator.modules() if isinstance(b, ResnetBlock))


def test_phase1_trains_the_synthesis_head_and_hands_over_a_zero_correction(chain: dict[str, Any]) -> None:
    prior = weights(chain["exports"][1])
    assert prior["correction.1.weight"].abs().sum() == 0 and prior["correction.1.bias"].abs().sum() == 0
    assert not same(
        {k: v for k, v in chain["initial"][0].items() if k.startswith("model.")},
        {k: v for k, v in prior.items() if k.startswith("model.")},
    )
    assert weights(chain["exports"][2])["correction.1.weight"].abs().sum() > 0  # phase 2 trains it


class ScriptedValidator:
    """Stands in for :class:`pipeline.train.validation.Validator`: PSNRs from a script, one per call."""

    def __init__(self, values: list[float]) -> None:
        self.values, self.calls, self.keys = list(values), 0, ["frame"]

    def __call__(self, generator: torch.nn.Module) -> dict[str, float]:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        scores = {"psnr": value, "ms_ssim": 0.9, "niqe": 5.0}
        return {**scores, **{f"codec_{k}": v for k, v in scores.items()}, "delta_psnr": value - 30.0,
                "delta_ms_ssim": 0.0, "delta_niqe": 0.0}  # fmt: skip


def scripted(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> list[ScriptedValidator]:
    made: list[ScriptedValidator] = []

    def build(*args: Any, **kwargs: Any) -> ScriptedValidator:
        made.append(ScriptedValidator(values))
        return made[-1]

    monkeypatch.setattr(trainer, "Validator", build)
    return made


def test_the_best_validated_step_is_exported(
    shards: Path, vgg_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, initial_generators: list
) -> None:
    """Validation at steps 0, 2, 4, 6 with a metric that peaks at step 2: the export is step 2's weights."""
    made = scripted(monkeypatch, [30.0, 31.0, 30.5, 29.0])
    steps: dict[int, dict[str, torch.Tensor]] = {}

    def keep(event: trainer.StepEvent) -> None:
        steps[event.step] = {k: v.detach().clone() for k, v in event.generator.state_dict().items()}

    cfg = make_cfg(shards, vgg_file, tmp_path, "phase2.steps=6", "validate.every=2")
    tracker = RecordingTracker()
    exports = trainer.train(cfg, [2], tracker=tracker, on_step=keep)
    assert made[0].calls == 4
    assert same(weights(exports[2]), steps[2]) and not same(weights(exports[2]), steps[6])
    _, spec = load_generator(exports[2])
    assert spec.selected["step"] == 2 and spec.selected["split"] == "valid" and spec.steps == 6
    logged = [m for run, _, m in tracker.metrics if "val_psnr" in m]
    assert [m["val_psnr"] for m in logged] == [30.0, 31.0, 30.5, 29.0]


def test_the_starting_point_wins_when_training_only_worsens(
    shards: Path, vgg_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, initial_generators: list
) -> None:
    """Step 0 (the codec itself) is a candidate; with patience 2 the phase stops early, and a rerun with
    --resume finds it complete."""
    made = scripted(monkeypatch, [30.0, 29.0, 28.0, 27.0])
    cfg = make_cfg(shards, vgg_file, tmp_path, "phase2.steps=20", "validate.every=2", "validate.patience=2")
    exports = trainer.train(cfg, [2], tracker=Tracker())
    assert made[0].calls == 3  # steps 0, 2, 4: two validations without improvement
    assert same(weights(exports[2]), initial_generators[0])
    latest = read_latest(tmp_path)
    assert latest is not None and latest.step == 4 and latest.state["stopped_early"]
    again = trainer.train(cfg, [2], resume=True, tracker=Tracker())
    assert same(weights(again[2]), initial_generators[0]) and len(made) == 1


def test_validation_resumes_with_its_best(
    shards: Path, vgg_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed phase keeps the best of before the interruption: same export as an uninterrupted run."""
    values = [30.0, 32.0, 31.0, 30.0, 29.0]
    scripted(monkeypatch, values)
    full = make_cfg(shards, vgg_file, tmp_path / "full", "phase2.steps=8", "validate.every=2",
                    "train.checkpoint_every=2")  # fmt: skip
    reference = trainer.train(full, [2], tracker=Tracker())[2]
    scripted(monkeypatch, values[:3])
    part = make_cfg(shards, vgg_file, tmp_path / "part", "phase2.steps=4", "validate.every=2",
                    "train.checkpoint_every=2")  # fmt: skip
    trainer.train(part, [2], tracker=Tracker())
    scripted(monkeypatch, values[3:])
    rest = make_cfg(shards, vgg_file, tmp_path / "part", "phase2.steps=8", "validate.every=2",
                    "train.checkpoint_every=2")  # fmt: skip
    latest = read_latest(tmp_path / "part")
    assert latest is not None and latest.state["validation"]["step"] == 2
    resumed = trainer.train(rest, [2], resume=True, tracker=Tracker())[2]
    assert same(weights(resumed), weights(reference))
    assert load_generator(resumed)[1].selected["step"] == 2


def test_how_often_a_phase_validates_does_not_change_its_training(
    shards: Path, vgg_file: Path, tmp_path: Path
) -> None:
    """The real validator at every step and at the first and last only: the same weights at every step.
    The semantic dropout draws from the torch RNG, which the validator's generator copy also draws from
    when it is built, so a validation that moved the stream would change the steps after it."""
    trained: dict[int, list[dict[str, torch.Tensor]]] = {1: [], 3: []}
    for every, steps in trained.items():

        def keep(event: trainer.StepEvent, steps: list = steps) -> None:
            steps.append({k: v.detach().clone() for k, v in event.generator.state_dict().items()})

        sets = (
            "phase2.steps=3",
            f"validate.every={every}",
            "validate.images=1",
            "train.semantic_dropout=0.5",
        )
        cfg = make_cfg(shards, vgg_file, tmp_path / f"every{every}", *sets)
        trainer.train(cfg, [2], tracker=Tracker(), on_step=keep)
    assert len(trained[1]) == len(trained[3]) == 3
    assert all(same(a, b) for a, b in zip(trained[1], trained[3], strict=True))
    assert not same(trained[1][0], trained[1][2])  # the steps train


def test_an_autocast_engine_computes_in_bf16_and_trains_fp32_weights(
    shards: Path, vgg_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``zero0_autocast_bf16.json`` on CPU: the generator's convolutions run in bf16 inside the engine's
    forward pass, its weights stay fp32, train, and are exported in fp32."""
    outputs: list[torch.dtype] = []

    def spy(generator, discriminator, cfg, phase_cfg, env=None):
        first = next(m for m in generator.modules() if isinstance(m, torch.nn.Conv2d))
        first.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
        return engine.build_engines(generator, discriminator, cfg, phase_cfg, env)

    monkeypatch.setattr(trainer, "build_engines", spy)
    autocast = REPO / "configs" / "deepspeed" / "zero0_autocast_bf16.json"
    cfg = make_cfg(shards, vgg_file, tmp_path, f"train.deepspeed_config={autocast}")
    exports = trainer.train(cfg, [3], tracker=Tracker())
    assert outputs == [torch.bfloat16] * cfg.phase3.steps
    exported = weights(exports[3])
    assert {t.dtype for t in exported.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in exported.values())
    head = [t for k, t in exported.items() if k.startswith("correction.")]
    assert head and any(t.abs().sum() > 0 for t in head)  # the head starts at zero: the steps trained it


def test_resume_refuses_checkpoints_of_other_training_settings(
    shards: Path, vgg_file: Path, tmp_path: Path
) -> None:
    cfg = make_cfg(shards, vgg_file, tmp_path, "phase1.loss.vgg=0")
    trainer.train(cfg, [1], tracker=Tracker())
    again = make_cfg(shards, vgg_file, tmp_path, "phase1.loss.vgg=0", "phase1.steps=4")
    assert trainer.train(again, [1], resume=True, tracker=Tracker())[1].is_file()  # more steps: fine
    other = make_cfg(shards, vgg_file, tmp_path, "phase1.loss.vgg=0", "phase1.loss.feat=1")
    with pytest.raises(ConfigError, match="different data, model, loss"):
        trainer.train(other, [1], resume=True, tracker=Tracker())


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.stem
)
def test_deepspeed_configs_get_the_phase_settings(path: Path) -> None:
    cfg = load_config(
        None, [f"train.deepspeed_config={path}", "loader.batch_size=3", "train.betas=[0.4, 0.9]"]
    )
    raw = json.loads(path.read_text())
    assert raw["gradient_accumulation_steps"] >= 1 and "gradient_clipping" in raw
    half = raw.get("bf16", {}).get("enabled") or raw.get("fp16", {}).get("enabled")
    if half:
        with pytest.raises(ConfigError, match="need a GPU"):
            engine.deepspeed_config(cfg, cfg.phase3, torch.device("cpu"))
        ds = engine.deepspeed_config(cfg, cfg.phase3, torch.device("cuda", 0))
    else:
        ds = engine.deepspeed_config(cfg, cfg.phase3, torch.device("cpu"))
        assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["train_micro_batch_size_per_gpu"] == 3
    params = ds["optimizer"]["params"]
    assert (params["lr"], params["betas"], params["weight_decay"]) == (cfg.phase3.lr, [0.4, 0.9], 0.0)
    assert params["adam_w_mode"] is False


def test_cosine_schedule_decays_the_learning_rate_to_zero(
    shards: Path, vgg_file: Path, tmp_path: Path
) -> None:
    cfg = make_cfg(
        shards, vgg_file, tmp_path, "phase3.steps=8", "phase3.lr=1e-3", "phase3.lr_schedule=cosine"
    )
    ds = engine.deepspeed_config(cfg, cfg.phase3, torch.device("cpu"))
    assert ds["scheduler"]["type"] == "WarmupCosineLR" and ds["scheduler"]["params"]["total_num_steps"] == 8
    tracker = RecordingTracker()
    trainer.train(cfg, [3], tracker=tracker)
    lrs = [m["lr"] for run, _, m in tracker.metrics if run == "phase3"]
    assert len(lrs) == 8 and 0.9e-3 < max(lrs) <= 1e-3 and lrs[-1] < 1e-4 and lrs[0] < max(lrs)
    assert lrs.index(max(lrs)) < 4  # warm-up, then decay
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_config(None, ["phase3.lr_schedule=step"])


def test_the_cosine_warm_up_is_five_percent_of_the_steps_unless_set() -> None:
    def warmup(*overrides: str) -> int:
        cfg = load_config(None, ["phase3.steps=400", "phase3.lr_schedule=cosine", *overrides])
        return engine.deepspeed_config(cfg, cfg.phase3, torch.device("cpu"))["scheduler"]["params"][
            "warmup_num_steps"
        ]

    assert warmup() == 20 and warmup("phase3.warmup_steps=250") == 250
    with pytest.raises(ConfigError, match=r"warmup_steps must be < steps \(400\), got 400"):
        load_config(None, ["phase3.steps=400", "phase3.lr_schedule=cosine", "phase3.warmup_steps=400"])
    with pytest.raises(ConfigError, match="phase3.warmup_steps warms up the cosine schedule"):
        load_config(None, ["phase3.steps=400", "phase3.warmup_steps=10"])
    plain = load_config(None, []).training_digest()
    assert load_config(None, ["phase3.warmup_steps=0"]).training_digest() == plain
    assert load_config(None, ["phase3.lr_schedule=cosine", "phase3.warmup_steps=5"]).training_digest() != (
        load_config(None, ["phase3.lr_schedule=cosine"]).training_digest()
    )


def test_zero3_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = load_config(None, [f"train.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match="stage 3"):
        engine.deepspeed_config(cfg, cfg.phase1, torch.device("cpu"))


def test_the_finite_watch_keeps_the_first_bad_step() -> None:
    watch = FiniteWatch()
    terms = {"g_total": torch.tensor(1.0), "g_gan": torch.tensor(0.5)}
    watch.observe(1, terms)
    watch.check(phase=2)  # all finite: nothing to say
    watch.observe(2, {**terms, "g_gan": torch.tensor(float("inf"))})
    watch.observe(3, {"g_total": torch.tensor(float("nan")), "g_gan": torch.tensor(float("nan"))})
    with pytest.raises(FloatingPointError, match=r"phase 2 step 2: non-finite \['g_gan'\]"):
        watch.check(phase=2)


def test_a_non_finite_loss_stops_training_before_anything_is_saved(
    shards: Path, vgg_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss turns NaN at step 3, neither a log nor a checkpoint step: the checkpoint of step 4 finds
    it, and neither that checkpoint nor an export is written."""
    calls = 0

    def poisoned(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nonlocal calls
        calls += 1
        fake, terms = generator_terms(*args, **kwargs)
        if calls == 3:
            terms = {**terms, "g_total": terms["g_total"] * float("nan")}
        return fake, terms

    monkeypatch.setattr(trainer, "generator_terms", poisoned)
    cfg = make_cfg(
        shards, vgg_file, tmp_path, "phase3.steps=6", "train.log_every=0", "tracking.log_every=0",
        "train.checkpoint_every=2",
    )  # fmt: skip
    tracker = RecordingTracker()
    with pytest.raises(FloatingPointError, match=r"phase 3 step 3: non-finite \['g_total'\]"):
        trainer.train(cfg, [3], tracker=tracker)
    assert calls == 4
    latest = read_latest(tmp_path)
    assert latest is not None and latest.step == 2
    names = ["latest.json", "phase3-step00000002"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == names
    assert not (tmp_path / "phase3").exists() and tracker.metrics == []


def test_the_weight_average_is_scored_exported_and_resumed(
    shards: Path, vgg_file: Path, tmp_path: Path, initial_generators: list
) -> None:
    """train.ema_decay: the callbacks' ``scored`` network and the export are the moving average of the
    steps' weights from the starting point (warm-up ``(1 + s) / (10 + s)``, then the decay), and a phase
    resumed half-way exports the same average as an uninterrupted one."""
    decay = 0.2  # the warm-up's 2/11 at step 1, the decay from step 2 on
    raw: dict[int, dict[str, torch.Tensor]] = {}
    scored: dict[int, dict[str, torch.Tensor]] = {}

    def keep(event: trainer.StepEvent) -> None:
        raw[event.step] = {k: v.detach().clone() for k, v in event.generator.state_dict().items()}
        scored[event.step] = {k: v.detach().clone() for k, v in event.scored.state_dict().items()}

    ema = f"train.ema_decay={decay}"
    full = make_cfg(shards, vgg_file, tmp_path / "full", "phase2.steps=4", "train.checkpoint_every=2", ema)
    reference = trainer.train(full, [2], tracker=Tracker(), on_step=keep)[2]
    expected = {k: v.float() for k, v in initial_generators[0].items()}
    for step in range(1, 5):
        weight = 1 - min(decay, (1 + step) / (10 + step))
        expected = {k: v + weight * (raw[step][k] - v) for k, v in expected.items()}
        assert all(torch.allclose(scored[step][k], expected[k], atol=1e-7) for k in expected)
    assert not same(scored[4], raw[4])
    assert all(torch.allclose(weights(reference)[k], expected[k], atol=1e-7) for k in expected)

    part = make_cfg(shards, vgg_file, tmp_path / "part", "phase2.steps=2", "train.checkpoint_every=2", ema)
    trainer.train(part, [2], tracker=Tracker())
    rest = make_cfg(shards, vgg_file, tmp_path / "part", "phase2.steps=4", "train.checkpoint_every=2", ema)
    assert same(weights(trainer.train(rest, [2], resume=True, tracker=Tracker())[2]), weights(reference))
    with pytest.raises(ConfigError, match="ema_decay must be in"):
        make_cfg(shards, vgg_file, tmp_path, "train.ema_decay=1")
