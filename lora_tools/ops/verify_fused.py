"""Check a fused file against diffusers' own runtime LoRA fusion, and render with the recorded sampler.

diffusers is the oracle: the base is loaded into diffusers models, the LoRAs are applied with
``load_lora_weights`` + ``fuse_lora``, and every weight is compared with the fused file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lora_tools.errors import UnsupportedModelError
from lora_tools.layouts.sdxl import config_from_shapes, sgm_to_diffusers_state_dicts
from lora_tools.ops.sampling import quiet_diffusers, scheduler_for
from lora_tools.provenance import read_provenance
from lora_tools.safetensors_io import load_tensors, read_header

_PIPE_NAMES = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


@dataclass(frozen=True)
class FuseCheck:
    """Result of comparing a fused file with diffusers' fusion of the same LoRAs."""

    tensors_compared: int
    tensors_changed: int
    max_rel_diff: float
    tolerance: float
    worst_key: str

    @property
    def ok(self) -> bool:
        return self.max_rel_diff <= self.tolerance


def build_pipeline(sgm_path: str | Path, *, dtype: str = "fp32"):  # type: ignore[no-untyped-def]
    """A diffusers ``StableDiffusionXLPipeline`` holding a single file's weights (converted by our tables).

    Works offline for any size: configs come from the file's own shapes; tokenizers are the byte
    tokenizer for small-vocabulary synthetic models.
    """
    import tempfile

    import torch

    with quiet_diffusers():  # importing the pipeline makes transformers talk about torchvision
        from diffusers import StableDiffusionXLPipeline

    from lora_tools.diffusers_folder import component_config
    from lora_tools.testing.synthetic import write_pipeline_files

    header = read_header(sgm_path)
    shapes = {k: t.shape for k, t in header.tensors.items()}
    cfg = config_from_shapes(shapes)
    if cfg.te1.vocab >= 49408:
        raise UnsupportedModelError("building a pipeline offline needs real CLIP tokenizers; use a synthetic tiny model")
    state = sgm_to_diffusers_state_dicts(load_tensors(sgm_path), cfg.table, ["unet", "vae", "te1", "te2"], source=str(sgm_path))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        import json

        from lora_tools.layouts.table import DIFFUSERS_FOLDERS
        from lora_tools.safetensors_io import save_tensors

        for comp in ("unet", "vae", "te1", "te2"):
            folder = root / DIFFUSERS_FOLDERS[comp]  # type: ignore[index]
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(component_config(cfg, comp)))  # type: ignore[arg-type]
            name = "diffusion_pytorch_model.safetensors" if comp in ("unet", "vae") else "model.safetensors"
            save_tensors(folder / name, {k: v.float() for k, v in state[comp].items()}, {"format": "pt"})  # type: ignore[index]
        write_pipeline_files(root, cfg)
        torch_dtype = torch.float32 if dtype == "fp32" else torch.float16
        with quiet_diffusers():
            return StableDiffusionXLPipeline.from_pretrained(root, dtype=torch_dtype, local_files_only=True), cfg


def compare_with_runtime_lora(base: str | Path, fused: str | Path, loras: Sequence[tuple[str | Path, float]],
                              *, tolerance: float | None = None) -> FuseCheck:
    """Compare ``fused`` with diffusers' ``load_lora_weights`` + ``fuse_lora`` of ``loras`` on ``base``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # PEFT's many small ops run far faster without thread hand-offs on small models
    try:
        return _compare(base, fused, loras, tolerance)
    finally:
        torch.set_num_threads(threads)


def _compare(base: str | Path, fused: str | Path, loras: Sequence[tuple[str | Path, float]],
             tolerance: float | None) -> FuseCheck:
    pipe, cfg = build_pipeline(base)
    with quiet_diffusers():
        for i, (path, strength) in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        pipe.set_adapters([f"l{i}" for i in range(len(loras))], adapter_weights=[s for _, s in loras])
        pipe.fuse_lora(adapter_names=[f"l{i}" for i in range(len(loras))], lora_scale=1.0)
        pipe.unload_lora_weights()
    before = sgm_to_diffusers_state_dicts(load_tensors(base), cfg.table, ["unet", "te1", "te2"])
    header = read_header(fused)
    fused_sd = sgm_to_diffusers_state_dicts(load_tensors(fused), cfg.table, ["unet", "te1", "te2"])
    fused_dtype = next(iter(header.tensors.values())).dtype
    tol = tolerance if tolerance is not None else (1e-6 if fused_dtype == "F32" else 2e-3)
    compared = changed = 0
    worst, worst_key = 0.0, ""
    for comp, name in _PIPE_NAMES.items():
        oracle = getattr(pipe, name).state_dict()
        for key, ours in fused_sd[comp].items():  # type: ignore[index]
            ref = oracle.get(key, oracle.get(key.removeprefix("text_model.")))
            if ref is None:
                continue
            compared += 1
            if not bool((ref.float() == before[comp][key].float()).all()):  # type: ignore[index]
                changed += 1
            scale = ref.float().abs().max().item() or 1.0
            err = (ours.float() - ref.float()).abs().max().item() / scale
            if err > worst or math.isnan(err):
                worst, worst_key = err, f"{name}.{key}"
    return FuseCheck(compared, changed, worst, tol, worst_key)


def render_grid(diffusers_dir: str | Path, png: str | Path, *, prompts: Sequence[str] = ("a cat", "a lighthouse", "a forest", "a city"),
                seed: int = 0, size: int = 64) -> Path:
    """Render ``prompts`` with the sampler settings recorded in the folder's UNet, as one PNG grid."""
    import torch
    from PIL import Image

    with quiet_diffusers():
        from diffusers import StableDiffusionXLPipeline

    folder = Path(diffusers_dir)
    record = read_provenance(read_header(folder / "unet" / "diffusion_pytorch_model.safetensors").metadata) or {}
    sampler = record.get("sampler") or {"steps": 4, "guidance_scale": 0.0, "timestep_spacing": "trailing", "prediction_type": "epsilon"}
    with quiet_diffusers():
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    pipe.scheduler = scheduler_for(sampler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(list(prompts), num_inference_steps=int(sampler["steps"]), guidance_scale=float(sampler["guidance_scale"]),
                  height=size, width=size, generator=torch.Generator().manual_seed(seed)).images
    grid = Image.new("RGB", (size * len(images), size))
    for i, im in enumerate(images):
        grid.paste(im, (i * size, 0))
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    grid.save(png)
    return Path(png)
