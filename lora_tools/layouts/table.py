"""The entry type shared by every layout table, and the component prefixes of an SDXL single file.

A layout table is a list of :class:`KeyMap` rows. Each row names one tensor in the SDXL
single-file (SGM) key space and the diffusers tensor it becomes, with the transform between
them. Most rows are renames; a few are not (OpenCLIP's fused q/k/v, the transposed
``text_projection``, the VAE's 1x1-conv attention). Rows are built by walking the model's block
structure, so the same code serves tiny test models and the full-size SDXL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lora_tools.layouts.components import Component, spelling

Transform = Literal["rename", "conv1x1_to_linear", "transpose", "slice"]

#: Single-file prefix of each component, as in community SDXL checkpoints (from :data:`COMPONENTS`).
SGM_PREFIXES: dict[Component, str] = spelling("sgm_prefix")
#: diffusers folder name of each component (from :data:`COMPONENTS`).
DIFFUSERS_FOLDERS: dict[Component, str] = spelling("diffusers_folder")


@dataclass(frozen=True, slots=True)
class KeyMap:
    """One tensor of a component in both layouts.

    Attributes:
        component: ``unet``, ``vae``, ``te1`` (CLIP-L) or ``te2`` (OpenCLIP-bigG).
        sgm: key inside the component (without the single-file prefix).
        diffusers: key inside the diffusers component, or ``None`` when the tensor has no
            diffusers counterpart (``logit_scale``, ``position_ids``).
        shape: shape in the single file.
        transform: how the SGM tensor becomes the diffusers tensor.
        part: for ``slice`` rows, ``(index, count)`` of the row block of the SGM tensor.
        optional: the tensor may be absent from real files (``position_ids``).
    """

    component: Component
    sgm: str
    diffusers: str | None
    shape: tuple[int, ...]
    transform: Transform = "rename"
    part: tuple[int, int] | None = None
    optional: bool = False

    @property
    def keeps_values(self) -> bool:
        """Whether the diffusers tensor holds the SGM tensor's bytes in the same order (a new name or
        shape only): it can be copied, or rounded, as it is."""
        return self.transform in ("rename", "conv1x1_to_linear")

    @property
    def sgm_key(self) -> str:
        """Full key in a single-file checkpoint."""
        return SGM_PREFIXES[self.component] + self.sgm

    @property
    def diffusers_shape(self) -> tuple[int, ...]:
        if self.transform == "conv1x1_to_linear":
            return self.shape[:2]
        if self.transform == "transpose":
            return (self.shape[1], self.shape[0])
        if self.transform == "slice":
            assert self.part is not None
            return (self.shape[0] // self.part[1],) + self.shape[1:]
        return self.shape


def module_of(key: str) -> str:
    """The module path of a parameter key (drops ``.weight``/``.bias``)."""
    return key.rsplit(".", 1)[0]
