"""rescale: bake a strength into a LoRA, so the new file at strength 1.0 is the old one at S."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lora_tools.errors import UsageError
from lora_tools.lora.validate import validate_lora
from lora_tools.provenance import build_record, derived_metadata, source_entry, with_record

if TYPE_CHECKING:
    from lora_tools.layouts.blocks import BlockWeights
    from lora_tools.lora.adapter import LoraAdapter, LoraModule

#: The factor that carries a module's magnitude, per kind: scaling it scales the delta linearly.
_LINEAR_ROLE = {"lora": ("up",), "loha": ("w1a",), "full": ("diff", "diff_b")}


@dataclass
class RescaleReport:
    """What :func:`rescale_lora` did.

    Attributes:
        strength: the strength baked in.
        scaled: modules whose factors were scaled.
        unchanged: modules kept as they were (their strength is 1.0).
        dropped: modules removed (their strength is 0.0: their delta is zero).
    """

    strength: float
    scaled: int = 0
    unchanged: int = 0
    dropped: int = 0
    per_module: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"strength": self.strength, "scaled": self.scaled, "unchanged": self.unchanged,
                "dropped": self.dropped}


def _scaled_module(m: LoraModule, s: float) -> dict[str, torch.Tensor]:
    if m.is_dora:
        raise UsageError(
            f"module '{m.name}' is DoRA: its delta is renormalised against the base weight, so no factor "
            "scaling bakes a strength into it; fuse it at that strength instead"
        )
    if m.kind == "lokr":
        roles: tuple[str, ...] = ("w1",) if "w1" in m.keys else ("w1a",)
    else:
        roles = _LINEAR_ROLE[m.kind]
    out = {}
    for role in m.keys:
        t = m.factor(role)
        if role in roles or role == "diff_b":  # a bias diff scales with its module's delta
            t = (t.float() * s).to(t.dtype)
        out[role] = t
    return out


def block_strength(adapter: LoraAdapter, blocks: BlockWeights) -> Callable[[LoraModule], float]:
    """Each module's block weight (the shared SDXL block names), checked to match some module.

    Raises:
        UsageError: a module with no SDXL counterpart, or a spec none of whose blocks holds a module.
    """
    from lora_tools.layouts.blocks import block_of
    from lora_tools.layouts.sdxl import FULL, TINY
    from lora_tools.layouts.targets import TargetIndex

    indexes = (TargetIndex(FULL.table), TargetIndex(TINY.table))
    by_module: dict[tuple[str, str], str] = {}
    for m in adapter.modules:
        t = next((t for i in indexes if (t := i.lookup(m.component, m.name)) is not None), None)
        if t is None:
            raise UsageError(f"module '{m.name}' ({m.component}) has no SDXL block to weight")
        by_module[(m.component, m.name)] = block_of(m.component, t.sgm_key)
    if not any(blocks.matches(b) for b in by_module.values()):
        raise UsageError(f"block spec '{blocks.spec}' matches no module of the LoRA "
                         f"(its modules are in {', '.join(sorted(set(by_module.values())))})")
    return lambda m: blocks.weight(by_module[(m.component, m.name)])


def rescale_lora(adapter: LoraAdapter, strength: float, *,
                 module_strength: Callable[[LoraModule], float] | None = None,
                 blocks: BlockWeights | None = None,
                 components: Iterable[str] | None = None) -> tuple[LoraAdapter, RescaleReport]:
    """A LoRA whose delta at strength 1.0 is `strength` times this one's, module by module.

    One factor per module is multiplied (``up`` for LoRA/LoCon/Tucker, ``w1a`` for LoHa, ``w1``
    or ``w1a`` for LoKr, ``diff`` for full diffs); alpha and rank stay, so the delta scales
    linearly and means exactly what a run-time strength means. Modules at strength 0 are dropped.

    Args:
        adapter: the input LoRA.
        strength: the strength to bake in.
        module_strength: an extra per-module multiplier, default 1.
        blocks: per-block weights (``IN04-IN08:0.5,OUT*:0``), multiplied into the strength.
        components: the components the strength applies to (``unet``, ``te1``, ``te2``); the
            others are kept unchanged. Default: all.

    Returns:
        The new in-memory LoRA (metadata kept, a ``loratool`` record added) and a report.

    Raises:
        UsageError: a DoRA module (its strength cannot be baked into factors), or an unknown component.
        ShapeMismatchError, NonFiniteError: an input LoRA whose factors do not fit each other or hold
            NaN/Inf (:func:`lora_tools.lora.validate.validate_lora`).
    """
    from lora_tools.lora.adapter import LoraAdapter

    comps = set(components) if components is not None else None
    if comps is not None and not comps <= {"unet", "te1", "te2"}:
        raise UsageError(f"unknown component(s) {', '.join(sorted(comps - {'unet', 'te1', 'te2'}))}; "
                         "expected unet, te1 or te2")
    validate_lora(adapter, verb="rescale")
    report = RescaleReport(strength=strength)
    per_block = block_strength(adapter, blocks) if blocks is not None else None
    factors, alphas = {}, {}
    for m in adapter.modules:
        s = 1.0 if comps is not None and m.component not in comps else float(strength)
        if module_strength is not None:
            s *= float(module_strength(m))
        if per_block is not None:
            s *= per_block(m)
        key = (m.component, m.name)
        if s == 0.0:
            report.dropped += 1
            continue
        if s == 1.0:
            factors[key] = {r: m.factor(r) for r in m.keys}
            report.unchanged += 1
        else:
            factors[key] = _scaled_module(m, s)
            report.scaled += 1
        alphas[key] = m.alpha
        report.per_module[m.name] = s
    record = build_record("rescale", sources=[source_entry(adapter)],
                          params={"strength": strength, **({"components": sorted(comps)} if comps else {}),
                                  **({"blocks": blocks.spec} if blocks is not None else {})})
    metadata = with_record(derived_metadata(adapter.metadata), record)
    out = LoraAdapter.from_tensors(factors, alphas=alphas, format=adapter.format, metadata=metadata)
    return out, report
