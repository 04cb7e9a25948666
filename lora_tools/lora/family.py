"""Which model family a LoRA that does not fit SDXL was made for: SD1.x, SD2.x or Flux.

Header-only: module names and factor shapes. SD1.x and SD2.x share the UNet's block structure
(attention at level 0, four levels, 12 input/output blocks), which SDXL does not have; they differ
in the width of the cross-attention context, the input width of ``attn2.to_k``/``to_v``: 768 (CLIP-L)
in SD1.x, 1024 (OpenCLIP-H) in SD2.x. A Flux LoRA names Flux's own blocks at its root
(``transformer_blocks``/``single_transformer_blocks`` in diffusers names, ``double_blocks``/
``single_blocks`` in BFL's), under any envelope.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from lora_tools.layouts.detect import SD1_HINT, looks_like_sd1

if TYPE_CHECKING:
    from lora_tools.layouts.targets import TargetIndex
    from lora_tools.lora.adapter import LoraAdapter, LoraModule

Family = Literal["sd1.x", "sd2.x", "sd1.x/sd2.x"]

#: The cross-attention context width of each SD family.
CONTEXT_WIDTH: dict[int, Family] = {768: "sd1.x", 1024: "sd2.x"}

#: The sentence said of a LoRA for each family (inspect and the fuse's match use these).
HINTS: dict[Family, str] = {
    "sd1.x": "It looks like an SD1.x LoRA (768-wide cross-attention), which does not fit SDXL.",
    "sd2.x": "It looks like an SD2.x LoRA (1024-wide cross-attention), which does not fit SDXL.",
    "sd1.x/sd2.x": SD1_HINT,
}

_CROSS_KV = re.compile(r"attn2[._]to_[kv]$")
#: Flux block names at a key's root, after any envelope.
_FLUX_KEY = re.compile(
    r"^(?:transformer\.|base_model\.model\.|diffusion_model\.|model\.diffusion_model\.|lora_transformer_|lora_unet_|"
    r"lycoris_)?(?:single_transformer_blocks|transformer_blocks|double_blocks|single_blocks)[._]\d+[._]"
)


def sd_family(modules: Iterable[LoraModule]) -> Family | None:
    """The SD family of LoRA ``modules`` that name SD1.x/SD2.x-only blocks, or ``None``.

    The context width of a cross-attention key/value module decides SD1.x vs SD2.x; without one,
    the answer is ``"sd1.x/sd2.x"``.
    """
    mods = list(modules)
    if not any(m.component == "unet" and looks_like_sd1(m.name) for m in mods):
        return None
    for m in mods:
        if m.component == "unet" and m.kind == "lora" and "down" in m.keys and _CROSS_KV.search(m.name):
            shape = m.factor_shape("down")
            if len(shape) == 2 and shape[1] in CONTEXT_WIDTH:
                return CONTEXT_WIDTH[shape[1]]
    return "sd1.x/sd2.x"


#: What trainers write about the model a LoRA was trained on (kohya sd-scripts, SAI model spec).
BASE_MODEL_KEYS = ("ss_base_model_version", "modelspec.architecture")
_FOREIGN_BASES: tuple[tuple[str, str], ...] = (
    ("sd_v1", "SD1.x"), ("sd_1", "SD1.x"), ("stable-diffusion-v1", "SD1.x"), ("sd_v2", "SD2.x"), ("sd_2", "SD2.x"),
    ("stable-diffusion-v2", "SD2.x"), ("sd3", "SD3"), ("stable-diffusion-v3", "SD3"), ("flux", "Flux"),
)


def metadata_base(metadata: Mapping[str, str]) -> tuple[str, str, str] | None:
    """``(family, key, value)`` when the metadata says the LoRA was trained for a model other than SDXL
    (``ss_base_model_version: sd_v1``, ``modelspec.architecture: stable-diffusion-v1/lora``), else ``None``."""
    for key in BASE_MODEL_KEYS:
        value = str(metadata.get(key, "")).strip()
        low = value.lower()
        if not low or "xl" in low:
            continue
        for prefix, family in _FOREIGN_BASES:
            if low.startswith(prefix):
                return family, key, value
    return None


def sd_hint(modules: Iterable[LoraModule]) -> str | None:
    """The sentence naming the SD family of ``modules`` (see :func:`sd_family`), or ``None``."""
    fam = sd_family(modules)
    return None if fam is None else HINTS[fam]


def context_hint(module: LoraModule) -> str:
    """The sentence for a module that names an SDXL cross-attention weight (2048-wide context) but
    does not fit it: its own context width names the family when it is SD1.x's or SD2.x's."""
    if module.kind == "lora" and "down" in module.keys:
        shape = module.factor_shape("down")
        if len(shape) == 2 and shape[1] in CONTEXT_WIDTH:
            return HINTS[CONTEXT_WIDTH[shape[1]]]
    return SD1_HINT


def foreign_format_name(format: str, modules: Iterable[LoraModule]) -> str:
    """The format name to show for a LoRA of another SD family: sd-scripts' SD1.x/SD2.x files spell
    diffusers block names inside the kohya envelope, which is its plain ``kohya`` format there
    (``kohya-diffusers`` is a distinction SDXL's two block vocabularies make)."""
    if format == "kohya-diffusers" and sd_family(modules) is not None:
        return "kohya"
    return format


def flux_keys(keys: Iterable[str]) -> list[str]:
    """The keys that name Flux blocks (see the module docstring)."""
    return [k for k in keys if _FLUX_KEY.match(k)]


def looks_like_flux(keys: list[str]) -> bool:
    """Whether most of ``keys`` name Flux blocks."""
    return 2 * len(flux_keys(keys)) > len(keys) > 0


def flux_message(source: str, keys: list[str]) -> str:
    """THE sentence said of a Flux LoRA (inspect and the fuse use it)."""
    return f"'{source}' is a Flux LoRA (first key: {flux_keys(keys)[0]}), which does not fit SDXL."


def a1111_version(metadata: Mapping[str, str]) -> tuple[str, str]:
    """What A1111/Forge's built-in LoRA loader takes a LoRA for, and why: ``(SDXL | SD2 | SD1 | Unknown, reason)``.

    Its rule (``extensions-builtin/Lora/network.py``): ``ss_base_model_version`` starting with ``sdxl_`` is SDXL;
    else ``ss_v2`` equal to ``True`` is SD2; else any metadata at all is SD1; none is Unknown. By default it lists a
    LoRA only with checkpoints of its version (Unknown: with every one, unless hidden by a setting).
    """
    version = str(metadata.get("ss_base_model_version", ""))
    if version.startswith("sdxl_"):
        return "SDXL", f"ss_base_model_version '{version}'"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2", "ss_v2 'True'"
    if metadata:
        return "SD1", ("metadata without an sdxl_ ss_base_model_version" if not version
                       else f"ss_base_model_version '{version}'")
    return "Unknown", "no metadata"


def loaders_view(metadata: Mapping[str, str]) -> dict[str, str]:
    """What each loader will take a LoRA for, one sentence each (``inspect`` shows it)."""
    version, why = a1111_version(metadata)
    listed = ("listed with every checkpoint (unless hidden for unknown versions)" if version == "Unknown"
              else f"listed only with {version} checkpoints")
    return {
        "a1111_forge": f"{version} ({why}): {listed}",
        "comfyui": "by its keys: ComfyUI loads any LoRA whose keys name the model's weights, whatever the metadata",
        "kohya": "by its keys: kohya's loader (networks/lora.py) reads no version from the metadata",
    }


#: The model a LoRA is for, as :func:`made_for` tells it.
Base = Literal["sdxl", "sd1", "sd2"]


def made_for(adapter: LoraAdapter) -> Base | None:
    """The model ``adapter`` was made for, from what it holds; ``None`` when it cannot be told (never guessed).

    In order: its metadata (``ss_base_model_version`` ``sdxl_...``, ``modelspec.architecture``
    ``stable-diffusion-xl...``, or another family :func:`metadata_base` names); SD1.x/SD2.x-only blocks or an
    SD1.x/SD2.x context width (:func:`sd_family`, :data:`CONTEXT_WIDTH`); then SDXL when it adapts the second
    text encoder (OpenCLIP-G, SDXL's only) or a UNet module named in SDXL's layout.
    """
    md = adapter.metadata
    if (str(md.get("ss_base_model_version", "")).startswith("sdxl_")
            or str(md.get("modelspec.architecture", "")).startswith("stable-diffusion-xl")):
        return "sdxl"
    named = metadata_base(md)
    if named is not None:
        return {"SD1.x": "sd1", "SD2.x": "sd2"}.get(named[0])  # type: ignore[return-value]
    modules = adapter.modules
    family = sd_family(modules) or _context_family(modules)
    if family is not None:
        return {"sd1.x": "sd1", "sd2.x": "sd2"}.get(family)  # type: ignore[return-value]
    if any(m.component == "te2" for m in modules):
        return "sdxl"
    index = _sdxl_index()
    if any(m.component == "unet" and index.lookup(m.component, m.name) is not None for m in modules):
        return "sdxl"
    return None


def _context_family(modules: Iterable[LoraModule]) -> Family | None:
    """SD1.x/SD2.x from a UNet cross-attention key/value module's input width (768/1024; SDXL's is 2048)."""
    for m in modules:
        if m.component == "unet" and m.kind == "lora" and "down" in m.keys and _CROSS_KV.search(m.name):
            shape = m.factor_shape("down")
            if len(shape) == 2 and shape[1] in CONTEXT_WIDTH:
                return CONTEXT_WIDTH[shape[1]]
    return None


@lru_cache(maxsize=1)
def _sdxl_index() -> TargetIndex:
    from lora_tools.layouts.sdxl import FULL
    from lora_tools.layouts.targets import TargetIndex

    return TargetIndex(FULL.table)


__all__ = ["CONTEXT_WIDTH", "Base", "a1111_version", "loaders_view", "made_for", "HINTS", "Family", "context_hint", "flux_keys", "flux_message", "foreign_format_name", "looks_like_flux",
           "sd_family", "sd_hint"]
