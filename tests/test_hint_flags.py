"""Every way out a library error names is spelled in the words of the command the user ran: its own flag
(``--to`` for convert's format), its own argument, or nothing, never a flag that command does not have."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from lora_tools.cli import PARAM_FLAGS, cli, command_speller
from lora_tools.ops.registry import OPS

ROOT = Path(__file__).resolve().parents[1] / "lora_tools"


@cache
def hint_params() -> frozenset[str]:
    """Every parameter a ``Hint(...)`` in the library names (its param and its alternatives)."""
    found: set[str] = set()
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Hint"):
                continue
            args = list(node.args[:1]) + [k.value for k in node.keywords if k.arg in ("param", "alternatives")]
            for a in args:
                for c in ([a] if isinstance(a, ast.Constant) else getattr(a, "elts", [])):
                    if isinstance(c, ast.Constant) and isinstance(c.value, str):
                        found.add(c.value)
    return frozenset(found)


def _words(command: click.Command) -> set[str]:
    ctx = click.Context(command)
    words = {o for p in command.params if isinstance(p, click.Option) for o in p.opts}
    return words | {p.make_metavar(ctx) for p in command.params if isinstance(p, click.Argument)}


def test_the_library_names_hint_params() -> None:
    assert {"overwrite", "lora", "format", "rank", "energy", "sv_ratio", "sv_fro", "sv_cumulative", "method"} <= hint_params()


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_hint_param_is_spelled_with_the_commands_own_options(name: str) -> None:
    command = cli.commands[name]
    spell = command_speller(command)
    words = _words(command)
    for param in sorted(hint_params()):
        spelled = spell(param)
        assert spelled == "" or spelled in words, f"loratool {name}: {param} spelled {spelled!r}, not among {words}"


def test_the_global_table_names_real_flags() -> None:
    every = set().union(*(_words(c) for c in cli.commands.values()))
    assert {flag for flag in PARAM_FLAGS.values() if flag not in every} == set()


def _error(argv: list[str]) -> str:
    run = CliRunner().invoke(cli, argv)
    assert run.exit_code != 0
    return run.stderr.strip()


def test_messages_name_the_commands_own_flags(tmp_path: Path) -> None:
    from lora_tools.testing.synthetic_lora import write_lora

    lora = write_lora(tmp_path / "a.safetensors", "micro", fmt="kohya", components=("unet", "te1"), rank=4)
    other = write_lora(tmp_path / "b.safetensors", "micro", fmt="kohya", rank=4, seed=2)
    peft = _error(["convert", str(lora), "--to", "peft", "-o", str(tmp_path / "p.safetensors")])
    assert "--to NAME" in peft and "--format" not in peft
    extract = _error(["extract", str(lora), str(other), "--rank", "4", "--energy", "0.5", "-o", str(tmp_path / "x")])
    assert "pass exactly one of --rank, --energy." in extract and "sv" not in extract
    resize = _error(["resize", str(lora), "-o", str(tmp_path / "r.safetensors")])
    assert "pass exactly one of --rank, --energy, --sv-ratio, --sv-fro, --sv-cumulative." in resize
    merge = _error(["merge", str(lora), str(other), "--rank", "4", "-o", str(tmp_path / "m.safetensors")])
    assert "pass --method svd" in merge
