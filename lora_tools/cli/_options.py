"""Options every LoRA-writing command shares: ``-o/--output``, ``--overwrite``, ``--dtype``, ``--json``."""

from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def output_options(func: F) -> F:
    """``-o/--output`` (required), ``--overwrite``, ``--dtype``, ``--json``, in that order in ``--help``."""
    for option in reversed((
        click.option("-o", "--output", required=True, type=click.Path(path_type=str),
                     help="The LoRA file to write (never one of the inputs)."),
        click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists."),
        click.option("--dtype", type=click.Choice(["keep", "fp16", "bf16", "fp32"]), default="keep",
                     show_default=True, help="dtype of the written factors (maths is always fp32)."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
    )):
        func = option(func)
    return func


def emit(report: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    """Print the report: JSON (``--json``) or the human lines (file-derived text already made safe)."""
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        for line in lines:
            click.echo(line)
