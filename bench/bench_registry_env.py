"""The registered model in a fresh virtual environment: only MLflow and the model's own requirements.

Steps, each timed:
  1. register a tiny generator in a private SQLite store (or take ``--model`` from ``--tracking-uri``)
     and download its model folder (``requirements.txt`` as MLflow wrote it);
  2. create a virtual environment in a private temporary folder (no system site-packages);
  3. ``pip install torch==<the pinned version>`` first (so a CPU box takes the CPU wheel, as the Makefile
     does), then ``pip install -r requirements.txt`` of the model;
  4. in that environment, from a folder outside this repository and without ``PYTHONPATH``:
     ``mlflow.pyfunc.load_model(models:/...)`` and ``predict`` on a random input; the output must equal
     the prediction of this process, and ``pipeline`` must come from the model's own ``code/`` folder.

It installs packages, so it is a bench, not a test. Usage:
    python bench/bench_registry_env.py [--model models:/name@alias --tracking-uri sqlite:///...] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

NAME = "bench-env-se"
LABEL_NC = 34
CHILD = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import mlflow
    import numpy as np
    t1 = time.perf_counter()
    model = mlflow.pyfunc.load_model(sys.argv[1])
    t2 = time.perf_counter()
    batch = np.load(sys.argv[2])
    np.save(sys.argv[3], model.predict({k: batch[k] for k in batch.files}))
    t3 = time.perf_counter()
    import pipeline, torch
    times = {"import_s": t1 - t0, "load_s": t2 - t1, "predict_s": t3 - t2}
    versions = {"torch": torch.__version__, "mlflow": mlflow.__version__}
    print(json.dumps({**times, **versions, "pipeline": pipeline.__file__}))
    """
)


@contextmanager
def step(name: str) -> Iterator[None]:
    start = time.perf_counter()
    print(f"[bench] {name} ...", flush=True)
    yield
    print(f"[bench] {name}: {time.perf_counter() - start:.1f} s", flush=True)


def register_tiny(folder: Path) -> tuple[str, str]:
    """A small generator registered as NAME@champion in a SQLite store under ``folder``."""
    import torch

    from pipeline.model.export import export_generator
    from pipeline.model.spec import GeneratorSpec
    from pipeline.tracking import MLflowTracker

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    spec = GeneratorSpec(
        ngf=8, n_downsample=2, n_blocks=2, norm="instance", label_nc=LABEL_NC, use_instance=False,
        residual=True, codec="hevc", quality=42, phase=3,
    )  # fmt: skip
    torch.manual_seed(0)
    generator = spec.build_generator()
    with torch.no_grad():
        generator.correction[-1].weight.normal_(0, 0.02)
    path = export_generator(folder / "generator.safetensors", generator, spec)
    tracker = MLflowTracker(uri, "bench-registry-env")
    with tracker.start_run("bench"):
        tracker.register_generator(path, NAME, alias="champion", spec=spec)
    return f"models:/{NAME}@champion", uri


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="models:/name@alias (default: register a tiny one)")
    parser.add_argument("--tracking-uri", default="", help="the store of --model")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

    from pipeline.model.export import load_generator
    from pipeline.tracking import download_model, predict, resolve_model_uri

    machine = platform.processor() or platform.machine()
    print(f"[bench] {machine}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    tmp = Path(tempfile.mkdtemp(prefix="jpdse-bench-env-"))
    total = time.perf_counter()
    try:
        with step("register and download the model"):
            model, uri = (args.model, args.tracking_uri) if args.model else register_tiny(tmp)
            model_dir = download_model(model, tracking_uri=uri, dst_dir=tmp / "download")
            generator_file = resolve_model_uri(model, tracking_uri=uri, dst_dir=tmp / "resolved")
        requirements = (model_dir / "requirements.txt").read_text()
        print("[bench] requirements.txt:\n" + textwrap.indent(requirements.strip(), "    "))
        torch_pin = next((r for r in requirements.split() if r.startswith("torch==")), "torch")

        venv = tmp / "venv"
        python = venv / "bin" / "python"
        with step("create the virtual environment"):
            run([sys.executable, "-m", "venv", str(venv)])
        with step(f"pip install {torch_pin}"):
            run([str(python), "-m", "pip", "install", "--quiet", torch_pin])
        with step("pip install -r requirements.txt"):
            run([str(python), "-m", "pip", "install", "--quiet", "-r", str(model_dir / "requirements.txt")])
        listed = run([str(python), "-m", "pip", "list", "--format", "json"]).stdout
        print(f"[bench] the environment holds {len(json.loads(listed))} distributions")

        rng = np.random.default_rng(0)
        batch = {
            "label": rng.integers(0, LABEL_NC, (1, 64, 128), dtype=np.int64),
            "decoded": rng.uniform(-1, 1, (1, 3, 64, 128)).astype(np.float32),
        }
        np.savez(tmp / "batch.npz", **batch)
        (tmp / "child.py").write_text(CHILD)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["MLFLOW_TRACKING_URI"] = uri
        with step("load_model and predict in the fresh environment"):
            child = run(
                [str(python), str(tmp / "child.py"), model, str(tmp / "batch.npz"), str(tmp / "out.npy")],
                cwd=tmp,
                env=env,
                timeout=600,
            )
        report = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"[bench] in the fresh environment: {json.dumps(report)}")
        generator, spec = load_generator(generator_file)
        expected = predict(generator, spec, batch)
        got = np.load(tmp / "out.npy")
        diff = float(np.abs(got - expected).max())
        repo = str(Path(__file__).resolve().parents[1])
        from_model = "/code/pipeline/" in report["pipeline"] and not report["pipeline"].startswith(repo)
        print(f"[bench] output {got.shape}, max |fresh - this process| = {diff:.3g}")
        print(f"[bench] pipeline imported from the model's code folder: {from_model}")
        print(f"[bench] total: {time.perf_counter() - total:.1f} s")
        if diff > 1e-5 or not from_model:
            raise SystemExit("[bench] FAILED: the fresh environment's prediction or import path differs")
    finally:
        if args.keep:
            print(f"[bench] kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
