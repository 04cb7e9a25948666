"""The acceleration preset registry: SDXL-Lightning, Hyper-SD, LCM-LoRA, TCD and DMD2.

One table, :data:`PRESETS`, keyed by name (``"lightning-4step"``, ``"hyper-sd-8step-cfg"``,
``"dmd2-4step"`` ...). Each :class:`AccelerationPreset` names the hub files of one model and the
:class:`SamplerSettings` its model card prescribes; one module per family holds the rows and says
where their facts come from (each row's ``source``: model cards, papers, diffusers' docs).

Identification (:func:`identify_file`) goes by sha256 first, then by hub repository and file
name; a base name shared by two families (LCM-LoRA and TCD both ship
``pytorch_lora_weights.safetensors``) identifies nothing on its own.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from typing import Any

from lora_tools.errors import Hint, UsageError
from lora_tools.presets import dmd2, hyper_sd, lcm, lightning, tcd
from lora_tools.presets.lightning import LIGHTNING, LIGHTNING_REPO
from lora_tools.presets.preset import AccelerationPreset
from lora_tools.presets.sampler import SCHEDULER_CLASSES, SamplerSettings

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "KEY_SIGNATURES",
    "LCM_TARGETS",
    "LIGHTNING",
    "LIGHTNING_REPO",
    "PRESETS",
    "SCHEDULER_CLASSES",
    "SDXL_BASE_REPO",
    "SDXL_BASE_UNET_FILE",
    "AccelerationPreset",
    "SamplerSettings",
    "get_preset",
    "identify_file",
    "lightning_preset",
    "sampler_from_record",
]

#: The model every preset here was distilled from (and the "B" of an add-difference merge).
SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
#: The base UNet inside :data:`SDXL_BASE_REPO`, used by the add-difference "unet" method.
SDXL_BASE_UNET_FILE = "unet/diffusion_pytorch_model.fp16.safetensors"

#: Family -> its rows, in listing order.
FAMILIES: dict[str, tuple[AccelerationPreset, ...]] = {
    "lightning": lightning.ROWS, "hyper-sd": hyper_sd.ROWS, "lcm": lcm.ROWS, "tcd": tcd.ROWS, "dmd2": dmd2.ROWS,
}

#: Every preset by name.
PRESETS: dict[str, AccelerationPreset] = {p.name: p for rows in FAMILIES.values() for p in rows}

#: The diffusers module suffixes of the LCM-LoRA SDXL training script's target list (diffusers' ``train_lcm_distill_lora_sdxl.py``):
#: 788 UNet modules on SDXL. SDXL-Lightning, LCM-LoRA and DMD2 LoRAs all cover exactly this set.
LCM_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                                "upsamplers.0.conv", "time_emb_proj")

#: Key signature name -> the families whose LoRAs have it (kohya keys, UNet only,
#: diffusers names, the LCM target set, one rank, alpha everywhere). Keys cannot tell these apart.
KEY_SIGNATURES: dict[str, tuple[str, ...]] = {"lcm-target-set": ("lightning", "lcm", "dmd2")}


def _step_list() -> str:
    counts = [str(n) for n in sorted(LIGHTNING)]
    return ", ".join(counts[:-1]) + " or " + counts[-1]


def lightning_preset(steps: int) -> AccelerationPreset:
    """Return the SDXL-Lightning preset for a step count.

    Raises:
        [`UsageError`]: no Lightning model exists for that step count.

    Example:
        ```py
        >>> lightning_preset(4).lora_file
        'sdxl_lightning_4step_lora.safetensors'
        ```
    """
    if not isinstance(steps, bool) and isinstance(steps, int) and steps in LIGHTNING:
        return LIGHTNING[steps]
    raise UsageError(
        f"SDXL-Lightning has no {steps}-step model: choose {_step_list()} steps "
        "(LoRAs exist for 2, 4 and 8; 1 step is a UNet/checkpoint only)."
    )


def get_preset(name: str) -> AccelerationPreset:
    """Return a preset by name (``"lightning-4step"``, ``"dmd2-4step"`` ...; case-insensitive).

    Raises:
        [`UsageError`]: unknown name; the message lists the valid names and the nearest one.
    """
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    close = difflib.get_close_matches(key, PRESETS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UsageError(f"Unknown preset '{name}': choose one of {', '.join(PRESETS)}.{hint}",
                     hint=Hint("preset", "with one of those names", "NAME"))


def _split_ref(filename: str) -> tuple[str | None, str]:
    """(``owner/repo`` or ``None``, lower-case base name) of a path or hub reference."""
    parts = [p for p in filename.replace("\\", "/").rstrip("/").split("/") if p]
    if not parts:
        return None, ""
    repo = "/".join(parts[-3:-1]).lower() if len(parts) >= 3 else None
    return repo, parts[-1].lower()


def identify_file(filename: str, sha256: str | None = None) -> AccelerationPreset | None:
    """Find the acceleration preset a file belongs to.

    A known sha256 wins. Otherwise the file's base name must equal one of a preset's file names
    (case-insensitive); where two presets share that name (``pytorch_lora_weights.safetensors``),
    the hub repository in ``filename`` (``"h1t/TCD-SDXL-LoRA/pytorch_lora_weights.safetensors"``,
    or a hub cache path ``.../models--h1t--TCD-SDXL-LoRA/snapshots/<rev>/...``) must decide.
    The step count of these LoRAs cannot be read from their keys (every step count has the same ones).

    Args:
        filename (`str`): a path, a hub reference or a bare name.
        sha256 (`str`, *optional*): the file's sha256 in hex, if computed.

    Returns:
        `AccelerationPreset` or `None` when the file is not recognised.
    """
    digest = sha256.strip().lower() if sha256 else None
    if digest:
        for preset in PRESETS.values():
            if digest in preset.known_sha256.values():
                return preset
    repo, base = _split_ref(filename)
    if not base:
        return None
    cached = _hub_cache_repo(filename)
    candidates = [p for p in PRESETS.values() if any(base == f.lower() for f in p.files)]
    if len(candidates) > 1:
        wanted = {r for r in (repo, cached) if r}
        candidates = [p for p in candidates if p.repo_id.lower() in wanted]
    if len(candidates) != 1:
        return None
    preset = candidates[0]
    known = next((v for f, v in preset.known_sha256.items() if f.lower() == base), None)
    if digest and known and known != digest:
        logger.debug("%s is named like a %s file but its sha256 differs from the known one", filename, preset.name)
    return preset


def _hub_cache_repo(filename: str) -> str | None:
    """``owner/repo`` of a Hugging Face cache path (``models--owner--repo``), lower case."""
    for part in filename.replace("\\", "/").split("/"):
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.removeprefix("models--").split("--", 1)).lower()
    return None


def sampler_from_record(record: Mapping[str, Any] | None) -> SamplerSettings | None:
    """The sampler settings a ``loratool`` record asks for: its ``sampler`` entry, else its preset
    (``preset``, or an old record's ``lightning_steps``); ``None`` when it names none."""
    if not record:
        return None
    sampler = record.get("sampler")
    if isinstance(sampler, Mapping) and sampler:
        return SamplerSettings.from_dict(sampler)
    name = record.get("preset")
    if isinstance(name, str) and name.lower() in PRESETS:
        return PRESETS[name.lower()].sampler
    steps = record.get("lightning_steps")
    if isinstance(steps, int) and steps in LIGHTNING:
        return LIGHTNING[steps].sampler
    return None
