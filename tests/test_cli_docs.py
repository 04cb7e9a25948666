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
