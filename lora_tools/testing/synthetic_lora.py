"""Synthetic LoRA files for every format we read, shaped like real ones.

:func:`write_lightning_lora` makes a file shaped exactly like ``sdxl_lightning_Nstep_lora``:
kohya envelope around diffusers module names, the 788 modules of the LCM-LoRA SDXL target
list, rank 64, alpha 8, fp16, UNet only.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch

from lora_tools.io.safetensors import DTYPE_ALIASES, torch_dtype
from lora_tools.layouts.sdxl import SDXLConfig
from lora_tools.layouts.table import Component
from lora_tools.layouts.targets import ModuleTarget, TargetIndex
from lora_tools.lora.adapter import LoraAdapter, LoraModule
from lora_tools.lora.formats import get_format
from lora_tools.lora.save import plan_save, spell_module, spelled_tensors, write_plan
from lora_tools.lora.spelling import spell_key
from lora_tools.testing.synthetic import Size, config_for

#: Format names (see :data:`lora_tools.lora.formats.FORMATS`; ``kohya-sgm``/``peft-raw`` are old aliases).
LoraFormat = Literal["kohya", "kohya-diffusers", "diffusers", "peft", "comfy", "diffusers-legacy", "kohya-sgm", "peft-raw"]
Algorithm = Literal["lora", "lora-tucker", "loha", "lokr", "dora"]
TargetSet = Literal["lightning", "attn", "all"]

#: The LCM-LoRA SDXL training script's default targets (diffusers' ``train_lcm_distill_lora_sdxl.py``): 788 modules on SDXL.
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
_ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def select_targets(cfg: SDXLConfig, targets: TargetSet, components: Iterable[Component] = ("unet",)) -> list[ModuleTarget]:
    """The base modules a synthetic LoRA adapts."""
    comps = set(components)
    out = []
    for t in TargetIndex(cfg.table).targets:
        if t.component not in comps:
            continue
        name = t.diffusers_module
        if t.component != "unet":
            out.append(t)
        elif targets == "all" or name.endswith(LCM_TARGETS if targets == "lightning" else _ATTN_TARGETS):
            out.append(t)
    return out


def _gen(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((zlib.crc32(name.encode()) ^ (seed * 0x85EBCA6B)) & 0x7FFFFFFF)


def module_factors(target: ModuleTarget, algorithm: Algorithm, rank: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random factor tensors (float32) for one module, by role name."""
    g = _gen(seed, target.diffusers_key)
    shape = target.shape
    out, fan_in = shape[0], math.prod(shape[1:])
    conv = len(shape) == 4
    r = rank if algorithm in ("lora", "dora") else min(rank, out, fan_in)

    def rnd(*s: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(s, generator=g) * scale

    if algorithm in ("lora", "dora") or (algorithm == "lora-tucker" and not (conv and shape[2] > 1)):
        down = rnd(r, *shape[1:]) if conv else rnd(r, fan_in)
        up = rnd(out, r, 1, 1) if conv else rnd(out, r)
        f = {"down": down, "up": up}
        if algorithm == "dora":
            f["dora_scale"] = (torch.rand((out, 1) + ((1, 1) if conv else ()), generator=g) + 0.5)
        return f
    if algorithm == "lora-tucker":
        return {"down": rnd(r, shape[1], 1, 1), "mid": rnd(r, r, shape[2], shape[3]), "up": rnd(out, r, 1, 1)}
    if algorithm == "loha":
        return {"w1a": rnd(out, r), "w1b": rnd(r, fan_in), "w2a": rnd(out, r), "w2b": rnd(r, fan_in)}
    if algorithm == "lokr":
        o1 = 2 if out % 2 == 0 else 1
        i1 = 2 if shape[1] % 2 == 0 else 1
        o2, rest = out // o1, fan_in // i1
        r2 = min(rank, o2, rest)
        return {"w1": rnd(o1, i1, scale=1.0), "w2a": rnd(o2, r2), "w2b": rnd(r2, rest)}
    raise ValueError(f"unknown algorithm {algorithm!r}")


#: Roles each algorithm can hold (what :func:`module_keys` spells).
_ALGORITHM_ROLES: dict[str, tuple[str, ...]] = {
    "lora": ("down", "up", "mid", "dora_scale", "w1a", "w1b", "w2a", "w2b"),
    "lora-tucker": ("down", "up", "mid", "dora_scale", "w1a", "w1b", "w2a", "w2b"),
    "dora": ("down", "up", "mid", "dora_scale", "w1a", "w1b", "w2a", "w2b"),
    "loha": ("down", "up", "mid", "dora_scale", "w1a", "w1b", "w2a", "w2b"),
    "lokr": ("w1", "w1a", "w1b", "w2", "w2a", "w2b"),
}


def _target_module(target: ModuleTarget) -> LoraModule:
    """A factor-less module naming ``target`` in diffusers names (to spell its keys)."""
    return LoraModule(target.component, target.diffusers_module, "lora", {}, None, 0, None,  # type: ignore[arg-type]
                      naming="diffusers", spelling="peft", envelope=None)


def module_keys(target: ModuleTarget, fmt: LoraFormat, algorithm: Algorithm) -> tuple[dict[str, str], str | None]:
    """Tensor key of each role for one module in ``fmt``, and the alpha key (or ``None``), as
    :func:`~lora_tools.lora.save.save_lora` spells them."""
    f = get_format(fmt)
    envelope, name, spelling = spell_module(_target_module(target), f)
    keys = {}
    for role in _ALGORITHM_ROLES[algorithm]:
        key = spell_key(envelope, name, role, spelling, "lokr" if algorithm == "lokr" else "lora")
        if key is not None:
            keys[role] = key
    alpha_key = spell_key(envelope, name, "alpha", spelling) if f.alphas == "tensor" else None
    return keys, alpha_key


def make_adapter(
    size: Size | SDXLConfig = "tiny",
    *,
    algorithm: Algorithm = "lora",
    targets: TargetSet = "attn",
    components: Iterable[Component] = ("unet",),
    rank: int = 4,
    alpha: float | None = None,
    dtype: str = "fp32",
    seed: int = 0,
) -> LoraAdapter:
    """A synthetic LoRA in memory (diffusers module names; save it in any format)."""
    cfg = config_for(size)
    st_dtype = torch_dtype(DTYPE_ALIASES.get(dtype, dtype))
    factors: dict[tuple[Component, str], dict[str, torch.Tensor]] = {}
    alphas: dict[tuple[Component, str], float | None] = {}
    for t in select_targets(cfg, targets, components):
        key = (t.component, t.diffusers_module)
        factors[key] = {role: v.to(st_dtype) for role, v in module_factors(t, algorithm, rank, seed=seed).items()}
        alphas[key] = alpha
    return LoraAdapter.from_tensors(factors, alphas=alphas, format="diffusers")


def make_lora(
    size: Size | SDXLConfig = "tiny",
    *,
    fmt: LoraFormat = "kohya-diffusers",
    algorithm: Algorithm = "lora",
    targets: TargetSet = "attn",
    components: Iterable[Component] = ("unet",),
    rank: int = 4,
    alpha: float | None = None,
    dtype: str = "fp32",
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Build the tensors and metadata of a synthetic LoRA (not yet written), spelled by ``save_lora``'s rules."""
    adapter = make_adapter(size, algorithm=algorithm, targets=targets, components=components, rank=rank,
                           alpha=alpha, dtype=dtype, seed=seed)
    return spelled_tensors(adapter, format=fmt, metadata={"format": "pt"})


def write_lora(path: str | Path, size: Size | SDXLConfig = "tiny", *, fmt: LoraFormat = "kohya-diffusers",
               overwrite: bool = True, **kwargs: object) -> Path:
    """Write a synthetic LoRA through :func:`~lora_tools.lora.save.save_lora`'s plan and writer; keyword
    arguments as in :func:`make_lora`. Like a trainer's file, it carries no ``loratool`` record."""
    adapter = make_adapter(size, **kwargs)  # type: ignore[arg-type]
    return write_plan(plan_save(adapter, format=fmt, metadata={"format": "pt"}), path, overwrite=overwrite)


def write_lightning_lora(path: str | Path, size: Size | SDXLConfig = "tiny", *, seed: int = 0,
                         rank: int = 64, alpha: float = 8.0) -> Path:
    """A LoRA shaped like ``sdxl_lightning_Nstep_lora.safetensors`` (788 modules on full SDXL)."""
    return write_lora(path, size, fmt="kohya-diffusers", algorithm="lora", targets="lightning",
                      components=("unet",), rank=rank, alpha=alpha, dtype="fp16", seed=seed)
