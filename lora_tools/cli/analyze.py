"""``loratool analyze``: which LoRAs a checkpoint has baked in, and at what strength."""

from __future__ import annotations

import click

from lora_tools.cli._options import emit
from lora_tools.cli._output import safe_text


@click.command("analyze")
@click.argument("model", type=click.Path(readable=False, path_type=str))
@click.option("--base", required=True, type=click.Path(readable=False, path_type=str), help="The model MODEL was made from.")
@click.option("--lora", "loras", multiple=True, type=click.Path(readable=False, path_type=str),
              help="A candidate LoRA (repeatable; default: the acceleration presets' LoRAs available locally).")
@click.option("--preset-dir", type=click.Path(file_okay=False, readable=False, path_type=str),
              help="A folder holding downloaded preset LoRA files (looked in before the Hugging Face cache).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def analyze_command(model: str, base: str, loras: tuple[str, ...], preset_dir: str | None, as_json: bool) -> None:
    """Find the strength at which each LORA is baked into MODEL (least squares on MODEL - BASE).

    Without --lora, the candidates are the acceleration presets whose LoRA files are in
    --preset-dir or the Hugging Face cache (nothing is downloaded).

    \b
    Example:
        loratool analyze juggernaut-lightning.safetensors --base sdxl_base.safetensors --lora sdxl_lightning_4step_lora.safetensors
        loratool analyze juggernaut-lightning.safetensors --base sdxl_base.safetensors
    """
    from contextlib import ExitStack
    from pathlib import Path

    from lora_tools.lora.load import load_lora
    from lora_tools.ops.analyze import analyze_model, analyze_presets

    if loras:
        with ExitStack() as stack:
            cands = [(Path(p).name, stack.enter_context(load_lora(p))) for p in loras]
            report = analyze_model(model, base, cands)
    else:
        report = analyze_presets(model, base, preset_dir=preset_dir)
    lines = []
    if not loras:
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
