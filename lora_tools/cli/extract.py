"""``loratool extract``: a LoRA from the difference of two models."""

from __future__ import annotations

import click

from lora_tools.cli._options import emit, output_options
from lora_tools.cli._output import safe_text
from lora_tools.cli._types import FRACTION, RANK
from lora_tools.units import format_bytes
from lora_tools.ops.convert import TARGET_FORMATS


@click.command("extract")
@click.argument("tuned", type=click.Path(readable=False, path_type=str))
@click.argument("original", type=click.Path(readable=False, path_type=str))
@click.option("--rank", type=RANK, help="Fixed rank of every module.")
@click.option("--energy", type=FRACTION,
              help="Keep the smallest rank retaining this fraction of each module's difference, (0, 1].")
@click.option("--conv-rank", type=RANK, help="Fixed rank for kxk convolutions (default: the main rule).")
@click.option("--components", default="unet", show_default=True, help="Comma-separated: unet,te1,te2.")
@click.option("--format", "fmt", type=click.Choice(TARGET_FORMATS), default="kohya-diffusers", show_default=True,
              help="Format of the written LoRA.")
@output_options
def extract_command(tuned: str, original: str, rank: int | None, energy: float | None, conv_rank: int | None,
                    components: str, fmt: str, output: str, overwrite: bool, dtype: str, as_json: bool) -> None:
    """Extract a LoRA approximating TUNED - ORIGINAL, streaming both models module by module.

    \b
    Example:
        loratool extract sdxl_lightning_1step_unet_x0.safetensors sdxl_base_unet.safetensors --rank 64 -o l1.safetensors
    """
    from lora_tools.lora.lowrank import RankRule
    from lora_tools.ops.extract import extract_lora
    from lora_tools.ops.lora_write import plan_output, tensor_bytes, write_lora
    from lora_tools.recipes.lora_jobs import command_record

    rule = RankRule(rank=rank, energy=energy)
    conv_rule = RankRule(rank=conv_rank) if conv_rank is not None else None
    comps = [c.strip() for c in components.split(",") if c.strip()]
    out = plan_output(output, [tuned, original], format=fmt, dtype=dtype, overwrite=overwrite)
    result = extract_lora(tuned, original, rule, components=comps, conv_rule=conv_rule)
    result.report.size_bytes = tensor_bytes(result.adapter, out.dtype)
    path = write_lora(result.adapter, out, record=command_record("extract", result.adapter, {
        "tuned": tuned, "original": original, "rank": rank, "energy": energy, "conv_rank": conv_rank,
        "components": components, "format": fmt, "output": output, "dtype": dtype}))
    rep = result.report
    emit({"output": str(path), "identical_modules": result.identical, **rep.to_dict()}, as_json,
         [f"Wrote {safe_text(path)} ({format_bytes(rep.size_bytes or 0)}): {len(rep.modules)} modules, "
          f"retained energy {rep.retained_energy:.2%}, largest relative error {rep.max_relative_error:.3g}; "
          f"{result.identical} modules identical in both models."])
