"""``loratool fuse``: Lightning (and any LoRA) into an SDXL checkpoint, as standalone files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from lora_tools.cli._generate import json_option, operation_command, overwrite_option
from lora_tools.cli._options import is_quiet, written
from lora_tools.cli._output import safe_text
from lora_tools.cli._progress import byte_progress
from lora_tools.errors import Hint, UsageError
from lora_tools.io.remote import as_path
from lora_tools.ops.registry import OPS
from lora_tools.units import format_bytes

if TYPE_CHECKING:
    from lora_tools.ops.fuse import FuseResult
    from lora_tools.ops.fuse_plan import FusePlan
    from lora_tools.presets import SamplerSettings


@operation_command(OPS["fuse"], extra=[
    click.Option(["--dry-run"], is_flag=True, help="Print the plan (matches, outputs, sizes, memory) and write nothing."),
    overwrite_option("Replace existing outputs (inputs are never overwritten)."),
    json_option("Print the plan (with --dry-run) or what was written as JSON on stdout."),
])
def fuse_command(options, dry_run: bool, overwrite: bool, as_json: bool) -> None:
    """Fuse an acceleration preset (SDXL-Lightning...) and/or LoRAs into BASE and save standalone model files.

    BASE is a single-file SDXL checkpoint, a diffusers UNet file or a diffusers folder.

    \b
    Example:
        loratool fuse juggernaut.safetensors --lightning 4
        loratool fuse juggernaut.safetensors --preset lightning-8step --strength 0.9
        loratool fuse juggernaut.safetensors --lightning 4 --lora style.safetensors:0.6 --save checkpoint --save unet
        loratool fuse base.safetensors --lora ByteDance/SDXL-Lightning/sdxl_lightning_8step_lora.safetensors --dry-run
    """
    if options.lightning is not None:
        shorthand = f"lightning-{options.lightning}step"
        if options.preset is not None and options.preset.strip().lower() != shorthand:
            raise UsageError(f"--lightning {options.lightning} and --preset {options.preset} name two presets: give one.")
        if options.preset is not None:
            options = options.model_copy(update={"lightning": None})
    if options.strength is not None and options.preset_name is None:
        raise UsageError(f"--strength {options.strength:g} applies to a preset, and none was given",
                         hint=Hint("preset", "to choose one (or --lightning N)", "NAME"))
    op = OPS["fuse"]
    # A dry run plans as if replacing, then says which outputs exist and would need --overwrite.
    planned = op.plan(options, overwrite=overwrite or dry_run)
    try:
        plan = planned.plan
        for w in plan.warnings:
            click.echo(f"Warning: {w}", err=True)
        if dry_run:
            existing = [] if overwrite else [o.path for o in plan.outputs if as_path(o.path).exists()]
            if as_json:
                click.echo(json.dumps(_plan_dict(plan, existing), indent=2))
            elif not is_quiet():  # a dry run writes nothing: under -q it prints nothing
                _print_plan(plan, existing)
            return
        with byte_progress(plan.base.total_bytes(), "fusing", enabled=not as_json) as advance:
            result = op.run(planned, progress=advance)
        if as_json:
            click.echo(json.dumps(_result_dict(plan, result.extra["fuse"], planned.workflow), indent=2))
            return
        fused = result.extra["fuse"]
        if is_quiet():
            written([*(f.path for f in fused.files), *([planned.workflow] if planned.workflow is not None else [])])
            return
        _print_summary(plan, fused)
        if planned.workflow is not None:
            click.echo(f"Wrote {safe_text(planned.workflow)} (ComfyUI API-format workflow)")
    finally:
        planned.close()


def _plan_dict(plan, existing: list[Path]) -> dict[str, Any]:
    return {"dry_run": True, "base": str(plan.base.path),
            "loras": [{"path": str(s.adapter.path), "strength": s.strength, "matched": len(s.match.matched),
                       "unmatched": len(s.match.unmatched)} for s in plan.loras],
            "tensors_patched": len(plan.patched_keys()),
            "outputs": [{"path": str(o.path), "kind": o.kind, "bytes": plan.output_bytes(o.kind),
                         "exists": o.path in existing} for o in plan.outputs],
            "needs_overwrite": [str(p) for p in existing], "predicted_peak_bytes": plan.predicted_peak_bytes(),
            "sampler": plan.sampler.describe() if plan.sampler is not None else None}


def _result_dict(plan, result, workflow: Path | None) -> dict[str, Any]:
    return {"files": [{"path": str(f.path), "kind": f.kind, "bytes": f.nbytes, "sha256": f.sha256,
                       "data_xxh3_128": f.data_xxh3_128} for f in result.files],
            "modules_fused": result.modules_fused, "tensors_patched": result.tensors_patched,
            "seconds": result.seconds, "workflow": str(workflow) if workflow is not None else None,
            "sampler": plan.sampler.describe() if plan.sampler is not None else None}


def _print_plan(plan, existing: list[Path]) -> None:
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
        click.echo(f"Output:  {safe_text(o.path)} ({o.kind}, about {format_bytes(plan.output_bytes(o.kind))}"
                   + (f", fp8 {plan.fp8}; {format_bytes(plan.fp16_bytes(o.kind))} in fp16" if plan.fp8 else "") + ")")
    click.echo(f"Predicted peak memory: about {format_bytes(plan.predicted_peak_bytes())}")
    if plan.sampler is not None:
        click.echo(f"Sampler: {plan.sampler.describe()}")
    if existing:
        click.echo(f"Exists:  {', '.join(safe_text(p) for p in existing)} (a real run needs --overwrite)")
    click.echo("Dry run: nothing was written.")


def _print_summary(plan, result) -> None:
    from lora_tools.io.hashing import autov2_hash

    click.echo(f"Fused {result.modules_fused} modules into {result.tensors_patched} tensors in {result.seconds:.1f} s.")
    for f in result.files:  # every weights file, the text encoders of a diffusers folder too
        digest = f" sha256 {f.sha256}, AutoV2 {autov2_hash(f.sha256)}" if f.sha256 else \
            f" data xxh3-128 {f.data_xxh3_128} (recorded in its header: `loratool check --hash` verifies it)" if f.data_xxh3_128 else ""
        click.echo(f"Wrote {safe_text(f.path)} ({format_bytes(f.nbytes)}){digest}")
    if result.fp8_error is not None:
        for line in fp8_lines(plan, result):
            click.echo(line)
    if plan.sampler is not None:
        for line in usage_lines(plan.sampler):
            click.echo(line)


def fp8_lines(plan: FusePlan, result: FuseResult) -> list[str]:
    """The fp8 summary: the size saved against fp16, and the weight error of the fp8 rounding."""
    e = result.fp8_error
    lines: list[str] = []
    if e is None:  # not an fp8 fuse
        return lines
    for o in plan.outputs:
        fp16, now = plan.fp16_bytes(o.kind), plan.output_bytes(o.kind)
        lines.append(f"fp8 {plan.fp8}: {safe_text(o.path.name)} is {format_bytes(now)}, {format_bytes(fp16 - now)} "
                     f"({100 * (fp16 - now) / fp16:.0f} %) smaller than in fp16" if fp16 else "")
    worst = f"; worst tensor {safe_text(e.worst[0])} ({e.worst[1]:.2%})" if e.worst else ""
    lines.append(f"fp8 rounding: {e.tensors} UNet weights, relative Frobenius error {e.relative:.3%}{worst}")
    if e.saturated:
        lines.append(f"Warning: {e.saturated} values beyond +-448 were clamped (plain fp8); --fp8 scaled keeps them.")
    return lines


def usage_lines(s: SamplerSettings) -> list[str]:
    """How to sample the result, from the preset's :class:`~lora_tools.presets.SamplerSettings` alone."""
    diffusers = (f"  diffusers: {s.scheduler}.from_config(pipe.scheduler.config, timestep_spacing=\"{s.timestep_spacing}\""
                 + (f", prediction_type=\"{s.prediction_type}\"" if s.prediction_type != "epsilon" else "")
                 + f"); pipe(prompt, num_inference_steps={s.steps}, guidance_scale={s.guidance_scale:g})")
    comfy = (f"  ComfyUI:   KSampler sampler={s.comfy_sampler} scheduler={s.comfy_scheduler} steps={s.steps} cfg={_number(s.comfy_cfg)}"
             + (f" (ModelSamplingDiscrete: {s.comfy_model_sampling})" if s.comfy_model_sampling != "eps" else ""))
    return [f"Use it with: {s.describe()}", diffusers, comfy]


def _number(x: float) -> str:
    return f"{x:.1f}" if float(x).is_integer() else f"{x:g}"
