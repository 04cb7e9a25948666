"""``loratool fuse``: Lightning (and any LoRA) into an SDXL checkpoint, as standalone files."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from lora_tools.cli._output import safe_text
from lora_tools.units import format_bytes
from lora_tools.cli._progress import byte_progress
from lora_tools.cli._types import LORA_STRENGTH, PRESET_STRENGTH
from lora_tools.errors import Hint, UsageError

if TYPE_CHECKING:
    from lora_tools.presets import SamplerSettings


@click.command("fuse")
@click.argument("base", type=click.Path(readable=False, path_type=str))  # checked by plan_fuse: one line, exit 1
@click.option("--preset", metavar="NAME", help="Acceleration preset to fuse in (e.g. lightning-4step; see loratool presets).")
@click.option("--lightning", type=click.Choice(["1", "2", "4", "8"]),
              help="SDXL-Lightning step count to fuse in: shorthand for --preset lightning-Nstep.")
@click.option("--method", type=click.Choice(["lora", "unet"]), default="lora", show_default=True,
              help="lora: fuse the preset's LoRA; unet: add (the preset's UNet - SDXL base UNet), Lightning's best quality.")
@click.option("--lora", "loras", multiple=True, metavar="SRC[:STRENGTH]", type=LORA_STRENGTH,
              help="Extra LoRA: local file or owner/repo/file.safetensors on the hub; strength defaults to 1.0. Repeatable.")
@click.option("--strength", "preset_strength", type=PRESET_STRENGTH, default=None,
              help="Strength of the preset's LoRA/difference (default 1.0; needs --preset or --lightning).")
@click.option("--save", "saves", multiple=True, type=click.Choice(["checkpoint", "unet", "diffusers"]),
              help="What to write (repeatable): whole single file, standalone diffusers UNet, diffusers folder. Default: checkpoint.")
@click.option("-o", "--output", type=click.Path(path_type=str), help="Output path (default: next to BASE, named after what was done).")
@click.option("--dtype", type=click.Choice(["keep", "fp16", "bf16", "fp32"]), default="keep", show_default=True,
              help="dtype of float tensors in the outputs (maths is always fp32).")
@click.option("--dry-run", is_flag=True, help="Print the plan (matches, outputs, sizes, memory) and write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (inputs are never overwritten).")
@click.option("--allow-unmatched", is_flag=True, help="Skip LoRA modules that have no target instead of failing.")
@click.option("--force", is_flag=True, help="Fuse even into a model lora_tools already fused a preset into.")
@click.option("--revision", help="Hub revision (commit, tag or branch) for hub downloads.")
@click.option("--preset-dir", "--lightning-dir", "preset_dir", type=click.Path(file_okay=False, readable=False, path_type=str),
              help="Local folder holding the preset's files, e.g. ByteDance/SDXL-Lightning's (instead of the hub).")
@click.option("--original-unet", type=click.Path(dir_okay=False, readable=False, path_type=str),
              help="The SDXL base UNet (diffusers layout) for --method unet (instead of the hub).")
@click.option("--variant", help="Weights variant of a diffusers-folder BASE (e.g. fp16).")
@click.option("--hash-base", is_flag=True,
              help="Record the base's full sha256 even when it is over 2 GiB (one more pass over the file).")
@click.option("--verify-output", is_flag=True,
              help="Before renaming each output into place, read it back and check its sha256 (one more pass).")
@click.option("--workflow", is_flag=True, help="Also write a ComfyUI API-format workflow (NAME-workflow.json) beside the checkpoint.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, summary only.")
def fuse_command(base: str, preset: str | None, lightning: str | None, method: str,
                 loras: tuple[tuple[str, float], ...], preset_strength: float | None, saves: tuple[str, ...],
                 output: str | None, dtype: str, dry_run: bool,
                 overwrite: bool, allow_unmatched: bool, force: bool, revision: str | None, preset_dir: str | None,
                 original_unet: str | None, variant: str | None, hash_base: bool, verify_output: bool,
                 workflow: bool, quiet: bool) -> None:
    """Fuse an acceleration preset (SDXL-Lightning...) and/or LoRAs into BASE and save standalone model files.

    BASE is a single-file SDXL checkpoint, a diffusers UNet file or a diffusers folder.

    \b
    Example:
        loratool fuse juggernaut.safetensors --lightning 4
        loratool fuse juggernaut.safetensors --preset lightning-8step --strength 0.9
        loratool fuse juggernaut.safetensors --lightning 4 --lora style.safetensors:0.6 --save checkpoint --save unet
        loratool fuse base.safetensors --lora ByteDance/SDXL-Lightning/sdxl_lightning_8step_lora.safetensors --dry-run
    """
    from lora_tools.ops.fuse_plan import plan_fuse  # torch-free: the LoRA hashing starts before torch loads

    if lightning is not None:
        shorthand = f"lightning-{lightning}step"
        if preset is not None and preset.strip().lower() != shorthand:
            raise UsageError(f"--lightning {lightning} and --preset {preset} name two presets: give one.")
        preset = shorthand
    if preset_strength is not None and preset is None:
        raise UsageError(f"--strength {preset_strength:g} applies to a preset, and none was given",
                         hint=Hint("preset", "to choose one (or --lightning N)", "NAME"))
    plan = plan_fuse(
        base, preset, method=method,  # type: ignore[arg-type]
        loras=list(loras), saves=saves or ("checkpoint",), output=output, dtype=dtype,  # type: ignore[arg-type]
        preset_strength=preset_strength, allow_unmatched=allow_unmatched, force=force, overwrite=overwrite,
        revision=revision, preset_dir=preset_dir, original_unet=original_unet, variant=variant,
        hash_base=hash_base, verify_output=verify_output,
    )
    try:
        wf = _plan_workflow(plan, overwrite) if workflow and not dry_run else None
        for w in plan.warnings:
            click.echo(f"Warning: {w}", err=True)
        if dry_run:
            _print_plan(plan)
            return
        from lora_tools.ops.fuse import run_fuse

        with byte_progress(plan.base.total_bytes(), "fusing", enabled=not quiet) as advance:
            result = run_fuse(plan, progress=advance)
        _print_summary(plan, result)
        if wf is not None:
            from lora_tools.verify.workflow import write_workflow

            click.echo(f"Wrote {safe_text(write_workflow(wf[0], wf[1].name, plan.sampler))} (ComfyUI API-format workflow)")
    finally:
        plan.close()


def _plan_workflow(plan, overwrite: bool):  # type: ignore[no-untyped-def]
    """(workflow path, checkpoint path) of ``--workflow``, checked before the fuse writes anything."""
    from lora_tools.verify.workflow import workflow_file

    ckpt = next((o.path for o in plan.outputs if o.kind == "checkpoint"), None)
    if ckpt is None:
        raise UsageError("--workflow loads a single-file checkpoint in ComfyUI: add --save checkpoint.")
    return workflow_file(ckpt, plan.sampler, overwrite=overwrite), ckpt


def _print_plan(plan) -> None:  # type: ignore[no-untyped-def]
    click.echo(f"Base:    {safe_text(plan.base.path)} ({plan.base.layout}, {plan.base.kind.architecture}, "
               f"{', '.join(plan.base.kind.components)})")
    for s in plan.loras:
        click.echo(f"LoRA:    {safe_text(s.adapter.path)} ({s.adapter.format}, {len(s.match.matched)} modules matched, "
                   f"{len(s.match.unmatched)} unmatched, strength {s.strength:g})")
    for d in plan.diffs:
        click.echo(f"UNet difference: {safe_text(d.tuned.path)} - {safe_text(d.original.path)} (strength {d.strength:g})")
    click.echo("Modules per block:")
    for (block, where), n in plan.modules_per_block().items():
        click.echo(f"  {block:<5} {where:<36} {n:>5}")
    if plan.unmatched:
        click.echo(f"Unmatched ({len(plan.unmatched)}): {', '.join(plan.unmatched[:5])}")
    click.echo(f"Tensors patched: {len(plan.patched_keys())} of {len(plan.base.refs)}")
    for o in plan.outputs:
        click.echo(f"Output:  {safe_text(o.path)} ({o.kind}, about {format_bytes(plan.output_bytes(o.kind))})")
    click.echo(f"Predicted peak memory: about {format_bytes(plan.predicted_peak_bytes())}")
    if plan.sampler is not None:
        click.echo(f"Sampler: {plan.sampler.describe()}")
    click.echo("Dry run: nothing was written.")


def _print_summary(plan, result) -> None:  # type: ignore[no-untyped-def]
    from lora_tools.io.hashing import autov2_hash

    click.echo(f"Fused {result.modules_fused} modules into {result.tensors_patched} tensors in {result.seconds:.1f} s.")
    for f in result.files:  # every weights file, the text encoders of a diffusers folder too
        digest = f" sha256 {f.sha256}, AutoV2 {autov2_hash(f.sha256)}" if f.sha256 else ""
        click.echo(f"Wrote {safe_text(f.path)} ({format_bytes(f.nbytes)}){digest}")
    if plan.sampler is not None:
        for line in usage_lines(plan.sampler):
            click.echo(line)


def usage_lines(s: "SamplerSettings") -> list[str]:
    """How to sample the result, from the preset's :class:`~lora_tools.presets.SamplerSettings` alone."""
    diffusers = (f"  diffusers: {s.scheduler}.from_config(pipe.scheduler.config, timestep_spacing=\"{s.timestep_spacing}\""
                 + (f", prediction_type=\"{s.prediction_type}\"" if s.prediction_type != "epsilon" else "")
                 + f"); pipe(prompt, num_inference_steps={s.steps}, guidance_scale={s.guidance_scale:g})")
    comfy = (f"  ComfyUI:   KSampler sampler={s.comfy_sampler} scheduler={s.comfy_scheduler} steps={s.steps} cfg={_number(s.comfy_cfg)}"
             + (f" (ModelSamplingDiscrete: {s.comfy_model_sampling})" if s.comfy_model_sampling != "eps" else ""))
    return [f"Use it with: {s.describe()}", diffusers, comfy]


def _number(x: float) -> str:
    return f"{x:.1f}" if float(x).is_integer() else f"{x:g}"
