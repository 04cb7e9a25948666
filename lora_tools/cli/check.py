"""``loratool check``: a thin command over :func:`lora_tools.ops.check.check_file`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lora_tools.cli._options import quiet_flag, say
from lora_tools.cli._output import safe_text
from lora_tools.ops.check import CheckResult, check_file
from lora_tools.units import format_bytes


@click.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path, readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with a verdict per file.")
@click.option("--hash", "hash_data", is_flag=True,
              help="Also read every tensor: the file's sha256, short reads, NaN/Inf, and the data hash a big loratool "
                   "output records in its header (one pass over each file).")
@quiet_flag
def check_command(paths: tuple[Path, ...], as_json: bool, hash_data: bool) -> None:
    """Check that each safetensors FILE is complete and internally consistent (a diffusers folder: each of its
    safetensors files).

    The header must follow the safetensors rules (tensors tiling the data section exactly, unique
    keys, known dtypes, sizes matching shapes) and a loratool record must be readable. Exit
    status 1 when any file fails; each failure is one "Error:" line on stderr.

    \b
    Example:
        loratool check juggernaut-lightning-4step.safetensors
        loratool check --hash --json downloads/*.safetensors
    """
    results = [check_file(p, hash_data=hash_data) for p in _files(paths)]
    if as_json:
        click.echo(json.dumps({"ok": all(r.ok for r in results), "files": [r.to_dict() for r in results]}, indent=2))
    else:
        for r in results:
            if r.ok:
                say(render_ok(r))
            for problem in r.problems:
                click.echo(f"Error: {safe_text(problem, limit=400)}", err=True)
    if not all(r.ok for r in results):
        raise SystemExit(1)


def _files(paths: tuple[Path, ...]) -> list[Path]:
    """The paths, a diffusers folder (``model_index.json``) replaced by its safetensors files."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir() and (p / "model_index.json").is_file():
            out += sorted(p.rglob("*.safetensors")) or [p]
        else:
            out.append(p)
    return out


def render_ok(result: CheckResult) -> str:
    """The one line for a sound file: ``ok  PATH  (N tensors, SIZE[, sha256 ...][, loratool record: OP])``."""
    parts = [f"{result.tensors:,} tensors", format_bytes(result.size_bytes or 0)]
    if result.sha256:
        parts.append(f"sha256 {result.sha256}")
    if result.data_xxh3_128:
        parts.append("its data matches the xxh3-128 recorded in it")
    if result.record is not None:
        parts.append(f"loratool record: {safe_text(result.record.get('operation', '?'))}")
    return f"ok  {safe_text(result.path)}  ({', '.join(parts)})"
