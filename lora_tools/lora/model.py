"""The one in-memory form every LoRA file is read into."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

from lora_tools.layouts.table import Component
from lora_tools.sources import SafetensorsSource, StateDictSource

AdapterKind = Literal["lora", "loha", "lokr", "full"]


@dataclass(frozen=True, slots=True)
class AdapterModule:
    """One adapted module of a LoRA file.

    Attributes:
        component: ``unet``, ``te1`` or ``te2``.
        name: the module name as spelled in the file (no component prefix, no suffix).
        kind: ``lora`` (incl. LoCon and Tucker ``mid``), ``loha``, ``lokr`` or ``full`` (``diff``).
        keys: tensor role -> key in the file. Roles: ``up``, ``down``, ``mid``, ``w1a``, ``w1b``,
            ``w2a``, ``w2b``, ``t1``, ``t2``, ``w1``, ``w2``, ``diff``, ``diff_b``, ``dora_scale``.
        alpha: the module's alpha, or ``None`` (then alpha = rank: scale 1).
        rank: the module's rank (``0`` where it has none: full diffs, undecomposed LoKr).
    """

    component: Component
    name: str
    kind: AdapterKind
    keys: Mapping[str, str]
    alpha: float | None
    rank: int

    @property
    def is_dora(self) -> bool:
        return "dora_scale" in self.keys

    @property
    def algorithm(self) -> str:
        """Human name of the adapter algorithm (``lora``, ``locon``, ``lora-tucker``, ``loha``...)."""
        if self.kind != "lora":
            return self.kind + ("+dora" if self.is_dora else "")
        base = "lora-tucker" if "mid" in self.keys else "lora"
        return base + ("+dora" if self.is_dora else "")


@dataclass
class LoraAdapter:
    """A LoRA file read into one form, tensors still on disk.

    Attributes:
        path: the file.
        format: detected format name (see :func:`lora_tools.lora.formats.available_formats`).
        modules: every adapted module.
        metadata: the safetensors ``__metadata__``.
        source: the open tensor source the factor tensors are read from.
    """

    path: Path
    format: str
    modules: list[AdapterModule]
    metadata: dict[str, str]
    source: SafetensorsSource | StateDictSource
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "LoraAdapter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
