"""SDXL-Lightning (``ByteDance/SDXL-Lightning``): 1/2/4/8 steps; 1 step is an x0 UNet only.

Facts (from the model card, huggingface.co/ByteDance/SDXL-Lightning): Diffusers ``EulerDiscreteScheduler``
with ``timestep_spacing="trailing"``, steps equal to the checkpoint's, ``guidance_scale=0``; the
1-step model adds ``prediction_type="sample"``. ComfyUI: Euler + ``sgm_uniform``, CFG 1.0, LoRA
strength 1.0 (Fooocus). LoRAs exist for 2, 4 and 8 steps only.
"""

from __future__ import annotations

from lora_tools.presets.preset import AccelerationPreset
from lora_tools.presets.sampler import SamplerSettings

LIGHTNING_REPO = "ByteDance/SDXL-Lightning"

# sha256 at hub revision c9a24f48e1c025556787b0c58dd67a091ece2e44 (as refiners' model list pins them).
_SHA256: dict[int, dict[str, str]] = {
    1: {
        "sdxl_lightning_1step_unet_x0.safetensors": "14d53ad5b440a37fc0f429d595d96bf144c5dd842aa5747383e6098c9dbfa644",
    },
    4: {
        "sdxl_lightning_4step_lora.safetensors": "bf56cf2657efb15e465d81402ed481d1e11c4677e4bcce1bc11fe71ad8506b79",
        "sdxl_lightning_4step_unet.safetensors": "39a90a8a2a25c1372633c1e8eb1a96f85eab937bcb58cfc6ec9baf66242ec23c",
    },
}


def lightning_row(steps: int) -> AccelerationPreset:
    """The SDXL-Lightning row for one step count (1, 2, 4 or 8)."""
    x0 = steps == 1
    suffix = "_x0" if x0 else ""
    return AccelerationPreset(
        name=f"lightning-{steps}step",
        family="lightning",
        steps=steps,
        repo_id=LIGHTNING_REPO,
        lora_file=None if x0 else f"sdxl_lightning_{steps}step_lora.safetensors",
        unet_file=f"sdxl_lightning_{steps}step_unet{suffix}.safetensors",
        checkpoint_file=f"sdxl_lightning_{steps}step{suffix}.safetensors",
        sampler=SamplerSettings(
            scheduler="EulerDiscreteScheduler",
            timestep_spacing="trailing",
            steps=steps,
            guidance_scale=0.0,
            prediction_type="sample" if x0 else "epsilon",
            comfy_sampler="euler",
            comfy_scheduler="sgm_uniform",
            comfy_cfg=1.0,
        ),
        known_sha256=_SHA256.get(steps, {}),
        label=f"SDXL-Lightning {steps}-step" + (" (x0 UNet)" if x0 else ""),
        source="huggingface.co/ByteDance/SDXL-Lightning (model card); arXiv:2402.13929; Fooocus set_lightning_defaults",
        license="openrail++",
    )


#: SDXL-Lightning presets by step count (1, 2, 4, 8).
LIGHTNING: dict[int, AccelerationPreset] = {n: lightning_row(n) for n in (1, 2, 4, 8)}
ROWS: tuple[AccelerationPreset, ...] = tuple(LIGHTNING.values())
