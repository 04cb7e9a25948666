"""One image through a pipeline with a preset's settings, timed to the last kernel: the steps, the
VAE decode apart, and a NaN anywhere reported as where it appeared."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lora_tools.errors import NonFiniteError
from lora_tools.presets.sampler import SamplerSettings
from lora_tools.verify.sampler import build_scheduler, quiet_diffusers

__all__ = ["Job", "JobResult", "Rendered", "StagedRun", "prepare", "render", "render_staged"]


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


@dataclass(frozen=True)
class Job:
    """One image of a staged run: ``prompt`` with ``seed`` and ``sampler``; ``where`` names the model in errors;
    ``step_done(done, total)`` is called after each UNet step."""

    prompt: str
    seed: int
    sampler: SamplerSettings
    where: str
    step_done: Callable[[int, int], None] | None = None


@dataclass
class JobResult:
    """A job's image (``None`` when it failed), its failure, and the scheduler it ran (timesteps, config)."""

    rendered: Rendered | None
    error: NonFiniteError | None
    scheduler: Any


@dataclass
class StagedRun:
    """The results of :func:`render_staged`, one per job in order, and the seconds ``torch.compile`` took."""

    results: list[JobResult]
    compile_seconds: float | None = None


def render_staged(parts: Any, jobs: Sequence[Job], size: tuple[int, int],
                  compile_unet: Callable[[Any], Any] | None = None) -> StagedRun:
    """Render ``jobs`` at ``size`` (width, height) with one model in memory at a time: the text encoders encode
    every prompt, then the UNet samples every job, then the VAE decodes every latent
    (:class:`lora_tools.verify.pipeline.ModelParts` loads each model for its stage and drops the others). The images
    are those :func:`render` gives with the whole pipeline in memory, bit for bit: the same pipeline call, given
    the prompt embeddings its own ``encode_prompt`` made. ``compile_unet(unet)`` replaces the UNet once loaded; the
    first job is then run once untimed (the compile time is reported apart). NaN or Inf is a job's failure, not an
    exception. Every model is dropped at the end.
    """
    import torch

    pipe = parts.pipe
    device = torch.device(parts.components.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    guided = any(j.sampler.guidance_scale > 1 for j in jobs)
    parts.use("text_encoder", "text_encoder_2")
    embeds: dict[str, tuple[dict[str, Any], float]] = {}
    with torch.inference_mode(), quiet_diffusers():
        for prompt in dict.fromkeys(j.prompt for j in jobs):
            sync()
            start = time.perf_counter()
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                                              do_classifier_free_guidance=guided)
            sync()
            embeds[prompt] = ({"prompt_embeds": pos, "negative_prompt_embeds": neg, "pooled_prompt_embeds": pooled,
                               "negative_pooled_prompt_embeds": neg_pooled}, time.perf_counter() - start)
    parts.use("unet")
    sampled: list[tuple[Any, list[float]] | NonFiniteError] = []
    schedulers: list[Any] = []
    compile_seconds = None
    settings: SamplerSettings | None = None
    with torch.inference_mode(), quiet_diffusers():
        for i, job in enumerate(jobs):
            if job.sampler != settings:
                pipe.scheduler = build_scheduler(job.sampler, pipe.scheduler.config)
                settings = job.sampler
            if i == 0 and compile_unet is not None:
                start = time.perf_counter()
                pipe.unet = compile_unet(pipe.unet)
                _sample(pipe, job, embeds[job.prompt][0], size, None)
                sync()
                compile_seconds = time.perf_counter() - start
            stamps: list[float] = []

            def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any], job: Job = job,
                        stamps: list[float] = stamps) -> dict[str, Any]:
                sync()
                stamps.append(time.perf_counter())
                if job.step_done is not None:
                    job.step_done(len(stamps), job.sampler.steps)
                return kwargs

            sync()
            start = time.perf_counter()
            latents = _sample(pipe, job, embeds[job.prompt][0], size, on_step)
            schedulers.append(pipe.scheduler)
            steps = [b - a for a, b in itertools.pairwise([start, *stamps])]
            if steps:
                steps[0] += embeds[job.prompt][1]
            if not torch.isfinite(latents).all():
                sampled.append(NonFiniteError(f"{job.where}: NaN or Inf in the latents after the UNet "
                                              f"(prompt {job.prompt!r}, seed {job.seed})."))
            else:
                sampled.append((latents, steps))
    parts.use("vae")
    results: list[JobResult] = []
    with torch.inference_mode(), quiet_diffusers():
        vae = pipe.vae
        for job, one, scheduler in zip(jobs, sampled, schedulers, strict=True):
            if isinstance(one, NonFiniteError):
                results.append(JobResult(None, one, scheduler))
                continue
            latents, steps = one
            sync()
            start = time.perf_counter()
            decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            sync()
            decode = time.perf_counter() - start
            if not torch.isfinite(decoded).all():
                results.append(JobResult(None, NonFiniteError(f"{job.where}: NaN or Inf in the VAE decode (prompt "
                                                              f"{job.prompt!r}, seed {job.seed})."), scheduler))
                continue
            rendered = Rendered(latents.float().cpu(), decoded.float().cpu(), sum(steps) + decode, steps, decode)
            results.append(JobResult(rendered, None, scheduler))
    parts.use()
    return StagedRun(results, compile_seconds)


def _sample(pipe: Any, job: Job, embeds: dict[str, Any], size: tuple[int, int],
            on_step: Callable[..., dict[str, Any]] | None) -> Any:
    """The job's final latents: the pipeline's own call, with the prompt embeddings given."""
    import torch

    generator = torch.Generator("cpu").manual_seed(job.seed)
    return pipe(generator=generator, width=size[0], height=size[1], output_type="latent",
                callback_on_step_end=on_step, **embeds, **job.sampler.call_kwargs()).images
