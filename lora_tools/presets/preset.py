"""One row of the preset registry: an acceleration model's hub files and the sampler it needs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from lora_tools.presets.sampler import SamplerSettings

__all__ = ["AccelerationPreset"]


@dataclass(frozen=True, slots=True)
class AccelerationPreset:
    """One acceleration model: its hub files and the sampler settings it needs.

    Args:
        name (`str`): preset name, e.g. ``"lightning-4step"``.
        family (`str`): model family (``"lightning"``, ``"hyper-sd"``, ``"lcm"``, ``"tcd"``, ``"dmd2"``).
        steps (`int`): the step count the model was distilled for.
        repo_id (`str`): hub repository holding the files.
        lora_file (`str`, *optional*): the LoRA file; ``None`` where none exists (Lightning 1-step).
        unet_file (`str`, *optional*): the diffusers UNet-only file, where one ships.
        checkpoint_file (`str`, *optional*): the all-in-one (ComfyUI) checkpoint file, where one ships.
        sampler (`SamplerSettings`): the settings to sample with.
        known_sha256 (`Mapping[str, str]`): file name -> sha256, where known.
        extra_files (`tuple[str, ...]`): further files of the same model (an fp16 copy).
        pickle (`bool`): the UNet ships as a torch pickle (``.bin``): load it weights-only.
        label (`str`): the name people use (``"SDXL-Lightning 4-step"``).
        source (`str`): where the row's facts come from (public ones: model cards, papers, docs).
        license (`str`, *optional*): the license id of the preset's own weights (its model card), shown in
            release cards; ``None`` where the row does not record it.
    """

    name: str
    family: str
    steps: int
    repo_id: str
    lora_file: str | None
    unet_file: str | None
    checkpoint_file: str | None
    sampler: SamplerSettings
    known_sha256: Mapping[str, str] = field(default_factory=dict, hash=False)
    extra_files: tuple[str, ...] = ()
    pickle: bool = False
    label: str = ""
    source: str = ""
    license: str | None = None

    def __post_init__(self) -> None:
        # Freeze the mapping and normalise hashes to lower case.
        frozen = MappingProxyType({k: v.lower() for k, v in self.known_sha256.items()})
        object.__setattr__(self, "known_sha256", frozen)
        if not self.label:
            object.__setattr__(self, "label", self.name)

    @property
    def files(self) -> tuple[str, ...]:
        """All file names of this preset (LoRA if any, UNet, checkpoint, extra files)."""
        main = (self.lora_file, self.unet_file, self.checkpoint_file)
        return tuple(f for f in main if f is not None) + self.extra_files

    @property
    def kind(self) -> str:
        """``"lora"`` when the model ships as a LoRA, else ``"unet"`` (a full UNet or checkpoint only)."""
        return "lora" if self.lora_file is not None else "unet"

    def hub_ref(self, filename: str) -> str:
        """Return ``"owner/repo/filename"``, the form :func:`lora_tools.hub.resolve_source` accepts."""
        return f"{self.repo_id}/{filename}"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready description of the row (for ``loratool presets --json``)."""
        return {"name": self.name, "label": self.label, "family": self.family, "steps": self.steps,
                "kind": self.kind, "repo_id": self.repo_id, "lora_file": self.lora_file,
                "unet_file": self.unet_file, "checkpoint_file": self.checkpoint_file,
                "extra_files": list(self.extra_files), "pickle": self.pickle,
                "known_sha256": dict(self.known_sha256), "sampler": self.sampler.to_dict(),
                "sampler_summary": self.sampler.describe(), "source": self.source}
