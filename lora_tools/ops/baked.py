"""Acceleration presets already baked into a checkpoint: the check fuse makes before baking a preset in
again (the preset files on this machine: :mod:`lora_tools.presets.local`).

A checkpoint alone cannot say what was added to it: the test needs the model it was made from.
``W = W_base + s * L`` is found by least squares on ``W - W_base`` (:func:`~lora_tools.ops.analyze.fit_models`),
so the check runs only when an SDXL base reference is at hand locally: the one the caller names,
the base UNet in the preset folder, or the one in the Hugging Face cache. Nothing is downloaded; with
no reference (or one of another shape) the check is skipped, and only lora_tools' own record
(:func:`lora_tools.provenance.fused_preset`) can tell.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lora_tools.errors import Hint, InvalidFileError, LoraToolsError, UsageError
from lora_tools.presets.local import reference_base

if TYPE_CHECKING:
    from lora_tools.io.model import ModelSource
    from lora_tools.lora.adapter import LoraAdapter
    from lora_tools.ops.analyze import LoraFit
    from lora_tools.presets import AccelerationPreset

#: Modules the check samples: those where the preset's delta is largest (a handful, not the model).
SAMPLE_MODULES = 8
#: A fitted strength from here up means the preset is in the model...
MIN_STRENGTH = 0.5
#: ...when the fit also explains this much of the sampled difference (an unrelated change of n
#: numbers explains about 1/n of it; a fine-tune ten times the preset's delta still leaves ~1 %).
MIN_EXPLAINED = 0.01
def baked_fit(model: ModelSource, reference: ModelSource, label: str, lora: LoraAdapter, *,
              sample: int = SAMPLE_MODULES) -> LoraFit | None:
    """How much of `lora` `model` holds over `reference`, fitted on `sample` modules.

    Args:
        model: the checkpoint.
        reference: the model it would have been made from (SDXL base).
        label: the LoRA's name in the result.
        lora: the LoRA looked for (its UNet modules).
        sample: how many modules to read (those where the LoRA's delta is largest).

    Returns:
        The fit (strength, fraction of the sampled difference explained), or ``None`` when the
        reference does not fit the model (other architecture or shapes) or holds no UNet.
    """
    from lora_tools.ops.analyze import fit_models

    unet = lora.with_modules([m for m in lora.modules if m.component == "unet"])
    if not unet.modules or "unet" not in reference.components or "unet" not in model.components:
        return None
    try:
        report = fit_models(model, reference, [(label, unet)], labels=(model.path.name, reference.path.name),
                            sample=sample)
    except (InvalidFileError, UsageError):
        return None
    return report.fits[0]


def is_baked(fit: LoraFit) -> bool:
    """Whether a fit says the LoRA is in the model (:data:`MIN_STRENGTH`, :data:`MIN_EXPLAINED`)."""
    return fit.strength >= MIN_STRENGTH and fit.explained >= MIN_EXPLAINED


def check_not_baked(model: ModelSource, loras: Sequence[tuple[str, LoraAdapter, AccelerationPreset]], *,
                    reference: str | Path | None = None, preset_dir: str | Path | None = None,
                    force: bool = False) -> None:
    """Refuse to bake an acceleration preset into a checkpoint that already holds it.

    For each preset LoRA about to be fused, fits the checkpoint's difference from an SDXL base
    reference (:func:`~lora_tools.presets.local.reference_base`) onto the LoRA's delta, on :data:`SAMPLE_MODULES` modules.
    Without a local reference nothing is checked.

    Args:
        model: the checkpoint fused into.
        loras: ``(label, adapter, preset)`` of the preset LoRAs to fuse.
        reference: the SDXL base (UNet) to compare with; default: found locally.
        preset_dir: a folder of preset files that may hold the base UNet.
        force: skip the check.

    Raises:
        UsageError: ``'base.safetensors' already has SDXL-Lightning 4-step baked in (strength 0.98,
            explains 97% of ...)``, with a hint naming ``force``.
    """
    from lora_tools.io.model import open_model

    if force or not loras:
        return
    path = reference_base(reference, preset_dir)
    if path is None or not path.exists():
        return
    try:
        ref = open_model(path)
    except LoraToolsError:  # a reference that cannot be read is no reference
        return
    with ref:
        for label, adapter, preset in loras:
            fit = baked_fit(model, ref, label, adapter)
            if fit is not None and is_baked(fit):
                raise UsageError(
                    f"'{model.path}' already has {preset.label} baked in (strength {fit.strength:.2f}, explains "
                    f"{fit.explained:.0%} of its difference from '{path.name}' on {fit.modules} sampled modules): "
                    "fusing it again doubles it", hint=Hint("force", "to fuse anyway"))


__all__ = ["baked_fit", "check_not_baked", "is_baked"]
