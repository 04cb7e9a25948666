"""One image through a pipeline with a preset's settings, timed to the last kernel: the steps, the
VAE decode apart, and a NaN anywhere reported as where it appeared."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_tools.errors import NonFiniteError
from lora_tools.presets.sampler import SamplerSettings
from lora_tools.verify.sampler import build_scheduler, quiet_diffusers

__all__ = ["Rendered", "prepare", "render"]


@dataclass(frozen=True)
class Rendered:
    """One rendered image.

    Attributes:
        latents: the final latents (fp32, on the CPU), before the VAE.
        image: the decoded image tensor (fp32, on the CPU, values in [-1, 1]).
        seconds: prompt encoding, every step and the decode, end to end.
        step_seconds: one entry per UNet step (the first includes the prompt encoding).
        decode_seconds: the VAE decode alone.
    """

    latents: Any
    image: Any
    seconds: float
    step_seconds: list[float]
    decode_seconds: float


def prepare(pipe: Any, sampler: SamplerSettings) -> None:
    """Give ``pipe`` the settings' scheduler over its own config, and an fp32 VAE (SDXL's overflows in fp16)."""
    import torch

    pipe.scheduler = build_scheduler(sampler, pipe.scheduler.config)
    with quiet_diffusers():
        pipe.vae.to(torch.float32)


def render(pipe: Any, sampler: SamplerSettings, prompt: str, seed: int, size: tuple[int, int], where: str,
           step_done: Callable[[int, int], None] | None = None) -> Rendered:
    """Render ``prompt`` with ``seed`` (CPU generator: the same noise on every device) at ``size`` (width, height).
    ``step_done(done, total)`` is called after each UNet step.

    Raises:
        [`NonFiniteError`]: NaN or Inf in the latents after the UNet or in the decoded image; the
            message names ``where`` (the model), the prompt and the seed.
    """
    import torch

    device = pipe.unet.device
    stamps: list[float] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        sync()
        stamps.append(time.perf_counter())
        if step_done is not None:
            step_done(len(stamps), sampler.steps)
        return kwargs

    generator = torch.Generator("cpu").manual_seed(seed)
    sync()
    start = time.perf_counter()
    with torch.inference_mode(), quiet_diffusers():
        latents = pipe(prompt=prompt, generator=generator, width=size[0], height=size[1], output_type="latent",
                       callback_on_step_end=on_step, **sampler.call_kwargs()).images
        if not torch.isfinite(latents).all():
            raise NonFiniteError(f"{where}: NaN or Inf in the latents after the UNet (prompt {prompt!r}, seed {seed}).")
        sync()
        before_decode = time.perf_counter()
        vae = pipe.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        sync()
    end = time.perf_counter()
    if not torch.isfinite(decoded).all():
        raise NonFiniteError(f"{where}: NaN or Inf in the VAE decode (prompt {prompt!r}, seed {seed}).")
    steps = [b - a for a, b in itertools.pairwise([start, *stamps])]
    return Rendered(latents.float().cpu(), decoded.float().cpu(), end - start, steps, end - before_decode)
