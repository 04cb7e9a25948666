"""``loratool extract``: a LoRA from the difference of two models."""

from __future__ import annotations

from lora_tools.cli._generate import json_option, operation_command, overwrite_option
from lora_tools.cli._options import emit
from lora_tools.cli._output import safe_text
from lora_tools.ops.registry import OPS
from lora_tools.units import format_bytes


@operation_command(OPS["extract"], extra=[overwrite_option(), json_option()])
def extract_command(options, overwrite: bool, as_json: bool) -> None:
    """Extract a LoRA approximating TUNED - ORIGINAL, streaming both models module by module.

    \b
    Example:
        loratool extract sdxl_lightning_1step_unet_x0.safetensors sdxl_base_unet.safetensors --rank 64 -o l1.safetensors
    """
    result = OPS["extract"](options, overwrite=overwrite)
    path, rep, identical = result.files[0], result.report, result.extra["identical"]
    left_out = result.extra["left_out"]
    lines = [f"TUNED {safe_text(options.tuned)} minus ORIGINAL {safe_text(options.original)}:",
             f"Wrote {safe_text(path)} ({format_bytes(rep.size_bytes or 0)}): {len(rep.modules)} modules, "
             f"retained energy {rep.retained_energy:.2%}, largest relative error {rep.max_relative_error:.3g}; "
             f"{identical} modules identical in both models."]
    if left_out:
        parts = ", ".join(f"{g} {v['energy']:.3g} ({v['share']:.2%})" for g, v in left_out.items())
        lines.append(f"Left out (kohya's and A1111/Forge's loaders drop them; --include adds them), energy of the "
                     f"difference (squared Frobenius norm, share of the whole): {parts}.")
    emit({"output": str(path), "identical_modules": identical, **rep.to_dict(), "left_out": left_out}, as_json, lines,
         [path])
