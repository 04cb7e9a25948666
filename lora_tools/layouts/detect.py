"""Tell what a checkpoint file is from its header alone: layout, architecture, components, markers."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from lora_tools.layouts.table import SGM_PREFIXES, Component

Layout = Literal["sgm", "diffusers-unet", "unknown"]
Architecture = Literal["sdxl-base", "sdxl-inpaint", "sdxl-refiner", "sd1.x", "sd2.x", "unknown"]

#: THE sentence said of a LoRA that looks made for SD1.x/SD2.x (one place; inspect and match use it).
SD1_HINT = "It looks like an SD1.x/SD2.x LoRA, which does not fit SDXL."
#: Module names only SD1.x/SD2.x have (SDXL has no attention at level 0, 9 input/output blocks, 3 levels).
SD1_MODULE_NAMES = re.compile(
    r"(down_blocks_0_attentions|down_blocks\.0\.attentions|input_blocks[._][12][._]1|up_blocks[._]3|output_blocks[._](9|10|11))"
)


def looks_like_sd1(module_name: str) -> bool:
    """Whether a LoRA module name exists only in SD1.x/SD2.x UNets (see :data:`SD1_MODULE_NAMES`)."""
    return SD1_MODULE_NAMES.search(module_name) is not None


_SUPPORTED: set[str] = {"sdxl-base"}
_WHY_NOT = {
    "sdxl-inpaint": "its UNet takes 9 input channels (latent + mask + masked image); Lightning was distilled from the 4-channel SDXL base",
    "sdxl-refiner": "the SDXL refiner has a different UNet (1280-wide context, 384 base channels) that SDXL LoRAs do not fit",
    "sd1.x": "it is a Stable Diffusion 1.x model (768-wide CLIP-L context, 4 levels); lora_tools handles SDXL",
    "sd2.x": "it is a Stable Diffusion 2.x model (OpenCLIP-H context 1024); lora_tools handles SDXL",
    "unknown": "its keys match no SDXL layout",
}


@dataclass(frozen=True)
class CheckpointKind:
    """What a checkpoint header says about the model.

    Attributes:
        layout: ``sgm`` (single file, ``model.diffusion_model.``...), ``diffusers-unet`` (a bare
            diffusers UNet state dict) or ``unknown``.
        architecture: ``sdxl-base``, ``sdxl-inpaint``, ``sdxl-refiner``, ``sd1.x``, ``sd2.x``, ``unknown``.
        components: SDXL components present (``unet``, ``te1``, ``te2``, ``vae``).
        prediction: ``epsilon`` unless a marker says ``v_prediction`` or ``edm``.
        markers: marker keys found (``v_pred``, ``ztsnr``, ``edm_mean``...).
        extra_keys: keys outside every component (scheduler buffers, markers...).
    """

    layout: Layout
    architecture: Architecture
    components: tuple[Component, ...]
    prediction: str = "epsilon"
    markers: tuple[str, ...] = ()
    extra_keys: tuple[str, ...] = field(default=())

    @property
    def supported(self) -> bool:
        return self.architecture in _SUPPORTED

    def why_unsupported(self) -> str:
        return _WHY_NOT.get(self.architecture, "")


_MARKER_KEYS = ("v_pred", "ztsnr", "edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min")


def detect_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> CheckpointKind:
    """Classify a checkpoint from its key -> shape map (a safetensors header is enough)."""
    keys = list(shapes)
    markers = tuple(k for k in _MARKER_KEYS if k in shapes)
    prediction = "epsilon"
    if any(m.startswith("edm") for m in markers):
        prediction = "edm" if "edm_mean" in markers else "v_prediction (EDM)"
    elif "v_pred" in markers:
        prediction = "v_prediction"
    if "conv_in.weight" in shapes and any(k.startswith("down_blocks.") for k in keys):
        arch = _unet_arch(shapes.get("conv_in.weight"), _ctx(shapes, ""), shapes.get("add_embedding.linear_1.weight"))
        return CheckpointKind("diffusers-unet", arch, ("unet",), prediction, markers)
    comps = tuple(c for c, p in SGM_PREFIXES.items() if any(k.startswith(p) for k in keys))
    unet_p = SGM_PREFIXES["unet"]
    if unet_p + "input_blocks.0.0.weight" not in shapes:
        if any(k.startswith("cond_stage_model.") for k in keys):
            sd_arch: Architecture = "sd2.x" if any(k.startswith("cond_stage_model.model.") for k in keys) else "sd1.x"
            return CheckpointKind("sgm", sd_arch, comps, prediction, markers)
        return CheckpointKind("unknown", "unknown", comps, prediction, markers)
    arch = _unet_arch(shapes.get(unet_p + "input_blocks.0.0.weight"), _ctx(shapes, unet_p), shapes.get(unet_p + "label_emb.0.0.weight"))
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and "te1" not in comps:
        arch = "sdxl-refiner"
    if arch == "unknown" and any(k.startswith("cond_stage_model.") for k in keys):
        arch = "sd2.x" if any(k.startswith("cond_stage_model.model.") for k in keys) else "sd1.x"
    prefixes = tuple(SGM_PREFIXES.values())
    extra = tuple(k for k in keys if not k.startswith(prefixes))
    return CheckpointKind("sgm", arch, comps, prediction, markers, extra)


def _ctx(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int | None:
    for k, s in shapes.items():
        if k.startswith(prefix) and k.endswith("attn2.to_k.weight"):
            return s[1]
    return None


def _unet_arch(conv_in: tuple[int, ...] | None, ctx: int | None, label_emb: tuple[int, ...] | None) -> Architecture:
    if conv_in is None:
        return "unknown"
    if label_emb is None:
        return {768: "sd1.x", 1024: "sd2.x"}.get(ctx or 0, "unknown")  # type: ignore[return-value]
    if ctx == 1280 or label_emb[1] == 2560:
        return "sdxl-refiner"
    if conv_in[1] == 9:
        return "sdxl-inpaint"
    return "sdxl-base"
