"""DMD2 SDXL (``tianweiy/DMD2``).

Facts (from the model card snippet, huggingface.co/tianweiy/DMD2): the 4-step LoRA is fused at 1.0
and sampled with ``LCMScheduler``, ``guidance_scale=0`` and explicit ``timesteps=[999, 749, 499, 249]``
("LCMScheduler's default timesteps are different from the one we used for training"); the 1-step
UNet with ``timesteps=[399]``, shipped as a ``.bin`` pickle (load weights-only). The author suggests
LoRA strength 0.5-0.75 on fine-tuned community checkpoints (tianweiy/DMD2 issue 5).
"""

from __future__ import annotations

from lora_tools.presets.preset import AccelerationPreset
from lora_tools.presets.sampler import SamplerSettings

DMD2_REPO = "tianweiy/DMD2"
_SOURCE = "huggingface.co/tianweiy/DMD2 (model card); github.com/tianweiy/DMD2 issue 5; arXiv:2405.14867"

DMD2_4STEP = AccelerationPreset(
    name="dmd2-4step", family="dmd2", steps=4, repo_id=DMD2_REPO,
    lora_file="dmd2_sdxl_4step_lora.safetensors", unet_file=None, checkpoint_file=None,
    extra_files=("dmd2_sdxl_4step_lora_fp16.safetensors",),
    sampler=SamplerSettings(scheduler="LCMScheduler", timestep_spacing=None, steps=4, timesteps=(999, 749, 499, 249),
                            guidance_scale=0.0, prediction_type="epsilon", lora_strength=1.0,
                            strength_range=(0.5, 0.75), comfy_sampler="lcm", comfy_scheduler="sgm_uniform",
                            comfy_cfg=1.0, comfy_sampling="lcm"),
    label="DMD2 SDXL 4-step LoRA", source=_SOURCE)

DMD2_1STEP = AccelerationPreset(
    name="dmd2-1step", family="dmd2", steps=1, repo_id=DMD2_REPO,
    lora_file=None, unet_file="dmd2_sdxl_1step_unet_fp16.bin", checkpoint_file=None, pickle=True,
    sampler=SamplerSettings(scheduler="LCMScheduler", timestep_spacing=None, steps=1, timesteps=(399,),
                            guidance_scale=0.0, prediction_type="epsilon", comfy_sampler="lcm",
                            comfy_scheduler="sgm_uniform", comfy_cfg=1.0, comfy_sampling="lcm",
                            comfy_node="a custom scheduler node (starts at t=399)"),
    label="DMD2 SDXL 1-step UNet", source=_SOURCE)

ROWS: tuple[AccelerationPreset, ...] = (DMD2_4STEP, DMD2_1STEP)
