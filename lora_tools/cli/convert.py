"""``loratool convert``: a LoRA in another format, losslessly."""

from __future__ import annotations

from lora_tools.cli._generate import json_option, operation_command, overwrite_option
from lora_tools.cli._options import emit
from lora_tools.cli._output import safe_text
from lora_tools.ops.registry import OPS


@operation_command(OPS["convert"], extra=[overwrite_option(), json_option()])
def convert_command(options, overwrite: bool, as_json: bool) -> None:
    """Write LORA in another format (same factors, keys spelled for the tool the format is for).

    \b
    Example:
        loratool convert sdxl_lightning_4step_lora.safetensors --to comfy -o lightning-comfy.safetensors
    """
    result = OPS["convert"](options, overwrite=overwrite)
    path, report = result.files[0], result.report
    emit({"output": str(path), **report}, as_json,
         [f"Wrote {safe_text(path)}: {report['modules']} modules, {safe_text(report['from'])} -> {report['to']}."], [path])
