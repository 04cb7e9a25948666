"""Every command that writes a folder, pointed at folders that are not its own: a folder of the user's
files, ``.``, ``..``, the input's folder and a symbolic link to it, with and without ``--overwrite``.
Each is refused at plan time with one line, exit 1, and nothing anywhere is removed or changed.

Commands: ``fuse --save diffusers``, ``verify --out``, ``publish --release-dir``, and ``run`` with a
verify job's ``out`` and a publish job's ``release_dir`` (recipes have no ``--overwrite``: a recipe
replaces only its own outputs, so both columns are the same run there).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.testing.synthetic import write_checkpoint
from tests.reliability_helpers import write_small_lora

COUNTED = "bad_input_cases"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs built once (copied into each test's folder): a micro full checkpoint (each case hashes the folders
    before and after: a small one), a LoRA, a LoRA made by loratool (publish releases only those), the verify
    tokenizers."""
    from lora_tools.io.diffusers_folder import write_byte_tokenizer
    from lora_tools.testing.synthetic import MICRO

    root = tmp_path_factory.mktemp("folder-outputs")
    lora = write_small_lora(root / "lora.safetensors")
    result = CliRunner().invoke(cli, ["rescale", str(lora), "--strength", "0.5", "-o", str(root / "made.safetensors")])
    assert result.exit_code == 0, result.output
    for name, te in (("tokenizer", MICRO.te1), ("tokenizer_2", MICRO.te2)):
        write_byte_tokenizer(root / "config" / name, te.vocab, te.positions)
    write_checkpoint(root / "full.safetensors", "micro", dtype="fp32", seed=1)
    return {p.name: p for p in root.iterdir()}


def _link_tree(made: dict[str, Path], into: Path) -> dict[str, Path]:
    into.mkdir()
    for name, p in made.items():
        if p.is_dir():
            os.symlink(p, into / name)  # the tokenizers are read only; a link keeps the copy cheap
        else:
            os.link(p, into / name)
    return {name: into / name for name in made}


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def _verify(io: dict[str, Path], out: str) -> list[str]:
    return ["verify", str(io["full.safetensors"]), "--preset", "lightning-4step", "--config", str(io["config"]),
            "--size", "32x32", "--prompt", "a cat", "--seeds", "0", "--device", "cpu", "--dtype", "fp32",
            "--out", out]


def _recipe(job: str) -> Callable[[dict[str, Path], str], list[str]]:
    def argv(io: dict[str, Path], out: str) -> list[str]:
        target = Path(out).absolute()
        recipe = io["lora.safetensors"].parent.parent / "recipe.yaml"
        recipe.write_text(f"version: 1\noutput_dir: '{target.parent}'\ninputs:\n  full: '{io['full.safetensors']}'\n"
                          f"  made: '{io['made.safetensors']}'\n  config: '{io['config']}'\njobs:\n  - "
                          + job.format(out=target.name) + "\n")
        return ["run", str(recipe)]
    return argv


COMMANDS: dict[str, Callable[[dict[str, Path], str], list[str]]] = {
    "fuse-diffusers": lambda io, out: ["fuse", str(io["full.safetensors"]), "--lora", str(io["lora.safetensors"]),
                                       "--save", "diffusers", "-o", out, "-q"],
    "verify": _verify,
    "publish": lambda io, out: ["publish", str(io["made.safetensors"]), "--license", "openrail++",
                                "--release-dir", out],
    "run-verify": _recipe("verify: {{model: full, preset: lightning-4step, config: config, size: 32x32, "
                          "out: '{out}'}}"),
    "run-publish": _recipe("publish: {{path: made, license: openrail++, release_dir: '{out}'}}"),
}
TARGETS = ["users-files", "dot", "dotdot", "inputs-folder", "link-to-inputs-folder"]
# The default selection keeps one row per command (its parent folder, '..'); the full selection (-m "") runs all.
CASES = [pytest.param(c, t, o, id=f"{c}-{t}-{'overwrite' if o else 'plain'}",
                      marks=() if t == "dotdot" and (o or c.startswith("run-")) else pytest.mark.slow)
         for c in COMMANDS for t in TARGETS for o in (False, True) if not (o and c.startswith("run-"))]


@pytest.mark.bad_input_cases
@pytest.mark.parametrize(("command", "target", "overwrite"), CASES)
def test_folder_output_that_is_not_ours_removes_nothing(command: str, target: str, overwrite: bool,
                                                        made: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    io = _link_tree(made, root / "inputs")
    (root / "mine").mkdir()
    (root / "mine" / "thesis.txt").write_text("the user's")
    (root / "mine" / "README.md").write_text("# my notes")  # a README does not make a folder a release of ours
    (root / "mine" / "report.json").write_text("{}")  # nor a report.json a verify output
    os.symlink(root / "inputs", root / "link")
    monkeypatch.chdir(root / "inputs")
    out = {"users-files": str(root / "mine"), "dot": ".", "dotdot": "..", "inputs-folder": str(root / "inputs"),
           "link-to-inputs-folder": str(root / "link")}[target]
    argv = COMMANDS[command](io, out) + (["--overwrite"] if overwrite else [])
    before = _tree(root)
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert _tree(root) == before, "something was removed or written"
    assert (root / "mine" / "thesis.txt").read_text() == "the user's"
