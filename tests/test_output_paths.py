"""Output paths that cannot be written, for every command that writes: a read-only file system,
a folder that is not writable, an output that is a directory, an output under a file.

Each case drives the real CLI and asserts the one line naming the path and the reason, exit 1,
nothing left behind (no output, no temp file) and every input unchanged. The read-only file
system is a real one (a tmpfs mounted read-only where the tests run as root and may mount);
the unwritable folder is tested as a user that folder permissions apply to (``nobody`` when the
tests run as root). Each is skipped, with the reason, where it cannot be set up. ``fuse``'s own
path-kind cases are in ``test_output.py``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.testing.synthetic import write_checkpoint
from tests.fork_server import ForkedRun
from tests.reliability_helpers import RunAs, Tmpfs, unprivileged, write_tuned


@dataclass(frozen=True)
class Inputs:
    base: Path  # a micro UNet-only SDXL checkpoint (each case hashes every input before and after: small ones)
    tuned: Path  # the same topology, other weights (for extract)
    full: Path  # a micro full SDXL checkpoint (for a diffusers folder)
    lora: Path  # a tiny UNet LoRA (rescale, resize, merge, convert)
    fuse_lora: Path  # a micro UNet LoRA, which fits base and full


Argv = Callable[[Inputs, Path], list[str]]

#: command -> (argv writing to ``out``, the kind of output it writes).
WRITERS: dict[str, tuple[Argv, str]] = {
    "fuse": (lambda io, out: ["fuse", str(io.base), "--lora", str(io.fuse_lora), "-o", str(out), "-q"], "file"),
    "fuse-diffusers": (lambda io, out: ["fuse", str(io.full), "--lora", str(io.fuse_lora), "--save", "diffusers",
                                        "-o", str(out), "-q"], "folder"),
    "rescale": (lambda io, out: ["rescale", str(io.lora), "--strength", "0.5", "-o", str(out)], "file"),
    "resize": (lambda io, out: ["resize", str(io.lora), "--rank", "1", "-o", str(out)], "file"),
    "merge": (lambda io, out: ["merge", str(io.lora), f"{io.lora}:0.5", "-o", str(out)], "file"),
    "convert": (lambda io, out: ["convert", str(io.lora), "--to", "peft", "-o", str(out)], "file"),
    "extract": (lambda io, out: ["extract", str(io.tuned), str(io.base), "--rank", "1", "-o", str(out)], "file"),
}
FILE_WRITERS = [c for c, (_, kind) in WRITERS.items() if kind == "file"]


def _name(command: str) -> str:
    return "pipe" if WRITERS[command][1] == "folder" else "out.safetensors"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_unet_inputs: SimpleNamespace) -> Inputs:
    root = tmp_path_factory.mktemp("output-path-inputs")
    from lora_tools.testing.synthetic_lora import write_lora

    base = write_checkpoint(root / "base.safetensors", "micro", dtype="fp16", components=("unet",))
    return Inputs(
        base=base,
        tuned=write_tuned(root / "tuned.safetensors", base),
        full=write_checkpoint(root / "full.safetensors", "micro", dtype="fp16"),
        lora=tiny_unet_inputs.lora,
        fuse_lora=write_lora(root / "fuse-lora.safetensors", "micro", rank=2),
    )


def _state(io: Inputs) -> dict[str, tuple[int, int, str]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in (io.base, io.tuned, io.full, io.lora, io.fuse_lora)}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_line(code: int, stdout: str, stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    assert code == 1, (code, stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def _run(argv: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, argv)
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------------------------- read-only file system
@pytest.mark.parametrize("nested", [False, True], ids=["in-it", "in-a-new-subfolder"])
@pytest.mark.parametrize("command", list(WRITERS))
def test_read_only_file_system(command: str, nested: bool, inputs: Inputs, read_only_fs: Path,
                               tmp_path: Path) -> None:
    out = (read_only_fs / "new" if nested else read_only_fs) / _name(command)
    before, listing = _state(inputs), _listing(tmp_path)
    line = _one_line(*_run(WRITERS[command][0](inputs, out)))
    assert line == f"Error: cannot write in '{read_only_fs}': read-only file system."
    assert list(read_only_fs.iterdir()) == []
    assert _listing(tmp_path) == listing and _state(inputs) == before


# ------------------------------------------------------------------------------- unwritable folder
@pytest.mark.parametrize("command", list(WRITERS))
def test_unwritable_folder(command: str, inputs: Inputs, run_as: RunAs) -> None:
    """A 0555 folder, written into by a user its permissions apply to (root drops to ``nobody``
    in a forked child: root itself writes into any folder)."""
    ids = unprivileged()
    if ids is None:
        pytest.skip("runs as root and there is no 'nobody' user to drop to: root writes into read-only folders")
    work = Path(tempfile.mkdtemp(prefix="loratool-unwritable-"))
    try:
        work.chmod(0o755)
        io = Inputs(*(Path(shutil.copyfile(p, work / p.name)) for p in
                      (inputs.base, inputs.tuned, inputs.full, inputs.lora, inputs.fuse_lora)))
        for p in (io.base, io.tuned, io.full, io.lora, io.fuse_lora):
            p.chmod(0o644)
        argv = WRITERS[command][0]
        # The child may not read the interpreter's own files (/root/...): the parent first runs the
        # same command into a path under a file, which fails at the same output check (so imports
        # everything the child needs) without writing anything.
        (work / "a-file").write_text("x")
        code, _, stderr = _run(argv(io, work / "a-file" / _name(command)))
        assert code == 1 and "is a file, not a folder" in stderr, stderr
        (work / "a-file").unlink()
        locked = work / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        before, listing = _state(io), _listing(work)
        line = _one_line(*run_as(*ids, argv(io, locked / _name(command))))
        assert line == f"Error: cannot write in '{locked}': permission denied."
        assert _listing(work) == listing and _state(io) == before
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------- path kinds
@pytest.mark.parametrize("overwrite", [pytest.param(False, id="plain", marks=pytest.mark.slow),
                                       pytest.param(True, id="overwrite")])  # plain: the full selection
@pytest.mark.parametrize("command", FILE_WRITERS)
def test_output_that_is_a_directory(command: str, overwrite: bool, inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "taken.safetensors"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    before, listing = _state(inputs), _listing(tmp_path)
    line = _one_line(*_run([*WRITERS[command][0](inputs, out), *(["--overwrite"] if overwrite else [])]))
    assert line == f"Error: cannot write '{out}': it is a directory (the output is a file)."
    assert _listing(tmp_path) == listing and _state(inputs) == before
    assert (out / "mine.txt").read_text() == "the user's"


@pytest.mark.parametrize("command", list(WRITERS))
def test_output_under_a_file(command: str, inputs: Inputs, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / _name(command)
    before, listing = _state(inputs), _listing(tmp_path)
    line = _one_line(*_run(WRITERS[command][0](inputs, out)))
    assert line == f"Error: cannot write '{out}': '{tmp_path / 'file'}' is a file, not a folder."
    assert _listing(tmp_path) == listing and _state(inputs) == before
    assert (tmp_path / "file").read_text() == "x"


def test_folder_output_where_a_file_is(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "pipe"
    out.write_text("x")
    for extra in ([], ["--overwrite"]):
        line = _one_line(*_run([*WRITERS["fuse-diffusers"][0](inputs, out), *extra]))
        assert line == f"Error: cannot write '{out}': it is a file (the output is a folder)."
    assert out.read_text() == "x" and _listing(tmp_path) == ["pipe"]


# ------------------------------------------------------------------------------- a real full disk
@pytest.mark.parametrize("command", ["fuse", "rescale"])
def test_too_small_disk_is_refused_at_plan_time(command: str, inputs: Inputs, tmp_path: Path, tmpfs: Tmpfs) -> None:
    with tmpfs(tmp_path / "small", "size=64k") as small:
        out = small / _name(command)
        before = _state(inputs)
        line = _one_line(*_run(WRITERS[command][0](inputs, out)))
        assert re.fullmatch(rf"Error: not enough space on '{re.escape(str(small))}' for '{re.escape(str(out))}': "
                            r"need \d+\.\d (KiB|MiB), have 64\.0 KiB\.", line), line
        assert list(small.iterdir()) == [] and _state(inputs) == before


@pytest.mark.subprocess  # a process of its own, forked by conftest's forked_cli
def test_disk_filling_mid_write_is_one_line(forked_cli: Callable[..., ForkedRun], inputs: Inputs, tmp_path: Path,
                                            tmpfs: Tmpfs) -> None:
    """The plan fits; then another writer fills the disk while the output is half written (the
    output package's mid-stream hook holds the run there): one line, exit 1, the temp removed."""
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        out = disk / "out.safetensors"
        ready, go = tmp_path / "ready", tmp_path / "go"
        env = dict(os.environ, LORATOOL_TEST_PAUSE_AT="mid-stream", LORATOOL_TEST_READY=str(ready),
                   LORATOOL_TEST_GO=str(go))
        proc = forked_cli(WRITERS["convert"][0](inputs, out), env=env)
        try:
            deadline = time.monotonic() + 180
            while not ready.exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the mid-stream point was never reached"
                time.sleep(0.02)
            assert [p.name for p in disk.iterdir() if p.name.endswith(".loratool.partial")]
            with open(disk / "filler", "wb", buffering=0) as f:  # the other writer: every byte left
                try:
                    while f.write(b"\0" * 65536):
                        pass
                except OSError:
                    pass
            go.write_text("go")
            _, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert "Traceback" not in stderr, stderr
        assert proc.returncode == 1, stderr
        assert stderr.splitlines() == [f"Error: cannot write '{out}': no space left on the device."], stderr
        assert [p.name for p in disk.iterdir()] == ["filler"]  # no output, no temp file
