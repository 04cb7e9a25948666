"""``loratool verify``: sample a model with its settings, and check a fused file against base + runtime LoRAs."""

from __future__ import annotations

from pathlib import Path

import click

from lora_tools.cli._generate import json_option, operation_command, overwrite_option
from lora_tools.cli._options import is_quiet, written
from lora_tools.errors import Hint, UsageError
from lora_tools.ops.registry import OPS


@operation_command(OPS["verify"], extra=[
    click.Option(["--prompts", "prompts_file"], type=click.Path(dir_okay=False, path_type=Path),
                 help="A text file with one prompt per line."),
    overwrite_option("Replace an earlier report in --out."),
    click.Option(["--compile", "compile_"], is_flag=True, help="torch.compile the UNet (compile time reported apart)."),
    json_option("Print the report as JSON."),
])
def verify_command(options, prompts_file: Path | None, overwrite: bool, compile_: bool,
                   as_json: bool) -> None:
    """Render MODEL with the sampler settings it needs, and with --against check it matches base + runtime LoRAs.

    MODEL is a fused single-file checkpoint, a standalone UNet (with --base) or a diffusers folder.

    \b
    Example:
        loratool verify juggernaut-lightning-4step.safetensors --out check/
        loratool verify fused.safetensors --against base.safetensors --lora sdxl_lightning_4step_lora.safetensors
        loratool verify fused-fp8.safetensors --against fused.safetensors   # an fp8 file against its fp16 one
    """
    import json

    from click.core import ParameterSource

    from lora_tools.cli._output import safe_text

    given = click.get_current_context().get_parameter_source("prompts") != ParameterSource.DEFAULT
    texts = list(options.prompts) if given else []
    if prompts_file is not None:
        from lora_tools.special_files import refuse_special

        refuse_special(prompts_file, "prompt file")
        try:
            texts += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{prompts_file}: cannot read prompts ({e}).") from None
    if texts:
        options = options.model_copy(update={"prompts": texts})
    if options.workflow and options.out is None:
        raise UsageError("--workflow writes into the output folder.", hint=Hint("out", "", "DIR"))
    op = OPS["verify"]
    planned = op.plan(options, overwrite=overwrite, compile=compile_)
    from lora_tools.cli._progress import on_terminal

    show = not as_json and on_terminal()
    if show:
        _announce(planned.plan)
    report = op.run(planned, steps=_step_line if show else None).report
    plan, model, out = planned.plan, options.model, options.out
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif is_quiet():  # what was written, and what failed (as errors)
        written([out] if out is not None else [])
        for f in report.failures:
            click.echo(f"Error: {f}", err=True)
        if report.verdict == "fail" and not report.failures:
            worst = min(i.psnr_db for i in report.images if i.psnr_db is not None)
            click.echo(f"Error: verdict FAIL: PSNR {worst:.1f} dB, threshold {report.threshold['psnr_db']:g} dB "
                       f"for {report.dtype}.", err=True)
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
            weights = f", {report.threshold['weights']} weights" if report.threshold.get("weights") else ""
            click.echo(f"Verdict:  {report.verdict.upper()} (PSNR threshold {report.threshold['psnr_db']:g} dB "
                       f"for {report.dtype}{weights})")
        if out is not None:
            names = sorted({Path(f).name if Path(f).parent == Path(out) else Path(f).parent.name + "/"
                            for f in report.files}, key=_file_order)
            click.echo(f"Wrote:    {safe_text(str(out))}/ ({', '.join(names)})")
    if not report.ok:
        raise SystemExit(1)


def _file_order(name: str) -> tuple[int, str]:
    """The pictures first, then the images, then the reports."""
    return (0 if name.endswith(".png") else 1 if name.endswith("/") else 2, name)


def _announce(plan) -> None:
    """One line on stderr (a terminal) before anything loads: what will be rendered, and about how long it takes
    on a CPU."""
    w, h = plan.size
    line = f"Plan:     {plan.renders} renders of {plan.sampler.steps} steps at {w}x{h} on {plan.device}"
    seconds = plan.predicted_cpu_seconds()
    if seconds is not None and plan.device == "cpu":
        line += f", about {_duration(seconds)} on this CPU (model loading apart)"
    if plan.memory is not None and plan.device == "cpu":
        from lora_tools.units import format_bytes

        line += f", peak memory about {format_bytes(plan.memory.peak)} ({plan.memory.stage})"
    click.echo(line, err=True)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    return f"{seconds / 60:.0f} min"


def _step_line(what: str, step: int, steps: int) -> None:
    """Per-step progress on stderr (a terminal), rewritten in place; the render's last step ends the line."""
    click.echo(f"\r  {what}: step {step}/{steps}", err=True, nl=step == steps)
