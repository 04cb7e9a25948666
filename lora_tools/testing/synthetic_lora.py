"""Synthetic LoRA files for every format we read, shaped like real ones.

:func:`write_lightning_lora` makes a file shaped exactly like ``sdxl_lightning_Nstep_lora``:
kohya envelope around diffusers module names, the 788 modules of the LCM-LoRA SDXL target
list, rank 64, alpha 8, fp16, UNet only.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Iterable, Literal

import torch

from lora_tools.layouts.sdxl import SDXLConfig
from lora_tools.layouts.targets import ModuleTarget, TargetIndex
from lora_tools.layouts.table import Component, module_of
from lora_tools.safetensors_io import DTYPE_ALIASES, save_tensors, torch_dtype
from lora_tools.testing.synthetic import Size, config_for

LoraFormat = Literal["kohya-diffusers", "kohya-sgm", "comfy", "peft", "peft-raw", "diffusers-legacy"]
Algorithm = Literal["lora", "lora-tucker", "loha", "lokr", "dora"]
TargetSet = Literal["lightning", "attn", "all"]

#: The LCM-LoRA SDXL training script's default targets (domain.md 1.2): 788 modules on SDXL.
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
_ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_PEFT_PREFIX = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}
_KOHYA_PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}


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


_KOHYA_ROLE_SUFFIX = {
    "down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight", "dora_scale": "dora_scale",
    "w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b",
}
_LOKR_ROLE_SUFFIX = {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2", "w2a": "lokr_w2_a", "w2b": "lokr_w2_b"}


def module_keys(target: ModuleTarget, fmt: LoraFormat, algorithm: Algorithm) -> tuple[dict[str, str], str | None]:
    """Tensor key of each role for one module in ``fmt``, and the alpha key (or ``None``)."""
    comp, dmod = target.component, target.diffusers_module
    sgm_mod = module_of(target.sgm_key).split(".", 2)[-1] if comp == "unet" else dmod
    if comp == "unet":
        sgm_mod = module_of(target.sgm_key)[len("model.diffusion_model."):]
    suffixes = _LOKR_ROLE_SUFFIX if algorithm == "lokr" else _KOHYA_ROLE_SUFFIX
    if fmt in ("kohya-diffusers", "kohya-sgm"):
        name = (sgm_mod if fmt == "kohya-sgm" else dmod).replace(".", "_")
        stem = _KOHYA_PREFIX[comp] + name
        return {role: f"{stem}.{sfx}" for role, sfx in suffixes.items()}, f"{stem}.alpha"
    if fmt == "comfy":
        if comp != "unet":
            raise ValueError("synthetic comfy LoRAs are UNet only")
        stem = "diffusion_model." + sgm_mod
        return {role: f"{stem}.{sfx}" for role, sfx in suffixes.items()}, f"{stem}.alpha"
    if fmt in ("peft", "peft-raw"):
        stem = ("base_model.model." if fmt == "peft-raw" else _PEFT_PREFIX[comp]) + dmod
        return {"down": f"{stem}.lora_A.weight", "up": f"{stem}.lora_B.weight",
                "dora_scale": f"{stem}.lora_magnitude_vector"}, None
    if fmt == "diffusers-legacy":
        prefix = _PEFT_PREFIX[comp]
        if comp == "unet" and dmod.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or dmod.endswith("to_out.0"):
            stem, proj = dmod.rsplit(".", 2)[0] if dmod.endswith("to_out.0") else dmod.rsplit(".", 1)[0], \
                "to_out" if dmod.endswith("to_out.0") else dmod.rsplit(".", 1)[1]
            base = f"{prefix}{stem}.processor.{proj}_lora"
            return {"down": f"{base}.down.weight", "up": f"{base}.up.weight"}, None
        inner = "lora_linear_layer" if comp != "unet" else "lora"
        return {"down": f"{prefix}{dmod}.{inner}.down.weight", "up": f"{prefix}{dmod}.{inner}.up.weight"}, None
    raise ValueError(f"unknown format {fmt!r}")


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
    """Build the tensors and metadata of a synthetic LoRA (not yet written)."""
    cfg = config_for(size)
    st_dtype = torch_dtype(DTYPE_ALIASES.get(dtype, dtype))
    tensors: dict[str, torch.Tensor] = {}
    chosen = select_targets(cfg, targets, components)
    for t in chosen:
        factors = module_factors(t, algorithm, rank, seed=seed)
        keys, alpha_key = module_keys(t, fmt, algorithm)
        for role, value in factors.items():
            if role not in keys:
                raise ValueError(f"format {fmt} cannot hold a '{role}' tensor ({algorithm})")
            tensors[keys[role]] = value.to(st_dtype)
        if alpha is not None and alpha_key is not None:
            tensors[alpha_key] = torch.tensor(float(alpha), dtype=st_dtype)
    metadata: dict[str, str] = {}
    if fmt in ("peft", "peft-raw") and alpha is not None:
        comps = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
        meta: dict[str, object] = {}
        for c in components:  # a PEFT LoraConfig per component, as diffusers' save_lora_weights writes it
            meta[f"{comps[c]}.lora_alpha"] = alpha
            meta[f"{comps[c]}.r"] = rank
            meta[f"{comps[c]}.target_modules"] = sorted({_leaf(t.diffusers_module) for t in chosen if t.component == c})
            meta[f"{comps[c]}.use_dora"] = algorithm == "dora"
        metadata["lora_adapter_metadata"] = json.dumps(meta)
    metadata["format"] = "pt"
    return tensors, metadata


def _leaf(module: str) -> str:
    """PEFT target name: the last part of a module path (``to_out.0`` keeps its index)."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def write_lora(path: str | Path, size: Size | SDXLConfig = "tiny", **kwargs: object) -> Path:
    """Write a synthetic LoRA; keyword arguments as in :func:`make_lora`."""
    tensors, metadata = make_lora(size, **kwargs)  # type: ignore[arg-type]
    return save_tensors(path, tensors, metadata)


def write_lightning_lora(path: str | Path, size: Size | SDXLConfig = "tiny", *, seed: int = 0,
                         rank: int = 64, alpha: float = 8.0) -> Path:
    """A LoRA shaped like ``sdxl_lightning_Nstep_lora.safetensors`` (788 modules on full SDXL)."""
    return write_lora(path, size, fmt="kohya-diffusers", algorithm="lora", targets="lightning",
                      components=("unet",), rank=rank, alpha=alpha, dtype="fp16", seed=seed)
