"""ONE table of SDXL's components and every way each one is spelled.

The same four components appear under many names: the single-file (SGM) prefix, the diffusers
folder and weight file, the pipeline attribute, the LoRA prefix of each format (PEFT/diffusers,
kohya, ComfyUI) and the name people read. Every other table is derived from :data:`COMPONENTS`,
so adding a spelling is one field here, not one edit in five files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

Component = Literal["unet", "vae", "te1", "te2"]


@dataclass(frozen=True, slots=True)
class ComponentSpec:
    """One SDXL component and all of its spellings.

    Attributes:
        name: our name (``unet``, ``te1``, ``te2``, ``vae``).
        label: the name shown to people (``CLIP-L text encoder``).
        sgm_prefix: key prefix in a single-file checkpoint (``conditioner.embedders.0.transformer.``).
        diffusers_folder: sub-folder of a diffusers pipeline folder (``text_encoder``).
        weights_stem: weight-file stem in that folder (``model``, ``diffusion_pytorch_model``).
        pipeline_attr: attribute of ``StableDiffusionXLPipeline`` (``text_encoder``).
        peft_prefix: key prefix of diffusers/PEFT LoRA files (``text_encoder.``), ``None`` if LoRAs
            never adapt it.
        kohya_prefix: kohya module prefix (``lora_te1_``), or ``None``.
        comfy_prefix: ComfyUI LoRA key prefix (``text_encoders.clip_l.transformer.``), or ``None``.
    """

    name: Component
    label: str
    sgm_prefix: str
    diffusers_folder: str
    weights_stem: str
    pipeline_attr: str
    peft_prefix: str | None
    kohya_prefix: str | None
    comfy_prefix: str | None


#: Every component, in single-file order (the order of the layout table and of reports).
COMPONENTS: Mapping[Component, ComponentSpec] = MappingProxyType({
    "unet": ComponentSpec("unet", "UNet", "model.diffusion_model.", "unet", "diffusion_pytorch_model", "unet",
                          "unet.", "lora_unet_", "diffusion_model."),
    "vae": ComponentSpec("vae", "VAE", "first_stage_model.", "vae", "diffusion_pytorch_model", "vae",
                         None, None, None),
    "te1": ComponentSpec("te1", "CLIP-L text encoder", "conditioner.embedders.0.transformer.", "text_encoder",
                         "model", "text_encoder", "text_encoder.", "lora_te1_", "text_encoders.clip_l.transformer."),
    "te2": ComponentSpec("te2", "OpenCLIP-bigG text encoder", "conditioner.embedders.1.model.", "text_encoder_2",
                         "model", "text_encoder_2", "text_encoder_2.", "lora_te2_",
                         "text_encoders.clip_g.transformer."),
})
#: The components a LoRA can adapt.
LORA_COMPONENTS: tuple[Component, ...] = tuple(c for c, s in COMPONENTS.items() if s.kohya_prefix is not None)


def spelling(field: str) -> dict[Component, str]:
    """``component -> spelling`` for one field of :class:`ComponentSpec` (components without one left out).

    Example:
        ```py
        >>> spelling("pipeline_attr")["te2"]
        'text_encoder_2'
        ```
    """
    out: dict[Component, str] = {}
    for name, spec in COMPONENTS.items():
        value = getattr(spec, field)
        if value is not None:
            out[name] = value
    return out


def component_label(component: str) -> str:
    """People's name of a component (``unet`` -> ``UNet``); unknown names are returned as given."""
    spec = COMPONENTS.get(component)  # type: ignore[call-overload]
    return spec.label if spec is not None else component
