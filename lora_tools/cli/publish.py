"""``loratool publish``: a release folder with model card, then an upload to the hub."""

from __future__ import annotations

import click

from lora_tools.cli._output import safe_text
from lora_tools.units import format_bytes


@click.command("publish")
@click.argument("path", type=click.Path(exists=True, path_type=str))
@click.option("--repo", metavar="ID", help="Hub repository (owner/name) to upload to.")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--license", "license_id", metavar="ID", help="License id for the card (default: the base's recorded license).")
@click.option("--release-dir", type=click.Path(path_type=str), help="Release folder (default: next to PATH).")
@click.option("--overwrite", is_flag=True, help="Replace an existing release folder.")
@click.option("--dry-run", is_flag=True, help="Show what would be written and uploaded; write and upload nothing.")
def publish_command(path: str, repo: str | None, private: bool, license_id: str | None, release_dir: str | None,
                    overwrite: bool, dry_run: bool) -> None:
    """Prepare a release of PATH (a model file, or a folder of them) and upload it.

    The release holds the model file(s), a model card (README.md: what was fused, the settings
    for diffusers/ComfyUI/A1111, licenses, hashes, the recipe) and scheduler_config.json.
    Without --repo only the folder is written.

    \b
    Example:
        loratool publish out/juggernaut-lightning-4step.safetensors --repo me/juggernaut-lightning --license openrail++ --dry-run
    """
    from lora_tools.publish import check_upload, plan_release, upload_release, write_release

    plan = plan_release(path, repo=repo, license=license_id, private=private, folder=release_dir, overwrite=overwrite)
    if repo is not None:
        check_upload(plan)
    for w in plan.warnings:
        click.echo(f"Warning: {w} (pass --license ID).", err=True)
    click.echo(f"Release folder: {safe_text(plan.folder)}" + (f" -> https://huggingface.co/{repo}" if repo else ""))
    for name, nbytes in plan.listing():
        click.echo(f"  {safe_text(name)} ({format_bytes(nbytes)})")
    click.echo(f"License: {safe_text(plan.license)}")
    if dry_run:
        click.echo("Dry run: nothing was written or uploaded.")
        return
    folder = write_release(plan)
    click.echo(f"Wrote {safe_text(folder)}")
    if repo is not None:
        url = upload_release(plan, folder)
        click.echo(f"Uploaded to {url}")
