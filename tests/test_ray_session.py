"""Ray inside one call: started only where none runs, shut down after, the signal handlers and Ray's
environment variables put back."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import pytest

from pipeline.ray_session import SIGNALS, ray_session, signal_handlers_kept


def _handler(number: int, frame: Any) -> None:
    """A stand-in for the handlers Ray installs."""


def test_the_handlers_changed_in_the_block_are_put_back_even_on_an_error() -> None:
    before = {number: signal.getsignal(number) for number in SIGNALS}
    with pytest.raises(RuntimeError, match="inside"), signal_handlers_kept():
        for number in SIGNALS:
            signal.signal(number, _handler)
        raise RuntimeError("inside")
    assert {number: signal.getsignal(number) for number in SIGNALS} == before
    assert signal.SIGINT in SIGNALS and signal.SIGTERM in SIGNALS


class FakeRay:
    """``ray``'s session calls, recorded; ``ray.init`` raises ConnectionError for ``refused`` addresses and,
    as the real one, installs a SIGTERM handler and sets variables of its own."""

    def __init__(self, running: bool, refused: tuple[str, ...] = ()) -> None:
        self.running, self.refused, self.calls = running, refused, []

    def is_initialized(self) -> bool:
        return self.running

    def init(self, **kwargs: Any) -> None:
        self.calls.append(("init", kwargs))
        if kwargs.get("address") in self.refused:
            raise ConnectionError(f"no cluster at {kwargs['address']}")
        signal.signal(signal.SIGTERM, _handler)
        os.environ.update(PYTHONBREAKPOINT="ray.util.rpdb._driver_set_trace", RAY_USAGE_STATS_ENABLED="0")
        self.running = True

    def shutdown(self) -> None:
        self.calls.append(("shutdown", {}))
        self.running = False


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> FakeRay:
    ray = FakeRay(running=False, refused=("auto",))
    monkeypatch.setitem(sys.modules, "ray", ray)  # what ``import ray`` inside ray_session gets
    return ray


def test_a_refused_cluster_falls_back_to_a_local_session_shut_down_after(
    fake_ray: FakeRay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")  # the user's own, kept
    sigterm = signal.getsignal(signal.SIGTERM)
    with ray_session({"address": "auto"}, {"address": None, "num_cpus": 2}):
        assert fake_ray.running and signal.getsignal(signal.SIGTERM) is _handler
        assert os.environ["PYTHONBREAKPOINT"].startswith("ray.")
    assert fake_ray.calls == [
        ("init", {"address": "auto"}),
        ("init", {"address": None, "num_cpus": 2}),
        ("shutdown", {}),
    ]
    assert not fake_ray.running and signal.getsignal(signal.SIGTERM) is sigterm
    assert "PYTHONBREAKPOINT" not in os.environ and os.environ["RAY_USAGE_STATS_ENABLED"] == "1"


def test_the_last_way_to_start_raises_its_own_error(fake_ray: FakeRay) -> None:
    with pytest.raises(ConnectionError, match="no cluster at auto"), ray_session({"address": "auto"}):
        pass
    assert fake_ray.calls == [("init", {"address": "auto"})]


def test_a_running_session_is_used_and_left_running(fake_ray: FakeRay) -> None:
    fake_ray.running = True
    with pytest.raises(KeyError), ray_session({"address": None}):
        raise KeyError("the block failed")
    assert fake_ray.calls == [] and fake_ray.running
