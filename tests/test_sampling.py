"""The Lightning sampler around a fused UNet: recorded settings in, the right timesteps out."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lora_tools.io.diffusers_folder import component_config
from lora_tools.layouts import TINY
from lora_tools.presets import LIGHTNING
from lora_tools.verify.sampler import build_scheduler, pick_device, random_conditioning, run_sampler, sampler_pipeline

if TYPE_CHECKING:  # importing diffusers' models takes seconds: not at collection
    from diffusers import AutoencoderKL, UNet2DConditionModel

torch.manual_seed(0)


def _models() -> tuple[UNet2DConditionModel, AutoencoderKL]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(component_config(TINY, "unet")).eval()
    vae = AutoencoderKL.from_config(component_config(TINY, "vae")).eval()
    return unet, vae


def test_scheduler_follows_the_recorded_settings() -> None:
    four = LIGHTNING[4].sampler.to_dict()
    s = build_scheduler(four)
    s.set_timesteps(four["steps"])
    assert s.config.timestep_spacing == "trailing" and s.config.prediction_type == "epsilon"
    assert s.timesteps.tolist() == [999, 749, 499, 249]  # trailing: the last step starts at t=249
    one = build_scheduler(LIGHTNING[1].sampler.to_dict())
    assert one.config.prediction_type == "sample"  # the 1-step UNet predicts x0


def test_sampler_runs_without_text_encoders_and_is_deterministic() -> None:
    unet, vae = _models()
    sampler = LIGHTNING[4].sampler.to_dict()
    pipe = sampler_pipeline(unet, vae, sampler)
    cond = random_conditioning(unet.config, seed=3)
    assert cond["prompt_embeds"].shape == (1, 77, unet.config.cross_attention_dim)
    with torch.inference_mode():
        first, images = run_sampler(pipe, sampler, cond, size=64, seed=5)
        again, _ = run_sampler(pipe, sampler, cond, size=64, seed=5, decode=False)
        other, _ = run_sampler(pipe, sampler, cond, size=64, seed=6, decode=False)
    assert first.latents.shape == (1, 4, 8, 8) and torch.isfinite(first.latents).all()
    assert torch.equal(first.latents, again.latents) and not torch.equal(first.latents, other.latents)
    assert images is not None and images[0].size == (64, 64)
    assert pick_device("cpu") == "cpu"
