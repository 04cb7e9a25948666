"""Match the modules of a LoRA to the base tensors they change, and compute their deltas."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lora_tools.errors import ShapeMismatchError
from lora_tools.layouts.targets import ModuleTarget, TargetIndex
from lora_tools.lora.adapter import LoraAdapter, LoraModule
from lora_tools.lora.family import context_hint, sd_hint

if TYPE_CHECKING:
    import torch

Naming = Literal["sgm", "diffusers", "mixed", "text-encoder", "none"]


@dataclass(frozen=True, slots=True)
class MatchedModule:
    """One LoRA module and the base weight it changes."""

    module: LoraModule
    target: ModuleTarget

    @property
    def keys(self) -> tuple[str, ...]:
        """The base tensors (single-file keys) the module changes: its weight unless it holds only a
        bias diff, and its bias when it holds one (``.diff_b``/``.b_norm``)."""
        keys: tuple[str, ...] = (self.target.sgm_key,) if self.module.changes_weight else ()
        if self.module.changes_bias and self.target.bias_key is not None:
            keys += (self.target.bias_key,)
        return keys


@dataclass
class LoraMatch:
    """The result of matching a LoRA against a model layout."""

    adapter: LoraAdapter
    matched: list[MatchedModule]
    unmatched: list[LoraModule]
    #: Why an unmatched module has no target, where the layout says so (``TargetIndex.why_not``).
    reasons: dict[tuple[str, str], str] = field(default_factory=dict)

    def reasons_text(self, limit: int = 2) -> str:
        """Why unmatched modules have no target: `` <component>:<name>: <reason>.`` for the first
        module of each distinct reason (at most ``limit``), or ``""`` when no reason is known."""
        first: dict[str, str] = {}
        for m in self.unmatched:
            why = self.reasons.get((m.component, m.name))
            if why is not None and why not in first:
                first[why] = f"{m.component}:{m.name}"
        return "".join(f" {who}: {why}." for why, who in list(first.items())[:limit])

    @property
    def naming(self) -> Naming:
        """Which block names the UNet modules use: SGM (``input_blocks``) or diffusers (``down_blocks``)."""
        kinds: set[Literal["sgm", "diffusers"]] = set()
        for m in self.matched:
            if m.module.component != "unet":
                continue
            flat = m.module.name.replace("_", ".")
            kinds.add("diffusers" if flat.replace(".", "_") == m.target.diffusers_module.replace(".", "_") else "sgm")
        if not kinds:
            return "text-encoder" if self.matched else "none"
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def describe_unmatched(self, base: str, limit: int = 3) -> str:
        names = [f"{m.component}:{m.name}" for m in self.unmatched[:limit]]
        family = sd_hint(self.unmatched)
        hint = f" {family}" if family else ""
        return (f"{len(self.unmatched)} of {len(self.adapter.modules)} modules of '{self.adapter.path}' have no target in "
                f"'{base}' (first: {', '.join(names)}).{self.reasons_text()}{hint} Run 'loratool inspect {self.adapter.path}'.")


#: A bias diff on a module without a bias (attention ``to_q``/``to_k``/``to_v``, ``text_projection``):
#: refused with this reason rather than applied in part.
_NO_BIAS = "it holds a bias diff (.diff_b/.b_norm) but {what} has no bias in SDXL"


def no_bias_reason(target: ModuleTarget) -> str:
    """Why a module with a bias diff has no target: the weight it names has no bias."""
    return _NO_BIAS.format(what=target.diffusers_module)


def match_lora(adapter: LoraAdapter, index: TargetIndex, *, base: str = "the base model") -> LoraMatch:
    """Resolve every module of ``adapter`` to a base weight by dictionary look-up; check shapes.

    Raises:
        ShapeMismatchError: a module resolves but its delta cannot have the target's shape.
    """
    matched, unmatched = [], []
    reasons: dict[tuple[str, str], str] = {}
    for m in adapter.modules:
        target = index.lookup(m.component, m.name)
        no_bias = target is not None and m.changes_bias and target.bias_key is None
        if target is None or no_bias:
            unmatched.append(m)
            why = (no_bias_reason(target) if target is not None
                   else index.why_not(m.component, m.name))
            if why is not None:
                reasons[(m.component, m.name)] = why
            continue
        _check_shape(adapter, m, target, base)
        matched.append(MatchedModule(m, target))
    return LoraMatch(adapter, matched, unmatched, reasons)


def _check_shape(adapter: LoraAdapter, m: LoraModule, target: ModuleTarget, base: str) -> None:
    src = adapter.source
    want = target.shape
    if m.changes_bias and target.bias_key is not None:
        got = tuple(src.meta(m.keys["diff_b"]).shape)
        if math.prod(got) != math.prod(target.bias_shape):
            raise ShapeMismatchError(
                f"'{adapter.path}': the bias diff of module '{m.name}' does not fit '{target.bias_key}' of '{base}' "
                f"(LoRA gives {list(got)}, the bias is {list(target.bias_shape)}).")
    if not m.changes_weight:
        return
    if m.kind == "lora":
        up = src.meta(m.keys["up"]).shape
        down = src.meta(m.keys["down"]).shape
        inner = math.prod(down[1:])
        if "mid" in m.keys:
            inner = down[1] * math.prod(src.meta(m.keys["mid"]).shape[2:])
        ok = up[0] == want[0] and inner == math.prod(want[1:])
    elif m.kind == "full":
        ok = math.prod(src.meta(m.keys["diff"]).shape) == math.prod(want)
    else:
        return  # LoHa/LoKr shapes are checked when their delta is built
    if not ok:
        family = sd_hint([m]) or (context_hint(m) if want[-1] == 2048 else None)
        sd1 = f" {family}" if family else ""
        raise ShapeMismatchError(
            f"'{adapter.path}': module '{m.name}' does not fit '{target.sgm_key}' of '{base}' "
            f"(LoRA gives {_delta_shape(adapter, m)}, the weight is {list(want)}).{sd1}"
        )


def _delta_shape(adapter: LoraAdapter, m: LoraModule) -> str:
    src = adapter.source
    if m.kind == "lora":
        up, down = src.meta(m.keys["up"]).shape, src.meta(m.keys["down"]).shape
        return f"{up[0]}x{math.prod(down[1:])}"
    return str(list(src.meta(m.keys["diff"]).shape))


def module_delta(adapter: LoraAdapter, mm: MatchedModule) -> torch.Tensor:
    """The module's dense delta in float32, scaled by alpha/rank (not by strength): :meth:`LoraModule.delta`
    in the target's shape (one rule for the fuse, inspect and every LoRA operation)."""
    return mm.module.delta(mm.target.shape)
