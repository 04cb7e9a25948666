"""``loratool check`` and :func:`lora_tools.ops.check.check_file`: the real CLI, stdout and stderr apart."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lora_tools.cli import cli
from lora_tools.io.safetensors import save_tensors
from lora_tools.ops.check import check_file
from lora_tools.provenance import build_record, with_record


def _run(*args: str):
    return CliRunner().invoke(cli, ["check", *args])


def _model(path: Path, **extra: torch.Tensor) -> Path:
    tensors = {"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.ones(4), **extra}
    record = build_record("fuse", sources=[{"role": "base", "name": "base.safetensors", "sha256": "ab" * 32}])
    return save_tensors(path, tensors, with_record({"format": "pt"}, record))


def test_sound_file_with_record(tmp_path):
    path = _model(tmp_path / "m.safetensors")
    result = _run(str(path), "--hash")
    assert result.exit_code == 0 and result.stderr == ""
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert result.stdout == f"ok  {path}  (2 tensors, {path.stat().st_size} B, sha256 {sha}, loratool record: fuse)\n"


def test_file_written_by_the_reference_library_is_sound(tmp_path):
    path = tmp_path / "ref.safetensors"
    save_file({"x": torch.randn(3, 5), "y": torch.zeros(0), "z": torch.ones(2, dtype=torch.bfloat16)}, path)
    result = check_file(path, hash_data=True)
    assert result.ok and result.tensors == 3 and result.data_checked
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_truncated_and_sound_files_together(tmp_path):
    good = _model(tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-3])
    result = _run(str(good), str(bad), str(tmp_path / "missing.safetensors"))
    assert result.exit_code == 1
    assert result.stdout.startswith(f"ok  {good}  (2 tensors, ")
    assert result.stderr.splitlines() == [
        f"Error: '{bad}' is truncated: tensor data needs 28 bytes, the file holds 25.",
        f"Error: '{tmp_path / 'missing.safetensors'}' does not exist.",
    ]


def test_nan_is_found_only_when_the_data_is_read(tmp_path):
    path = _model(tmp_path / "nan.safetensors", c=torch.tensor([1.0, float("nan")]))
    assert _run(str(path)).exit_code == 0
    result = _run(str(path), "--hash")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == f"Error: '{path}': tensor 'c' holds NaN or Inf values.\n"


def test_unreadable_record(tmp_path):
    path = save_tensors(tmp_path / "r.safetensors", {"a": torch.zeros(2)}, {"loratool": "{not json"})
    result = _run(str(path))
    assert result.exit_code == 1
    assert result.stderr == f"Error: '{path}': its 'loratool' record is not a JSON object.\n"


def test_record_with_a_malformed_source_hash(tmp_path):
    record = build_record("fuse", sources=[{"role": "lora", "name": "x.safetensors", "sha256": "1234"}])
    path = save_tensors(tmp_path / "h.safetensors", {"a": torch.zeros(2)}, with_record({}, record))
    result = check_file(path)
    assert result.problems == [f"'{path}': its record's sha256 of source 'x.safetensors' is not 64 hex digits."]


def test_json_output(tmp_path):
    good = _model(tmp_path / "good.safetensors")
    bad = tmp_path / "empty.safetensors"
    bad.write_bytes(b"")
    result = _run("--json", str(good), str(bad))
    assert result.exit_code == 1 and result.stderr == ""
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert [f["ok"] for f in doc["files"]] == [True, False]
    assert doc["files"][0]["record"]["operation"] == "fuse" and doc["files"][0]["tensors"] == 2
    assert doc["files"][1]["problems"] == [f"'{bad}' is empty: not a safetensors file."]


def test_file_derived_text_is_escaped_in_human_output(tmp_path):
    path = tmp_path / "evil\x1b]0;owned\x07.safetensors"
    save_tensors(path, {"w\x1b[2J": torch.tensor([float("inf")])})
    result = _run(str(path), "--hash")
    assert result.exit_code == 1
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert "\\x1b[2J" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("args", [(), ("--hash",), ("--json",)])
def test_check_writes_nothing(tmp_path, args):
    path = _model(tmp_path / "m.safetensors")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir())
    assert _run(str(path), *args).exit_code == 0
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()) == before
