"""Every command documents itself with an example and is named in the README."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_root_help_shows_a_quick_start():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "loratool demo" in result.stdout and "loratool fuse juggernaut.safetensors --lightning 4" in result.stdout


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_command_help_has_an_example_and_is_in_the_readme(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.stdout
    assert f"loratool {name}" in README


def test_library_errors_become_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "not-a-model.safetensors"
    bad.write_bytes(b"\x00" * 3)
    result = CliRunner().invoke(cli, ["fuse", str(bad), "--lora", str(bad)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: '{bad}' is only 3 bytes long: not a safetensors file.\n"
    assert list(tmp_path.iterdir()) == [bad]


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "empty.safetensors"
    bad.write_bytes(b"")
    result = CliRunner().invoke(cli, ["--debug", "inspect", str(bad)])
    assert result.exit_code == 1 and result.exception is not None
    assert type(result.exception).__name__ == "InvalidFileError"


def _architecture_block() -> str:
    section = README.split("## Architecture", 1)[1]
    return section.split("```", 2)[1]


def test_the_readme_architecture_names_every_module_and_folder_and_nothing_else():
    """The README's Architecture section matches the package: one line per top-level module or folder."""
    import re

    package = Path(__file__).resolve().parents[1] / "lora_tools"
    actual = {p.name + ("/" if p.is_dir() else "") for p in package.iterdir()
              if p.name != "__pycache__" and (p.is_dir() or p.suffix == ".py")}
    named = re.findall(r"^  (\S+)\s", _architecture_block(), re.M)
    assert len(named) == len(set(named)), f"named twice: {sorted({n for n in named if named.count(n) > 1})}"
    assert set(named) == actual, f"missing from the README: {sorted(actual - set(named))}; gone: {sorted(set(named) - actual)}"


@pytest.mark.subprocess
@pytest.mark.smoke
def test_the_cli_and_inspect_start_without_torch(tmp_path):
    """``loratool --help`` and ``loratool inspect`` read headers only: importing torch (seconds) is for commands
    that compute."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    from lora_tools.testing.synthetic_lora import make_lora

    tensors, meta = make_lora("tiny", fmt="kohya")
    save_file(tensors, str(tmp_path / "l.safetensors"), meta)
    probe = ("import sys; from lora_tools.cli import main; sys.argv = ['loratool'] + sys.argv[1:]\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)")
    for argv in (["--help"], ["inspect", str(tmp_path / "l.safetensors")]):
        p = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=tmp_path)
        assert p.stdout.strip().splitlines()[-1] in ("NO-TORCH 0", "NO-TORCH None"), (argv, p.stdout[-500:], p.stderr[-500:])


@pytest.mark.subprocess
def test_the_cli_starts_without_the_hub_client(tmp_path):
    """``loratool --help`` loads neither torch nor huggingface_hub. pydantic is allowed: every command's options
    are generated from its operation's options model (``lora_tools.ops.registry``)."""
    import subprocess
    import sys

    probe = ("import sys; from lora_tools.cli import main; sys.argv = ['loratool', '--help']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('LOADED', sorted(m for m in ('torch', 'huggingface_hub') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert p.stdout.strip().splitlines()[-1] == "LOADED []", (p.stdout[-500:], p.stderr[-500:])
