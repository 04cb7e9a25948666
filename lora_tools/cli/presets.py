"""``loratool presets``: the acceleration preset registry, as a table or JSON."""

from __future__ import annotations

import json

import click

from lora_tools.cli._options import quiet_flag, say


@click.command("presets")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per preset) instead of text.")
@quiet_flag
def presets_command(name: str | None, as_json: bool) -> None:
    """List the acceleration presets (SDXL-Lightning, Hyper-SD, LCM, TCD, DMD2) and their sampler settings.

    With NAME, show that preset in full.

    \b
    Example:
        loratool presets
        loratool presets dmd2-4step --json
    """
    from lora_tools.presets import PRESETS, get_preset

    rows = [get_preset(name)] if name else list(PRESETS.values())
    if as_json:
        data = [p.to_dict() for p in rows]
        click.echo(json.dumps(data[0] if name else data, indent=2))
        return
    if not name:
        width = max(len(p.name) for p in rows)
        for p in rows:
            say(f"{p.name:<{width}}  {p.label}: {p.sampler.describe()}")
        return
    p = rows[0]
    say(f"{p.name}: {p.label} ({p.family}, {p.steps} step{'s' if p.steps != 1 else ''}, {p.kind})")
    say(f"  repo       {p.repo_id}")
    for title, f in (("lora", p.lora_file), ("unet", p.unet_file), ("checkpoint", p.checkpoint_file)):
        if f:
            say(f"  {title:<10} {f}" + (f"  sha256 {p.known_sha256[f]}" if f in p.known_sha256 else ""))
    for f in p.extra_files:
        say(f"  also       {f}")
    if p.pickle:
        say("  note       a torch pickle: loaded weights-only")
    say(f"  sample     {p.sampler.describe()}")
    say(f"  source     {p.source}")
