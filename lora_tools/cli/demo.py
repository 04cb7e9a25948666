"""``loratool demo``: the main job end to end on synthetic models, offline."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import click

from lora_tools.errors import UsageError


@click.command("demo")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"),
              show_default=True, help="Where to build the synthetic models and write the results.")
@click.option("--no-render", is_flag=True, help="Skip the verify step (the 4-step renders with diffusers).")
def demo_command(folder: Path, no_render: bool) -> None:
    """Build a tiny synthetic SDXL checkpoint and a Lightning-shaped LoRA, then inspect, fuse, check and verify them.

    Everything runs offline on random-weight models with SDXL's exact block layout and key names.

    \b
    Example:
        loratool demo
        loratool demo --dir /tmp/lightning-demo
    """
    from lora_tools.ops.fuse import fuse
    from lora_tools.testing import synthetic
    from lora_tools.testing.synthetic_lora import write_lightning_lora, write_lora
    from lora_tools.verify.weights import compare_with_runtime_lora

    _fresh_folder(folder)
    lightning_dir = folder / "SDXL-Lightning"
    click.echo(f"1. Building synthetic models in {folder}/ (tiny SDXL topology, random weights)")
    base = synthetic.write_checkpoint(folder / "community-checkpoint.safetensors", "tiny", dtype="fp16", seed=1,
                                      metadata={"modelspec.title": "Synthetic community checkpoint"})
    lora = write_lightning_lora(lightning_dir / "sdxl_lightning_4step_lora.safetensors", "tiny")
    style = write_lora(folder / "style-lora.safetensors", "tiny", fmt="kohya", components=("unet", "te1", "te2"),
                       rank=8, alpha=4.0, dtype="fp16", seed=7)
    click.echo(f"   base {base.name}, Lightning LoRA {lora.name}, style LoRA {style.name}")

    click.echo("2. Inspecting the Lightning LoRA")
    from lora_tools.ops.inspect import inspect_path

    info = inspect_path(lora).to_dict()["lora"]
    ranks = ", ".join(f"{r} x{n}" for r, n in info["ranks"].items())
    alphas = ", ".join(f"{a} x{n}" for a, n in info["alphas"].items())
    click.echo(f"   {info['format']} format, {info['modules']} UNet modules, rank {ranks}, alpha {alphas}: "
               f"{info['acceleration']['label']} (identified by {info['acceleration']['identified_by']})")

    click.echo("3. Fusing: " + command("fuse", base, "--lightning", "4", "--preset-dir", lightning_dir,
                                       "--lora", f"{style}:0.6", "--save", "checkpoint", "--save", "unet",
                                       "--save", "diffusers", "--overwrite"))
    result = fuse(base, "lightning-4step", preset_dir=lightning_dir, loras=[(str(style), 0.6)],
                  saves=("checkpoint", "unet", "diffusers"))
    for f in result.files:
        if f.kind != "diffusers" or f.path.parent.name == "unet":
            click.echo(f"   wrote {f.path} ({f.nbytes / 2**20:.1f} MiB)")
    click.echo(f"   {result.modules_fused} modules fused into {result.tensors_patched} tensors in {result.seconds:.2f} s")

    click.echo("4. Checking the fused file against diffusers (load_lora_weights + fuse_lora on the base)")
    ckpt = next(f.path for f in result.files if f.kind == "checkpoint")
    check = compare_with_runtime_lora(base, ckpt, [(lora, 1.0), (style, 0.6)])
    click.echo(f"   {check.tensors_compared} tensors compared, {check.tensors_changed} changed by the LoRAs, "
               f"max relative difference {check.max_rel_diff:.2e} ({'OK' if check.ok else 'MISMATCH'})")
    if not check.ok:
        raise click.ClickException("the fused file does not match diffusers' own fusion")

    if not no_render:
        _verify_step(folder, ckpt, base, [(lora, 1.0), (style, 0.6)])
    click.echo("Done. Open the files above, or run: " + command("inspect", ckpt))


def _verify_step(folder: Path, fused: Path, base: Path, loras: list[tuple[Path, float]]) -> None:
    """Step 5: ``loratool verify`` on the fused file against the base + the LoRAs at run time (fp32, tiny images)."""
    from lora_tools.verify import plan_verify, run_verify

    out = folder / "verify"
    flags = [arg for p, s in loras for arg in ("--lora", f"{p}:{s:g}")]
    click.echo("5. Verifying: " + command("verify", fused, "--against", base, *flags, "--prompt", DEMO_PROMPT,
                                          "--size", f"{DEMO_SIZE}x{DEMO_SIZE}", "--device", "cpu", "--dtype", "fp32",
                                          "--out", out, "--overwrite"))
    plan = plan_verify(fused, prompts=(DEMO_PROMPT,), seeds=(0,), size=(DEMO_SIZE, DEMO_SIZE),
                       against=base, loras=loras, device="cpu", dtype="fp32", out=out)
    report = run_verify(plan)
    s = report.settings
    worst = min((i.psnr_db for i in report.images if i.psnr_db is not None), default=float("nan"))
    click.echo(f"   {s['scheduler']}, timesteps {s['timesteps']}, CFG {s['guidance_scale']:g}: "
               f"latents PSNR {worst:.1f} dB against the runtime LoRAs")
    assert report.threshold is not None and report.verdict is not None
    click.echo(f"   Verdict: {report.verdict.upper()} (threshold {report.threshold['psnr_db']:g} dB for fp32)")
    for failure in report.failures:
        click.echo(f"   failed: {failure}")
    click.echo(f"   report {out / 'report.md'} and {out / 'report.json'}, grid {out / 'grid.png'}")
    if not report.ok:
        raise click.ClickException("the fused file does not render like the base with its LoRAs at run time")


def command(verb: str, *args: object) -> str:
    """The ``loratool`` command line the demo runs, as the user can paste it from where they ran the demo
    (paths as they were given, so relative to the current folder; quoted for a POSIX shell)."""
    return shlex.join(["loratool", verb, *(str(a) for a in args)])


#: The prompt of the demo's verify step.
DEMO_PROMPT = "a lighthouse at dusk"

#: Image size of the demo's verify step (tiny model, tiny images: the demo is a test too).
DEMO_SIZE = 32

#: A file the demo leaves in its folder, so that a later run may clear that folder (and no other).
DEMO_MARKER = ".loratool-demo"


def _fresh_folder(folder: Path) -> None:
    """Empty ``folder`` for a new run; refuse a folder the demo did not make (no marker file),
    and a symbolic link (clearing it would delete what it points to)."""
    if folder.is_symlink():
        raise UsageError(f"'{folder}' is a symbolic link: pass a real folder as --dir.")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"'{folder}' is a file: pass a folder as --dir.")
    if folder.exists() and any(folder.iterdir()):
        if not (folder / DEMO_MARKER).is_file():
            raise UsageError(f"'{folder}' exists and was not made by loratool demo: pass another --dir.")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).write_text("made by loratool demo; the next run empties this folder\n")
