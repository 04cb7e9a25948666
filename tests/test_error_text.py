"""The one error boundary (``lora_tools.error_text.describe``): every kind of exception becomes one
line and its exit code, through the real CLI as well as directly, and a recipe job's failed line is
the same text."""

from __future__ import annotations

import errno
import os
import sys
import types
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from lora_tools.error_text import (
    EXIT_DEVICE,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_LIBRARY,
    EXIT_MEMORY,
    EXIT_NETWORK,
    describe,
)
from lora_tools.errors import DeviceError, HubError, OutputError


def _library_error(module: str, name: str, base: type[BaseException], text: str) -> BaseException:
    """An exception whose type lives in ``module`` (as torch's or diffusers' own types do)."""
    cls = types.new_class(name, (base,))
    cls.__module__ = module
    return cls(text)


OS_CASES = [
    (errno.ENAMETOOLONG, "file name too long", "choose a shorter name"),
    (errno.ELOOP, "too many levels of symbolic links", "fix or remove the link"),
    (errno.EACCES, "permission denied", "check the permissions"),
    (errno.EROFS, "read-only file system", "choose a path on a writable disk"),
    (errno.ENOSPC, "no space left on the device", "free some space"),
    (errno.EDQUOT, "disk quota exceeded", "free some space"),
    (errno.EISDIR, "it is a directory", "name a file"),
    (errno.ENOTDIR, "a part of the path is a file, not a folder", "check the path"),
    (errno.EXDEV, "it is on another file system", "one file system"),
    (errno.EIO, "input/output error", "try again"),
    (errno.EMFILE, "too many open files", "ulimit -n"),
    (errno.ENXIO, "no such device or address", "name a regular file"),
]


@pytest.mark.parametrize(("code", "reason", "step"), OS_CASES, ids=[errno.errorcode[c[0]] for c in OS_CASES])
def test_os_errors_name_the_path_the_reason_and_a_next_step(code: int, reason: str, step: str) -> None:
    failure = describe(OSError(code, os.strerror(code), "/some/where.safetensors"))
    assert failure.exit_code == EXIT_INPUT
    assert failure.message.startswith(f"'/some/where.safetensors': {reason}"), failure.message
    assert step in failure.message and "\n" not in failure.message


def test_two_paths_are_both_named() -> None:
    failure = describe(OSError(errno.EXDEV, "Invalid cross-device link", "/a/tmp", None, "/b/out"))
    assert failure.message.startswith("'/a/tmp' -> '/b/out': it is on another file system")


def test_pathlib_symlink_loop_is_an_os_error() -> None:
    assert describe(RuntimeError("Symlink loop from '/x/loop'")).message.startswith(
        "'/x/loop': too many levels of symbolic links")


@pytest.mark.parametrize(("error", "code", "start"), [
    (OutputError("cannot write 'x': no space left on the device."), EXIT_INPUT,
     "cannot write 'x': no space left on the device."),
    (HubError("Cannot get 'f' from o/r: not in the Hugging Face cache"), EXIT_INPUT, "Cannot get 'f'"),
    (DeviceError("device 'cuda' is not available"), EXIT_DEVICE, "device 'cuda' is not available"),
    (AssertionError("Torch not compiled with CUDA enabled"), EXIT_DEVICE, "the device is not available: Torch not"),
    (RuntimeError("The MPS backend is supported on MacOS 14.0+."), EXIT_DEVICE, "the device is not available"),
    (RuntimeError("Found no NVIDIA driver on your system."), EXIT_DEVICE, "the device is not available"),
    (MemoryError(), EXIT_MEMORY, "out of memory"),
    (_library_error("torch", "OutOfMemoryError", RuntimeError, "CUDA out of memory. Tried to allocate 2 GiB"),
     EXIT_MEMORY, "out of memory"),
    (_library_error("requests.exceptions", "ConnectionError", OSError, "Max retries exceeded"), EXIT_NETWORK,
     "network error: ConnectionError: Max retries exceeded"),
    (TimeoutError("timed out"), EXIT_NETWORK, "network error"),
    (_library_error("huggingface_hub.errors", "HfHubHTTPError", Exception, "500 Server Error"), EXIT_LIBRARY,
     "huggingface_hub failed: HfHubHTTPError: 500 Server Error"),
    (_library_error("diffusers.models", "DiffusersError", ValueError, "height must be divisible by 8"),
     EXIT_LIBRARY, "diffusers failed"),
    (_library_error("transformers.tokenization", "TokenizerError", ValueError, "bad\nvocab"), EXIT_LIBRARY,
     "transformers failed: TokenizerError: bad vocab"),
    (KeyError("oops"), EXIT_INTERNAL, "internal error: KeyError"),
    (ZeroDivisionError("division by zero"), EXIT_INTERNAL, "internal error: ZeroDivisionError"),
], ids=lambda v: v if isinstance(v, int) else type(v).__name__ if isinstance(v, BaseException) else None)
def test_every_class_has_its_line_and_code(error: BaseException, code: int, start: str) -> None:
    failure = describe(error)
    assert failure.exit_code == code, failure
    assert failure.message.startswith(start), failure.message
    assert "\n" not in failure.message
    if code == EXIT_INTERNAL:
        assert "run with --debug" in failure.message


def test_a_value_error_raised_inside_a_library_names_the_library() -> None:
    code = compile("def boom():\n    raise ValueError('bad shape')\n", "<torch>", "exec")
    module: dict[str, object] = {"__name__": "torch.nn.functional"}
    exec(code, module)  # noqa: S102 - a function whose frame says it lives in torch
    try:
        module["boom"]()  # type: ignore[operator]
    except ValueError as e:
        failure = describe(e)
    assert failure.exit_code == EXIT_LIBRARY and failure.message.startswith("torch failed: ValueError: bad shape")


# ------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def crashing(monkeypatch: pytest.MonkeyPatch) -> click.Command:
    """A command added to the group that raises whatever the test puts in ``crashing.error``."""
    from lora_tools.cli import cli

    @click.command("crash-for-test")
    def crash() -> None:
        raise crash.error  # type: ignore[attr-defined]

    monkeypatch.setitem(cli.commands, "crash-for-test", crash)
    return crash


@pytest.mark.parametrize(("error", "code"), [
    (OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300), EXIT_INPUT),
    (AssertionError("Torch not compiled with CUDA enabled"), EXIT_DEVICE),
    (KeyError("oops"), EXIT_INTERNAL),
    (MemoryError(), EXIT_MEMORY),
], ids=["oserror", "device", "internal", "memory"])
def test_the_cli_prints_one_line_and_the_code(crashing: click.Command, error: BaseException, code: int) -> None:
    from lora_tools.cli import cli

    crashing.error = error  # type: ignore[attr-defined]
    result = CliRunner().invoke(cli, ["crash-for-test"])
    assert result.exit_code == code, result.output
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: ")


def test_debug_keeps_the_traceback(crashing: click.Command) -> None:
    from lora_tools.cli import cli

    crashing.error = KeyError("oops")  # type: ignore[attr-defined]
    result = CliRunner().invoke(cli, ["--debug", "crash-for-test"])
    assert isinstance(result.exception, KeyError)


@pytest.mark.subprocess
def test_describe_imports_no_library() -> None:
    import subprocess

    code = ("import sys, lora_tools.error_text as t; t.describe(OSError(2, 'x', 'y')); "
            "print(sorted(m for m in ('torch', 'pydantic', 'huggingface_hub', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_verify_names_a_missing_device_before_loading_anything(device: str, tmp_path: Path) -> None:
    import torch

    from lora_tools.cli import cli
    from lora_tools.testing.synthetic import write_checkpoint

    if device == "cuda" and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"this machine has {device}")
    model = write_checkpoint(tmp_path / "m.safetensors", "tiny", dtype="fp16", seed=1)
    result = CliRunner().invoke(cli, ["verify", str(model), "--preset", "lightning-4step", "--device", device,
                                      "--size", "32x32", "--out", str(tmp_path / "out")])
    assert result.exit_code == EXIT_DEVICE, result.output
    assert result.stderr.startswith(f"Error: device '{device}' is not available: ")
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.rstrip().endswith("; pass --device cpu to run elsewhere.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
