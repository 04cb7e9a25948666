"""``loratool publish``: a release folder with model card, then an upload to the hub."""

from __future__ import annotations

import click

from lora_tools.cli._generate import operation_command, overwrite_option
from lora_tools.cli._output import safe_text
from lora_tools.ops.registry import OPS
from lora_tools.units import format_bytes


@operation_command(OPS["publish"], extra=[overwrite_option("Replace an existing release folder.")])
def publish_command(options, overwrite: bool) -> None:
    """Prepare a release of PATH (a model file, or a folder of them) and upload it.

    The release holds the model file(s), a model card (README.md: what was fused, the settings
    for diffusers/ComfyUI/A1111, licenses, hashes, the recipe) and scheduler_config.json.
    Without --repo only the folder is written.

    \b
    Example:
        loratool publish out/juggernaut-lightning-4step.safetensors --repo me/juggernaut-lightning --license openrail++ --dry-run
    """
    op = OPS["publish"]
    planned = op.plan(options, overwrite=overwrite)
    plan, repo = planned.plan, options.repo
    for w in plan.warnings:
        click.echo(f"Warning: {w} (pass --license ID).", err=True)
    click.echo(f"Release folder: {safe_text(plan.folder)}" + (f" -> https://huggingface.co/{repo}" if repo else ""))
    for name, nbytes in plan.listing():
        click.echo(f"  {safe_text(name)} ({format_bytes(nbytes)})")
    click.echo(f"License: {safe_text(plan.license)}")
    if options.dry_run:
        click.echo("Dry run: nothing was written or uploaded.")
        return
    result = op.run(planned)
    click.echo(f"Wrote {safe_text(result.files[0])}")
    if repo is not None:
        click.echo(f"Uploaded to {result.extra['url']}")
