"""Inputs are opened only if they are regular files or folders: a FIFO, a character device or a socket
in any input role of any reading command is one line, exit 1, without blocking, nothing written.

A watchdog opens the FIFO for writing after a few seconds and closes it, so code that opened the FIFO
(the old behaviour: it hung) gets an end of file instead of hanging the test run, and the test then
fails on the message instead of timing out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.testing.synthetic import write_checkpoint
from tests.fuse_helpers import listing
from tests.reliability_helpers import write_small_lora

COUNTED = "bad_input_cases"

Argv = Callable[[Path, Path, Path, Path], list[str]]  # (bad, base, lora, work) -> argv

#: role -> how a command reads ``bad`` there, and the noun its message asks for instead.
ROLES: dict[str, tuple[Argv, str]] = {
    "inspect": (lambda bad, base, lora, w: ["inspect", str(bad)], "regular file"),
    "check": (lambda bad, base, lora, w: ["check", str(bad)], "regular file"),
    "fuse-base": (lambda bad, base, lora, w: ["fuse", str(bad), "--lora", str(lora), "-o", str(w / "o.safetensors")],
                  "regular file"),
    "fuse-lora": (lambda bad, base, lora, w: ["fuse", str(base), "--lora", str(bad), "-o", str(w / "o.safetensors")],
                  "regular file"),
    "rescale": (lambda bad, base, lora, w: ["rescale", str(bad), "--strength", "0.5", "-o", str(w / "o.safetensors")],
                "regular file"),
    "resize": (lambda bad, base, lora, w: ["resize", str(bad), "--rank", "1", "-o", str(w / "o.safetensors")],
               "regular file"),
    "merge": (lambda bad, base, lora, w: ["merge", str(lora), str(bad), "-o", str(w / "o.safetensors")],
              "regular file"),
    "convert": (lambda bad, base, lora, w: ["convert", str(bad), "--to", "peft", "-o", str(w / "o.safetensors")],
                "regular file"),
    "extract-tuned": (lambda bad, base, lora, w: ["extract", str(bad), str(base), "--rank", "1",
                                                  "-o", str(w / "o.safetensors")], "regular file"),
    "extract-original": (lambda bad, base, lora, w: ["extract", str(base), str(bad), "--rank", "1",
                                                     "-o", str(w / "o.safetensors")], "regular file"),
    "analyze": (lambda bad, base, lora, w: ["analyze", str(base), "--base", str(base), "--lora", str(bad)],
                "regular file"),
    "verify-model": (lambda bad, base, lora, w: ["verify", str(bad), "--size", "32x32", "--device", "cpu"],
                     "regular file"),
    "verify-prompts": (lambda bad, base, lora, w: ["verify", str(base), "--prompts", str(bad), "--size", "32x32",
                                                   "--device", "cpu"], "prompt file"),
    "publish": (lambda bad, base, lora, w: ["publish", str(bad), "--release-dir", str(w / "release")],
                "regular file"),
}
KINDS = {"fifo": "a named pipe (FIFO)", "device": "a character device", "socket": "a socket"}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("special-good")
    base = write_checkpoint(root / "base.safetensors", "tiny", dtype="fp16", components=("unet",))
    return base, write_small_lora(root / "lora.safetensors")


@contextlib.contextmanager
def _special(kind: str, path: Path) -> Iterator[Path]:
    """``path`` made a FIFO (with the unblocking watchdog), a link to /dev/null, or a listening socket."""
    if kind == "device":
        path.symlink_to("/dev/null")
        yield path
        return
    if kind == "socket":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(path))
            s.listen()
            yield path
        return
    os.mkfifo(path)
    stop = threading.Event()

    def unblock() -> None:  # a reader that opened the FIFO waits for a writer: be one, then leave
        while not stop.wait(3.0):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno in (errno.ENXIO, errno.ENOENT):
                    continue
                return
            os.close(fd)

    watchdog = threading.Thread(target=unblock, daemon=True)
    watchdog.start()
    try:
        yield path
    finally:
        stop.set()
        watchdog.join()


CASES = [(role, kind) for role in ROLES for kind in KINDS]


@pytest.mark.bad_input_cases
@pytest.mark.parametrize(("role", "kind"), CASES, ids=[f"{r}-{k}" for r, k in CASES])
def test_special_input_is_refused_without_blocking(role: str, kind: str, good: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    argv, noun = ROLES[role]
    with _special(kind, work / "bad.safetensors") as bad:
        before = listing(work)
        start = time.monotonic()
        result = CliRunner().invoke(cli, argv(bad, *good, work))
        seconds = time.monotonic() - start
        after = listing(work)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.strip() == f"Error: '{bad}' is {KINDS[kind]}, not a regular file: name a {noun}."
    assert seconds < 3.0, f"took {seconds:.1f} s: it blocked until the watchdog opened the FIFO"
    assert after == before


@pytest.mark.bad_input_cases
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("role", ["recipe", "recipe-input"])
def test_special_recipe_or_recipe_input_is_refused(role: str, kind: str, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    with _special(kind, tmp_path / ("recipe-fifo.yaml" if role == "recipe" else "input.safetensors")) as bad:
        if role == "recipe":
            recipe = bad
        else:
            recipe.write_text("version: 1\noutput_dir: out\ninputs:\n  l: input.safetensors\njobs:\n"
                              "  - rescale: {lora: l, strength: 0.5, output: o.safetensors}\n")
        result = CliRunner().invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 1, result.output
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    if role == "recipe":
        assert result.stderr.strip() == (f"Error: {bad}: the recipe is {KINDS[kind]}, not a regular file: "
                                         "name a recipe file")
    else:
        assert result.stderr.strip() == (f"Error: {recipe}:4:6: inputs.l: 'input.safetensors' is {KINDS[kind]}, "
                                         "not a regular file or folder")
    assert not (tmp_path / "out").exists()
