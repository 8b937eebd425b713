"""The first contact with an http(s) MLflow store has its own, short, connect timeout: a store that does not
answer the connect fails within it, while MLflow's request timeout (reads included) stays longer."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from pipeline.config import ConfigError, from_dict
from pipeline.tracking.base import RunInfo
from pipeline.tracking.mlflow_store import MLflowStore, StoreUnavailable, check_connect, store_call


@pytest.fixture
def unanswered() -> Iterator[str]:
    """A local port whose connects hang: a listening socket with a full accept queue (the kernel drops
    further SYNs), as a firewalled or overloaded store."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    try:
        probe = socket.create_connection(("127.0.0.1", port), timeout=0.5)
    except TimeoutError:
        pass
    else:
        probe.close()
        pytest.skip("this kernel accepts connects beyond a full backlog")
    yield f"http://127.0.0.1:{port}"
    for filler in fillers:
        filler.close()
    server.close()


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_a_store_that_does_not_answer_the_connect_fails_within_the_connect_timeout(
    unanswered: str, no_proxy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # MLflow alone would wait a minute
    began = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"unreachable \(start_run: no answer to connect within 0.5 s"):
        MLflowStore(unanswered, "jpd-se", connect_timeout=0.5).start_run(
            RunInfo("k", "job", None, {}, {}, 1), None
        )
    assert time.monotonic() - began < 3
    began = time.monotonic()
    with (
        pytest.raises(StoreUnavailable, match="no answer to connect within 0.3 s"),
        store_call(unanswered, "lookup", connect_timeout=0.3),
    ):
        pytest.fail("the call must not run")
    assert time.monotonic() - began < 3


def test_connect_check_refused_unresolvable_and_answering(no_proxy: None) -> None:
    with pytest.raises(StoreUnavailable, match="connection refused"):
        check_connect("http://127.0.0.1:9", 2)
    with pytest.raises(StoreUnavailable, match="no host"):
        check_connect("http://:5000", 2)
    with socket.socket() as server:  # an answering server: the check passes (MLflow's timeout bounds reads)
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        check_connect(f"http://127.0.0.1:{server.getsockname()[1]}", 2)


def test_the_check_goes_to_the_proxy_requests_would_use(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(8)
        monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{proxy.getsockname()[1]}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        check_connect("http://store.invalid:5000", 2)  # the store's name is the proxy's to resolve


def test_the_connect_timeout_is_a_tracking_setting() -> None:
    assert from_dict({"tracking": {"connect_timeout": 0.5}}).tracking.connect_timeout == 0.5
    with pytest.raises(ConfigError, match="connect_timeout must be > 0"):
        from_dict({"tracking": {"connect_timeout": 0}})
    with pytest.raises(ValueError, match="connect_timeout must be > 0"):
        MLflowStore("http://127.0.0.1:9", "jpd-se", connect_timeout=-1)
