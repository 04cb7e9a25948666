"""LCM-LoRA SDXL (``latent-consistency/lcm-lora-sdxl``).

Facts (the model card, huggingface.co/latent-consistency/lcm-lora-sdxl; diffusers ``inference_with_lcm.md``): ``LCMScheduler``, about
4 (2-8) steps, guidance 1.0 (off) up to 2.0 ("best values between 1.0 and 2.0"). ComfyUI has a
native ``lcm`` sampler (with ``ModelSamplingDiscrete`` ``lcm``); Fooocus uses weight 1.0, CFG 1.0.
The file name ``pytorch_lora_weights.safetensors`` is shared with TCD: identify by sha256 or repo.
"""

from __future__ import annotations

from lora_tools.presets.preset import AccelerationPreset
from lora_tools.presets.sampler import SamplerSettings

LCM_SDXL_REPO = "latent-consistency/lcm-lora-sdxl"

LCM_LORA = AccelerationPreset(
    name="lcm-lora-sdxl", family="lcm", steps=4, repo_id=LCM_SDXL_REPO,
    lora_file="pytorch_lora_weights.safetensors", unet_file=None, checkpoint_file=None,
    sampler=SamplerSettings(scheduler="LCMScheduler", timestep_spacing=None, steps=4, steps_range=(2, 8),
                            guidance_scale=1.0, guidance_range=(1.0, 2.0), prediction_type="epsilon",
                            comfy_sampler="lcm", comfy_scheduler="sgm_uniform", comfy_cfg=1.0, comfy_sampling="lcm"),
    known_sha256={"pytorch_lora_weights.safetensors": "a764e6859b6e04047cd761c08ff0cee96413a8e004c9f07707530cd776b19141"},
    label="LCM-LoRA SDXL", source="huggingface.co/latent-consistency/lcm-lora-sdxl (model card); diffusers docs inference_with_lcm; "
                                  "arXiv:2311.05556; Fooocus set_lcm_defaults")

ROWS: tuple[AccelerationPreset, ...] = (LCM_LORA,)
