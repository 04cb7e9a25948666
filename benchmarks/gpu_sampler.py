#!/usr/bin/env python
"""Fused Lightning model vs base + runtime LoRA, through the Lightning sampler, on the GPU (not a test).

On a synthetic SDXL (full size by default: the real shapes, random weights) and a
Lightning-shaped LoRA, in one process:

1. ``loratool fuse BASE --lightning 4 --lightning-dir DIR --save checkpoint --save unet`` (timed,
   in a subprocess, as users run it);
2. the fused standalone UNet loaded the way the SDXL-Lightning README loads its UNets
   (``UNet2DConditionModel`` from the config + ``load_state_dict(load_file(...))``, strict);
3. the base UNet with the same LoRA applied at run time by diffusers (``load_lora_adapter``,
   not fused), and the base VAE;
4. both through ``StableDiffusionXLPipeline`` with the settings the fuse recorded (Euler,
   trailing, 4 steps, CFG 0), the same prompt embeddings and starting noise: warm-up, then timed
   runs (to the last kernel) with and without the VAE decode, and the difference of the final
   latents;
5. an image grid (fused | runtime LoRA) and a JSON + markdown report under ``--out``.

Random weights make noise images; the point is the sampler settings, the agreement of the two
UNets and the timings.

Usage:
    python benchmarks/gpu_sampler.py --out /tmp/gpu                # full size, GPU if there is one
    python benchmarks/gpu_sampler.py --size tiny --out /tmp/gpu    # smoke run on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def build_inputs(work: Path, size: str) -> tuple[Path, Path]:
    from lora_tools.testing.synthetic import write_checkpoint
    from lora_tools.testing.synthetic_lora import write_lightning_lora

    base = work / f"sdxl-{size}-fp16.safetensors"
    lora = work / "lightning" / "sdxl_lightning_4step_lora.safetensors"
    if not base.exists():
        write_checkpoint(base, size, dtype="fp16", seed=0)  # type: ignore[arg-type]
    if not lora.exists():
        write_lightning_lora(lora, size)  # type: ignore[arg-type]
    return base, lora


def run_fuse(base: Path, lora: Path, out: Path) -> tuple[float, str]:
    cmd = [sys.executable, "-c", "from lora_tools.cli import main; main()", "fuse", str(base), "--lightning", "4",
           "--lightning-dir", str(lora.parent), "--save", "checkpoint", "--save", "unet", "-o", str(out),
           "--overwrite", "-q"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"loratool fuse failed:\n{proc.stderr}")
    return seconds, proc.stdout


def load_models(base: Path, lora: Path, fused_unet: Path, device: str, dtype):  # type: ignore[no-untyped-def]
    """(fused UNet, base UNet + runtime LoRA, VAE, SDXL config), on ``device``."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    from lora_tools.diffusers_folder import component_config
    from lora_tools.layouts.sdxl import config_from_shapes, sgm_to_diffusers_state_dicts
    from lora_tools.ops.sampling import quiet_diffusers
    from lora_tools.safetensors_io import load_tensors, read_header

    cfg = config_from_shapes({k: t.shape for k, t in read_header(base).tensors.items()})
    with quiet_diffusers():
        fused = UNet2DConditionModel.from_config(component_config(cfg, "unet"))
        fused.load_state_dict(load_file(str(fused_unet)), strict=True)  # as the SDXL-Lightning README does
        fused = fused.to(device, dtype).eval()
        state = sgm_to_diffusers_state_dicts(load_tensors(base), cfg.table, ["unet", "vae"], source=str(base))
        runtime = UNet2DConditionModel.from_config(component_config(cfg, "unet"))
        runtime.load_state_dict(state["unet"], strict=True)
        runtime = runtime.to(device, dtype).eval()
        lora_sd, alphas = StableDiffusionXLPipeline.lora_state_dict(str(lora))
        runtime.load_lora_adapter(lora_sd, prefix="unet", network_alphas=alphas, adapter_name="lightning")
        vae = AutoencoderKL.from_config(component_config(cfg, "vae"))
        vae.load_state_dict(state["vae"], strict=True)
        vae = vae.to(device, torch.float32 if dtype == torch.float16 else dtype).eval()  # SDXL's VAE overflows in fp16
    return fused, runtime, vae, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--work", type=Path, default=HERE / ".cache" / "gpu", help="inputs and fused files")
    ap.add_argument("--out", type=Path, required=True, help="report, grid and JSON")
    ap.add_argument("--device", default="auto", help="auto (GPU if there is one), cuda or cpu")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    ap.add_argument("--resolution", type=int, default=None, help="image size (default 1024 full, 64 tiny)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up")
    args = ap.parse_args()

    import torch

    from lora_tools.ops.sampling import pick_device, random_conditioning, run_sampler, sampler_pipeline
    from lora_tools.provenance import read_provenance
    from lora_tools.safetensors_io import read_header

    device = pick_device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if device == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    size = args.resolution or (1024 if args.size == "full" else 64)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"size": args.size, "device": device, "dtype": str(dtype).replace("torch.", ""),
                                 "resolution": size, "torch": torch.__version__, "python": platform.python_version(),
                                 "cpus": os.cpu_count()}
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)

    t = time.perf_counter()
    base, lora = build_inputs(args.work, args.size)
    report["build_inputs_s"] = round(time.perf_counter() - t, 1)
    out = args.work / "fused.safetensors"
    report["fuse_s"], fuse_stdout = run_fuse(base, lora, out)
    report["fuse_summary"] = fuse_stdout.strip().splitlines()[:3]
    sampler = read_provenance(read_header(out).metadata)["sampler"]  # type: ignore[index]
    report["sampler"] = sampler
    print(f"fused in {report['fuse_s']:.1f} s; sampler {sampler}", flush=True)

    t = time.perf_counter()
    fused, runtime, vae, _ = load_models(base, lora, args.work / "fused-unet.safetensors", device, dtype)
    report["load_s"] = round(time.perf_counter() - t, 1)
    cond = random_conditioning(fused.config, seed=1, device=device, dtype=dtype)
    results = {}
    images = []
    for name, unet in (("fused", fused), ("runtime_lora", runtime)):
        pipe = sampler_pipeline(unet, vae, sampler)
        with torch.inference_mode():
            run_sampler(pipe, sampler, cond, size=size, seed=0)  # warm-up
            runs = [run_sampler(pipe, sampler, cond, size=size, seed=0) for _ in range(args.runs)]
            unet_only = [run_sampler(pipe, sampler, cond, size=size, seed=0, decode=False)[0].seconds
                         for _ in range(args.runs)]
        results[name] = runs
        report[f"{name}_unet_s"] = round(statistics.median(unet_only), 4)
        images.append(runs[-1][1][0])
        secs = [r.seconds for r, _ in runs]
        report[f"{name}_s_per_image"] = {"median": round(statistics.median(secs), 4), "min": round(min(secs), 4),
                                         "max": round(max(secs), 4)}
        print(f"{name}: {statistics.median(secs) * 1000:.1f} ms per {size}x{size} image "
              f"({sampler['steps']} steps + VAE decode; the steps alone {statistics.median(unet_only) * 1000:.1f} ms)",
              flush=True)
    a = results["fused"][-1][0].latents
    b = results["runtime_lora"][-1][0].latents
    report["finite"] = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    report["latents_max_abs_diff"] = float((a - b).abs().max())
    report["latents_rel_diff"] = float((a - b).abs().max() / b.abs().max())
    report["deterministic"] = bool(torch.equal(results["fused"][0][0].latents, results["fused"][-1][0].latents))

    from PIL import Image

    grid = Image.new("RGB", (size * 2, size))
    for i, im in enumerate(images):
        grid.paste(im, (i * size, 0))
    grid.save(args.out / "fused-vs-runtime-lora.png")
    (args.out / "gpu_sampler.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
