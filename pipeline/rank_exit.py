"""How a launched rank leaves the process once its command has returned.

A rank of a ``torchrun`` / DeepSpeed / SLURM job that has finished its work cleanly (process group
destroyed, tracking run ended, lock released) can still abort while Python finalises the interpreter:
a C++ thread of torch (a gloo or autograd worker) that touches a Python object during
``Py_FinalizeEx`` ends in ``std::terminate`` ("terminate called without an active exception", SIGABRT),
an open PyTorch bug. The launcher then reports the whole job failed, after it succeeded. A rank therefore
runs the ``atexit`` handlers itself (MLflow's, logging's: everything an exit would run) and leaves with
``os._exit``, skipping only the finalisation in which that race happens.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import NoReturn


def launched_rank() -> bool:
    """True in a process a launcher started as one rank of several (it sets ``WORLD_SIZE``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def leave(code: int) -> NoReturn:
    """Exit with ``code`` after the ``atexit`` handlers and flushed output, without finalisation."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing can reach it
            stream.flush()
    os._exit(code)
