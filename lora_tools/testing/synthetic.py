"""SDXL-topology models with random weights, tiny or full size, in every layout we read.

The demo, the tests and the benchmarks share these builders. Values are a pure function of
``(seed, key)``, so a single file, a diffusers folder and a standalone UNet built with the same
seed hold the same model, and files are written one tensor at a time (a full-size checkpoint
never sits in memory).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from lora_tools.io.diffusers_folder import ALL_COMPONENTS, write_byte_tokenizer, write_pipeline_configs
from lora_tools.io.safetensors import DTYPE_ALIASES, StreamingWriter, TensorPlan, torch_dtype
from lora_tools.layouts.sdxl import SIZES, TINY, SDXLConfig, to_diffusers
from lora_tools.layouts.table import DIFFUSERS_FOLDERS, Component, KeyMap

Size = Literal["micro", "tiny", "full"]
#: The smallest SDXL topology our tables and diffusers build: tiny's widths with one transformer block per
#: attention level and two-layer text encoders. A verify or an oracle on it costs seconds, not most of a minute.
MICRO = SDXLConfig(unet=replace(TINY.unet, depths=(0, 1, 1), mid_depth=1), vae=TINY.vae,
                   te1=replace(TINY.te1, layers=2), te2=replace(TINY.te2, layers=2))
#: Marker tensors that change how loaders treat a checkpoint (ComfyUI's and A1111's model detection read them).
MARKERS: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] = {
    "v_pred": ("v_pred", torch.int64, (0,)),
    "ztsnr": ("ztsnr", torch.int64, (0,)),
    "edm_vpred": ("edm_vpred.sigma_max", torch.float32, ()),
}

Progress = Callable[[Iterable[KeyMap]], Iterable[KeyMap]]


def config_for(size: Size | SDXLConfig) -> SDXLConfig:
    if isinstance(size, SDXLConfig):
        return size
    return MICRO if size == "micro" else SIZES[size]


def random_tensor(key: str, shape: tuple[int, ...], *, seed: int = 0) -> torch.Tensor:
    """A float32 tensor for ``key`` that depends only on ``(seed, key)``.

    Norm weights sit around 1, biases around 0, matrices are scaled by ``1/sqrt(fan_in)`` so a
    denoising step on a synthetic model stays finite.
    """
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if key.endswith("logit_scale"):
        return torch.tensor(math.log(100.0))
    gen = torch.Generator().manual_seed((zlib.crc32(key.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF)
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) >= 2:
        return t.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
    if key.endswith(".weight") and _is_norm(key):
        return t.mul_(0.02).add_(1.0)
    return t.mul_(0.02)


def _is_norm(key: str) -> bool:
    module = key.rsplit(".", 2)[-2]
    return "norm" in module or module in ("ln_1", "ln_2", "ln_final", "in_layers.0", "0") or module.startswith("layer_norm")


def _cast(t: torch.Tensor, dtype: str) -> torch.Tensor:
    return t if not t.is_floating_point() else t.to(torch_dtype(dtype))


def checkpoint_plan(cfg: SDXLConfig, components: Iterable[Component], dtype: str) -> list[tuple[str, tuple[int, ...], str]]:
    comps = set(components)
    out: dict[str, tuple[int, ...]] = {}
    for r in cfg.table.rows:
        if r.component in comps:
            out.setdefault(r.sgm_key, r.shape)
    return [(k, s, "I64" if k.endswith("position_ids") else dtype) for k, s in out.items()]


def write_checkpoint(
    path: str | Path,
    size: Size | SDXLConfig = "tiny",
    *,
    seed: int = 0,
    dtype: str = "fp16",
    components: Iterable[Component] = ALL_COMPONENTS,
    markers: Iterable[str] = (),
    metadata: Mapping[str, str] | None = None,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Path:
    """Write a single-file SGM checkpoint (``model.diffusion_model.`` ...), streaming.

    Args:
        size: ``"micro"``, ``"tiny"``, ``"full"`` or an explicit :class:`SDXLConfig`.
        dtype: storage dtype of float tensors (``fp16``, ``bf16``, ``fp32``).
        components: which components to include (``("unet",)`` gives a UNet-only file).
        markers: marker keys to add (``v_pred``, ``ztsnr``, ``edm_vpred``).
        transform: optional ``(key, float32 tensor) -> tensor`` hook, e.g. to perturb a model.
    """
    cfg = config_for(size)
    st_dtype = DTYPE_ALIASES.get(dtype, dtype)
    entries = checkpoint_plan(cfg, components, st_dtype)
    marker_rows = [MARKERS[m] for m in markers]
    plans = [TensorPlan(k, dt, s) for k, s, dt in entries]
    plans += [TensorPlan(k, "I64" if dt == torch.int64 else "F32", s) for k, dt, s in marker_rows]
    it: Iterable = entries if progress is None else progress(entries)
    with StreamingWriter(Path(path), plans, dict(metadata or {})) as w:
        for key, shape, dt in it:
            t = random_tensor(key, shape, seed=seed)
            if transform is not None:
                t = transform(key, t)
            w.write(key, _cast(t, dt))
        for key, dt, shape in marker_rows:
            w.write(key, torch.zeros(shape, dtype=dt) if dt == torch.int64 else torch.tensor(80.0))
        return w.finalize()


def _diffusers_tensors(cfg: SDXLConfig, component: Component, seed: int,
                       transform: Callable[[str, torch.Tensor], torch.Tensor] | None) -> Iterable[tuple[str, torch.Tensor]]:
    cache: tuple[str, torch.Tensor] | None = None
    for r in cfg.table.component_rows(component):
        if r.diffusers is None:
            continue
        if cache is None or cache[0] != r.sgm_key:
            t = random_tensor(r.sgm_key, r.shape, seed=seed)
            cache = (r.sgm_key, transform(r.sgm_key, t) if transform else t)
        yield r.diffusers, to_diffusers(r, cache[1])


def write_component(
    path: str | Path, cfg: SDXLConfig, component: Component, *, seed: int = 0, dtype: str = "fp16",
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    key_prefix: str = "", metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write one component in diffusers layout (e.g. a standalone diffusers UNet file)."""
    st_dtype = DTYPE_ALIASES.get(dtype, dtype)
    rows = [r for r in cfg.table.component_rows(component) if r.diffusers is not None]
    plans = [TensorPlan(key_prefix + r.diffusers, st_dtype, r.diffusers_shape) for r in rows]  # type: ignore[operator]
    with StreamingWriter(Path(path), plans, dict(metadata or {"format": "pt"})) as w:
        for name, t in _diffusers_tensors(cfg, component, seed, transform):
            w.write(key_prefix + name, _cast(t, st_dtype).contiguous())
        return w.finalize()


def write_unet_file(path: str | Path, size: Size | SDXLConfig = "tiny", *, seed: int = 0, dtype: str = "fp16",
                    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Write a standalone UNet in diffusers layout, like ``sdxl_lightning_4step_unet.safetensors``."""
    return write_component(path, config_for(size), "unet", seed=seed, dtype=dtype, transform=transform)


def write_diffusers_folder(path: str | Path, size: Size | SDXLConfig = "tiny", *, seed: int = 0, dtype: str = "fp16",
                           variant: str | None = None,
                           transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Write a diffusers ``StableDiffusionXLPipeline`` folder holding the same model as
    :func:`write_checkpoint` with the same seed."""
    cfg = config_for(size)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    suffix = f".{variant}" if variant else ""
    for comp in ALL_COMPONENTS:
        folder = root / DIFFUSERS_FOLDERS[comp]
        folder.mkdir(exist_ok=True)
        stem = "diffusion_pytorch_model" if comp in ("unet", "vae") else "model"
        write_component(folder / f"{stem}{suffix}.safetensors", cfg, comp, seed=seed, dtype=dtype, transform=transform)
    write_pipeline_files(root, cfg)
    return root


def write_pipeline_files(root: Path, cfg: SDXLConfig) -> None:
    """Configs and byte tokenizers of a synthetic SDXL diffusers folder."""
    write_pipeline_configs(root, cfg)
    for name, te in (("tokenizer", cfg.te1), ("tokenizer_2", cfg.te2)):
        write_byte_tokenizer(root / name, te.vocab, te.positions)
