"""``loratool analyze``: which LoRAs a checkpoint has baked in, and at what strength."""

from __future__ import annotations

from lora_tools.cli._generate import json_option, operation_command
from lora_tools.cli._options import emit
from lora_tools.cli._output import safe_text
from lora_tools.ops.registry import OPS


@operation_command(OPS["analyze"], extra=[json_option()])
def analyze_command(options, as_json: bool) -> None:
    """Find the strength at which each LORA is baked into MODEL (least squares on MODEL - BASE).

    Without --lora, the candidates are the acceleration presets whose LoRA files are in
    --preset-dir or the Hugging Face cache (nothing is downloaded).

    \b
    Example:
        loratool analyze juggernaut-lightning.safetensors --base sdxl_base.safetensors --lora sdxl_lightning_4step_lora.safetensors
        loratool analyze juggernaut-lightning.safetensors --base sdxl_base.safetensors
    """
    report = OPS["analyze"](options).report
    lines = []
    if not options.loras:
        lines.append(f"Tried the presets available locally: {', '.join(report.presets_tried)}; "
                     f"not available: {', '.join(report.presets_unavailable) or 'none'}.")
    lines += [f"{safe_text(f.label)}: strength {f.strength:.3f}, explains {f.explained:.1%} of the difference "
              f"on its {f.modules} modules" for f in report.fits]
    lines.append(f"Together: {report.explained:.1%} of the difference on the adapted modules.")
    if report.interference:
        worst = sorted(report.interference, key=lambda i: -abs(i.cosine))[:5]
        lines.append("Most interfering modules (cosine, column-space overlap):")
        lines += [f"  {safe_text(i.module)}: {i.cosine:+.3f}, {i.overlap:.3f}" for i in worst]
    emit(report.to_dict(), as_json, lines)
