"""Paired differences of two models of one architecture: the module targets both hold (shapes checked),
and ``tuned - original`` per target, streamed through :func:`~lora_tools.engine.stream_pairs` (extract,
analyze and the baked-in check read models this way)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from lora_tools.errors import InvalidFileError, UsageError

if TYPE_CHECKING:
    from lora_tools.io.model import ModelSource
    from lora_tools.layouts.targets import ModuleTarget

_COMPONENTS = ("unet", "te1", "te2")


def target_weight(model: ModelSource, t: ModuleTarget) -> torch.Tensor:
    """The float32 base weight a module target changes (its row block for fused q/k/v)."""
    return target_part(model.read(model.ref(t.sgm_key)), t)


def target_part(weight: torch.Tensor, t: ModuleTarget) -> torch.Tensor:
    """The float32 part of a stored tensor that module target `t` changes, in the target's shape."""
    w = weight.to(torch.float32)
    if t.part is not None:
        index, count = t.part
        w = w.chunk(count, dim=0)[index]
    return w.reshape(t.shape)


def paired_targets(tuned: ModelSource, original: ModelSource, components: Iterable[str],
                   labels: tuple[str, str]) -> list[ModuleTarget]:
    """The module targets both models hold, checked to have the same shapes.

    Raises:
        InvalidFileError: the models are of different architectures or shapes.
        UsageError: a requested component is missing from a model.
    """
    from lora_tools.layouts.targets import TargetIndex

    comps = list(components)
    for c in comps:
        if c not in _COMPONENTS:
            raise UsageError(f"unknown component {c!r}; expected unet, te1 or te2")
        for label, model in zip(labels, (tuned, original), strict=True):
            if c not in model.components:
                raise UsageError(f"'{label}' has no {c}")
    out = []
    for t in TargetIndex(tuned.cfg.table).targets:
        if t.component not in comps:
            continue
        if t.sgm_key not in original:
            raise InvalidFileError(f"'{labels[0]}' and '{labels[1]}' are different architectures: "
                                   f"'{labels[1]}' has no {t.sgm_key}.")
        a, b = tuned.ref(t.sgm_key).shape, original.ref(t.sgm_key).shape
        if a != b:
            raise InvalidFileError(f"'{labels[0]}' and '{labels[1]}' have different shapes: {t.sgm_key} is "
                                   f"{'x'.join(map(str, a))} in one and {'x'.join(map(str, b))} in the other.")
        out.append(t)
    return out


def stream_differences(tuned: ModelSource, original: ModelSource, targets: Sequence[ModuleTarget],
                       consume: Callable[[ModuleTarget, torch.Tensor], None], *,
                       progress: Callable[[int], None] | None = None) -> int:
    """Call ``consume(target, tuned - original)`` for every target, reading both models side by side.

    The two models are read in one pass through the shared engine's
    :func:`~lora_tools.engine.stream_pairs` (one thread reads ahead, a bounded number of bytes in
    flight), each stored tensor once even when several targets share it (fused q/k/v).

    Returns:
        The number of stored tensor pairs read.
    """
    from lora_tools.engine import stream_pairs

    by_key: dict[str, list[ModuleTarget]] = {}
    for t in targets:
        by_key.setdefault(t.sgm_key, []).append(t)

    def eat(key: str, wa: torch.Tensor, wb: torch.Tensor) -> None:
        for t in by_key[key]:
            consume(t, target_part(wa, t) - target_part(wb, t))

    return stream_pairs(tuned, original, list(by_key), eat, progress=progress)


__all__ = ["paired_targets", "stream_differences", "target_part", "target_weight"]
