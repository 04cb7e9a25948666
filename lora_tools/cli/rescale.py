"""``loratool rescale``: bake a strength into a LoRA."""

from __future__ import annotations

import click

from lora_tools.cli._options import emit, output_options
from lora_tools.cli._output import safe_text
from lora_tools.cli._types import STRENGTH


@click.command("rescale")
@click.argument("lora", type=click.Path(readable=False, path_type=str))
@click.option("--strength", type=STRENGTH, required=True,
              help="The strength to bake in (the new file at 1.0 = the old at S).")
@click.option("--blocks", metavar="SPEC", help="Per-block strengths multiplied in, e.g. 'IN04-IN08:0.5,OUT*:0'.")
@click.option("--components", help="Comma-separated components the strength applies to (unet,te1,te2); default all.")
@output_options
def rescale_command(lora: str, strength: float, blocks: str | None, components: str | None, output: str, overwrite: bool,
                    dtype: str, as_json: bool) -> None:
    """Write LORA with STRENGTH baked in: the new file at strength 1.0 equals LORA at STRENGTH.

    \b
    Example:
        loratool rescale style.safetensors --strength 0.6 -o style-0.6.safetensors
        loratool rescale style.safetensors --strength 1 --blocks 'IN04-IN08:0.5,OUT*:0' -o style-in.safetensors
    """
    from lora_tools.layouts.blocks import parse_block_weights
    from lora_tools.lora.load import load_lora
    from lora_tools.ops.lora_write import plan_output, write_lora
    from lora_tools.ops.rescale import rescale_lora
    from lora_tools.recipes.lora_jobs import command_record

    bw = parse_block_weights(blocks) if blocks is not None else None
    out = plan_output(output, [lora], dtype=dtype, overwrite=overwrite)
    comps = [c.strip() for c in components.split(",") if c.strip()] if components else None
    with load_lora(lora) as adapter:
        result, report = rescale_lora(adapter, strength, blocks=bw, components=comps)
        path = write_lora(result, out, record=command_record("rescale", result, {
            "lora": lora, "strength": strength, "blocks": blocks, "components": components, "output": output,
            "dtype": dtype}))
    emit({"output": str(path), **report.to_dict()}, as_json,
         [f"Wrote {safe_text(path)}: {report.scaled} modules scaled by {strength:g}, "
          f"{report.unchanged} unchanged, {report.dropped} dropped."])
