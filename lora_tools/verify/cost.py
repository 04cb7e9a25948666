"""What a verify run will cost, known before anything loads: the model's native image size (from its UNet's
width) and a rough CPU time (from its UNet's parameter count, the image size and the number of UNet steps)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_tools.io.safetensors import SafetensorsHeader

#: SDXL's UNet: the width of its first block (``conv_in``) and its parameter count.
SDXL_WIDTH = 320
SDXL_UNET_PARAMS = 2_567_463_684

#: The native size of an SDXL-sized UNet, and the size for a test-sized one (narrower than SDXL: random weights,
#: nothing to look at, so the cheapest size that still goes through every down and up block).
NATIVE_SIZE = (1024, 1024)
TEST_SIZE = (64, 64)

#: Seconds for one UNet step of SDXL at 1024x1024 in fp32 on a CPU of a few cores (measured order of magnitude:
#: the prediction says "about" and is for choosing, not for promising).
CPU_SECONDS_PER_SDXL_STEP = 30.0

#: The floor of one UNet step on a CPU whatever the model's size (kernel launches, attention set-up), and the
#: cost of one render beyond its steps (text encoders, VAE decode) at the smallest sizes: measured on the
#: synthetic tiny model.
MIN_CPU_STEP_SECONDS = 1.0
CPU_SECONDS_PER_RENDER = 1.0

_CONV_IN = ("conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight")
_UNET_PREFIXES = ("model.diffusion_model.", "")


@dataclass(frozen=True)
class UnetScale:
    """The UNet's width (``conv_in`` output channels; ``None`` when not found) and parameter count."""

    width: int | None
    params: int

    @property
    def test_sized(self) -> bool:
        return self.width is not None and self.width < SDXL_WIDTH

    @property
    def native_size(self) -> tuple[int, int]:
        """1024x1024 for an SDXL-sized (or unknown) UNet, :data:`TEST_SIZE` for a narrower test-sized one."""
        return TEST_SIZE if self.test_sized else NATIVE_SIZE


def unet_scale(header: SafetensorsHeader) -> UnetScale:
    """Read the UNet's width and parameter count from a single file's or a diffusers UNet's header."""
    single = any(k.startswith("model.diffusion_model.") for k in header.tensors)
    prefix = "model.diffusion_model." if single else ""
    width = None
    for key in _CONV_IN:
        info = header.tensors.get(key)
        if info is not None and info.shape:
            width = int(info.shape[0])
            break
    params = sum(t.numel for t in header.tensors.values() if t.name.startswith(prefix))
    return UnetScale(width, params or SDXL_UNET_PARAMS)


def predicted_cpu_seconds(scale: UnetScale, size: tuple[int, int], unet_steps: int, renders: int) -> float:
    """About how long ``renders`` images of ``unet_steps`` UNet evaluations in all, at ``size``, take in fp32 on a
    CPU (model loading apart)."""
    pixels = size[0] * size[1] / (NATIVE_SIZE[0] * NATIVE_SIZE[1])
    step = max(MIN_CPU_STEP_SECONDS, CPU_SECONDS_PER_SDXL_STEP * pixels * scale.params / SDXL_UNET_PARAMS)
    return step * unet_steps + CPU_SECONDS_PER_RENDER * renders * max(1.0, pixels * 16)


def header_path(model: Path, kind: str) -> Path:
    """The file whose header holds the UNet of ``model`` (a diffusers folder's UNet file)."""
    return model / "unet" / "diffusion_pytorch_model.safetensors" if kind == "diffusers" else model
