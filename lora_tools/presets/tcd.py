"""TCD-SDXL LoRA (``h1t/TCD-SDXL-LoRA``).

Facts (the model card, huggingface.co/h1t/TCD-SDXL-LoRA; diffusers ``inference_with_tcd_lora.md``, ``api/schedulers/tcd.md``):
``TCDScheduler``, 4-8 steps, ``guidance_scale=0``, ``eta`` 0-1 with 0.3 recommended; ComfyUI through
the ComfyUI-TCD custom node. The file name ``pytorch_lora_weights.safetensors`` is shared with
LCM-LoRA: identify by sha256 or repo.
"""

from __future__ import annotations

from lora_tools.presets.preset import AccelerationPreset
from lora_tools.presets.sampler import SamplerSettings

TCD_SDXL_REPO = "h1t/TCD-SDXL-LoRA"

TCD_LORA = AccelerationPreset(
    name="tcd-sdxl", family="tcd", steps=4, repo_id=TCD_SDXL_REPO,
    lora_file="pytorch_lora_weights.safetensors", unet_file=None, checkpoint_file=None,
    sampler=SamplerSettings(scheduler="TCDScheduler", timestep_spacing=None, steps=4, steps_range=(4, 8),
                            eta=0.3, guidance_scale=0.0, prediction_type="epsilon", comfy_sampler="euler",
                            comfy_scheduler="sgm_uniform", comfy_cfg=1.0, comfy_node="the ComfyUI-TCD custom node"),
    label="TCD-SDXL LoRA", source="huggingface.co/h1t/TCD-SDXL-LoRA (model card); diffusers docs inference_with_tcd_lora; "
                                  "arXiv:2402.19159")

ROWS: tuple[AccelerationPreset, ...] = (TCD_LORA,)
