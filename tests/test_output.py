"""The one output path: overwrite rules (no data loss), permissions, path kinds, free space,
OS errors as one line, all or nothing across outputs, integrity checks, stale temps, and the
LoRA-file writer. Each test drives the real CLI or the library and checks the file system."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lora_tools.cli import cli, error_message
from lora_tools.errors import OutputError, OutputExistsError, UsageError
from lora_tools.io import atomic
from lora_tools.io.safetensors import StreamingWriter, TensorPlan, load_tensors, read_header
from lora_tools.ops.fuse import fuse
from lora_tools.output.plan import WrittenFile, check_output
from lora_tools.output.sinks import write_safetensors
from lora_tools.provenance import read_record
from tests.fuse_helpers import FuseAssets, listing


def run(*args: object) -> object:
    return CliRunner().invoke(cli, [*map(str, args)])


def lightning(assets: FuseAssets) -> list[object]:
    return ["--lightning", "4", "--lightning-dir", assets.lightning_dir]


def one_error(result: object) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def no_temps(folder: Path) -> None:
    assert [p.name for p in folder.rglob("*") if ".partial" in p.name] == []


# ------------------------------------------------------------------------------- data loss
def test_overwrite_refuses_a_folder_of_the_users(assets: FuseAssets, tmp_path: Path) -> None:
    mine = tmp_path / "my-models"
    (mine / "unet").mkdir(parents=True)
    (mine / "notes.txt").write_text("years of work")
    (mine / "unet" / "config.json").write_text("{}")
    before = listing(mine)
    line = one_error(run("fuse", assets.base, *lightning(assets), "--save", "diffusers", "-o", mine, "--overwrite"))
    assert line == (f"Error: '{mine}' already exists and is not an earlier loratool output (it holds files "
                    "loratool does not write (such as 'notes.txt')): it will not be replaced; choose another output name.")
    assert listing(mine) == before and (mine / "notes.txt").read_text() == "years of work"
    no_temps(tmp_path)


def test_existing_folder_message_does_not_invite_overwrite(assets: FuseAssets, tmp_path: Path) -> None:
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "a.jpg").write_bytes(b"\xff\xd8")
    line = one_error(run("fuse", assets.base, *lightning(assets), "--save", "diffusers", "-o", mine))
    assert "--overwrite" not in line and "not an earlier loratool output" in line


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_overwrite_replaces_an_earlier_output_of_ours(assets: FuseAssets, tmp_path: Path) -> None:
    out = tmp_path / "fused-diffusers"
    assert run("fuse", assets.base, *lightning(assets), "--save", "diffusers", "-o", out, "-q").exit_code == 0
    first = read_record(read_header(out / "unet" / "diffusion_pytorch_model.safetensors").metadata)
    result = run("fuse", assets.base, *lightning(assets), "--lora", assets.style, "--save", "diffusers", "-o", out,
                 "--overwrite", "-q")
    assert result.exit_code == 0, result.stderr
    second = read_record(read_header(out / "unet" / "diffusion_pytorch_model.safetensors").metadata)
    assert len(second["sources"]) == len(first["sources"]) + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused-diffusers"]  # the old copy is gone too


def test_a_folder_of_only_our_file_names_is_replaceable(tmp_path: Path) -> None:
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text("{}")
    check_output(folder, "folder", overwrite=True)  # no error
    os.symlink(tmp_path, folder / "vae")
    with pytest.raises(OutputError, match="symbolic link 'vae'"):
        check_output(folder, "folder", overwrite=True)


# ------------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_umask_permissions(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        f = write_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(3)}, {"format": "pt"})
        folder = atomic.create_temp_dir(tmp_path / "d")
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.path.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


@pytest.mark.slow
def test_fused_diffusers_folder_has_plain_permissions(assets: FuseAssets, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "pipe"
        result = run("fuse", assets.base, *lightning(assets), "--save", "diffusers", "-o", out, "-q")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    modes = {stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")] if p.is_dir()}
    files = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes == {0o755} and files == {0o644}


# ------------------------------------------------------------------------------- path kinds, OS errors
def test_output_that_is_a_directory(assets: FuseAssets, tmp_path: Path) -> None:
    out = tmp_path / "taken.safetensors"
    out.mkdir()
    line = one_error(run("fuse", assets.base, *lightning(assets), "-o", out, "--overwrite"))
    assert line == f"Error: cannot write '{out}': it is a directory (the output is a file)."


def test_folder_output_where_a_file_is(assets: FuseAssets, tmp_path: Path) -> None:
    out = tmp_path / "pipe"
    out.write_text("x")
    line = one_error(run("fuse", assets.base, *lightning(assets), "--save", "diffusers", "-o", out, "--overwrite"))
    assert line == f"Error: cannot write '{out}': it is a file (the output is a folder)."
    assert out.read_text() == "x"


def test_output_under_a_file(assets: FuseAssets, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out.safetensors"
    line = one_error(run("fuse", assets.base, *lightning(assets), "-o", out))
    assert line == f"Error: cannot write '{out}': '{tmp_path / 'file'}' is a file, not a folder."


# test_unwritable_folder: in test_output_paths.py, for every writing command (as `nobody` under root).


def test_not_enough_space_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    total = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: total._replace(free=1000))
    with pytest.raises(OutputError) as e:
        StreamingWriter(tmp_path / "big.safetensors", [TensorPlan("w", "F32", (1000,))])
    assert "not enough space on '" in str(e.value) and "need 4.0 KiB, have 1000 B" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_space_of_outputs_on_one_disk_adds_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    total = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: total._replace(free=6000))
    dev = atomic.reserve_space(tmp_path / "a", 4000)
    try:
        with pytest.raises(OutputError, match="need 7.8 KiB"):
            atomic.reserve_space(tmp_path / "b", 4000)
    finally:
        atomic.release_space(dev, 4000)
    atomic.release_space(atomic.reserve_space(tmp_path / "b", 4000), 4000)


@pytest.mark.subprocess
def test_disk_full_mid_write_is_one_line(tmp_path: Path) -> None:
    """RLIMIT_FSIZE stands in for a full disk: the write fails with EFBIG past the limit."""
    code = (
        "import resource, signal, sys, torch\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from lora_tools.output.sinks import write_safetensors\n"
        "from lora_tools.errors import OutputError\n"
        "try:\n"
        f"    write_safetensors({str(tmp_path / 'x.safetensors')!r}, {{'w': torch.zeros(100_000)}})\n"
        "except OutputError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr
    assert p.stdout.strip() == f"cannot write '{tmp_path / 'x.safetensors'}': file too large (file system or file size limit)."
    assert list(tmp_path.iterdir()) == []


def test_enospc_reason() -> None:
    import errno

    e = atomic.output_error("/m/x.safetensors", OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(e, OutputError) and str(e) == "cannot write '/m/x.safetensors': no space left on the device."
    e = atomic.output_error("/m/x", OSError(errno.EROFS, "Read-only file system"))
    assert str(e) == "cannot write '/m/x': read-only file system."


# ------------------------------------------------------------------------------- all or nothing
def test_one_failing_output_leaves_none(assets: FuseAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The UNet file fails at its rename, after the checkpoint was renamed: both are gone."""
    real = atomic.replace
    calls: list[Path] = []

    def failing(tmp: Path, final: Path) -> Path | None:
        calls.append(final)
        if final.name.endswith("-unet.safetensors"):
            raise OSError(28, "No space left on device")
        return real(tmp, final)

    monkeypatch.setattr(atomic, "replace", failing)
    keep = tmp_path / "out.safetensors"
    keep.write_bytes(b"an older file")
    result = run("fuse", assets.base, *lightning(assets), "--save", "checkpoint", "--save", "unet",
                 "-o", keep, "--overwrite")
    line = one_error(result)
    assert line == f"Error: cannot write '{tmp_path / 'out-unet.safetensors'}': no space left on the device."
    assert [c.name for c in calls] == ["out.safetensors", "out-unet.safetensors"]  # the first one was renamed
    assert keep.read_bytes() == b"an older file"  # ...and rolled back to what was there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


# ------------------------------------------------------------------------------- integrity
def test_header_is_checked_before_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "x.safetensors"
    with StreamingWriter(out, [TensorPlan("w", "F32", (4,))], {"format": "pt"}) as w:
        w.write("w", torch.ones(4))
        w._out.finish()  # type: ignore[union-attr]
        with open(w._tmp, "r+b") as f:  # type: ignore[arg-type]
            f.seek(10)
            f.write(b"X")  # a flipped header byte on disk
        with pytest.raises(OutputError, match="read back is not what was written"):
            w.finalize()
    assert list(tmp_path.iterdir()) == []


def test_verify_rehashes_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "x.safetensors"
    with StreamingWriter(out, [TensorPlan("w", "F32", (4,))], {"format": "pt"}, verify=True) as w:
        w.write("w", torch.ones(4))
        w._out.finish()  # type: ignore[union-attr]
        with open(w._tmp, "r+b") as f:  # type: ignore[arg-type]
            f.seek(-1, 2)
            f.write(b"\x01")  # a flipped data byte: only the re-hash sees it
        with pytest.raises(OutputError, match="data read back differs"):
            w.finalize()
    assert list(tmp_path.iterdir()) == []
    f = write_safetensors(out, {"w": torch.ones(4)}, verify=True)
    assert f.sha256 is not None and f.autov2 == f.sha256[:10]


# ------------------------------------------------------------------------------- stale temps, names
def test_stale_temps_of_dead_runs_are_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True)  # a process that has ended
    pid = int(dead.stdout)
    out = tmp_path / "m.safetensors"
    stale = tmp_path / f".m.safetensors.{pid}-0{atomic.TEMP_SUFFIX}"
    stale.write_bytes(b"x" * 100)
    stale_dir = tmp_path / f".m.safetensors.{pid}-3-old{atomic.TEMP_SUFFIX}"
    stale_dir.mkdir()
    live = tmp_path / f".m.safetensors.{os.getpid()}-999{atomic.TEMP_SUFFIX}"
    live.write_bytes(b"y")
    other = tmp_path / f".other.safetensors.{pid}-0{atomic.TEMP_SUFFIX}"
    other.write_bytes(b"z")
    with caplog.at_level("WARNING", logger="lora_tools"):
        write_safetensors(out, {"w": torch.ones(2)})
    assert not stale.exists() and not stale_dir.exists()
    assert live.exists() and other.exists()
    assert f"process {pid}" in caplog.text and str(stale) in caplog.text


def test_temp_names_are_recognisable(tmp_path: Path) -> None:
    t = atomic.create_temp_file(tmp_path / "model.safetensors")
    assert t.name.startswith(f".model.safetensors.{os.getpid()}-") and t.name.endswith(".loratool.partial")


# ------------------------------------------------------------------------------- LoRA file sink
def test_write_safetensors_overwrite_rule(tmp_path: Path) -> None:
    out = tmp_path / "lora.safetensors"
    first = write_safetensors(out, {"a": torch.arange(3.0)}, {"format": "pt", "k": "v"})
    assert isinstance(first, WrittenFile) and first.kind == "lora" and first.nbytes == out.stat().st_size
    import hashlib

    assert first.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    with pytest.raises(OutputExistsError) as e:
        write_safetensors(out, {"a": torch.zeros(3)})
    assert str(e.value) == (f"'{out}' already exists: pass overwrite=True to replace it, "
                            "or output=PATH to choose another name.")
    assert error_message(e.value) == f"'{out}' already exists: pass --overwrite to replace it, or -o to choose another name."
    assert torch.equal(load_tensors(out)["a"], torch.arange(3.0))
    write_safetensors(out, [("b", torch.ones(2, dtype=torch.float16))], overwrite=True)
    assert list(load_tensors(out)) == ["b"] and read_header(out).metadata == {"format": "pt"}
    with pytest.raises(UsageError, match="one of the inputs"):
        write_safetensors(out, {"a": torch.zeros(1)}, overwrite=True, inputs=[out])


def test_claim_loses_to_a_file_that_appeared(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    w = StreamingWriter(out, [TensorPlan("w", "F32", (2,))], overwrite=False)
    w.write("w", torch.ones(2))
    out.write_bytes(b"the other run's file")
    with pytest.raises(OutputExistsError, match="appeared while this run was writing it"):
        w.finalize()
    w.abort()
    assert out.read_bytes() == b"the other run's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_metadata_builder(tmp_path: Path) -> None:
    from lora_tools.output.metadata import output_metadata
    from lora_tools.provenance import build_record

    rec = build_record("save", sources=[{"role": "lora", "name": "a.safetensors"}], created="2026-01-02T03:04:05Z")
    meta = output_metadata(rec, title="A", merged_from=["a", "b"], base_metadata={"format": "pt", "x": "1"},
                           keep_base=True, usage_hint="4 steps", prediction_type="epsilon")
    assert meta["x"] == "1" and meta["modelspec.date"] == "2026-01-02" and meta["modelspec.merged_from"] == "a, b"
    assert meta["modelspec.usage_hint"] == "4 steps" and meta["modelspec.prediction_type"] == "epsilon"
    assert json.loads(meta["loratool"]) == rec and read_record(meta) == rec
    assert "x" not in output_metadata(rec, title="A", base_metadata={"x": "1"})


def test_python_fuse_names_the_parameter(assets: FuseAssets, tmp_path: Path) -> None:
    out = tmp_path / "f.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError) as e:
        fuse(assets.base, lightning=4, lightning_dir=assets.lightning_dir, output=out)
    assert "overwrite=True" in str(e.value) and "--" not in str(e.value)
