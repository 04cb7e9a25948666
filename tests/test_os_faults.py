"""Every command that writes x every OS fault on the output path: one line naming the path and the reason,
exit 1, no traceback, nothing left under the output name (no temp either), inputs byte-identical.

Commands: fuse (file and diffusers folder), rescale, resize, merge, convert, extract, verify, publish and
run (a recipe job). Faults: a name too long (and one whose temp name is too long), a symbolic-link loop,
an output that is a directory (or a file where a folder goes), an output under a file, a read-only file
system and a full disk (real tmpfs mounts, where the tests run as root and may mount), a folder the user
may not write (as ``nobody`` when the tests run as root). Everything is refused before a model is
computed, except the full disk (verify renders first: that case is slow).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.testing.synthetic import write_checkpoint
from tests.reliability_helpers import Tmpfs, run_as, unprivileged, write_small_lora, write_tuned

COUNTED = "bad_input_cases"


@dataclass(frozen=True)
class Inputs:
    base: Path  # micro UNet-only checkpoint (every input small: each case hashes them all before and after)
    tuned: Path
    full: Path  # micro full checkpoint (diffusers output, verify: the smallest model diffusers renders)
    lora: Path
    made: Path  # a LoRA loratool wrote (publish releases only those)
    config: Path  # tokenizers for verify (micro)

    def files(self) -> list[Path]:
        return [self.base, self.tuned, self.full, self.lora, self.made]


Argv = Callable[[Inputs, Path], list[str]]


def _recipe(io: Inputs, out: Path) -> list[str]:
    """A recipe (written beside the inputs) whose one rescale job writes ``out``."""
    recipe = io.lora.parent / f"recipe-{hashlib.sha256(str(out).encode()).hexdigest()[:12]}.yaml"
    recipe.write_text(f"version: 1\noutput_dir: '{out.parent}'\ninputs:\n  l: '{io.lora}'\njobs:\n"
                      f"  - rescale: {{lora: l, strength: 0.5, output: '{out.name}'}}\n")
    return ["run", str(recipe), "-q"]


#: command -> (argv writing ``out``, the kind of output).
WRITERS: dict[str, tuple[Argv, str]] = {
    "fuse": (lambda io, out: ["fuse", str(io.base), "--lora", str(io.lora), "-o", str(out), "-q"], "file"),
    "fuse-diffusers": (lambda io, out: ["fuse", str(io.full), "--lora", str(io.lora), "--save", "diffusers",
                                        "-o", str(out), "-q"], "folder"),
    "rescale": (lambda io, out: ["rescale", str(io.lora), "--strength", "0.5", "-o", str(out)], "file"),
    "resize": (lambda io, out: ["resize", str(io.lora), "--rank", "1", "-o", str(out)], "file"),
    "merge": (lambda io, out: ["merge", str(io.lora), f"{io.lora}:0.5", "-o", str(out)], "file"),
    "convert": (lambda io, out: ["convert", str(io.lora), "--to", "peft", "-o", str(out)], "file"),
    "extract": (lambda io, out: ["extract", str(io.tuned), str(io.base), "--rank", "1", "-o", str(out)], "file"),
    "verify": (lambda io, out: ["verify", str(io.full), "--preset", "lightning-4step", "--config", str(io.config),
                                "--size", "32x32", "--prompt", "a cat", "--seeds", "0", "--device", "cpu",
                                "--dtype", "fp32", "--out", str(out)], "folder"),
    "publish": (lambda io, out: ["publish", str(io.made), "--license", "openrail++", "--release-dir", str(out)],
                "folder"),
    "run": (_recipe, "file"),
}


def _name(command: str) -> str:
    return "out" if WRITERS[command][1] == "folder" else "out.safetensors"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    from lora_tools.io.diffusers_folder import write_byte_tokenizer
    from lora_tools.testing.synthetic import MICRO

    root = tmp_path_factory.mktemp("os-fault-inputs")
    root.chmod(0o755)
    base = write_checkpoint(root / "base.safetensors", "micro", dtype="fp16", components=("unet",))
    lora = write_small_lora(root / "lora.safetensors")
    made = root / "made.safetensors"
    result = CliRunner().invoke(cli, ["rescale", str(lora), "--strength", "0.5", "-o", str(made)])
    assert result.exit_code == 0, result.output
    config = root / "config"
    for name, te in (("tokenizer", MICRO.te1), ("tokenizer_2", MICRO.te2)):
        write_byte_tokenizer(config / name, te.vocab, te.positions)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return Inputs(base, write_tuned(root / "tuned.safetensors", base),
                  write_checkpoint(root / "full.safetensors", "micro", dtype="fp32", seed=1), lora, made, config)


def _state(io: Inputs) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns) for p in io.files()}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _failed(code: int, stdout: str, stderr: str, command: str) -> str:
    """The line that says why: the one ``Error:`` line (for ``run``: the failed job's line or the plan's)."""
    assert "Traceback" not in stdout + stderr, stdout + stderr
    assert code == 1, (code, stdout, stderr)
    lines = stderr.splitlines()
    if command == "run":
        return "\n".join(lines + stdout.splitlines())
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def _run(argv: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, argv)
    return result.exit_code, result.stdout, result.stderr


def _check(command: str, io: Inputs, out: Path, watched: Path, reasons: tuple[str, ...],
           runner: Callable[[list[str]], tuple[int, str, str]] = _run) -> str:
    argv = WRITERS[command][0](io, out)
    before, listing = _state(io), _listing(watched)
    text = _failed(*runner(argv), command)
    assert any(r in text for r in reasons), text
    assert _listing(watched) == listing, "something was left behind (an output or a temp)"
    assert _state(io) == before, "an input changed"
    return text


# ------------------------------------------------------------------------------- path faults
@contextlib.contextmanager
def _fault(kind: str, root: Path, command: str) -> Iterator[Path]:
    name = _name(command)
    suffix = ".safetensors" if name.endswith(".safetensors") else ""
    if kind == "name-too-long":
        yield root / ("n" * 300 + suffix)
    elif kind == "temp-name-too-long":  # the name fits, its temp name (.NAME.<pid>-<n>.loratool.partial) does not
        yield root / ("t" * (250 - len(suffix)) + suffix)
    elif kind == "symlink-loop":
        os.symlink("loop", root / "loop")
        yield root / "loop" / name
    elif kind == "under-a-file":
        (root / "a-file").write_text("x")
        yield root / "a-file" / name
    elif kind == "wrong-kind":  # a directory where a file goes, a file where a folder goes
        out = root / name
        if WRITERS[command][1] == "file":
            out.mkdir()
            (out / "mine.txt").write_text("the user's")
        else:
            out.write_text("the user's")
        yield out
    else:
        raise AssertionError(kind)


REASONS = {
    "name-too-long": ("file name too long",),
    "temp-name-too-long": ("file name too long",),
    "symlink-loop": ("too many levels of symbolic links",),
    "under-a-file": ("is a file, not a folder", "a part of the path is a file",
                     "a part of the path is not a directory"),
    "wrong-kind": ("it is a directory", "it is a file", "already exists"),
}
# The default selection keeps one row per command (a name too long); the full selection (-m "") runs them all.
PATH_CASES = [pytest.param(c, k, id=f"{c}-{k}", marks=() if k == "name-too-long" else pytest.mark.slow)
              for c in WRITERS for k in REASONS]


@pytest.mark.bad_input_cases
@pytest.mark.parametrize(("command", "fault"), PATH_CASES)
def test_path_fault(command: str, fault: str, inputs: Inputs, tmp_path: Path) -> None:
    with _fault(fault, tmp_path, command) as out:
        _check(command, inputs, out, tmp_path, REASONS[fault])
        if fault == "wrong-kind":
            kept = out / "mine.txt" if out.is_dir() else out
            assert kept.read_text() == "the user's"


# ------------------------------------------------------------------------------- mounted file systems
@pytest.mark.fs  # a real tmpfs mount or another user: the full selection
@pytest.mark.bad_input_cases
@pytest.mark.parametrize("command", list(WRITERS))
def test_read_only_file_system(command: str, inputs: Inputs, tmp_path: Path, tmpfs: Tmpfs) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        _check(command, inputs, ro / "new" / _name(command), ro, ("read-only file system",))


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass


@pytest.mark.fs  # a real tmpfs mount or another user: the full selection
@pytest.mark.bad_input_cases
@pytest.mark.parametrize("command", [pytest.param(c, marks=(pytest.mark.slow, pytest.mark.diffusers)) if c == "verify" else c
                                     for c in WRITERS])
def test_full_disk(command: str, inputs: Inputs, tmp_path: Path, tmpfs: Tmpfs) -> None:
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        _fill(disk)
        _check(command, inputs, disk / _name(command), disk, ("no space left", "not enough space"))
        assert [p.name for p in disk.iterdir()] == ["filler"]


# ------------------------------------------------------------------------------- permission denied
@pytest.fixture(scope="module")
def readable(inputs: Inputs) -> Iterator[Inputs]:
    """The inputs copied where ``nobody`` may read them (pytest's own folders are root's alone)."""
    work = Path(tempfile.mkdtemp(prefix="loratool-readable-"))
    work.chmod(0o755)
    shutil.copytree(inputs.base.parent, work / "inputs")
    yield Inputs(*(work / "inputs" / p.relative_to(inputs.base.parent) for p in
                   (inputs.base, inputs.tuned, inputs.full, inputs.lora, inputs.made, inputs.config)))
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.fs  # a real tmpfs mount or another user: the full selection
@pytest.mark.bad_input_cases
@pytest.mark.parametrize("command", list(WRITERS))
def test_permission_denied(command: str, readable: Inputs) -> None:
    """A 0555 folder written into by a user its permissions apply to (root drops to ``nobody`` in a
    forked child); the parent first runs the same command into a path under a file, which fails at the
    same plan step, so the child needs no import of its own."""
    ids = unprivileged()
    if ids is None:
        pytest.skip("runs as root and there is no 'nobody' user to drop to")
    work = Path(tempfile.mkdtemp(prefix="loratool-denied-"))
    try:
        work.chmod(0o755)
        inputs = readable
        (work / "a-file").write_text("x")
        code, _, _ = _run(WRITERS[command][0](inputs, work / "a-file" / _name(command)))
        assert code == 1
        (work / "a-file").unlink()
        locked = work / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        _check(command, inputs, locked / _name(command), work, ("permission denied",),
               runner=lambda argv: run_as(*ids, argv))
    finally:
        shutil.rmtree(work, ignore_errors=True)
