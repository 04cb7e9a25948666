#!/usr/bin/env python
"""Fused model vs base + runtime LoRA vs the fused model compiled, through ``lora_tools.verify`` (not a test).

On a synthetic SDXL (full size by default: the real shapes, random weights) and a Lightning-shaped
4-step LoRA, in one process, with the pipelines ``loratool verify`` builds and the sampler settings
the fuse recorded (Euler, trailing, 4 steps, CFG 0):

1. the fuse (``lora_tools.ops.fuse.fuse``, timed);
2. ``base``: the unmodified base pipeline (what a fused model must not be slower than);
3. ``fused``: the fused checkpoint (``lora_tools.verify.pipeline.build_pipeline``);
4. ``runtime_lora``: the base with the LoRA applied at run time through diffusers
   (``lora_tools.verify.oracle.apply_runtime_loras``: ``load_lora_weights``, not fused);
5. ``fused_compiled``: the fused pipeline with ``torch.compile`` of its UNet (compile time apart).

Each pipeline renders once untimed (warm-up: allocator, cuDNN autotune, compile), then ``--runs``
timed images (``lora_tools.verify.render.render``: synchronised to the last kernel; every UNet step
timed, the fp32 VAE decode timed apart). The final latents of fused and runtime LoRA are compared
(PSNR, as ``verify --against`` does). Writes ``gpu_sampler.json`` and ``gpu_sampler.md`` under ``--out``.

Random weights make noise images; the point is the timings and the agreement.

Usage:
    python benchmarks/gpu_sampler.py --out /tmp/gpu                          # full size, GPU if there is one
    python benchmarks/gpu_sampler.py --size tiny --out /tmp/gpu              # smoke run on the CPU
    python benchmarks/gpu_sampler.py --out /tmp/gpu --channels-last --fuse-qkv --compile-mode max-autotune
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PROMPT = "a lighthouse at dusk, photograph"


def build_inputs(work: Path, size: str) -> tuple[Path, Path, Path]:
    """(base checkpoint, Lightning LoRA, tokenizer folder) of the synthetic model, built once and cached."""
    from lora_tools.io.diffusers_folder import write_byte_tokenizer
    from lora_tools.io.safetensors import read_header
    from lora_tools.layouts.sdxl import config_from_shapes
    from lora_tools.testing.synthetic import write_checkpoint
    from lora_tools.testing.synthetic_lora import write_lightning_lora

    base = work / f"sdxl-{size}-fp16.safetensors"
    lora = work / "lightning" / "sdxl_lightning_4step_lora.safetensors"
    if not base.exists():
        write_checkpoint(base, size, dtype="fp16", seed=0)  # type: ignore[arg-type]
    if not lora.exists():
        write_lightning_lora(lora, size)  # type: ignore[arg-type]
    config = work / f"tokenizers-{size}"  # synthetic weights: the byte tokenizer (ids < 514) fits any vocabulary
    cfg = config_from_shapes({k: t.shape for k, t in read_header(base).tensors.items()})
    for name, te in (("tokenizer", cfg.te1), ("tokenizer_2", cfg.te2)):
        if not (config / name / "vocab.json").exists():
            write_byte_tokenizer(config / name, te.vocab, te.positions)
    return base, lora, config


def timed_runs(pipe: Any, sampler: Any, size: int, runs: int, where: str) -> tuple[dict[str, Any], Any]:
    """One warm-up render (untimed), then ``runs`` timed ones: medians and the last latents."""
    from lora_tools.verify.render import render

    start = time.perf_counter()
    render(pipe, sampler, PROMPT, 0, (size, size), where)
    warmup = time.perf_counter() - start
    results = [render(pipe, sampler, PROMPT, 0, (size, size), where) for _ in range(runs)]
    later_steps = [s for r in results for s in r.step_seconds[1:]]  # the first step also encodes the prompt
    denoise = [r.seconds - r.decode_seconds for r in results]
    summary = {
        "warmup_s": round(warmup, 4),
        "end_to_end_s": round(statistics.median(r.seconds for r in results), 4),
        "denoise_s": round(statistics.median(denoise), 4),
        "step_s_median": round(statistics.median(later_steps), 5) if later_steps else None,
        "first_step_s": round(statistics.median(r.step_seconds[0] for r in results), 5),
        "step_s_all": [[round(s, 5) for s in r.step_seconds] for r in results],
        "vae_decode_s": round(statistics.median(r.decode_seconds for r in results), 4),
        "deterministic": all(bool((r.latents == results[0].latents).all()) for r in results),
    }
    return summary, results[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--work", type=Path, default=HERE / ".cache" / "gpu", help="inputs and fused files")
    ap.add_argument("--out", type=Path, required=True, help="gpu_sampler.json and gpu_sampler.md")
    ap.add_argument("--device", default="auto", help="auto (GPU if there is one), cuda or cpu")
    ap.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto",
                    help="auto: fp16 on CUDA, fp32 on the CPU")
    ap.add_argument("--resolution", type=int, default=None, help="image size (default 1024 full, 64 tiny)")
    ap.add_argument("--runs", type=int, default=5, help="timed images per pipeline after one warm-up")
    ap.add_argument("--channels-last", action="store_true", help="UNet in channels-last memory format")
    ap.add_argument("--fuse-qkv", action="store_true", help="diffusers' fuse_qkv_projections on every pipeline")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode of the compiled run (default, reduce-overhead, max-autotune, ...)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled run")
    args = ap.parse_args()

    import torch

    from lora_tools.ops.fuse import fuse
    from lora_tools.verify.oracle import apply_runtime_loras, psnr_db
    from lora_tools.verify.pipeline import build_pipeline
    from lora_tools.verify.render import prepare
    from lora_tools.verify.sampler import pick_device, quiet_diffusers

    device = pick_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("fp16" if device == "cuda" else "fp32")
    size = args.resolution or (1024 if args.size == "full" else 64)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"size": args.size, "device": device, "dtype": dtype, "resolution": size,
                              "runs": args.runs, "torch": torch.__version__, "python": platform.python_version(),
                              "cpus": os.cpu_count(), "channels_last": args.channels_last, "fuse_qkv": args.fuse_qkv,
                              "attention": "SDPA (diffusers' default AttnProcessor2_0)"}
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)

    t = time.perf_counter()
    base, lora, config = build_inputs(args.work, args.size)
    report["build_inputs_s"] = round(time.perf_counter() - t, 1)
    fused_path = args.work / "fused.safetensors"
    t = time.perf_counter()
    result = fuse(base, "lightning-4step", preset_dir=lora.parent, saves=("checkpoint",), output=fused_path,
                  overwrite=True)
    report["fuse_s"] = round(time.perf_counter() - t, 2)
    from lora_tools.presets import get_preset

    sampler = get_preset("lightning-4step").sampler
    report["sampler"] = sampler.describe()
    print(f"fused {result.modules_fused} modules in {report['fuse_s']} s; sampling with {sampler.describe()}", flush=True)

    def build(model: Path, loras: list[tuple[Path, float]] | None = None) -> Any:
        t0 = time.perf_counter()
        pipe = build_pipeline(model, config=config, dtype=dtype, device=device).pipe
        if loras:
            apply_runtime_loras(pipe, loras)
        prepare(pipe, sampler)
        with quiet_diffusers():
            if args.fuse_qkv:
                pipe.fuse_qkv_projections()
            if args.channels_last:
                pipe.unet.to(memory_format=torch.channels_last)
        return pipe, round(time.perf_counter() - t0, 2)

    runs: dict[str, dict[str, Any]] = {}
    latents: dict[str, Any] = {}
    plans: list[tuple[str, Path, list[tuple[Path, float]] | None, bool]] = [
        ("base", base, None, False), ("fused", fused_path, None, False), ("runtime_lora", base, [(lora, 1.0)], False)]
    if not args.no_compile:
        plans.append(("fused_compiled", fused_path, None, True))
    for name, model, loras, compiled in plans:
        pipe, load_s = build(model, loras)
        if compiled:
            pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        summary, last = timed_runs(pipe, sampler, size, args.runs, name)
        summary["load_s"] = load_s
        if compiled:
            summary["compile_mode"] = args.compile_mode
            summary["compile_s"] = summary["warmup_s"]  # the warm-up render is where compilation happens
        if device == "cuda":
            summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        runs[name] = summary
        latents[name] = last.latents
        step = summary["step_s_median"]
        print(f"{name}: {summary['end_to_end_s'] * 1000:.1f} ms per {size}x{size} image end to end, "
              f"{(step or 0) * 1000:.2f} ms per step, VAE decode {summary['vae_decode_s'] * 1000:.1f} ms "
              f"(warm-up {summary['warmup_s']:.1f} s, excluded)", flush=True)
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()
    report["runs_by_pipeline"] = runs
    report["fused_vs_runtime_lora_latents_psnr_db"] = psnr_db(latents["fused"], latents["runtime_lora"])
    report["fused_vs_runtime_lora_latents_max_abs"] = float((latents["fused"] - latents["runtime_lora"]).abs().max())
    if "fused_compiled" in latents:
        report["compiled_vs_fused_latents_psnr_db"] = psnr_db(latents["fused_compiled"], latents["fused"])
    base_step = runs["base"]["step_s_median"]
    if base_step:
        report["fused_step_over_base_step"] = round(runs["fused"]["step_s_median"] / base_step, 4)
    (args.out / "gpu_sampler.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "gpu_sampler.md").write_text(markdown(report))
    print(json.dumps({k: v for k, v in report.items() if k != "runs_by_pipeline"}, indent=2, default=str))


def markdown(report: dict[str, Any]) -> str:
    """The results table for benchmarks/GPU_RESULTS.md."""
    lines = [f"# gpu_sampler: {report.get('gpu', report['device'])}, {report['dtype']}, "
             f"{report['resolution']}x{report['resolution']}, 4 steps ({report['sampler']})", "",
             f"channels-last {report['channels_last']}, fused QKV {report['fuse_qkv']}, {report['attention']}; "
             f"torch {report['torch']}; medians of {report['runs']} runs after one warm-up", "",
             "| pipeline | ms per step | first step (ms, with prompt encoding) | denoise (ms) | VAE decode fp32 (ms) "
             "| end to end (ms) | warm-up / compile (s) |", "|---|---|---|---|---|---|---|"]
    for name, r in report["runs_by_pipeline"].items():
        step = r["step_s_median"]
        lines.append(f"| {name} | {(step or 0) * 1000:.2f} | {r['first_step_s'] * 1000:.2f} | {r['denoise_s'] * 1000:.1f} "
                     f"| {r['vae_decode_s'] * 1000:.1f} | {r['end_to_end_s'] * 1000:.1f} | {r['warmup_s']:.1f} |")
    lines += ["", f"fused vs runtime LoRA, final latents: PSNR {report['fused_vs_runtime_lora_latents_psnr_db']:.1f} dB, "
                  f"max abs {report['fused_vs_runtime_lora_latents_max_abs']:.3g}"]
    if "fused_step_over_base_step" in report:
        lines.append(f"fused step / base step: {report['fused_step_over_base_step']:.3f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
