"""``loratool verify``: sample a model with its settings, and check a fused file against base + runtime LoRAs."""

from __future__ import annotations

from pathlib import Path

import click

from lora_tools.cli._types import LORA_STRENGTH, SEEDS, SIZE
from lora_tools.errors import Hint, UsageError


@click.command("verify")
@click.argument("model", type=click.Path(readable=False, path_type=Path))
@click.option("--preset", default="auto", show_default=True,
              help="auto: the settings fuse recorded in MODEL (else its file name); or a preset name (loratool presets).")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="A prompt to render (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A text file with one prompt per line.")
@click.option("--seeds", type=SEEDS, default="0", show_default=True, help="Seeds, comma separated.")
@click.option("--size", type=SIZE, default="1024x1024", show_default=True, help="Image size WxH.")
@click.option("--steps", type=int, help="Another step count (refused when it contradicts the model, unless --force).")
@click.option("--force", is_flag=True, help="Sample with a step count or preset that contradicts the model.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Folder for grid.png, each image, report.json and report.md.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier report in --out.")
@click.option("--against", type=click.Path(path_type=Path), help="The base MODEL was fused from (faithfulness check).")
@click.option("--lora", "loras", multiple=True, metavar="SRC[:S]", type=LORA_STRENGTH,
              help="A LoRA fused into MODEL, applied to --against at run time.")
@click.option("--base", type=click.Path(path_type=Path), help="The rest of the pipeline for a standalone UNet MODEL.")
@click.option("--config", type=click.Path(file_okay=False, path_type=Path),
              help="A diffusers SDXL folder with the tokenizers (else the hub cache of the SDXL base).")
@click.option("--device", type=click.Choice(["auto", "cuda", "mps", "cpu"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default="auto", show_default=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the UNet (compile time reported apart).")
@click.option("--show-wrong", is_flag=True, help="Add a column rendered with wrong settings (leading, CFG 7, 30 steps).")
@click.option("--workflow", is_flag=True, help="Also write a ComfyUI API-format workflow.json into --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_command(model: Path, preset: str, prompts: tuple[str, ...], prompts_file: Path | None,
                   seeds: tuple[int, ...], size: tuple[int, int],
                   steps: int | None, force: bool, out: Path | None, overwrite: bool, against: Path | None,
                   loras: tuple[tuple[str, float], ...], base: Path | None, config: Path | None, device: str, dtype: str,
                   compile_: bool, show_wrong: bool, workflow: bool, as_json: bool) -> None:
    """Render MODEL with the sampler settings it needs, and with --against check it matches base + runtime LoRAs.

    MODEL is a fused single-file checkpoint, a standalone UNet (with --base) or a diffusers folder.

    \b
    Example:
        loratool verify juggernaut-lightning-4step.safetensors --out check/
        loratool verify fused.safetensors --against base.safetensors --lora sdxl_lightning_4step_lora.safetensors
    """
    import json

    from lora_tools.cli._output import safe_text
    from lora_tools.verify import DEFAULT_PROMPTS, plan_verify, run_verify

    texts = list(prompts)
    if prompts_file is not None:
        from lora_tools.special_files import refuse_special

        refuse_special(prompts_file, "prompt file")
        try:
            texts += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{prompts_file}: cannot read prompts ({e}).") from None
    if workflow and out is None:
        raise UsageError("--workflow writes into the output folder.", hint=Hint("out", "", "DIR"))
    plan = plan_verify(model, preset=preset, prompts=texts or DEFAULT_PROMPTS, seeds=seeds, size=size,
                       steps=steps, force=force, base=base, config=config, against=against,
                       loras=list(loras), device=device, dtype=dtype, compile=compile_,
                       show_wrong=show_wrong, workflow=workflow, out=out, overwrite=overwrite)
    report = run_verify(plan)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        s = report.settings
        click.echo(f"Model:    {safe_text(str(model))} ({plan.kind}, preset {plan.preset or 'from record'})")
        click.echo(f"Sampler:  {plan.sampler.describe()}")
        click.echo(f"Ran:      {s['scheduler']}, timesteps {s['timesteps']}, on {report.device} in {report.dtype}")
        for i in report.images:
            line = f"  seed {i.seed} {safe_text(i.prompt)!r}: {i.seconds:.2f} s"
            if i.psnr_db is not None:
                line += f", PSNR {i.psnr_db:.1f} dB, max abs {i.max_abs:.2e}"
            click.echo(line)
        for f in report.failures:
            click.echo(f"Failed:   {f}")
        if report.verdict is not None:
            click.echo(f"Verdict:  {report.verdict.upper()} (PSNR threshold {report.threshold['psnr_db']:g} dB "
                       f"for {report.dtype})")
        if out is not None:
            click.echo(f"Wrote:    {safe_text(str(out))}/ (grid.png, images/, report.json, report.md)")
    if not report.ok:
        raise SystemExit(1)
