"""The same habits on every command: ``--json`` that parses, dry runs that plan over existing outputs, a
diffusers folder wherever a model goes, safetensors under a safetensors name, help text without markup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.testing.synthetic import write_checkpoint
from lora_tools.testing.synthetic_lora import write_lightning_lora


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("consistency")
    base = write_checkpoint(d / "base.safetensors", "micro", dtype="fp16", seed=1)
    write_lightning_lora(d / "L" / "sdxl_lightning_4step_lora.safetensors", "micro")
    return {"base": base, "lightning": d / "L", "dir": d}


def _fuse(inputs: dict[str, Path], *extra: str) -> list[str]:
    return ["fuse", str(inputs["base"]), "--lightning", "4", "--preset-dir", str(inputs["lightning"]), *extra]


def _ok(argv: list[str]) -> str:
    run = CliRunner().invoke(cli, argv)
    assert run.exit_code == 0, run.output
    return run.stdout


def test_fuse_json_then_dry_run_over_existing_outputs_then_publish_json(inputs: dict[str, Path]) -> None:
    out = inputs["dir"] / "fused.safetensors"
    report = json.loads(_ok(_fuse(inputs, "-o", str(out), "--json")))
    assert [f["path"] for f in report["files"]] == [str(out)] and report["files"][0]["bytes"] == out.stat().st_size
    assert report["modules_fused"] > 0 and "4 steps" in report["sampler"]
    before = out.stat().st_mtime_ns
    text = _ok(_fuse(inputs, "-o", str(out), "--dry-run"))
    assert f"Exists:  {out} (a real run needs --overwrite)" in text and "Dry run: nothing was written." in text
    plan = json.loads(_ok(_fuse(inputs, "-o", str(out), "--dry-run", "--json")))
    assert plan["needs_overwrite"] == [str(out)] and plan["outputs"][0]["exists"] is True
    assert out.stat().st_mtime_ns == before
    release = json.loads(_ok(["publish", str(out), "--license", "openrail++", "--dry-run", "--json"]))
    assert release["dry_run"] is True and release["license"] == "openrail++"
    assert [f["name"] for f in release["files"]] == [out.name, "README.md", "scheduler_config.json"]


@pytest.mark.parametrize("name", ["x.ckpt", "x.pt", "x.bin"])
def test_a_pickle_name_is_refused(inputs: dict[str, Path], name: str) -> None:
    out = inputs["dir"] / name
    run = CliRunner().invoke(cli, _fuse(inputs, "-o", str(out)))
    assert run.exit_code == 1 and "loratool writes safetensors" in run.stderr and not out.exists()


def test_check_accepts_a_diffusers_folder(tiny_diffusers_folder: Path) -> None:
    report = json.loads(_ok(["check", str(tiny_diffusers_folder), "--json"]))
    paths = [Path(f["path"]) for f in report["files"]]
    assert report["ok"] and tiny_diffusers_folder / "unet" / "diffusion_pytorch_model.safetensors" in paths


def test_help_has_no_markup_and_no_cut_summaries() -> None:
    assert "``" not in _ok(["run", "--help"])
    root = _ok(["--help"])
    assert "..." not in root.split("Commands:")[1].replace("(SDXL-Lightning...)", "")
    assert "Fuse an acceleration preset (SDXL-Lightning...) and/or LoRAs into" in root


def test_lora_with_a_strength_has_one_metavar() -> None:
    for name in ("fuse", "verify"):
        assert "--lora SRC[:STRENGTH]" in _ok([name, "--help"]), name


@pytest.mark.parametrize("argv", [["publish", "nothere.safetensors", "--dry-run"],
                                  ["rescale", "nothere.safetensors", "--strength", "1", "-o", "x.safetensors"],
                                  ["fuse", "nothere.safetensors", "--lightning", "4"]])
def test_a_missing_input_is_one_line_and_exit_1_everywhere(argv: list[str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke(cli, argv)
    assert run.exit_code == 1 and run.stderr == "Error: 'nothere.safetensors' does not exist.\n"
