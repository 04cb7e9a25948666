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


# ---------------------------------------------------------------------------------------------------- memory

#: Resident memory of the process beside the models (Python, torch, diffusers, transformers, the allocator's
#: slack): full-size SDXL in fp32 at 256x256 peaks at 11.46 GB with 10.27 GB of UNet weights (benchmarks/
#: verify_memory.py), a micro model at 0.56 GB.
RUNTIME_BYTES = 900_000_000
#: Activations of one UNet evaluation per image pixel and batch item, for an SDXL-wide UNet in fp32 (scaled by
#: the UNet's width and the dtype's size): an estimate from the tensor sizes (the widest feature maps, 320
#: channels at 1/8 of the image, several held at once), not measured at 1024x1024 on this 2-core machine.
UNET_BYTES_PER_PIXEL = 1200.0
#: Activations of the VAE decode per image pixel for SDXL's VAE (128 channels at full resolution), in fp32:
#: measured 4200 at 512x512 (1.1 GB).
VAE_BYTES_PER_PIXEL = 4400.0
#: The environment variable that overrides the available memory (bytes, or with a K/M/G/T suffix): for tests, and
#: for a machine whose limit the kernel's count does not show (a container's cgroup).
AVAILABLE_MEMORY_ENV = "LORATOOL_AVAILABLE_MEMORY"

_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class ModelParams:
    """Parameter counts of a model's four components, the largest tensor's element count and the file's bytes per
    element (what loading holds beside the model: one tensor as read and as converted)."""

    unet: int
    vae: int
    te1: int
    te2: int
    largest: int = 0
    file_bytes: int = 2
    vae_width: int = 128
    unet_width: int = SDXL_WIDTH


@dataclass(frozen=True)
class MemoryPrediction:
    """The peak resident memory of a verify run, in bytes, and the stage it happens in."""

    peak: int
    stage: str
    weights: int
    activations: int


def model_params(headers: dict[str, list[SafetensorsHeader]]) -> ModelParams:
    """Parameter counts per component from the headers of each component's files (``"unet"``, ``"vae"``,
    ``"te1"``, ``"te2"``; a single file's header under every component it holds, read by its key prefixes)."""
    from lora_tools.layouts.table import SGM_PREFIXES

    counts: dict[str, int] = {}
    largest, file_bytes, vae_width, unet_width = 0, 2, 128, SDXL_WIDTH
    for comp, hs in headers.items():
        prefix = SGM_PREFIXES[comp]  # type: ignore[index]
        total = 0
        for h in hs:
            single = any(k.startswith(prefix) for k in h.tensors)
            for t in h.tensors.values():
                if single and not t.name.startswith(prefix):
                    continue
                total += t.numel
                if t.numel > largest:
                    largest, file_bytes = t.numel, max(1, t.nbytes // max(1, t.numel))
                if t.name in ("first_stage_model.decoder.conv_in.weight", "decoder.conv_in.weight"):
                    vae_width = int(t.shape[0]) // 4
                if t.name in _CONV_IN:
                    unet_width = int(t.shape[0])
        if hs:
            counts[comp] = total
    return ModelParams(counts.get("unet", SDXL_UNET_PARAMS), counts.get("vae", 0), counts.get("te1", 0),
                       counts.get("te2", 0), largest, file_bytes, vae_width, unet_width)


def headers_of(model: Path, kind: str, base: Path | None = None) -> dict[str, list[SafetensorsHeader]]:
    """The headers of each component's weight files: a single file's under all four, a diffusers folder's per
    component, a standalone UNet's (a pickle has none: SDXL's count stands in) with its ``base``'s for the rest."""
    from lora_tools.io.diffusers_folder import component_weight_files
    from lora_tools.io.safetensors import read_header

    comps = ("unet", "vae", "te1", "te2")
    if kind == "diffusers":
        return {c: [read_header(f) for f in component_weight_files(model, c)] for c in comps}  # type: ignore[arg-type]
    if kind == "unet":
        rest = headers_of(base, "diffusers" if base.is_dir() else "checkpoint") if base is not None else {}
        return rest | {"unet": [read_header(model)] if model.suffix == ".safetensors" else []}
    header = read_header(model)
    return dict.fromkeys(comps, [header])


def predicted_memory(params: ModelParams, dtype: str, size: tuple[int, int], guided: bool) -> MemoryPrediction:
    """The peak resident memory of a verify run that holds one model at a time (text encoders, then the UNet, then
    the VAE in fp32): the largest stage's weights and activations, the runtime, and one tensor being loaded."""
    b = _DTYPE_BYTES[dtype]
    pixels = size[0] * size[1]
    loading = params.largest * (params.file_bytes + 4)
    unet_act = int(UNET_BYTES_PER_PIXEL * pixels * (2 if guided else 1) * params.unet_width / SDXL_WIDTH * b / 4)
    vae_act = int(VAE_BYTES_PER_PIXEL * pixels * params.vae_width / 128)
    stages = {"the text encoders": ((params.te1 + params.te2) * b, 0),
              "the UNet": (params.unet * b, unet_act),
              "the VAE decode": (params.vae * 4, vae_act)}
    stage, (weights, act) = max(stages.items(), key=lambda kv: sum(kv[1]))
    return MemoryPrediction(RUNTIME_BYTES + loading + weights + act, stage, weights, act)


def available_memory() -> int | None:
    """Memory the run may use, in bytes: :data:`AVAILABLE_MEMORY_ENV` when set, else the kernel's MemAvailable
    (``/proc/meminfo``), else psutil's count where it is installed; ``None`` when nothing says.

    Raises:
        [`UsageError`]: the variable is set to something that is not a size.
    """
    import os

    text = os.environ.get(AVAILABLE_MEMORY_ENV)
    if text:
        return _parse_bytes(text)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _parse_bytes(text: str) -> int:
    from lora_tools.errors import UsageError

    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = units.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in units else t)
    except ValueError:
        raise UsageError(f"{AVAILABLE_MEMORY_ENV}={text!r} is not a size (bytes, or a number with K, M, G or T)."
                         ) from None
    return int(value * factor)
