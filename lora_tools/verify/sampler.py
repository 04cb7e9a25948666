"""The sampler a fused model needs, run with diffusers on the GPU when there is one.

A few-step model only works with its own settings (SDXL-Lightning: Euler, "trailing" timesteps,
its step count, CFG 0, x0 prediction for 1 step; DMD2: LCM with explicit timesteps; ...). These
helpers build a ``StableDiffusionXLPipeline`` around a UNet and a VAE with exactly the settings a
fuse recorded or a preset names (:class:`lora_tools.presets.SamplerSettings`), and time it.

Synthetic models have no real tokenizer, so the pipeline here takes prompt embeddings directly
(:func:`random_conditioning`); the text encoders are not needed to compare or time UNets.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_tools.presets.sampler import SamplerSettings

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers', transformers' and PEFT's own chatter (info lines, loading bars,
    "no LoRA keys for the text encoder" notes) while we drive them: the library never prints."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def pick_device(device: str = "auto") -> str:
    """``cuda`` when a GPU is there and ``device`` is ``auto``, else ``device`` (``cpu`` without a GPU)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    from lora_tools.errors import DeviceError, Hint

    way_out = Hint("device", "to run elsewhere", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise DeviceError(f"device 'cuda' is not available: {why}", hint=way_out)
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("device 'mps' is not available: it needs Apple silicon and a torch built with MPS",
                          hint=way_out)
    return device


def settings_of(sampler: SamplerSettings | Mapping[str, Any]) -> SamplerSettings:
    """``sampler`` as :class:`SamplerSettings` (a record's dict, old ones included, is read)."""
    return sampler if isinstance(sampler, SamplerSettings) else SamplerSettings.from_dict(sampler)


def build_scheduler(sampler: SamplerSettings | Mapping[str, Any], base_config: Mapping[str, Any] | None = None) -> Any:
    """Build the settings' diffusers scheduler over a base model's scheduler config, quietly.

    Args:
        sampler: the settings (or a record's dict of them).
        base_config (`Mapping`, *optional*): the base pipeline's ``scheduler.config``; the SDXL base
            config when omitted.

    Returns:
        A diffusers scheduler of class ``sampler.scheduler`` with ``sampler.scheduler_options()`` applied.
    """
    from lora_tools.io.diffusers_folder import SCHEDULER_CONFIG

    settings = settings_of(sampler)
    with quiet_diffusers():  # "config attributes ... will be ignored": Euler-only keys of the base config
        import diffusers

        cls = getattr(diffusers, settings.scheduler)
        config = {k: v for k, v in dict(base_config if base_config is not None else SCHEDULER_CONFIG).items()
                  if not k.startswith("_")}
        return cls.from_config(config, **settings.scheduler_options())


def timesteps_run(sampler: SamplerSettings | Mapping[str, Any], base_config: Mapping[str, Any] | None = None) -> list[int]:
    """The timesteps the built scheduler actually runs (what the pipeline's ``set_timesteps`` gives)."""
    settings = settings_of(sampler)
    scheduler = build_scheduler(settings, base_config)
    with quiet_diffusers():  # LCM warns that DMD2's timesteps are not its own: they are on purpose
        if settings.timesteps is not None:
            scheduler.set_timesteps(timesteps=list(settings.timesteps))
        else:
            scheduler.set_timesteps(settings.steps)
    return [int(t) for t in scheduler.timesteps.tolist()]


def sampler_pipeline(unet: Any, vae: Any, sampler: SamplerSettings | Mapping[str, Any]) -> Any:
    """A ``StableDiffusionXLPipeline`` without text encoders (prompts come as embeddings)."""
    from diffusers import StableDiffusionXLPipeline

    with quiet_diffusers():
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=build_scheduler(sampler))
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]  # diffusers' lazy exports hide the method from mypy
    return pipe


def random_conditioning(unet_config: Mapping[str, Any], *, batch: int = 1, seed: int = 0, device: str = "cpu",
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Seeded prompt and pooled embeddings (77 tokens) of the widths a UNet's config asks for."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pooled_width = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    embeds = torch.randn(batch, 77, unet_config["cross_attention_dim"], generator=g)
    pooled = torch.randn(batch, pooled_width, generator=g)
    dtype = dtype or torch.float32
    return {"prompt_embeds": embeds.to(device=device, dtype=dtype),
            "pooled_prompt_embeds": pooled.to(device=device, dtype=dtype)}


@dataclass(frozen=True)
class SampleRun:
    """Latents (and images) of one sampler call, and how long it took."""

    latents: torch.Tensor
    seconds: float


def run_sampler(pipe: Any, sampler: SamplerSettings | Mapping[str, Any], conditioning: Mapping[str, torch.Tensor],
                *, size: int, seed: int = 0, decode: bool = True) -> tuple[SampleRun, Any]:
    """One call of the pipeline with the recorded steps and guidance, timed to the last kernel.

    Returns the final latents (before the VAE) and the decoded images (PIL, or ``None`` without
    ``decode``).
    """
    import torch

    device = pipe.unet.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    latents_shape = (conditioning["prompt_embeds"].shape[0], pipe.unet.config.in_channels,
                     size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    latents = torch.randn(latents_shape, generator=generator).to(device, pipe.unet.dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with quiet_diffusers():
        out = pipe(**conditioning, latents=latents, **settings_of(sampler).call_kwargs(), height=size, width=size,
                   output_type="latent")
    final = out.images
    images = None
    if decode:
        images = pipe.image_processor.postprocess(_decode(pipe, final), output_type="pil")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return SampleRun(final.float().cpu(), time.perf_counter() - start), images


def _decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        scaled = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        return pipe.vae.decode(scaled, return_dict=False)[0]
