"""The quality benchmark's command line: what it accepts before it builds or trains anything."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_quality.py"


@pytest.fixture
def bench_quality(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module; the progress-bar switch it sets for its children is undone afterwards."""
    monkeypatch.setenv("TQDM_DISABLE", "")
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("text", "size"), [("none", None), ("1024x512", (1024, 512))])
def test_extra_sizes_that_are_accepted(
    bench_quality: ModuleType, text: str, size: tuple[int, int] | None
) -> None:
    assert bench_quality.size_choice(text) == size


@pytest.mark.parametrize("text", ["1024", "x512", "0x512", "1024x-5", "1024x512x2", "big", "auto"])
def test_a_malformed_extra_size_is_refused(bench_quality: ModuleType, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT"):
        bench_quality.size_choice(text)
