"""``loratool publish``: a release folder with model card, then an upload to the hub."""

from __future__ import annotations

import click

from lora_tools.cli._generate import json_option, operation_command, overwrite_option
from lora_tools.cli._options import say, written
from lora_tools.cli._output import safe_text
from lora_tools.ops.registry import OPS
from lora_tools.units import format_bytes


@operation_command(OPS["publish"], extra=[overwrite_option("Replace an existing release folder."),
                                           json_option("Print the release (folder, files, license, URL) as JSON.")])
def publish_command(options, overwrite: bool, as_json: bool) -> None:
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
    if as_json:
        _publish_json(op, planned, options)
        return
    say(f"Release folder: {safe_text(plan.folder)}" + (f" -> https://huggingface.co/{repo}" if repo else ""),
        *(f"  {safe_text(name)} ({format_bytes(nbytes)})" for name, nbytes in plan.listing()),
        f"License: {safe_text(plan.license)}")
    if options.dry_run:
        say("Dry run: nothing was written or uploaded.")
        return
    result = op.run(planned)
    say(f"Wrote {safe_text(result.files[0])}")
    if repo is not None:
        say(f"Uploaded to {result.extra['url']}")
    written([result.files[0], *([result.extra["url"]] if repo is not None else [])])


def _publish_json(op, planned, options) -> None:
    import json

    plan = planned.plan
    report = {"folder": str(plan.folder), "repo": options.repo, "license": plan.license,
              "files": [{"name": name, "bytes": nbytes} for name, nbytes in plan.listing()],
              "dry_run": bool(options.dry_run), "written": None, "url": None}
    if not options.dry_run:
        result = op.run(planned)
        report["written"] = str(result.files[0])
        report["url"] = result.extra.get("url") if options.repo is not None else None
    click.echo(json.dumps(report, indent=2))
