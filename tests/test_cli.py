"""The command line refuses bad values and files before any work: exit 2, one line on stderr, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A local port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def minimal_jse(folder: Path) -> Path:
    """A truncated .jse: the magic bytes and nothing after them."""
    from pipeline.compress.container import MAGIC

    return write(folder / "cut.jse", MAGIC)


# (name, arguments; "{tmp}" is the test's folder, "{dead}" an http store nobody serves), what stderr names
CASES: list[tuple[str, list[str], str]] = [
    ("steps 0", ["train", "phase1.steps=0"], "phase1.steps must be >= 1"),
    ("steps negative", ["train", "phase2.steps=-5"], "phase2.steps"),
    ("checkpoint_every negative", ["train", "train.checkpoint_every=-3"], "train.checkpoint_every"),
    ("unknown norm", ["train", "model.norm=foo"], "model.norm must be one of"),
    ("unknown gan mode", ["train", "loss.gan_mode=foo"], "gan_mode"),
    ("unknown eval input", ["evaluate", "eval.input=foo"], "eval.input must be one of"),
    ("unknown label coder", ["shards", "shards.label_coder=foo"], "label_coder"),
    ("label_downsample 0", ["shards", "shards.label_downsample=0"], "label_downsample"),
    ("batch_size 0", ["train", "loader.batch_size=0"], "batch_size"),
    ("negative lr", ["train", "phase1.lr=-0.1"], "lr must be > 0"),
    ("ngf 0", ["train", "model.ngf=0"], "ngf"),
    ("n_downsample 8", ["train", "model.n_downsample=8"], "n_downsample"),
    ("empty experiment", ["train", "tracking.experiment="], "experiment"),
    (
        "unknown codec (shards)",
        ["shards", "shards.codecs=[{name: foo, qualities: [1]}]"],
        "unknown codec 'foo'",
    ),
    ("unknown codec (train)", ["train", "loader.codec=foo"], "loader.codec: unknown codec 'foo'"),
    (
        "bad codec option",
        ["shards", "shards.codecs=[{name: hevc, qualities: [42], options: {bogus: 1}}]"],
        "bad options for codec 'hevc'",
    ),
    (
        "quality out of range",
        ["shards", "shards.codecs=[{name: hevc, qualities: [99]}]"],
        "outside hevc's range",
    ),
    ("missing bpgenc", ["shards", "shards.codecs=[{name: bpg, qualities: [30]}]"], "bpgenc not found"),
    ("missing config file", ["train", "--config", "{tmp}/nope.yaml"], "config file not found"),
    ("override without =", ["train", "phase1.steps"], "override must look like key.sub=value"),
    ("unknown key", ["train", "nosuch.key=1"], "unknown key(s) ['nosuch']"),
    ("missing shards (train)", ["train", "shards.output={tmp}/none"], "no shard manifest in"),
    (
        "missing shards (evaluate)",
        ["evaluate", "shards.output={tmp}/none", "eval.input=shards"],
        "holds no shards",
    ),
    ("model not safetensors", ["evaluate", "--model", "{tmp}/text.safetensors"], "not a safetensors file"),
    ("model file missing", ["evaluate", "--model", "{tmp}/missing.safetensors"], "no such file"),
    ("models:/ empty", ["evaluate", "--model", "models:/"], "bad model URI"),
    ("models:/ empty alias", ["evaluate", "--model", "models:/hevc-se-q42@"], "bad model URI"),
    ("models:/ bad version", ["evaluate", "--model", "models:/hevc-se-q42/latest"], "bad model URI"),
    ("runs:/ without path", ["evaluate", "--model", "runs:/abc"], "bad model URI"),
    (
        "models:/ store unreachable",
        ["evaluate", "--model", "models:/hevc-se-q42@champion", "tracking.uri={dead}"],
        "unreachable",
    ),
    ("decompress random bytes", ["decompress", "{tmp}/random.jse", "-o", "{tmp}/out.png"], "not a .jse"),
    ("decompress truncated", ["decompress", "{tmp}/cut.jse", "-o", "{tmp}/out.png"], "jse"),
    ("replay missing record", ["tracking-replay", "{tmp}/missing.jsonl"], "not found"),
    ("replay bad record", ["tracking-replay", "{tmp}/bad.jsonl"], "not a JSON line"),
    ("replay store unreachable", ["tracking-replay", "{tmp}/record.jsonl", "--uri", "{dead}"], "unreachable"),
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private working folder (MLflow's default store and offline records land here) with the files the
    table refers to; no tracking store, no bpg binaries on PATH."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", f"{empty_bin}{os.pathsep}{Path(sys.executable).parent}")
    write(tmp_path / "text.safetensors", b"not safetensors at all")
    write(tmp_path / "random.jse", os.urandom(64))
    minimal_jse(tmp_path)
    write(tmp_path / "bad.jsonl", b"{not json\n")
    record = '{"event": "start_run", "key": "k", "name": "job", "parent": null, "experiment": "e", '
    record += '"params": {}, "tags": {}, "time": 1}\n'
    write(tmp_path / "record.jsonl", record.encode())
    return tmp_path


@pytest.mark.parametrize(("name", "argv", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_values_exit_2_with_one_line(
    name: str,
    argv: list[str],
    expected: str,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    args = [a.replace("{tmp}", str(workdir)).replace("{dead}", dead) for a in argv]
    if args[0] not in ("compress", "decompress", "tracking-replay") and "--config" not in args:
        args += [f"shards.output={workdir / 'shards'}"] if not any("shards.output" in a for a in args) else []
        args += [f"eval.output_dir={workdir / 'eval'}", f"train.output_dir={workdir / 'train'}"]
        if not any(a.startswith("tracking.") for a in args):
            args.append("tracking.enabled=false")
    start = time.monotonic()
    code = main(args)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert elapsed < 15, f"{name} took {elapsed:.1f}s"
    assert not (workdir / "train").exists() and not (workdir / "eval").exists(), "work started"


@pytest.mark.slow
def test_no_traceback_reaches_stderr_of_the_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "phase1.steps=0", f"train.output_dir={tmp_path / 't'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: phase1.steps must be >= 1 (0 would export an untrained generator), got 0"
    ]
    assert not (tmp_path / "t").exists()


def test_registry_uri_against_a_store_that_does_not_exist(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A models:/ URI is looked up without creating the store it names (a model missing from an existing
    store: tests/test_tracking.py)."""
    store = f"sqlite:///{workdir / 'store' / 'mlflow.db'}"
    assert main(["evaluate", "--model", "models:/hevc-se-q42/1", f"tracking.uri={store}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: models:/hevc-se-q42/1: there is no MLflow store at {store}"]
    assert not (workdir / "store").exists()


def test_unexpected_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    """A bug is not an expected failure: it is not reduced to one line."""
    import pipeline.cli as cli

    def broken(*args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_dispatch", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["evaluate", "tracking.enabled=false"])
