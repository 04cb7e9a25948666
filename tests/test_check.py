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


# ------------------------------------------------------------------ the data hash a big output records


def _data_section(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little"):]


@pytest.mark.parametrize("direct", [False, True])
def test_a_written_data_hash_is_the_xxh3_of_the_data_and_check_verifies_it(tmp_path, direct):
    import xxhash
    from safetensors import safe_open

    from lora_tools.io.hashing import DATA_HASH_KEY
    from lora_tools.io.safetensors import StreamingWriter, TensorPlan

    tensors = {"a": torch.randn(300, 77).half(), "b": torch.arange(5000, dtype=torch.float32), "c": torch.ones(3)}
    path = tmp_path / "big.safetensors"
    plans = [TensorPlan(k, "F16" if t.dtype == torch.float16 else "F32", tuple(t.shape)) for k, t in tensors.items()]
    with StreamingWriter(path, plans, {"format": "pt"}, data_hash=True, direct=direct) as w:
        for k, t in tensors.items():
            w.write(k, t)
        w.finalize()
    expected = xxhash.xxh3_128(_data_section(path)).hexdigest()  # the oracle: the bytes on disk, hashed apart
    assert w.data_xxh3_128 == expected
    with safe_open(str(path), "pt") as f:  # the reference reader: the patched header is a valid one
        assert f.metadata() == {"format": "pt", DATA_HASH_KEY: expected}
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t), k
    ok = _run(str(path), "--hash")
    assert ok.exit_code == 0 and "its data matches the xxh3-128 recorded in it" in ok.stdout, ok.output

    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # one bit of 'c' flipped: a damaged copy
    path.write_bytes(bytes(raw))
    assert _run(str(path)).exit_code == 0  # the header alone is still sound
    bad = _run(str(path), "--hash")
    assert bad.exit_code == 1
    assert bad.stderr == (f"Error: '{path}': its tensor data does not match the xxh3-128 recorded in it when it was "
                          f"written (the data's is {xxhash.xxh3_128(_data_section(path)).hexdigest()}): the file "
                          "changed after it was written.\n")


def test_a_forged_data_hash_is_reported_without_echoing_it(tmp_path):
    from lora_tools.io.hashing import DATA_HASH_KEY

    path = save_tensors(tmp_path / "m.safetensors", {"a": torch.ones(2)}, {DATA_HASH_KEY: "\x1b[31mred"})
    result = check_file(path, hash_data=True)
    assert result.problems == [f"'{path}': its '{DATA_HASH_KEY}' is not an xxh3-128 (32 lower-case hex digits)."]


def test_a_sha256_hashed_output_records_no_data_hash(tmp_path):
    from lora_tools.io.safetensors import StreamingWriter, TensorPlan, read_header

    path = tmp_path / "small.safetensors"
    with StreamingWriter(path, [TensorPlan("a", "F32", (4,))], {"format": "pt"}, hash=True, data_hash=True) as w:
        w.write("a", torch.ones(4))
        w.finalize()
    assert w.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and w.data_xxh3_128 is None
    assert read_header(path).metadata == {"format": "pt"}  # the sha256 pins the whole file, header included


@pytest.mark.slow
def test_a_big_fuse_output_records_its_data_hash_and_a_small_one_its_sha256(assets, tmp_path, monkeypatch):
    from lora_tools.io.hashing import DATA_HASH_KEY
    from lora_tools.io.safetensors import read_header
    from lora_tools.output import sinks

    small = CliRunner().invoke(cli, ["fuse", str(assets.base), "--lora", str(assets.lightning_lora), "-o",
                                     str(tmp_path / "small.safetensors")], catch_exceptions=False)
    assert small.exit_code == 0 and " sha256 " in small.stdout
    assert DATA_HASH_KEY not in read_header(tmp_path / "small.safetensors").metadata

    monkeypatch.setattr(sinks, "FULL_HASH_MAX_BYTES", 1000)  # every output counts as big
    out = tmp_path / "big.safetensors"
    big = CliRunner().invoke(cli, ["fuse", str(assets.base), "--lora", str(assets.lightning_lora), "-o", str(out)],
                             catch_exceptions=False)
    assert big.exit_code == 0, big.output
    recorded = read_header(out).metadata[DATA_HASH_KEY]
    assert f"data xxh3-128 {recorded} (recorded in its header" in big.stdout and " sha256 " not in big.stdout
    checked = check_file(out, hash_data=True)
    assert checked.ok and checked.data_xxh3_128 == recorded
    # the tensors are the small output's, byte for byte: the header only has one more metadata key
    assert _data_section(out) == _data_section(tmp_path / "small.safetensors")
    assert set(read_header(out).metadata) == set(read_header(tmp_path / "small.safetensors").metadata) | {DATA_HASH_KEY}
