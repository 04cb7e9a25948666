"""Peak memory of ``loratool verify`` on a full-size SDXL single file, in fp32 on the CPU (issue #24: at most 16 GB).

    python benchmarks/verify_memory.py --cache-dir /work/benchcache              # full size, a few minutes
    python benchmarks/verify_memory.py --cache-dir /tmp/vm --model-size micro    # seconds

The full-size input is the shared synthetic SDXL (``<cache-dir>/full/sdxl-full-fp16.safetensors``: UNet, both text
encoders and the VAE, real shapes, random weights, fp16; the script waits for ``<cache-dir>/full/READY``); a micro
one is written under ``<cache-dir>/verifymem/`` and deleted after. ``--against``: the faithfulness check, the model
fused with the (shared) Lightning LoRA checked against the model + the LoRA at run time. Synthetic weights need no real CLIP vocabulary:
the byte tokenizer (of the model's vocabulary size) is written into a ``--config`` folder there, and removed after.

The run is the CLI in a child process, ``verify MODEL --dtype fp32 --device cpu --size 256x256 --steps N``
(Lightning 4-step settings, ``--force`` for another step count); its peak resident set is the kernel's own count
for the child (``wait4``'s ``ru_maxrss``), with its wall and CPU (user + sys) times. The prediction ``verify``
prints before loading (``plan.memory``) is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LIMIT_BYTES = 16 * 10**9


def _inputs(cache: Path, size: str) -> tuple[Path, Path, list[Path]]:
    """The model, the --config folder with tokenizers, and what to delete after."""
    from lora_tools.io.diffusers_folder import write_byte_tokenizer
    from lora_tools.io.safetensors import read_header
    from lora_tools.layouts.sdxl import config_from_shapes
    from lora_tools.testing.synthetic import write_checkpoint

    own = cache / "verifymem"
    own.mkdir(parents=True, exist_ok=True)
    cleanup: list[Path] = []
    if size == "full":
        while not (cache / "full" / "READY").exists():
            print("waiting for", cache / "full" / "READY", file=sys.stderr)
            time.sleep(30)
        model = cache / "full" / "sdxl-full-fp16.safetensors"
    else:
        model = write_checkpoint(own / f"sdxl-{size}-fp16.safetensors", size, dtype="fp16")  # type: ignore[arg-type]
        cleanup.append(model)
    cfg = config_from_shapes({k: t.shape for k, t in read_header(model).tensors.items()})
    config = own / f"config-{size}"
    for name, te in (("tokenizer", cfg.te1), ("tokenizer_2", cfg.te2)):
        write_byte_tokenizer(config / name, te.vocab, te.positions)
    cleanup.append(config)
    return model, config, cleanup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, required=True, help="holds full/ (the shared inputs); our files go to "
                    "verifymem/ under it")
    ap.add_argument("--model-size", choices=["micro", "tiny", "full"], default="full")
    ap.add_argument("--image-size", default="256x256")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--against", action="store_true", help="the faithfulness check: fuse the Lightning LoRA into the "
                    "model (under verifymem/, deleted after) and verify the fused file against the model + the LoRA "
                    "at run time: two models, one after the other")
    ap.add_argument("--results", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    model, config, cleanup = _inputs(args.cache_dir, args.model_size)
    try:
        from lora_tools.verify import plan_verify

        checked, against = model, {}
        if args.against:
            from lora_tools.ops.fuse import fuse
            from lora_tools.testing.synthetic_lora import write_lightning_lora

            lora = args.cache_dir / "full" / "lightning" / "sdxl_lightning_4step_lora.safetensors"
            if args.model_size != "full":
                lora = write_lightning_lora(config.parent / "L" / lora.name, args.model_size)  # type: ignore[arg-type]
                cleanup.append(lora.parent)
            checked = config.parent / f"fused-{args.model_size}.safetensors"
            cleanup.append(checked)
            fuse(model, loras=[(str(lora), 1.0)], saves=("checkpoint",), output=checked, overwrite=True)
            against = {"against": model, "loras": [(lora, 1.0)]}
        w, h = (int(x) for x in args.image_size.split("x"))
        plan = plan_verify(checked, preset="lightning-4step", prompts=["a cat"], size=(w, h), steps=args.steps,
                           force=True, config=config, device="cpu", dtype=args.dtype, **against)
        assert plan.memory is not None
        cmd = [sys.executable, "-m", "lora_tools", "verify", str(checked), "--preset", "lightning-4step", "--prompt",
               "a cat", "--dtype", args.dtype, "--device", "cpu", "--size", args.image_size, "--steps",
               str(args.steps), "--force", "--config", str(config), "--json"]
        if args.against:
            cmd += ["--against", str(model), "--lora", f"{against['loras'][0][0]}:1.0"]
        print("$", " ".join(cmd), file=sys.stderr)
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        out, err = child.stdout.read() if child.stdout else "", child.stderr.read() if child.stderr else ""
        code = os.waitstatus_to_exitcode(status)
        peak = usage.ru_maxrss * 1024
        result = {"model": str(checked), "against": str(model) if args.against else None,
                  "model_size": args.model_size, "dtype": args.dtype, "size": args.image_size,
                  "steps": args.steps, "exit_code": code, "peak_rss_bytes": peak,
                  "predicted_peak_bytes": plan.memory.peak, "predicted_stage": plan.memory.stage,
                  "wall_seconds": round(wall, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)}
        if out.strip().startswith("{"):
            report = json.loads(out)
            result["render_seconds"] = [round(i["seconds"], 2) for i in report["images"]]
            result["verdict"] = report.get("verdict")
            result["psnr_db"] = [i.get("psnr_db") for i in report["images"]]
        else:
            result["stderr"] = err.strip().splitlines()[-3:]
        print(json.dumps(result, indent=2))
        print(f"peak RSS {peak / 1e9:.2f} GB (predicted {plan.memory.peak / 1e9:.2f} GB, {plan.memory.stage}), "
              f"wall {wall:.0f} s, CPU {usage.ru_utime + usage.ru_stime:.0f} s, exit {code}: "
              f"{'within' if peak <= LIMIT_BYTES else 'NOT within'} 16 GB")
        if args.results:
            args.results.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        for p in cleanup:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
