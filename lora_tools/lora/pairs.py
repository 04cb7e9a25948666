"""LoRA modules as 2-D factor pairs and back: the bridge between LoRA values and lowrank maths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lora_tools.errors import InvalidFileError, UsageError
from lora_tools.lora.lowrank import flatten_conv, tucker_to_pair

if TYPE_CHECKING:
    from lora_tools.layouts.components import Component
    from lora_tools.lora.adapter import LoraAdapter, LoraModule



@dataclass(frozen=True, slots=True)
class Pair:
    """One module's delta as ``scale * up @ down`` with 2-D float32 factors.

    Attributes:
        up: ``(out, r)``.
        down: ``(r, in * kh * kw)``.
        scale: the module's scale (``alpha / rank``).
        shape: the delta's weight shape (``(out, in)`` or ``(out, in, kh, kw)``).
    """

    up: Tensor
    down: Tensor
    scale: float
    shape: tuple[int, ...]


def module_key(m: LoraModule) -> tuple[Component, str]:
    """The identity of a module across LoRAs of one naming family."""
    return (m.component, m.name)


def refuse_bias_diff(m: LoraModule, verb: str) -> None:
    """Resize and merge produce low-rank weight deltas only: a module that also changes its bias
    (``.diff_b``/``.b_norm``) is refused rather than losing that bias diff without a word."""
    if m.changes_bias:
        raise UsageError(
            f"module '{m.name}' also changes its bias (.diff_b): {verb} writes low-rank weight deltas only and "
            "would drop it; fuse or rescale this LoRA instead, or remove that module"
        )


def is_low_rank(m: LoraModule) -> bool:
    """Whether the module is a plain LoRA/LoCon/Tucker pair (not LoHa, LoKr, full, DoRA)."""
    return m.kind == "lora" and not m.is_dora


def pair_of(m: LoraModule) -> Pair:
    """The module's factors as a 2-D pair (Tucker through its factors); LoRA kind only."""
    if not is_low_rank(m):
        raise UsageError(f"module '{m.name}' is {m.algorithm}, not a plain low-rank pair")
    up, down = m.factor("up").float(), m.factor("down").float()
    if "mid" in m.keys:
        u, d, shape = tucker_to_pair(up, m.factor("mid").float(), down)
    else:
        u, d, shape = flatten_conv(up, down)
    return Pair(u, d, m.scale, shape)


def dense_of(m: LoraModule) -> Tensor:
    """The module's scaled delta, flattened to 2-D ``(out, in * kh * kw)``, float32."""
    if m.is_dora:
        raise UsageError(
            f"module '{m.name}' is DoRA: its delta depends on the base weight's norm, so it cannot be "
            "rescaled, resized or merged without a base; fuse it into a checkpoint instead"
        )
    d = m.delta()
    return d.reshape(d.shape[0], -1)


def roles_from_pair(up: Tensor, down: Tensor, shape: tuple[int, ...]) -> dict[str, Tensor]:
    """``up``/``down`` factor tensors in the layout a LoRA file stores for a weight of `shape`."""
    k = up.shape[1]
    if len(shape) == 4:
        return {"up": up.reshape(shape[0], k, 1, 1).contiguous(),
                "down": down.reshape(k, *shape[1:]).contiguous()}
    return {"up": up.contiguous(), "down": down.contiguous()}


def check_same_architecture(adapters: list[tuple[str, LoraAdapter]]) -> None:
    """Refuse LoRAs whose common modules target different weight shapes (different models).

    Raises:
        InvalidFileError: one line naming both files and the first module that differs.
    """
    seen: dict[tuple[str, str], tuple[str, tuple[int, ...]]] = {}
    for label, adapter in adapters:
        for m in adapter.modules:
            shape = tuple(m.natural_shape())
            flat = (shape[0], int(torch.Size(shape[1:]).numel()))
            prev = seen.setdefault(module_key(m), (label, flat))
            if prev[1] != flat:
                raise InvalidFileError(
                    f"'{label}' and '{prev[0]}' are LoRAs for different architectures: module '{m.name}' "
                    f"is {flat[0]}x{flat[1]} in one and {prev[1][0]}x{prev[1][1]} in the other."
                )


def respelled(adapter: LoraAdapter, format: str, label: str) -> LoraAdapter:
    """`adapter` with its keys spelled in `format` (in memory; the same factors), for matching modules.

    Returns `adapter` itself when it already is in `format`.
    """
    if adapter.format == format:
        return adapter
    from lora_tools.io.sources import StateDictSource
    from lora_tools.lora.load import load_lora
    from lora_tools.lora.save import spelled_tensors

    tensors, metadata = spelled_tensors(adapter, format=format)
    return load_lora(label, source=StateDictSource(Path(label), tensors, metadata))
