"""``loratool fuse``: Lightning (and any LoRA) into an SDXL checkpoint, as standalone files."""

from __future__ import annotations

import click

from lora_tools.cli._progress import byte_progress


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


@click.command("fuse")
@click.argument("base", type=click.Path(exists=True, dir_okay=True, path_type=str))
@click.option("--lightning", type=click.Choice(["1", "2", "4", "8"]), help="SDXL-Lightning step count to fuse in.")
@click.option("--method", type=click.Choice(["lora", "unet"]), default="lora", show_default=True,
              help="lora: fuse the Lightning LoRA; unet: add (Lightning UNet - SDXL base UNet), the model card's best quality.")
@click.option("--lora", "loras", multiple=True, metavar="SRC[:STRENGTH]",
              help="Extra LoRA: local file or owner/repo/file.safetensors on the hub; strength defaults to 1.0. Repeatable.")
@click.option("--strength", "lightning_strength", type=float, default=1.0, show_default=True,
              help="Strength of the Lightning LoRA/difference.")
@click.option("--save", "saves", multiple=True, type=click.Choice(["checkpoint", "unet", "diffusers"]),
              help="What to write (repeatable): whole single file, standalone diffusers UNet, diffusers folder. Default: checkpoint.")
@click.option("-o", "--output", type=click.Path(path_type=str), help="Output path (default: next to BASE, named after what was done).")
@click.option("--dtype", type=click.Choice(["keep", "fp16", "bf16", "fp32"]), default="keep", show_default=True,
              help="dtype of float tensors in the outputs (maths is always fp32).")
@click.option("--dry-run", is_flag=True, help="Print the plan (matches, outputs, sizes, memory) and write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (inputs are never overwritten).")
@click.option("--allow-unmatched", is_flag=True, help="Skip LoRA modules that have no target instead of failing.")
@click.option("--force", is_flag=True, help="Fuse even into a model lora_tools already fused Lightning into.")
@click.option("--revision", help="Hub revision (commit, tag or branch) for hub downloads.")
@click.option("--lightning-dir", type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Local folder holding the ByteDance/SDXL-Lightning files (instead of the hub).")
@click.option("--original-unet", type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="The SDXL base UNet (diffusers layout) for --method unet (instead of the hub).")
@click.option("--variant", help="Weights variant of a diffusers-folder BASE (e.g. fp16).")
@click.option("--hash-base", is_flag=True,
              help="Record the base's full sha256 even when it is over 2 GiB (one more pass over the file).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, summary only.")
def fuse_command(base: str, lightning: str | None, method: str, loras: tuple[str, ...], lightning_strength: float,
                 saves: tuple[str, ...], output: str | None, dtype: str, dry_run: bool, overwrite: bool,
                 allow_unmatched: bool, force: bool, revision: str | None, lightning_dir: str | None,
                 original_unet: str | None, variant: str | None, hash_base: bool, quiet: bool) -> None:
    """Fuse SDXL-Lightning and/or LoRAs into BASE and save standalone model files.

    BASE is a single-file SDXL checkpoint, a diffusers UNet file or a diffusers folder.

    \b
    Example:
        loratool fuse juggernaut.safetensors --lightning 4
        loratool fuse juggernaut.safetensors --lightning 4 --lora style.safetensors:0.6 --save checkpoint --save unet
        loratool fuse base.safetensors --lora ByteDance/SDXL-Lightning/sdxl_lightning_8step_lora.safetensors --dry-run
    """
    from lora_tools.hub import parse_source
    from lora_tools.ops.fuse_plan import plan_fuse  # torch-free: the LoRA hashing starts before torch loads

    plan = plan_fuse(
        base, lightning=int(lightning) if lightning else None, method=method,  # type: ignore[arg-type]
        loras=[parse_source(s) for s in loras], saves=saves or ("checkpoint",), output=output, dtype=dtype,  # type: ignore[arg-type]
        lightning_strength=lightning_strength, allow_unmatched=allow_unmatched, force=force, overwrite=overwrite,
        revision=revision, lightning_dir=lightning_dir, original_unet=original_unet, variant=variant,
        hash_base=hash_base,
    )
    try:
        for w in plan.warnings:
            click.echo(f"Warning: {w}", err=True)
        if dry_run:
            _print_plan(plan)
            return
        from lora_tools.ops.fuse import run_fuse

        with byte_progress(plan.base.total_bytes(), "fusing", enabled=not quiet) as advance:
            result = run_fuse(plan, progress=advance)
        _print_summary(plan, result)
    finally:
        plan.close()


def _print_plan(plan) -> None:  # type: ignore[no-untyped-def]
    click.echo(f"Base:    {plan.base.path} ({plan.base.layout}, {plan.base.kind.architecture}, "
               f"{', '.join(plan.base.kind.components)})")
    for s in plan.loras:
        click.echo(f"LoRA:    {s.adapter.path} ({s.adapter.format}, {len(s.match.matched)} modules matched, "
                   f"{len(s.match.unmatched)} unmatched, strength {s.strength:g})")
    for d in plan.diffs:
        click.echo(f"UNet difference: {d.tuned.path} - {d.original.path} (strength {d.strength:g})")
    click.echo("Modules per block:")
    for block, n in sorted(plan.modules_per_block().items()):
        click.echo(f"  {block:<32} {n:>5}")
    if plan.unmatched:
        click.echo(f"Unmatched ({len(plan.unmatched)}): {', '.join(plan.unmatched[:5])}")
    click.echo(f"Tensors patched: {len(plan.patched_keys())} of {len(plan.base.refs)}")
    for o in plan.outputs:
        click.echo(f"Output:  {o.path} ({o.kind}, about {_human(plan.output_bytes(o.kind))})")
    click.echo(f"Predicted peak memory: about {_human(plan.predicted_peak_bytes())}")
    if plan.sampler is not None:
        click.echo(f"Sampler: {plan.sampler.describe()}")
    click.echo("Dry run: nothing was written.")


def _print_summary(plan, result) -> None:  # type: ignore[no-untyped-def]
    from lora_tools.hub import autov2_hash

    click.echo(f"Fused {result.modules_fused} modules into {result.tensors_patched} tensors in {result.seconds:.1f} s.")
    for f in result.files:
        if f.kind == "diffusers" and not f.path.name.startswith("diffusion_pytorch_model"):
            continue
        digest = f"sha256 {f.sha256[:16]}..., AutoV2 {autov2_hash(f.sha256)}" if f.sha256 else ""
        click.echo(f"Wrote {f.path} ({_human(f.nbytes)}) {digest}")
    if plan.sampler is not None:
        s = plan.sampler
        click.echo(f"Use it with: {s.describe()}")
        click.echo("  diffusers: EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing=\"trailing\""
                   + (f", prediction_type=\"{s.prediction_type}\"" if s.prediction_type != "epsilon" else "")
                   + f"); pipe(prompt, num_inference_steps={s.steps}, guidance_scale={s.guidance_scale:g})")
        click.echo(f"  ComfyUI:   KSampler sampler=euler scheduler=sgm_uniform steps={s.steps} cfg=1.0"
                   + (" (ModelSamplingDiscrete: x0)" if s.prediction_type == "sample" else ""))
