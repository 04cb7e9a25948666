"""``loratool resize``: reduce a LoRA's rank by optimal truncated SVD, reporting what it lost."""

from __future__ import annotations

from lora_tools.cli._generate import json_option, operation_command, overwrite_option
from lora_tools.cli._options import emit
from lora_tools.cli._output import safe_text
from lora_tools.ops.registry import OPS
from lora_tools.units import format_bytes


@operation_command(OPS["resize"], extra=[overwrite_option(), json_option()])
def resize_command(options, overwrite: bool, as_json: bool) -> None:
    """Reduce LORA's rank (fixed or dynamic) through its factors and report the retained energy.

    --sv-ratio, --sv-fro and --sv-cumulative are kohya sd-scripts' dynamic rules (resize_lora.py
    --dynamic_method), counted exactly as kohya does, one rank more than the count; --max-rank is
    kohya's --new_rank. --energy is our own rule (the count alone, on squared singular values).

    \b
    Example:
        loratool resize lightning.safetensors --rank 16 -o lightning-r16.safetensors
        loratool resize style.safetensors --energy 0.99 -o style-small.safetensors
        loratool resize style.safetensors --sv-fro 0.9 --max-rank 32 -o style-kohya.safetensors
    """
    result = OPS["resize"](options, overwrite=overwrite)
    path, report = result.files[0], result.report
    worst = max(report.modules, key=lambda m: m.relative_error, default=None)
    lines = [f"Wrote {safe_text(path)} ({format_bytes(report.size_bytes)}): {len(report.modules)} modules, "
             f"retained energy {report.retained_energy:.2%}, largest relative error {report.max_relative_error:.3g}"
             + (f" ({safe_text(worst.name)})" if worst else "") + "."]
    emit({"output": str(path), **report.to_dict()}, as_json, lines, [path])
