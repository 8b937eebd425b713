"""The registered model is self-contained: it loads and predicts where this repository cannot be imported,
its requirements carry public versions, its version carries the selected step's validation figures and,
once the main job evaluated it, its held-out figures; its runs the standard user/source tags;
``mlflow models serve`` answers a prediction request; and compress/decompress follow a registry reference."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.compress.container import read_container
from pipeline.config import from_dict
from pipeline.eval.report import BDRATE_FILE, MEANS_FILE
from pipeline.eval.rows import MeanRow, Measures, csv_text
from pipeline.job import tag_registered_models
from pipeline.model.export import export_generator, weights_sha256
from pipeline.model.spec import GeneratorSpec
from pipeline.tracking import MLflowTracker, download_model, predict
from pipeline.tracking.registry import selected_metrics
from pipeline.train.trainer import REGISTERED_FILE

REPO = Path(__file__).resolve().parents[1]
NAME = "hevc-se-q42"
LABEL_NC = 34
SELECTED = {
    "step": 20,
    "metric": "psnr",
    "value": 31.5,
    "scores": {"psnr": 31.5, "codec_psnr": 31.2, "delta_psnr": 0.3},
    "split": "valid",
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, GeneratorSpec]]:
    """A generator (non-zero correction head, validation selection recorded) registered as NAME@champion in
    a SQLite store of its own, found through $MLFLOW_TRACKING_URI."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    spec = GeneratorSpec(
        ngf=4,
        n_downsample=2,
        n_blocks=1,
        norm="instance",
        label_nc=LABEL_NC,
        use_instance=False,
        residual=True,
        codec="hevc",
        quality=42,
        phase=3,
        selected=SELECTED,
    )
    torch.manual_seed(0)
    generator = spec.build_generator()
    with torch.no_grad():
        generator.correction[-1].weight.normal_(0, 0.02)
    path = export_generator(folder / "generator.safetensors", generator, spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        tracker = MLflowTracker(uri, "jpd-se-registry")
        with tracker.start_run("phase3"):
            assert tracker.register_generator(path, NAME, alias="champion", spec=spec) == f"models:/{NAME}/1"
        yield uri, path, spec


def test_selected_metrics() -> None:
    spec = GeneratorSpec(ngf=4, n_downsample=2, n_blocks=1, norm="instance", label_nc=3, use_instance=False)
    assert selected_metrics(spec) == {}
    with_selection = GeneratorSpec(**{**spec.__dict__, "selected": SELECTED})
    assert selected_metrics(with_selection) == {
        "val_psnr": 31.5,
        "val_codec_psnr": 31.2,
        "val_delta_psnr": 0.3,
        "selected_step": 20.0,
    }


def test_version_metrics_requirements_and_run_tags(
    registered: tuple[str, Path, GeneratorSpec], tmp_path: Path
) -> None:
    uri, _, _ = registered
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias(NAME, "champion")
    assert float(version.tags["val_delta_psnr"]) == pytest.approx(0.3)
    assert float(version.tags["selected_step"]) == 20
    experiment = client.get_experiment_by_name("jpd-se-registry")
    (logged,) = client.search_logged_models([experiment.experiment_id])
    assert {m.key: m.value for m in logged.metrics}["val_psnr"] == pytest.approx(31.5)

    run = client.get_run(version.run_id)
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    assert run.data.tags["mlflow.source.type"] == "LOCAL"

    model_dir = download_model(f"models:/{NAME}@champion", tracking_uri=uri, dst_dir=tmp_path)
    requirements = (model_dir / "requirements.txt").read_text().split()
    torch_pin = next(r for r in requirements if r.startswith("torch=="))
    assert "+" not in torch_pin and torch_pin == f"torch=={torch.__version__.split('+')[0]}"
    assert any(r.startswith("pyyaml==") for r in requirements)
    assert (model_dir / "code" / "pipeline" / "tracking" / "registry.py").is_file()
    assert not list((model_dir / "code").rglob("__pycache__"))


BOOTSTRAP = textwrap.dedent(
    """
    import importlib.util, json, os, sys

    repo = os.path.realpath(sys.argv[1])
    # hide this repository: the editable install's finder and any path inside the repository
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
    sys.path[:] = [p for p in sys.path if not os.path.realpath(p or os.getcwd()).startswith(repo)]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("pipeline") is None, "the repository is still importable"

    import mlflow
    import numpy as np

    model = mlflow.pyfunc.load_model(sys.argv[2])
    batch = np.load(sys.argv[3])
    np.save(sys.argv[4], model.predict({k: batch[k] for k in batch.files}))
    import pipeline

    print(json.dumps({"pipeline": os.path.realpath(pipeline.__file__)}))
    """
)


@pytest.mark.slow
def test_pyfunc_loads_where_the_repository_is_not_importable(
    registered: tuple[str, Path, GeneratorSpec], tmp_path: Path
) -> None:
    uri, path, spec = registered
    rng = np.random.default_rng(0)
    batch = {
        "label": rng.integers(0, LABEL_NC, (1, 32, 48), dtype=np.int64),
        "decoded": rng.uniform(-1, 1, (1, 3, 32, 48)).astype(np.float32),
    }
    np.savez(tmp_path / "batch.npz", **batch)
    (tmp_path / "bootstrap.py").write_text(BOOTSTRAP)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"})
    result = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "bootstrap.py"),
            str(REPO),
            f"models:/{NAME}@champion",
            str(tmp_path / "batch.npz"),
            str(tmp_path / "out.npy"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded_from = json.loads(result.stdout.strip().splitlines()[-1])["pipeline"]
    assert not loaded_from.startswith(str(REPO)) and "/code/pipeline/" in loaded_from
    from pipeline.model.export import load_generator

    generator, _ = load_generator(path)
    assert np.array_equal(np.load(tmp_path / "out.npy"), predict(generator, spec, batch))
    assert mlflow.__version__  # the parent's MLflow is the one the child ran


def test_compress_records_and_decompress_follows_the_registry_model(
    registered: tuple[str, Path, GeneratorSpec], sample_image: np.ndarray, tmp_path: Path, capsys
) -> None:
    import cv2

    _, path, _ = registered
    image, label, out = tmp_path / "x.png", tmp_path / "x_label.png", tmp_path / "x.jse"
    cv2.imwrite(str(image), cv2.cvtColor(sample_image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(label), (np.arange(256 * 128) % LABEL_NC).reshape(128, 256).astype(np.uint8))
    assert (
        main(
            [
                "compress",
                str(image),
                "--label",
                str(label),
                "--model",
                f"models:/{NAME}@champion",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    reference = read_container(out).model
    assert (reference.name, reference.version, reference.sha256) == (NAME, "1", weights_sha256(path))
    assert (
        main(["decompress", str(out), "-o", str(tmp_path / "x_out.png")]) == 0
    )  # no --model: the recorded one
    assert f"models:/{NAME}/1" in capsys.readouterr().out
    assert (
        main(
            [
                "decompress",
                str(out),
                "-o",
                str(tmp_path / "y.png"),
                "--model",
                "models:/no-such-model@champion",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("error: model models:/no-such-model@champion") and len(err.strip().splitlines()) == 1
    )


def _mean_row(method: str, model: str, psnr: float, bpp: float) -> MeanRow:
    measures = Measures(bpp_codec=0.1, bpp_total=bpp, psnr=psnr, ms_ssim=0.95, niqe=5.5, lpips=math.nan)
    return MeanRow(
        method=method, model=model, label=method, codec="hevc", quality=42, images=3, measures=measures,
        fid=math.nan, lpips_note="", fid_note="", on_training_frames=False,
    )  # fmt: skip


def test_the_main_job_puts_held_out_figures_on_each_registered_version(
    registered: tuple[str, Path, GeneratorSpec], tmp_path: Path
) -> None:
    uri, path, _ = registered
    exports = []
    for name in ("q42", "q42_nosem", "q42_stale"):  # registered; never registered; marker of other weights
        export = tmp_path / name / "generator.safetensors"
        export.parent.mkdir()
        shutil.copy2(path, export)
        exports.append(export)
    sha = weights_sha256(path)
    marker = {"uri": f"models:/{NAME}/1", "name": NAME, "alias": "champion", "sha256": sha}
    (exports[0].parent / REGISTERED_FILE).write_text(json.dumps(marker))
    (exports[2].parent / REGISTERED_FILE).write_text(json.dumps({**marker, "sha256": "0" * 64}))
    results = tmp_path / "eval"
    results.mkdir()
    means = [_mean_row("hevc", "hevc", 30.0, 0.1)]
    means += [_mean_row("hevc-SE", f"{e}#{sha[:12]}", 30.75, 0.125) for e in exports]
    (results / MEANS_FILE).write_text(csv_text(MeanRow, means))
    gain = {"test": "hevc-SE", "anchor": "hevc", "quality": 42, "frames": 3, "worst": 0.5, "best": 1.0}
    other = {"measure": "psnr", "mean": 9.0, "ci95": 9.0, "improved": 0}  # not this model's point
    frame_gains = [
        {**gain, "measure": "psnr", "mean": 0.75, "ci95": 0.4, "improved": 3},
        {**gain, "measure": "niqe", "mean": 0.0, "ci95": 0.2, "improved": 1},
        {**gain, **other, "quality": 37},
        {**gain, **other, "anchor": "hevc-SE (no semantics)"},
    ]
    (results / BDRATE_FILE).write_text(json.dumps({"frame_gains": frame_gains}))
    cfg = from_dict({"tracking": {"uri": uri}, "loader": {"codec": "hevc"}, "eval": {"split": "test"}})

    client = MlflowClient(uri, registry_uri=uri)
    run = client.create_run(client.get_experiment_by_name("jpd-se-registry").experiment_id)
    assert tag_registered_models(cfg, exports, results, run.info.run_id) == [f"models:/{NAME}/1"]
    version = client.get_model_version(NAME, "1")
    notes = ("eval_split", "eval_results")
    figures = {k: float(v) for k, v in version.tags.items() if k.startswith("eval_") and k not in notes}
    assert figures == pytest.approx(
        {
            "eval_psnr": 30.75,
            "eval_ms_ssim": 0.95,
            "eval_niqe": 5.5,
            "eval_bpp": 0.125,
            "eval_bpp_codec": 0.1,
            "eval_quality": 42,
            "eval_images": 3,
            "eval_delta_psnr": 0.75,
            "eval_delta_ms_ssim": 0.0,
            "eval_delta_niqe": 0.0,
            "eval_delta_psnr_ci95": 0.4,
            "eval_delta_niqe_ci95": 0.2,
            "eval_frames_improved": 3,
        }  # fmt: skip
    )
    assert version.tags["eval_split"] == "test" and version.tags["eval_results"] == str(results.resolve())
    assert float(version.tags["val_delta_psnr"]) == pytest.approx(0.3)  # the validation figures stay
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert {m.key: m.value for m in logged.metrics}["eval_delta_psnr"] == pytest.approx(0.75)
    assert {m.key: m.value for m in logged.metrics}["val_psnr"] == pytest.approx(31.5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (127.0.0.1 only)
        return response.status, response.read()


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_prediction(
    registered: tuple[str, Path, GeneratorSpec], tmp_path: Path
) -> None:
    uri, path, spec = registered
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"})
    log = (tmp_path / "serve.log").open("w")
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion"]
    server = subprocess.Popen(
        [*command, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the server's workers go down with it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no answer on /ping within 60 s"
            try:
                if _post(f"{base}/ping", timeout=2)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        rng = np.random.default_rng(1)
        batch = {
            "label": rng.integers(0, LABEL_NC, (2, 16, 24), dtype=np.int64),
            "decoded": rng.uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32),
        }
        status, body = _post(f"{base}/invocations", {"inputs": {k: v.tolist() for k, v in batch.items()}}, 60)
        assert status == 200
        served = np.asarray(json.loads(body)["predictions"], dtype=np.float32)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
        log.close()
    from pipeline.model.export import load_generator

    generator, _ = load_generator(path)
    expected = predict(generator, spec, batch)
    assert served.shape == expected.shape == (2, 3, 16, 24)
    np.testing.assert_array_equal(served, expected)  # float32 through JSON and back: exact
