"""Which acceleration presets' files are on this machine: the preset LoRAs in a preset folder or the
Hugging Face cache, and the SDXL base to compare a checkpoint with. Nothing here downloads."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_tools.errors import HubError, UsageError

if TYPE_CHECKING:
    from lora_tools.presets import AccelerationPreset

#: File names of the SDXL base UNet looked for in a preset folder (fuse's ``unet`` method and the baked-in check).
BASE_UNET_NAMES = ("sdxl_base_unet.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                   "diffusion_pytorch_model.safetensors")


@dataclass(frozen=True, slots=True)
class PresetFiles:
    """Which acceleration presets' LoRA files are on this machine.

    Attributes:
        found: ``(preset, path)`` for each preset whose LoRA file is in the preset folder or the
            Hugging Face cache.
        missing: the presets with a LoRA file that is in neither.
    """

    found: list[tuple[AccelerationPreset, Path]]
    missing: list[AccelerationPreset]


def local_preset_loras(preset_dir: str | Path | None = None) -> PresetFiles:
    """The acceleration presets whose LoRA files are available without the network.

    Each preset with a LoRA file is looked for in `preset_dir` (by its hub file name, unless
    several presets share that name, as LCM's and TCD's ``pytorch_lora_weights.safetensors`` do),
    then in the Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME`` as set now). Nothing is downloaded.

    Args:
        preset_dir: a folder holding downloaded preset files, or ``None``.

    Returns:
        `PresetFiles`: the presets found (with their paths) and those not available.
    """
    from lora_tools.presets import PRESETS

    names = Counter(p.lora_file for p in PRESETS.values() if p.lora_file is not None)
    found, missing = [], []
    for preset in PRESETS.values():
        if preset.lora_file is None:
            continue
        # a name several presets share (pytorch_lora_weights.safetensors) cannot say which one a folder holds
        folder = preset_dir if names[preset.lora_file] == 1 else None
        path = _local_file(preset.repo_id, preset.lora_file, folder)
        if path is None:
            missing.append(preset)
        else:
            found.append((preset, path))
    return PresetFiles(found, missing)


def _local_file(repo_id: str, filename: str, folder: str | Path | None) -> Path | None:
    if folder is not None:
        for name in (filename, Path(filename).name):
            if (Path(folder) / name).is_file():
                return Path(folder) / name
    from lora_tools.hub import resolve_file

    try:
        return resolve_file(repo_id, filename, local_files_only=True)
    except (HubError, UsageError):
        return None


def reference_base(reference: str | Path | None = None, preset_dir: str | Path | None = None) -> Path | None:
    """The SDXL base to compare a checkpoint with: `reference`, else the base UNet in `preset_dir`,
    else the one in the Hugging Face cache; ``None`` when none is on this machine."""
    from lora_tools.presets import SDXL_BASE_REPO, SDXL_BASE_UNET_FILE

    if reference is not None:
        return Path(reference)
    if preset_dir is not None:
        for name in BASE_UNET_NAMES:
            if (Path(preset_dir) / name).is_file():
                return Path(preset_dir) / name
    return _local_file(SDXL_BASE_REPO, SDXL_BASE_UNET_FILE, None)
