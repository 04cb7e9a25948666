"""What inspect knows about acceleration models (Lightning...): by sha256, file name, metadata or keys.

Identification by file goes through :func:`lora_tools.presets.identify_file` (the one preset
registry); the key signature is :func:`lightning_signature`'s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lora_tools.layouts.sdxl import SDXLConfig
from lora_tools.layouts.targets import TargetIndex
from lora_tools.lora.adapter import LoraAdapter
from lora_tools.lora.match import LoraMatch
from lora_tools.ops.inspect.report import Acceleration
from lora_tools.presets import LIGHTNING, AccelerationPreset, identify_file

#: The LCM-LoRA SDXL training script's default targets (diffusers' ``train_lcm_distill_lora_sdxl.py``); the same list as
#: ``lora_tools.testing.synthetic_lora.LCM_TARGETS``, repeated here because that module imports torch.
LIGHTNING_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LIGHTNING_SHAPED = "lightning/lcm/dmd2-shaped"
#: Said of a file whose name is an acceleration LoRA's but whose keys lack that LoRA's signature.
NAME_WITHOUT_SIGNATURE = "Its keys do not have the Lightning LoRA signature, so the name may be misleading."
_STEPS_IN_TEXT = re.compile(r"lightning\D{0,20}?(\d+)[\s_-]*steps?", re.IGNORECASE)
_STEPS_METADATA_KEYS = ("ss_output_name", "modelspec.title", "modelspec.description", "ss_training_comment", "name", "title")


def lightning_signature(adapter: LoraAdapter, match: LoraMatch, cfg: SDXLConfig) -> bool:
    """Kohya keys, UNet only, diffusers names, exactly the LCM target set,
    one rank, alpha on every module.
    """
    modules = adapter.modules
    if adapter.format not in ("kohya", "kohya-diffusers") or not modules or match.unmatched:
        return False
    if any(m.component != "unet" or m.kind != "lora" or m.alpha is None or m.is_dora or "mid" in m.keys
           for m in modules):
        return False
    if match.naming != "diffusers":
        return False
    if len({m.rank for m in modules}) != 1:
        return False
    want = {t.diffusers_module for t in TargetIndex(cfg.table).targets
            if t.component == "unet" and t.diffusers_module.endswith(LIGHTNING_TARGETS)}
    have = [mm.target.diffusers_module for mm in match.matched]
    return len(have) == len(want) and set(have) == want


def acceleration(name: str, sha256: str | None, metadata: Mapping[str, str], signature: bool,
                 provenance_steps: int | None = None) -> Acceleration | None:
    """What identifies the file as an acceleration model (``signature``: the LoRA key signature)."""
    preset = identify_file(name, sha256)
    how = None
    if preset is not None:
        how = "sha256" if sha256 and sha256.lower() in preset.known_sha256.values() else "filename"
    else:
        steps = provenance_steps or _steps_from_metadata(metadata)
        if steps in LIGHTNING:
            preset, how = LIGHTNING[steps], "metadata"
    if preset is not None and how is not None:
        by = {"sha256": "its sha256", "filename": "its file name", "metadata": "its metadata"}[how]
        note = f"Identified as SDXL-Lightning {preset.steps}-step by {by}."
        if signature:
            note += " Its keys match the Lightning/LCM/DMD2 signature."
        elif how == "filename":
            note += " " + NAME_WITHOUT_SIGNATURE
        return _preset_acceleration(preset, how, signature, note)
    if signature:
        return Acceleration(
            LIGHTNING_SHAPED, None, None, None, "keys", True, None, None,
            "Keys match SDXL-Lightning, LCM-LoRA and DMD2 (kohya keys, UNet only, diffusers names, the "
            "LCM target set, one rank, alpha everywhere). The step count cannot be read from keys: check "
            "the file name or the model card.",
        )
    return None


def misleading_name(accel: Acceleration | None, name: str) -> str | None:
    """The warning for a LoRA named like an acceleration LoRA whose keys lack its signature."""
    if accel is None or accel.identified_by != "filename" or accel.key_signature:
        return None
    return (f"'{name}' is named like the {accel.label} LoRA, but its keys do not have that LoRA's "
            f"signature: the name may be misleading.")


def _preset_acceleration(preset: AccelerationPreset, how: str, signature: bool, note: str) -> Acceleration:
    sampler = preset.sampler
    return Acceleration(f"Lightning {preset.steps}-step", preset.family, preset.name, preset.steps, how,
                        signature, sampler.to_dict(), sampler.describe(), note)


def _steps_from_metadata(metadata: Mapping[str, str]) -> int | None:
    for key in _STEPS_METADATA_KEYS:
        m = _STEPS_IN_TEXT.search(metadata.get(key, ""))
        if m:
            return int(m.group(1))
    return None
