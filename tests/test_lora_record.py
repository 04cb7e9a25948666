"""The ``loratool`` record of a LoRA file names the operation that made it (not a generic save),
its sources with their sha256, and its params; LoRA files go through the one output path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

import lora_tools
from lora_tools.cli import cli
from lora_tools.errors import UsageError
from lora_tools.io.safetensors import read_header
from lora_tools.lora.load import load_lora
from lora_tools.provenance import build_record, read_record
from lora_tools.testing.synthetic_lora import write_lora


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(path: Path) -> dict:  # type: ignore[type-arg]
    rec = read_record(read_header(path).metadata)
    assert rec is not None
    return rec


def _run(*args: object) -> None:
    result = CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr


@pytest.fixture()
def lora(tmp_path: Path) -> Path:
    return write_lora(tmp_path / "style.safetensors", "tiny", fmt="kohya", components=("unet", "te1"), rank=4,
                      alpha=2.0, seed=5)


def test_rescaled_file_records_rescale_with_its_strength_and_source_hash(lora: Path, tmp_path: Path) -> None:
    out = tmp_path / "half.safetensors"
    _run("rescale", lora, "--strength", "0.5", "--components", "unet", "-o", out)
    rec = _record(out)
    assert rec["operation"] == "rescale"
    assert rec["params"] == {"strength": 0.5, "components": ["unet"]}
    assert [(s["name"], s["sha256"]) for s in rec["sources"]] == [(lora.name, _sha(lora))]


@pytest.mark.slow
def test_merged_file_records_merge_with_every_source_and_weight(lora: Path, tmp_path: Path) -> None:
    other = write_lora(tmp_path / "other.safetensors", "tiny", fmt="kohya-diffusers", rank=3, seed=6)
    out = tmp_path / "merged.safetensors"
    _run("merge", lora, f"{other}:0.25", "-o", out)
    rec = _record(out)
    assert rec["operation"] == "merge" and rec["params"]["method"] == "concat"
    got = [(s["name"], s["sha256"], s["strength"]) for s in rec["sources"]]
    assert got == [(lora.name, _sha(lora), 1.0), (other.name, _sha(other), 0.25)]


def test_converted_file_records_convert_from_and_to(lora: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.safetensors"
    _run("convert", lora, "--to", "diffusers", "-o", out)
    rec = _record(out)
    assert rec["operation"] == "convert" and rec["params"] == {"from": "kohya", "to": "diffusers"}
    assert rec["sources"][0]["sha256"] == _sha(lora)


def test_save_lora_takes_the_callers_record_and_defaults_to_a_save_record(lora: Path, tmp_path: Path) -> None:
    mine = build_record("resize", sources=[{"role": "lora", "name": "x", "sha256": "ab"}], params={"rank": 2})
    with load_lora(lora) as a:
        p = lora_tools.save_lora(a, tmp_path / "r.safetensors", record=mine)
        q = lora_tools.save_lora(a, tmp_path / "s.safetensors", format="comfy")
    assert _record(p) == mine
    rec = _record(q)
    assert rec["operation"] == "save" and rec["params"]["format"] == "comfy"
    assert rec["sources"][0]["sha256"] == _sha(lora)


def test_save_lora_never_writes_over_its_own_input_even_with_overwrite(lora: Path, tmp_path: Path) -> None:
    before = lora.read_bytes()
    with load_lora(lora) as a:
        with pytest.raises(UsageError, match="one of the inputs"):
            lora_tools.save_lora(a, lora, overwrite=True)
    assert lora.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [lora.name]


def test_save_lora_output_has_plain_file_permissions_and_no_temp(lora: Path, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    with load_lora(lora) as a:
        out = lora_tools.save_lora(a, tmp_path / "sub" / "o.safetensors")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["o.safetensors"]
    assert out.stat().st_mode & 0o777 == (0o666 & ~_umask())


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m
