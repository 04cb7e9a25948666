"""Moved to :mod:`lora_tools.verify.sampler`; kept so that old imports keep working."""

from lora_tools.verify.sampler import (SampleRun, pick_device, quiet_diffusers, random_conditioning, run_sampler,
                                       sampler_pipeline, scheduler_for, settings_of)

__all__ = ["SampleRun", "pick_device", "quiet_diffusers", "random_conditioning", "run_sampler", "sampler_pipeline",
           "scheduler_for", "settings_of"]
