"""Faults of a real fuse process: SIGINT, SIGTERM, SIGHUP and SIGKILL at three points (planning,
mid-stream, just before the rename), and two processes writing one output. Each run is a process of its own, forked
from conftest's ``forked_cli`` server (torch imported once): signals, exit statuses and pids are a real process's.

The process pauses at a point through the test hook ``LORATOOL_TEST_PAUSE_AT`` (it writes the
file named by ``LORATOOL_TEST_READY`` and waits), so each signal lands exactly there.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import read_header
from lora_tools.provenance import read_record
from tests.fork_server import ForkedRun
from tests.reliability_helpers import write_small_lora, write_tuned

pytestmark = pytest.mark.slow  # and subprocess (conftest.BY_FILE): every test starts a fuse process

ForkedCli = Callable[..., ForkedRun]
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129, signal.SIGKILL: -signal.SIGKILL}


@pytest.fixture(scope="module")
def fault_inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The fuse runs' inputs in the micro size (the hooks hold each run at its point, whatever the model's size): an
    fp32 base with all four components (a diffusers folder can be written from it) and a ``--lightning-dir`` holding a
    Lightning-shaped LoRA for it."""
    from lora_tools.testing.synthetic import write_checkpoint
    from lora_tools.testing.synthetic_lora import write_lightning_lora

    root = tmp_path_factory.mktemp("fault-fuse-inputs")
    lightning_dir = root / "lightning"
    write_lightning_lora(lightning_dir / "sdxl_lightning_4step_lora.safetensors", "micro", rank=4)
    return SimpleNamespace(base=write_checkpoint(root / "base.safetensors", "micro", dtype="fp32"),
                           lightning_dir=lightning_dir)


def start(forked_cli: ForkedCli, fault_inputs: SimpleNamespace, out: Path, point: str, ready: Path, *extra: str,
          go: Path | None = None) -> ForkedRun:
    env = dict(os.environ, LORATOOL_TEST_PAUSE_AT=point, LORATOOL_TEST_READY=str(ready))
    if go is not None:
        env["LORATOOL_TEST_GO"] = str(go)
    return forked_cli(["fuse", str(fault_inputs.base), "--lightning", "4", "--lightning-dir",
                       str(fault_inputs.lightning_dir), "-o", str(out), "-q", *extra], env=env)


def wait_ready(proc: ForkedRun, ready: Path) -> None:
    deadline = time.monotonic() + 180
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"ended before its pause point (exit {proc.returncode}): {proc.stderr.read()}")
        assert time.monotonic() < deadline, "the pause point was never reached"
        time.sleep(0.02)


#: Every signal at every point; SIGTERM mid-stream (the temp file half written) is the default selection's smoke case.
_FUSE_CASES = [pytest.param(sig, point, id=f"{sig.name}-{point}",
                            marks=[pytest.mark.smoke] if (sig, point) == (signal.SIGTERM, "mid-stream") else [])
               for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL)
               for point in ("planning", "mid-stream", "before-rename")]


@pytest.mark.parametrize(("sig", "point"), _FUSE_CASES)
def test_signal_leaves_nothing(forked_cli: ForkedCli, fault_inputs: SimpleNamespace, tmp_path: Path,
                               sig: signal.Signals, point: str) -> None:
    _ = fault_inputs.base, fault_inputs.lightning_dir  # built here, not in the child
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "fused.safetensors"
    ready = tmp_path / "ready"
    proc = start(forked_cli, fault_inputs, out, point, ready)
    try:
        wait_ready(proc, ready)
        if point != "planning":
            assert any(p.name.endswith(".loratool.partial") for p in out_dir.iterdir())  # a temp is being written
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT[sig], stderr
    assert not out.exists()
    if sig != signal.SIGKILL:
        assert stderr.strip().splitlines()[-1] == "Interrupted: nothing was written under the output names.", stderr
        assert list(out_dir.iterdir()) == []  # the temp file went with it
    # The next run writing there removes what a killed run left, and says so.
    result = CliRunner().invoke(cli, ["fuse", str(fault_inputs.base), "--lightning", "4", "--lightning-dir",
                                      str(fault_inputs.lightning_dir), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in out_dir.iterdir()] == ["fused.safetensors"]
    if sig == signal.SIGKILL and point != "planning":
        assert "removed '" in result.stderr and f"(process {proc.pid})" in result.stderr


def test_sigterm_mid_stream_of_a_diffusers_folder(forked_cli: ForkedCli, fault_inputs: SimpleNamespace,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "pipe"
    ready = tmp_path / "ready"
    proc = start(forked_cli, fault_inputs, out, "mid-stream", ready, "--save", "diffusers")
    try:
        wait_ready(proc, ready)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready"]


def _finish(procs: list[ForkedRun]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _strength_in(out: Path) -> float:
    """The preset strength recorded in the fused file: tells which of two runs wrote it."""
    sources = read_record(read_header(out).metadata)["sources"]
    return next(float(s["strength"]) for s in sources if s.get("role") == "lora")


def _assert_one_whole_file(out: Path) -> None:
    header = read_header(out)  # one whole file, from one of the runs: the safetensors library reads it all
    assert read_record(header.metadata)["operation"] == "fuse"
    from safetensors.torch import load_file

    assert sorted(load_file(out)) == sorted(header.keys())
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file of either run


_LOSER = "nothing was replaced, and this run's output was dropped."


@pytest.mark.parametrize("overwrite", [False, True], ids=["claim", "overwrite"])
def test_two_runs_writing_one_output(forked_cli: ForkedCli, fault_inputs: SimpleNamespace, tmp_path: Path,
                                     overwrite: bool) -> None:
    """Both pass planning while the output does not exist and both finish writing; then the
    output package's before-rename hook lets the first one rename, and only when it has exited
    the second: the order is fixed by the hooks, never by timing. The second finds the first's
    file: without overwrite it loses (nothing replaced), with it it replaces the file whole and
    says so."""
    out = tmp_path / "out" / "fused.safetensors"
    out.parent.mkdir()
    extra = ["--overwrite"] if overwrite else []
    strengths = (1.0, 0.5)  # recorded in each run's file, so the test knows whose file is there
    procs = [start(forked_cli, fault_inputs, out, "before-rename", tmp_path / f"ready{i}", *extra,
                   "--strength", str(strengths[i]), go=tmp_path / f"go{i}") for i in range(2)]
    try:
        for i, p in enumerate(procs):
            wait_ready(p, tmp_path / f"ready{i}")
        assert not out.exists()  # both planned and wrote with the name free
        results = []
        for i, p in enumerate(procs):
            (tmp_path / f"go{i}").write_text("go")
            results.append(p.communicate(timeout=120))
    finally:
        _finish(procs)
    (_, first_err), (_, second_err) = results
    assert procs[0].returncode == 0, first_err
    assert "appeared while this run was writing it" not in first_err
    if overwrite:
        assert procs[1].returncode == 0, second_err
        assert (f"'{out}' appeared while this run was writing it (another run?): replaced it with this run's output"
                in second_err), second_err
        assert _strength_in(out) == strengths[1]  # the last finisher won, whole
    else:
        assert procs[1].returncode == 1, second_err
        assert second_err.strip() == f"Error: '{out}' appeared while this run was writing it (another run?): {_LOSER}"
        assert _strength_in(out) == strengths[0]  # the first file was not touched
    _assert_one_whole_file(out)


def test_two_runs_claiming_one_output_at_once(forked_cli: ForkedCli, fault_inputs: SimpleNamespace,
                                              tmp_path: Path) -> None:
    """Both released at the same instant: the claim is one atomic rename, so whatever the order
    exactly one run wins and the other loses with the one-line message (order-independent)."""
    out = tmp_path / "out" / "fused.safetensors"
    out.parent.mkdir()
    go = tmp_path / "go"
    procs = [start(forked_cli, fault_inputs, out, "before-rename", tmp_path / f"ready{i}", go=go) for i in range(2)]
    try:
        for i, p in enumerate(procs):
            wait_ready(p, tmp_path / f"ready{i}")
        go.write_text("go")
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        _finish(procs)
    assert sorted(p.returncode for p in procs) == [0, 1], results
    loser = next(err for p, (_, err) in zip(procs, results, strict=True) if p.returncode == 1)
    assert loser.strip() == f"Error: '{out}' appeared while this run was writing it (another run?): {_LOSER}"
    _assert_one_whole_file(out)


# ------------------------------------------------------------------------------- LoRA-writing commands
LORA_WRITERS = {
    "rescale": lambda io, out: ["rescale", str(io["lora"]), "--strength", "0.5", "-o", str(out)],
    "resize": lambda io, out: ["resize", str(io["lora"]), "--rank", "1", "-o", str(out)],
    "merge": lambda io, out: ["merge", str(io["lora"]), f"{io['lora']}:0.5", "-o", str(out)],
    "convert": lambda io, out: ["convert", str(io["lora"]), "--to", "peft", "-o", str(out)],
    "extract": lambda io, out: ["extract", str(io["tuned"]), str(io["base"]), "--rank", "1", "-o", str(out)],
}
_SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP, "SIGKILL": signal.SIGKILL}
_POINTS = ("planning", "mid-stream", "before-rename")
#: rescale (the shared LoRA write path) gets every signal at every point; every other LoRA writer
#: SIGTERM (the catchable abort path SIGINT and SIGHUP share) at every point and SIGKILL mid-stream.
_LORA_CASES = [("rescale", s, p) for s in _SIGNALS for p in _POINTS] + [
    (c, s, p) for c in LORA_WRITERS if c != "rescale"
    for s, p in [*(("SIGTERM", p) for p in _POINTS), ("SIGKILL", "mid-stream")]]


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A micro UNet-only base, a fine-tune of it (extract) and a small LoRA that fits it."""
    from lora_tools.testing.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("lora-fault-inputs")
    base = write_checkpoint(root / "base.safetensors", "micro", dtype="fp16", components=("unet",))
    return {"base": base, "tuned": write_tuned(root / "tuned.safetensors", base),
            "lora": write_small_lora(root / "lora.safetensors")}


@pytest.mark.parametrize("command,sig_name,point", _LORA_CASES, ids=[f"{c}-{s}-{p}" for c, s, p in _LORA_CASES])
def test_signal_leaves_nothing_lora_writers(forked_cli: ForkedCli, lora_inputs: dict[str, Path], tmp_path: Path,
                                            command: str, sig_name: str, point: str) -> None:
    sig = _SIGNALS[sig_name]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "lora-out.safetensors"
    ready = tmp_path / "ready"
    argv = LORA_WRITERS[command](lora_inputs, out)
    env = dict(os.environ, LORATOOL_TEST_PAUSE_AT=point, LORATOOL_TEST_READY=str(ready))
    proc = forked_cli(argv, env=env)
    try:
        wait_ready(proc, ready)
        if point != "planning":
            assert any(p.name.endswith(".loratool.partial") for p in out_dir.iterdir())  # a temp is being written
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        _finish([proc])
    assert proc.returncode == EXIT[sig], stderr
    assert not out.exists()
    if sig != signal.SIGKILL:
        assert stderr.strip().splitlines()[-1] == "Interrupted: nothing was written under the output names.", stderr
        assert list(out_dir.iterdir()) == []  # the temp file went with it
    # The next run writing there removes what a killed run left, and says so.
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in out_dir.iterdir()] == [out.name]
    if sig == signal.SIGKILL and point != "planning":
        assert "removed '" in result.stderr and f"(process {proc.pid})" in result.stderr
