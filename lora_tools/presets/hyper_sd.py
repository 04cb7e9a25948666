"""Hyper-SD SDXL (``ByteDance/Hyper-SD``).

Facts (from the Hyper-SD model card, huggingface.co/ByteDance/Hyper-SD): the N-step LoRAs use
``DDIMScheduler(timestep_spacing="trailing")``, steps = N, ``guidance_scale=0``; ByteDance's ComfyUI
workflows use DDIM (or Euler) + ``sgm_uniform``; SDXL LoRAs fuse at 1.0 (Fooocus uses the 4-step
LoRA at 0.8). The 1-step LoRA is "unified" (1-8 steps) with ``TCDScheduler`` and ``eta`` (1.0 for
one step), through the ComfyUI-TCD node. The 1-step UNet uses ``LCMScheduler`` with
``timesteps=[800]`` and guidance 0, through a custom scheduler node in ComfyUI (it starts at 800,
not 999). The CFG-preserved 8/12-step LoRAs take CFG about 5-8 [I].
"""

from __future__ import annotations

from lora_tools.presets.preset import AccelerationPreset
from lora_tools.presets.sampler import SamplerSettings

HYPER_SD_REPO = "ByteDance/Hyper-SD"

# A third-party pinned model list (refiners'), cross-checked against its LCM value.
_SHA256 = {
    "Hyper-SDXL-1step-lora.safetensors": "c912df184c5116792d2c604d26c6bc2aa916685f4a793755255cda1c43a3c78a",
    "Hyper-SDXL-4steps-lora.safetensors": "12f81a27d00a751a40d68fd15597091896c5a90f3bd632fb6c475607cbdad76e",
    "Hyper-SDXL-8steps-lora.safetensors": "ca689190e8c46038550384b5675488526cfe5a40d35f82b27acb75c100f417c1",
    "Hyper-SDXL-8steps-CFG-lora.safetensors": "55b51334c85061afff5eff7c550b61963c8b8607a5868bbe4f26db49374719b1",
    "Hyper-SDXL-12steps-CFG-lora.safetensors": "0b97f447b5878323a28fbe7c51ba7acebd21f4d77552ba77b04b11c8911825b6",
}
_SOURCE = "huggingface.co/ByteDance/Hyper-SD (model card); Fooocus set_hyper_sd_defaults; arXiv:2404.13686"


def _known(*files: str) -> dict[str, str]:
    return {f: _SHA256[f] for f in files if f in _SHA256}


def _n_step(steps: int) -> AccelerationPreset:
    lora = f"Hyper-SDXL-{steps}steps-lora.safetensors"
    return AccelerationPreset(
        name=f"hyper-sd-{steps}step", family="hyper-sd", steps=steps, repo_id=HYPER_SD_REPO,
        lora_file=lora, unet_file=None, checkpoint_file=None,
        sampler=SamplerSettings(scheduler="DDIMScheduler", timestep_spacing="trailing", steps=steps,
                                guidance_scale=0.0, prediction_type="epsilon", comfy_sampler="ddim",
                                comfy_scheduler="sgm_uniform", comfy_cfg=1.0),
        known_sha256=_known(lora), label=f"Hyper-SDXL {steps}-step LoRA", source=_SOURCE)


def _cfg(steps: int) -> AccelerationPreset:
    lora = f"Hyper-SDXL-{steps}steps-CFG-lora.safetensors"
    return AccelerationPreset(
        name=f"hyper-sd-{steps}step-cfg", family="hyper-sd", steps=steps, repo_id=HYPER_SD_REPO,
        lora_file=lora, unet_file=None, checkpoint_file=None,
        sampler=SamplerSettings(scheduler="DDIMScheduler", timestep_spacing="trailing", steps=steps,
                                guidance_scale=5.0, guidance_range=(5.0, 8.0), prediction_type="epsilon",
                                comfy_sampler="ddim", comfy_scheduler="sgm_uniform", comfy_cfg=5.0),
        known_sha256=_known(lora), label=f"Hyper-SDXL {steps}-step CFG-preserved LoRA",
        source=_SOURCE + "; CFG 5-8 is [I] (sandner.art, a repo docstring)")


ONE_STEP_LORA = AccelerationPreset(
    name="hyper-sd-1step", family="hyper-sd", steps=1, repo_id=HYPER_SD_REPO,
    lora_file="Hyper-SDXL-1step-lora.safetensors", unet_file=None, checkpoint_file=None,
    sampler=SamplerSettings(scheduler="TCDScheduler", timestep_spacing=None, steps=1, steps_range=(1, 8),
                            eta=1.0, guidance_scale=0.0, prediction_type="epsilon", comfy_sampler="euler",
                            comfy_scheduler="sgm_uniform", comfy_cfg=1.0, comfy_node="the ComfyUI-TCD custom node"),
    known_sha256=_known("Hyper-SDXL-1step-lora.safetensors"), label="Hyper-SDXL unified 1-step LoRA (1-8 steps)",
    source=_SOURCE + "; eta 1.0 for one step, lower eta for more detail")

ONE_STEP_UNET = AccelerationPreset(
    name="hyper-sd-1step-unet", family="hyper-sd", steps=1, repo_id=HYPER_SD_REPO,
    lora_file=None, unet_file="Hyper-SDXL-1step-Unet.safetensors",
    checkpoint_file="Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors",
    sampler=SamplerSettings(scheduler="LCMScheduler", timestep_spacing=None, steps=1, timesteps=(800,),
                            guidance_scale=0.0, prediction_type="epsilon", comfy_sampler="lcm",
                            comfy_scheduler="sgm_uniform", comfy_cfg=1.0, comfy_sampling="lcm",
                            comfy_node="a custom scheduler node (starts at t=800)"),
    label="Hyper-SDXL 1-step UNet", source=_SOURCE)

ROWS: tuple[AccelerationPreset, ...] = (
    ONE_STEP_LORA, _n_step(2), _n_step(4), _n_step(8), _cfg(8), _cfg(12), ONE_STEP_UNET)
