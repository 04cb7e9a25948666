"""``loratool convert``: a LoRA in another format, losslessly."""

from __future__ import annotations

import click

from lora_tools.cli._options import emit, output_options
from lora_tools.cli._output import safe_text
from lora_tools.ops.convert import TARGET_FORMATS


@click.command("convert")
@click.argument("lora", type=click.Path(readable=False, path_type=str))
@click.option("--to", "to", type=click.Choice(TARGET_FORMATS), required=True, help="The format to write.")
@output_options
def convert_command(lora: str, to: str, output: str, overwrite: bool, dtype: str, as_json: bool) -> None:
    """Write LORA in another format (same factors, keys spelled for the tool the format is for).

    \b
    Example:
        loratool convert sdxl_lightning_4step_lora.safetensors --to comfy -o lightning-comfy.safetensors
    """
    from lora_tools.lora.load import load_lora
    from lora_tools.ops.convert import convert_lora
    from lora_tools.ops.lora_write import plan_output, write_lora
    from lora_tools.recipes.lora_jobs import command_record

    out = plan_output(output, [lora], format=to, dtype=dtype, overwrite=overwrite)
    with load_lora(lora) as adapter:
        source_format = adapter.format
        result, _ = convert_lora(adapter, to)
        path = write_lora(result, out, record=command_record("convert", result, {
            "lora": lora, "to": to, "output": output, "dtype": dtype}))
        count = len(result.modules)
    emit({"output": str(path), "from": source_format, "to": to, "modules": count}, as_json,
         [f"Wrote {safe_text(path)}: {count} modules, {safe_text(source_format)} -> {to}."])
