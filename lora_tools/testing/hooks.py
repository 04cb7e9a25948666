"""Fault-test hooks: inert unless a test sets their ``LORATOOL_TEST_*`` environment variable.

- :func:`pause_point`: the process pauses at a named point (``LORATOOL_TEST_PAUSE_AT``), so a test's
  signal lands exactly there;
- :func:`kill_once_progress`: a Ray task SIGKILLs its own worker once (``LORATOOL_TEST_KILL_ONCE``), as a
  lost node does.

Standard library only: the writers import this module.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

PAUSE_ENV = "LORATOOL_TEST_PAUSE_AT"
READY_ENV = "LORATOOL_TEST_READY"
GO_ENV = "LORATOOL_TEST_GO"
PAUSE_POINTS = ("planning", "mid-stream", "before-rename")
#: When set to a path, the first task to report progress creates that file and SIGKILLs its own worker
#: process mid-job (what a lost node does), once per path.
KILL_ONCE_ENV = "LORATOOL_TEST_KILL_ONCE"
_paused: set[str] = set()
#: Set by the CLI's signal handler: a paused worker thread stops waiting, so the abort can finish.
ABORTING = threading.Event()


def pause_point(point: str) -> None:
    """When ``LORATOOL_TEST_PAUSE_AT`` names ``point``, write the file named by ``LORATOOL_TEST_READY``
    and wait: for the test's signal, or until the file named by ``LORATOOL_TEST_GO`` exists. Does
    nothing otherwise."""
    if os.environ.get(PAUSE_ENV) != point or point in _paused:
        return
    _paused.add(point)
    ready = os.environ.get(READY_ENV)
    if ready:
        Path(ready).write_text(str(os.getpid()))
    go = os.environ.get(GO_ENV)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (go and os.path.exists(go)) and not ABORTING.is_set():
        time.sleep(0.02)


def kill_once_progress() -> Callable[[int], None] | None:
    """A progress callback that SIGKILLs this process the first time it is called, once per marker
    path named by ``LORATOOL_TEST_KILL_ONCE``; ``None`` when the variable is not set."""
    marker = os.environ.get(KILL_ONCE_ENV)
    if not marker:
        return None

    def advance(nbytes: int) -> None:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    return advance
