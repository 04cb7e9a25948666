"""``loratool demo``: the main job end to end on synthetic models, offline."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from lora_tools.cli._options import json_flag, quiet_flag, say, written
from lora_tools.errors import UsageError

if TYPE_CHECKING:
    from lora_tools.verify.report import VerifyReport


@click.command("demo")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"),
              show_default=True, help="Where to build the synthetic models and write the results.")
@click.option("--no-render", is_flag=True, help="Skip the verify steps (the 4-step renders with diffusers).")
@json_flag
@quiet_flag
def demo_command(folder: Path, no_render: bool, as_json: bool) -> None:
    """Build a tiny synthetic SDXL checkpoint and a Lightning-shaped LoRA, then inspect, fuse (fp16 and fp8), check
    and verify them.

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
    say(f"1. Building synthetic models in {folder}/ (tiny SDXL topology, random weights)")
    base = synthetic.write_checkpoint(folder / "community-checkpoint.safetensors", "tiny", dtype="fp16", seed=1,
                                      metadata={"modelspec.title": "Synthetic community checkpoint"})
    lora = write_lightning_lora(lightning_dir / "sdxl_lightning_4step_lora.safetensors", "tiny")
    style = write_lora(folder / "style-lora.safetensors", "tiny", fmt="kohya", components=("unet", "te1", "te2"),
                       rank=8, alpha=4.0, dtype="fp16", seed=7)
    say(f"   base {base.name}, Lightning LoRA {lora.name}, style LoRA {style.name}")

    say("2. Inspecting the Lightning LoRA")
    from lora_tools.ops.inspect import inspect_path

    info = inspect_path(lora).to_dict()["lora"]
    ranks = ", ".join(f"{r} x{n}" for r, n in info["ranks"].items())
    alphas = ", ".join(f"{a} x{n}" for a, n in info["alphas"].items())
    say(f"   {info['format']} format, {info['modules']} UNet modules, rank {ranks}, alpha {alphas}: "
        f"{info['acceleration']['label']} (identified by {info['acceleration']['identified_by']})")

    say("3. Fusing: " + command("fuse", *_fuse_args(base, lightning_dir, style), "--save", "checkpoint", "--save",
                                "unet", "--save", "diffusers", "--overwrite"))
    result = fuse(base, "lightning-4step", preset_dir=lightning_dir, loras=[(str(style), STYLE_STRENGTH)],
                  saves=("checkpoint", "unet", "diffusers"))
    shown = [f for f in result.files if f.kind != "diffusers" or f.path.parent.name == "unet"]
    say(*(f"   wrote {f.path} ({f.nbytes / 2**20:.1f} MiB)" for f in shown))
    say(f"   {result.modules_fused} modules fused into {result.tensors_patched} tensors in {result.seconds:.2f} s")
    written(f.path for f in shown)

    say("4. Checking the fused file against diffusers (load_lora_weights + fuse_lora on the base)")
    ckpt = next(f.path for f in result.files if f.kind == "checkpoint")
    check = compare_with_runtime_lora(base, ckpt, [(lora, 1.0), (style, STYLE_STRENGTH)])
    say(f"   {check.tensors_compared} tensors compared, {check.tensors_changed} changed by the LoRAs, "
        f"max relative difference {check.max_rel_diff:.2e} ({'OK' if check.ok else 'MISMATCH'})")
    if not check.ok:
        raise click.ClickException("the fused file does not match diffusers' own fusion")

    done: dict[str, Any] = {"folder": str(folder), "files": [str(f.path) for f in shown],
                            "diffusers_check": {"tensors_compared": check.tensors_compared,
                                                "max_relative_difference": check.max_rel_diff, "ok": check.ok}}
    if not no_render:
        done["verify"] = _verify_step(folder, ckpt, base, [(lora, 1.0), (style, STYLE_STRENGTH)]).to_dict()
    fp8, done["fp8"] = _fp8_step(5 if no_render else 6, base, lightning_dir, style, ckpt)
    if not no_render:
        done["verify_fp8"] = _verify_fp8_step(folder, fp8, ckpt).to_dict()
    say("Done. Open the files above, or run: " + command("inspect", ckpt))
    if as_json:
        click.echo(json.dumps(done, indent=2))


def _fuse_args(base: Path, lightning_dir: Path, style: Path) -> list[object]:
    """The demo's fuse, as printed: Lightning 4-step from its folder, and the style LoRA at 0.6."""
    return [base, "--lightning", "4", "--preset-dir", lightning_dir, "--lora", f"{style}:{STYLE_STRENGTH:g}"]


def _fp8_step(step: int, base: Path, lightning_dir: Path, style: Path, fp16: Path) -> tuple[Path, dict[str, Any]]:
    """Step 5 (6 after verify): the same fuse in scaled fp8 (``--dtype fp8``): its size against fp16 and the weight
    error of the rounding."""
    from lora_tools.cli.fuse import fp8_lines
    from lora_tools.ops.fuse import run_fuse
    from lora_tools.ops.fuse_plan import plan_fuse

    out = fp16.with_name(fp16.stem + "-fp8" + fp16.suffix)
    say(f"{step}. Fusing in fp8 (UNet weights in 8 bits, for small GPUs): "
        + command("fuse", *_fuse_args(base, lightning_dir, style), "--dtype", "fp8", "-o", out, "--overwrite"))
    plan = plan_fuse(base, "lightning-4step", preset_dir=lightning_dir, loras=[(str(style), STYLE_STRENGTH)],
                     dtype="fp8", output=out)
    try:
        result = run_fuse(plan)
    finally:
        plan.close()
    say(*(f"   {line}" for line in fp8_lines(plan, result) if line))
    written([out])
    e = result.fp8_error
    assert e is not None
    return out, {"file": str(out), "bytes": out.stat().st_size, "fp16_bytes": fp16.stat().st_size,
                 "relative_error": e.relative, "worst": list(e.worst) if e.worst else None}


def _verify_step(folder: Path, fused: Path, base: Path, loras: list[tuple[Path, float]]) -> VerifyReport:
    """Step 5: ``loratool verify`` on the fused file against the base + the LoRAs at run time (fp32, tiny images)."""
    from lora_tools.verify import plan_verify, run_verify

    out = folder / "verify"
    flags = [arg for p, s in loras for arg in ("--lora", f"{p}:{s:g}")]
    say("5. Verifying: " + command("verify", fused, "--against", base, *flags, *_VERIFY_FLAGS, "--out", out,
                                   "--overwrite"))
    plan = plan_verify(fused, prompts=(DEMO_PROMPT,), seeds=(0,), size=(DEMO_SIZE, DEMO_SIZE),
                       against=base, loras=loras, device="cpu", dtype="fp32", out=out)
    report = run_verify(plan)
    s = report.settings
    say(f"   {s['scheduler']}, timesteps {s['timesteps']}, CFG {s['guidance_scale']:g}: "
        f"latents PSNR {_worst(report):.1f} dB against the runtime LoRAs")
    _verdict(report, out, "the fused file does not render like the base with its LoRAs at run time")
    return report


def _verify_fp8_step(folder: Path, fp8: Path, fp16: Path) -> VerifyReport:
    """Step 7: ``loratool verify`` on the fp8 file against the fp16 one (same prompt, seed and settings)."""
    from lora_tools.verify import plan_verify, run_verify

    out = folder / "verify-fp8"
    say("7. Verifying fp8 against fp16: " + command("verify", fp8, "--against", fp16, *_VERIFY_FLAGS, "--out", out,
                                                    "--overwrite"))
    plan = plan_verify(fp8, prompts=(DEMO_PROMPT,), seeds=(0,), size=(DEMO_SIZE, DEMO_SIZE),
                       against=fp16, device="cpu", dtype="fp32", out=out)
    report = run_verify(plan)
    say(f"   latents PSNR {_worst(report):.1f} dB against the fp16 file")
    _verdict(report, out, "the fp8 file does not render like the fp16 one")
    return report


def _worst(report: VerifyReport) -> float:
    return min((i.psnr_db for i in report.images if i.psnr_db is not None), default=float("nan"))


def _verdict(report: VerifyReport, out: Path, failure: str) -> None:
    """The verdict line, the failures and the files of a verify step; a failed verdict ends the demo."""
    assert report.threshold is not None and report.verdict is not None
    weights = f", {report.threshold['weights']} weights" if report.threshold.get("weights") else ""
    say(f"   Verdict: {report.verdict.upper()} (threshold {report.threshold['psnr_db']:g} dB for {report.dtype}{weights})")
    for f in report.failures:
        say(f"   failed: {f}")
    say(f"   report {out / 'report.md'} and {out / 'report.json'}, grid {out / 'grid.png'}, "
        f"comparison {out / 'comparison.png'}")
    written([out])
    if not report.ok:
        raise click.ClickException(failure)


def command(verb: str, *args: object) -> str:
    """The ``loratool`` command line the demo runs, as the user can paste it from where they ran the demo
    (paths as they were given, so relative to the current folder; quoted for a POSIX shell)."""
    return shlex.join(["loratool", verb, *(str(a) for a in args)])


#: The prompt of the demo's verify step.
DEMO_PROMPT = "a lighthouse at dusk"

#: Image size of the demo's verify step (tiny model, tiny images: the demo is a test too).
DEMO_SIZE = 32

#: The style LoRA's strength in the demo's fuse.
STYLE_STRENGTH = 0.6

#: The verify flags both verify steps print (and run with).
_VERIFY_FLAGS = ("--prompt", DEMO_PROMPT, "--size", f"{DEMO_SIZE}x{DEMO_SIZE}", "--device", "cpu", "--dtype", "fp32")

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
