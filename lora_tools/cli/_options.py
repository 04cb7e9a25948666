"""How commands print their report: JSON (``--json``) or human lines."""

from __future__ import annotations

import json
from typing import Any

import click


def emit(report: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    """Print the report: JSON (``--json``) or the human lines (file-derived text already made safe)."""
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        for line in lines:
            click.echo(line)
