"""Helpers of the reliability tests: running the CLI as another user (for the permission cases a
root test run would not see: root reads unreadable files and writes into read-only folders), and
inputs that keep the fault tests quick."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from lora_tools.cli import cli

#: The ``run_as`` fixture's type: ``run_as(uid, gid, argv) -> (exit code, stdout, stderr)``.
RunAs = Callable[[int, int, list[str]], tuple[int, str, str]]
#: The ``tmpfs`` fixture's type: ``with tmpfs(at, options) as folder: ...``.
Tmpfs = Callable[[Path, str], contextlib.AbstractContextManager[Path]]


def nobody() -> tuple[int, int] | None:
    """``(uid, gid)`` of ``nobody`` when the tests run as root and it exists, else ``None``."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def unprivileged() -> tuple[int, int] | None:
    """The user to run a permission case as: this user when it is not root, else ``nobody``
    (``None``: root with no ``nobody`` to drop to, so the case cannot be tested)."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    return nobody()


def run_as(uid: int, gid: int, argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in a forked child as ``uid``/``gid``; its exit code, stdout and stderr.

    The child imports nothing new after it drops its privileges only if the parent already ran
    the same code path once (the interpreter's files may be unreadable to ``nobody``).
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(read)
            if (uid, gid) != (os.geteuid(), os.getegid()):
                os.setgid(gid)
                os.setuid(uid)
            result = CliRunner().invoke(cli, argv)
            os.write(write, json.dumps([result.exit_code, result.stdout, result.stderr]).encode())
        except BaseException:  # noqa: BLE001 - report through the exit status, never run on as root's test
            status = 3
        finally:
            os._exit(status)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed before reporting"
    code, stdout, stderr = json.loads(b"".join(chunks))
    return code, stdout, stderr


def write_tuned(path: Path, base: Path) -> Path:
    """``base`` with two attention weights changed: a fine-tune whose extract is quick (two modules)."""
    from lora_tools.io.safetensors import load_tensors, save_tensors

    tensors = load_tensors(base)
    for key in sorted(k for k in tensors if k.endswith("attn1.to_q.weight"))[:2]:
        tensors[key] = tensors[key] + 0.01
    return save_tensors(path, tensors, {"format": "pt"})


def write_small_lora(path: Path, modules: int = 4, rank: int = 4) -> Path:
    """A tiny-SDXL kohya LoRA cut to its first ``modules`` modules: every LoRA op on it is quick."""
    from lora_tools.io.safetensors import save_tensors
    from lora_tools.testing.synthetic_lora import make_lora

    tensors, metadata = make_lora("tiny", rank=rank)
    keep = sorted({k.split(".", 1)[0] for k in tensors})[:modules]
    return save_tensors(path, {k: v for k, v in tensors.items() if k.split(".", 1)[0] in keep}, metadata)
