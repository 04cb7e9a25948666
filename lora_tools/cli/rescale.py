"""``loratool rescale``: bake a strength into a LoRA."""

from __future__ import annotations

from lora_tools.cli._generate import json_option, operation_command, overwrite_option
from lora_tools.cli._options import emit
from lora_tools.cli._output import safe_text
from lora_tools.ops.registry import OPS


@operation_command(OPS["rescale"], extra=[overwrite_option(), json_option()])
def rescale_command(options, overwrite: bool, as_json: bool) -> None:
    """Write LORA with STRENGTH baked in: the new file at strength 1.0 equals LORA at STRENGTH.

    \b
    Example:
        loratool rescale style.safetensors --strength 0.6 -o style-0.6.safetensors
        loratool rescale style.safetensors --strength 1 --blocks 'IN04-IN08:0.5,OUT*:0' -o style-in.safetensors
    """
    result = OPS["rescale"](options, overwrite=overwrite)
    path, report = result.files[0], result.report
    emit({"output": str(path), **report.to_dict()}, as_json,
         [f"Wrote {safe_text(path)}: {report.scaled} modules scaled by {options.strength:g}, "
          f"{report.unchanged} unchanged, {report.dropped} dropped."], [path])
