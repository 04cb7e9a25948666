"""``loratool verify``'s render of a full-size SDXL single file against ComfyUI executing the workflow verify writes
(issue #24: "its image against ComfyUI's render of our workflow").

    LORA_TOOLS_COMFYUI=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/ComfyUI/venv/bin/python \\
        python benchmarks/comfyui_render.py --cache-dir /work/benchcache [--size 256x256] [--image docs/comfyui-render.png]

1. ``loratool verify MODEL --preset lightning-4step --prompt P --seeds S --size WxH --dtype fp32 --device cpu
   --workflow --out DIR`` in a child process (the CLI itself; a hook keeps the final latents and the scheduler's
   sigmas); its peak resident set is the kernel's count for the child (``wait4``), with wall and CPU times.
2. ComfyUI, in a child process of its own Python (``$COMFYUI_PYTHON``, default this one), headless and in-process:
   the ``workflow.json`` verify wrote, as written, through ComfyUI's ``execution.validate_prompt`` and its
   ``PromptExecutor`` on the CPU (no server, no network), with one ``SaveLatent`` node added on the KSampler's output;
   the MODEL's folder is ComfyUI's checkpoint folder. Peak RSS and times as above.
3. PSNR of ComfyUI's PNG against ours (8-bit, peak 255), of the final latents (the reference's range as peak, as
   verify's own check), the initial noise of both (both draw ``torch.randn`` from a CPU generator seeded with the
   seed), the sigmas each sampler walked, and a side-by-side picture (ours | ComfyUI | difference x32, centre crops).

The full-size input is the shared synthetic SDXL (``<cache-dir>/full/sdxl-full-fp16.safetensors``: UNet, both text
encoders and the VAE, real shapes, random weights). Random weights know no words, but the token ids must still be
the same on both sides: verify gets a ``--config`` folder whose tokenizers are ComfyUI's own CLIP vocabulary
(``comfy/sd1_tokenizer``, copied under ``<cache-dir>/comfyrender/`` and removed after; the second pads with ``!``
as SDXL's does). Nothing else is shared. ``--comfy-fp16-weights``: ComfyUI keeps the UNet in fp16 and computes in
fp32 (its manual cast on the CPU), the same numbers from a file that is fp16 anyway, in half the memory.
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
from typing import Any

PRESET = "lightning-4step"
SCALING_FACTOR = 0.13025  # SDXL's VAE: ComfyUI's LATENT holds the unscaled latents, diffusers' pipeline the scaled


def _child(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; its exit code, peak RSS (bytes), wall and CPU (user + sys) seconds, and output."""
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert child.stdout is not None
    lines = []
    for line in child.stdout:
        lines.append(line)
        print("  |", line, end="", file=sys.stderr, flush=True)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"exit_code": child.returncode, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "output_tail": "".join(lines[-15:])}


def _tokenizers(comfy_root: Path, dest: Path) -> Path:
    """A ``--config`` folder whose ``tokenizer``/``tokenizer_2`` are ComfyUI's CLIP vocabulary, as SDXL's are
    configured (77 tokens; the first pads with the end token, the second with ``!``)."""
    source = comfy_root / "comfy" / "sd1_tokenizer"
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copyfile(source / f, folder / f)
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": pad}
        (folder / "special_tokens_map.json").write_text(json.dumps(special))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}))
    return dest


# ------------------------------------------------------------------------------------------------ the two children

def ours_child(latents_out: str, cli_args: list[str]) -> None:
    """The ``loratool`` CLI with ``cli_args``; the final latents and sigmas of its render go to ``latents_out``."""
    import torch
    from safetensors.torch import save_file

    import lora_tools.verify.render as render
    from lora_tools.cli import cli

    original = render.render_staged

    def kept(*a: Any, **k: Any) -> Any:
        run = original(*a, **k)
        one = run.results[0]
        assert one.rendered is not None, one.error
        save_file({"latents": one.rendered.latents.contiguous(),
                   "sigmas": torch.as_tensor(one.scheduler.sigmas, dtype=torch.float32).contiguous()}, latents_out)
        return run

    render.render_staged = kept
    cli.main(cli_args, prog_name="loratool")


def comfy_child(workflow_path: str, checkpoints: str, out: str, fp16_weights: bool) -> None:
    """ComfyUI executes ``workflow_path`` headless on the CPU; writes its PNG, latents and facts into ``out``."""
    import asyncio
    import importlib
    import logging
    import uuid

    from lora_tools.testing.comfyui import install_torchvision_stand_in

    root = os.environ["LORA_TOOLS_COMFYUI"]
    sys.path.append(root)
    logging.basicConfig(level=logging.INFO)
    install_torchvision_stand_in()  # for the whole run: ComfyUI imports it as it goes
    args = importlib.import_module("comfy.cli_args").args
    args.cpu = True
    args.disable_xformers = True
    if fp16_weights:
        args.fp16_unet = True
    import torch

    nodes = importlib.import_module("nodes")
    execution = importlib.import_module("execution")
    folder_paths = importlib.import_module("folder_paths")
    asyncio.run(nodes.init_builtin_extra_nodes())
    folder_paths.folder_names_and_paths["checkpoints"] = ([checkpoints], folder_paths.supported_pt_extensions)
    folder_paths.filename_list_cache.clear()
    folder_paths.set_output_directory(out)

    wf = json.loads(Path(workflow_path).read_text())
    wf["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "comfy-latent"}}
    valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), wf, None))
    if not valid[0]:
        raise SystemExit(f"ComfyUI refused the workflow: {valid[1]} {valid[3]}")

    class Server:  # what PromptExecutor tells a front end: nothing listens here
        client_id = None
        last_node_id = None
        last_prompt_id = None

        def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
            if event == "execution_error":
                print("ComfyUI error:", data.get("exception_message"), data.get("traceback"), flush=True)

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    executor = execution.PromptExecutor(Server(), cache_type=False)
    start = time.perf_counter()
    executor.execute(wf, str(uuid.uuid4()), {}, valid[2])
    seconds = time.perf_counter() - start
    if not executor.success:
        raise SystemExit("ComfyUI's execution failed")
    ks = wf["6"]["inputs"]
    latent = wf["5"]["inputs"]
    import comfy.model_sampling
    import comfy.sample
    import comfy.samplers

    sampling = comfy.model_sampling.ModelSamplingDiscrete()  # SDXL's schedule: ComfyUI's defaults
    sigmas = comfy.samplers.calculate_sigmas(sampling, ks["scheduler"], ks["steps"])
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, latent["height"] // 8, latent["width"] // 8), ks["seed"])
    from safetensors.torch import save_file

    save_file({"sigmas": sigmas.float().contiguous(), "noise": noise.contiguous(),
               "timesteps": sampling.timestep(sigmas[:-1]).float().contiguous()}, str(Path(out) / "facts.safetensors"))
    Path(out, "run.json").write_text(json.dumps({"execute_s": round(seconds, 1), "unet_dtype": str(
        importlib.import_module("comfy.model_management").unet_dtype()), "fp16_weights": fp16_weights}))


# -------------------------------------------------------------------------------------------------------- the parent

def _side_by_side(ours: Path, comfy: Path, dest: Path, title: str, crop: int = 128) -> None:
    """ours | ComfyUI | their difference x32, each the centre ``crop`` x ``crop`` pixels at 1:1 (noise does not
    compress: the whole images would make a large PNG)."""
    import numpy as np
    from PIL import Image, ImageDraw

    def centre(path: Path) -> Any:
        im = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
        h, w = im.shape[:2]
        top, left = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        return im[top:top + crop, left:left + crop]

    a, b = centre(ours), centre(comfy)
    diff = np.clip(np.abs(a - b) * 32, 0, 255).astype(np.uint8)
    h, w = a.shape[:2]
    pad, gap = 44, 4
    canvas = Image.new("RGB", (max(3 * w + 2 * gap, 8 + 6 * len(title) // 2), h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title.split("\n")):
        draw.text((2, 2 + 12 * i), line, fill="black")
    for i, (im, label) in enumerate(((a.astype(np.uint8), "loratool verify"), (b.astype(np.uint8), "ComfyUI"),
                                     (diff, "|difference| x32"))):
        canvas.paste(Image.fromarray(im), (i * (w + gap), pad))
        draw.text((i * (w + gap) + 2, pad - 12), label, fill="black")
    dest.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(dest, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, required=True, help="holds full/ (the shared inputs); ours go to "
                    "comfyrender/ under it, removed after unless --keep")
    ap.add_argument("--model", type=Path, help="default: <cache-dir>/full/sdxl-full-fp16.safetensors")
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--prompt", default="a photo of a cat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--comfy-fp16-weights", action="store_true")
    ap.add_argument("--skip-ours", action="store_true", help="reuse verify's run kept by an earlier --keep")
    ap.add_argument("--compare-only", action="store_true", help="reuse both runs kept by an earlier --keep")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--image", type=Path, help="write the side-by-side picture here (e.g. docs/comfyui-render.png)")
    ap.add_argument("--results", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    root = os.environ.get("LORA_TOOLS_COMFYUI")
    if not root or not (Path(root) / "comfy" / "sd.py").is_file():
        raise SystemExit("set LORA_TOOLS_COMFYUI to a ComfyUI checkout")
    comfy_python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    model = (args.model or args.cache_dir / "full" / "sdxl-full-fp16.safetensors").resolve()
    work = args.cache_dir / "comfyrender"
    verify_dir, comfy_dir = work / "verify", work / "comfy"
    latents_file = work / "ours-latents.safetensors"
    work.mkdir(parents=True, exist_ok=True)
    args.model_name = model.name
    result: dict[str, Any] = {"model": str(model), "size": args.size, "prompt": args.prompt, "seed": args.seed,
                              "preset": PRESET}
    try:
        if not (args.skip_ours or args.compare_only):
            config = _tokenizers(Path(root), work / "config")
            cli_args = ["verify", str(model), "--preset", PRESET, "--prompt", args.prompt, "--seeds", str(args.seed),
                        "--size", args.size, "--dtype", "fp32", "--device", "cpu", "--config", str(config),
                        "--workflow", "--out", str(verify_dir), "--overwrite"]
            result["ours"] = _child([sys.executable, __file__, "--ours-child", str(latents_file), *cli_args])
            if result["ours"]["exit_code"] != 0:
                raise SystemExit("verify failed:\n" + result["ours"]["output_tail"])
            (work / "ours.json").write_text(json.dumps(result["ours"]))
        result["ours"] = json.loads((work / "ours.json").read_text())
        if not args.compare_only:
            shutil.rmtree(comfy_dir, ignore_errors=True)
            comfy_dir.mkdir(parents=True)
            env = dict(os.environ, LORA_TOOLS_COMFYUI=root)
            result["comfyui"] = _child([comfy_python, __file__, "--comfy-child", str(verify_dir / "workflow.json"),
                                        str(model.parent), str(comfy_dir), "1" if args.comfy_fp16_weights else "0"],
                                       env)
            if result["comfyui"]["exit_code"] != 0:
                raise SystemExit("ComfyUI failed:\n" + result["comfyui"]["output_tail"])
            result["comfyui"] |= json.loads((comfy_dir / "run.json").read_text())
            (work / "comfy.json").write_text(json.dumps(result["comfyui"]))
        result["comfyui"] = json.loads((work / "comfy.json").read_text())
        result |= _compare(verify_dir, comfy_dir, latents_file, args)
        print(json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
        if args.results:
            for side in ("ours", "comfyui"):
                result.get(side, {}).pop("output_tail", None)
            args.results.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _compare(verify_dir: Path, comfy_dir: Path, latents_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from lora_tools.verify.oracle import psnr_db

    ours_png = next((verify_dir / "images").glob("*.png"))
    comfy_png = next(comfy_dir.glob("*.png"))
    a = torch.from_numpy(np.asarray(Image.open(ours_png).convert("RGB")).copy())
    b = torch.from_numpy(np.asarray(Image.open(comfy_png).convert("RGB")).copy())
    ours = load_file(str(latents_file))
    comfy_latent = load_file(str(next(comfy_dir.glob("*.latent"))))["latent_tensor"] * SCALING_FACTOR
    facts = load_file(str(comfy_dir / "facts.safetensors"))
    w, h = (int(x) for x in args.size.split("x"))
    our_noise = torch.randn((1, 4, h // 8, w // 8), generator=torch.Generator("cpu").manual_seed(args.seed))
    out: dict[str, Any] = {
        "image_psnr_db": round(psnr_db(a, b, peak=255.0), 2),
        "image_max_abs_u8": int((a.int() - b.int()).abs().max()),
        "latent_psnr_db": round(psnr_db(ours["latents"], comfy_latent), 2),
        "latent_max_abs": float((ours["latents"] - comfy_latent).abs().max()),
        "initial_noise_identical": bool(torch.equal(our_noise, facts["noise"])),
        "sigmas_ours": [round(float(s), 4) for s in ours["sigmas"]],
        "sigmas_comfyui": [round(float(s), 4) for s in facts["sigmas"]],
        "comfyui_unet_timesteps": [round(float(t), 2) for t in facts["timesteps"]],
    }
    if args.image:
        title = (f"{args.model_name}, {PRESET}, {args.size} (centre 128x128), seed {args.seed}, fp32, CPU\n"
                 f"image PSNR {out['image_psnr_db']:.1f} dB (max {out['image_max_abs_u8']}/255), "
                 f"latents {out['latent_psnr_db']:.1f} dB")
        _side_by_side(ours_png, comfy_png, args.image, title)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--ours-child":
        ours_child(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--comfy-child":
        comfy_child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1")
    else:
        main()
