"""Recipe planning refuses an output or output folder that is, holds or lies inside an input of any job,
after resolving symbolic links and ``..``: one line at the job, exit 1, nothing written, inputs unchanged.
Nothing is read: the inputs are stand-in files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from tests.fuse_helpers import listing

COUNTED = "bad_input_cases"


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def _setup(work: Path) -> None:
    (work / "style.safetensors").write_bytes(b"style bytes")
    (work / "base.safetensors").write_bytes(b"base bytes")
    (work / "models").mkdir()
    (work / "models" / "tuned.safetensors").write_bytes(b"tuned bytes")
    (work / "lightning").mkdir()
    (work / "lightning" / "sdxl_lightning_4step_lora.safetensors").write_bytes(b"lightning bytes")
    os.symlink(work / "style.safetensors", work / "style-link.safetensors")
    os.symlink(work / "models", work / "models-link")


HEAD = """version: 1
output_dir: {output_dir}
inputs:
  style: style.safetensors
  base: base.safetensors
  tuned: models/tuned.safetensors
  lightning: lightning
jobs:
"""

#: id -> (output_dir, the job, the input it would clobber (relative to the work folder), the relation)
CASES: dict[str, tuple[str, str, str, str]] = {
    "file-is-its-input": (".", "rescale: {lora: style, strength: 0.5, output: style.safetensors}",
                          "style.safetensors", "is"),
    "file-is-its-input-through-a-link": (".", "rescale: {lora: style, strength: 0.5, output: style-link.safetensors}",
                                         "style.safetensors", "is"),
    "file-is-its-input-through-dotdot": ("models/..", "resize: {lora: style, rank: 1, output: style.safetensors}",
                                         "style.safetensors", "is"),
    "file-is-another-jobs-input": (".", "convert: {lora: base, to: peft, output: style.safetensors}\n"
                                   "  - rescale: {lora: style, strength: 0.5, output: s2.safetensors}",
                                   "style.safetensors", "is"),
    "file-is-an-extract-input": (".", "extract: {tuned: tuned, original: base, rank: 1, "
                                      "output: models/tuned.safetensors}", "models/tuned.safetensors", "is"),
    "file-inside-a-folder-input": ("lightning", "rescale: {lora: style, strength: 0.5, output: x.safetensors}\n"
                                   "  - fuse: {base: base, lightning: 4, lightning_dir: lightning, "
                                   "output: y.safetensors}",
                                   "lightning", "lies inside"),
    "verify-folder-holds-an-input": (".", "verify: {model: tuned, out: models}", "models/tuned.safetensors", "holds"),
    "verify-folder-is-a-link-to-inputs": (".", "verify: {model: tuned, out: models-link}", "models/tuned.safetensors",
                                          "holds"),
    "publish-folder-holds-an-input": (".", "publish: {path: tuned, release_dir: models}", "models/tuned.safetensors",
                                      "holds"),
    "publish-folder-holds-another-jobs-input": (".", "publish: {path: base, release_dir: models}\n"
                                                "  - rescale: {lora: tuned, strength: 0.5, output: t.safetensors}",
                                                "models/tuned.safetensors", "holds"),
    "verify-folder-is-a-folder-input": (".", "verify: {model: base, out: lightning}\n"
                                        "  - fuse: {base: base, lightning: 4, lightning_dir: lightning, "
                                        "output: y.safetensors}", "lightning", "is"),
}


@pytest.mark.bad_input_cases
@pytest.mark.parametrize("case", list(CASES))
def test_an_output_over_into_or_around_an_input_is_refused(case: str, tmp_path: Path) -> None:
    output_dir, job, clobbered, relation = CASES[case]
    _setup(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(HEAD.format(output_dir=output_dir) + "  - " + job + "\n")
    before, names = _tree(tmp_path), listing(tmp_path)
    result = CliRunner().invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"Error: {recipe}:"), lines[0]
    assert f"' {relation} '{(tmp_path / clobbered).resolve()}', " in lines[0], lines[0]
    assert lines[0].endswith("choose another output name (a recipe never writes over, into or around its inputs)")
    assert _tree(tmp_path) == before and listing(tmp_path) == names


def test_outputs_beside_the_inputs_are_fine(tmp_path: Path) -> None:
    """``output_dir: .`` with the inputs in it is the common case: only the outputs themselves count."""
    _setup(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(HEAD.format(output_dir=".")
                      + "  - rescale: {lora: style, strength: 0.5, output: s.safetensors}\n")
    result = CliRunner().invoke(cli, ["run", str(recipe), "--dry-run"])
    assert "choose another output name" not in result.stderr, result.stderr
