"""conftest's ``forked_cli`` (tests/fork_server.py) answers as a fresh ``loratool`` process does: its output and its
exit status (signals: tests/test_faults.py), and it refuses a run whose environment the server's imports may have
read."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.fork_server import ENV_REFUSED, ForkedRun

ForkedCli = Callable[..., ForkedRun]
LORATOOL = [sys.executable, "-c", "from lora_tools.cli import main; main()"]


def test_output_and_exit_status_are_a_fresh_processs(forked_cli: ForkedCli, tmp_path: Path) -> None:
    for argv in (["presets"], ["nosuch"], ["inspect", "missing.safetensors"]):
        forked = forked_cli(argv, cwd=tmp_path)
        fresh = subprocess.run([*LORATOOL, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert forked.communicate(timeout=120) == (fresh.stdout, fresh.stderr), argv
        assert forked.returncode == fresh.returncode and forked.pid > 0, argv
    assert forked.returncode != 0


def test_an_environment_read_at_import_is_refused(forked_cli: ForkedCli, tmp_path: Path) -> None:
    run = forked_cli(["presets"], env=dict(os.environ, HF_HOME=str(tmp_path / "elsewhere")))
    out, err = run.communicate(timeout=120)
    assert run.returncode == ENV_REFUSED and out == ""
    assert "changes HF_HOME" in err and "fresh interpreter" in err
