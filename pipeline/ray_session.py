"""Ray inside one call of the pipeline (the shard build, the sweep): started only where no session runs,
and the process left with the signal handlers it had.

``ray.init`` installs a SIGTERM handler and Tune's ``fit`` handlers for SIGINT and SIGUSR1, and neither
puts them back. After a sweep inside a longer process (a notebook, a script that trains next), Tune's
SIGINT handler would swallow the next Ctrl-C, setting a flag of the finished sweep. ``ray.init`` also
points ``PYTHONBREAKPOINT`` at Ray's remote debugger, which ``ray.shutdown`` leaves there: the process's
next ``breakpoint()`` would wait for a debugger to attach to a Ray that is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


@contextlib.contextmanager
def signal_handlers_kept() -> Iterator[None]:
    """Put back the handlers of :data:`SIGNALS` after the block (only the main thread may set them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {number: signal.getsignal(number) for number in SIGNALS}
    try:
        yield
    finally:
        for number, handler in saved.items():
            if handler is not None:  # None: installed outside Python, nothing to put back
                signal.signal(number, handler)


def _ray_owned(name: str) -> bool:
    """The environment variables ``ray.init`` sets in the driver for itself."""
    return name == "PYTHONBREAKPOINT" or name.startswith("RAY_")


@contextlib.contextmanager
def ray_environment_kept() -> Iterator[None]:
    """Put back, after the block, the variables of :func:`_ray_owned` as they were before it."""
    saved = {name: value for name, value in os.environ.items() if _ray_owned(name)}
    try:
        yield
    finally:
        for name in [name for name in os.environ if _ray_owned(name) and name not in saved]:
            del os.environ[name]
        os.environ.update(saved)


@contextlib.contextmanager
def ray_session(*inits: dict[str, Any]) -> Iterator[None]:
    """Ray for the block: the session already running, else one started with the first of ``inits``
    (``ray.init``'s keywords) that does not raise ``ConnectionError``, shut down after the block. The
    signal handlers and Ray's environment variables are put back either way."""
    import ray

    with signal_handlers_kept(), ray_environment_kept():
        started = not ray.is_initialized()
        if started:
            _init_first(ray, inits)
        try:
            yield
        finally:
            if started:
                ray.shutdown()


def _init_first(ray: Any, inits: tuple[dict[str, Any], ...]) -> None:
    """``ray.init`` with each of ``inits`` in turn until one does not refuse to connect; the last one's
    error is raised."""
    for kwargs in inits[:-1]:
        with contextlib.suppress(ConnectionError):
            ray.init(**kwargs)
            return
    ray.init(**inits[-1])
