"""The fault-test hooks (lora_tools/testing/hooks.py) are inert without their variables and do what the fault
and Ray tests rely on with them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lora_tools.testing import hooks

_KILL = "from lora_tools.testing.hooks import kill_once_progress\nkill_once_progress()(1)\nprint('alive')"


def test_without_their_variables_the_hooks_do_nothing(monkeypatch) -> None:
    for name in (hooks.PAUSE_ENV, hooks.READY_ENV, hooks.GO_ENV, hooks.KILL_ONCE_ENV):
        monkeypatch.delenv(name, raising=False)
    hooks.pause_point("planning")  # returns at once
    assert hooks.kill_once_progress() is None


@pytest.mark.subprocess
def test_pause_point_announces_itself_and_waits_for_go(tmp_path: Path) -> None:
    ready, go = tmp_path / "ready", tmp_path / "go"
    go.touch()  # already there: the pause ends at once
    code = "from lora_tools.testing.hooks import pause_point\npause_point('mid-stream')\npause_point('planning')"
    env = dict(os.environ, LORATOOL_TEST_PAUSE_AT="mid-stream", LORATOOL_TEST_READY=str(ready),
               LORATOOL_TEST_GO=str(go))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False, timeout=60)
    assert p.returncode == 0, p.stderr
    assert ready.read_text().isdigit()  # the paused process's id, for the test to signal


@pytest.mark.subprocess
def test_kill_once_kills_the_first_process_only(tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    env = dict(os.environ, LORATOOL_TEST_KILL_ONCE=str(marker))
    first = subprocess.run([sys.executable, "-c", _KILL], env=env, capture_output=True, text=True, check=False, timeout=60)
    assert first.returncode == -signal.SIGKILL and marker.exists()
    second = subprocess.run([sys.executable, "-c", _KILL], env=env, capture_output=True, text=True, check=False, timeout=60)
    assert second.returncode == 0 and second.stdout.strip() == "alive"
