"""What a tensor receives: contributions that the engine turns into row-block operations.

A contribution knows how to add itself to one fp32 tensor, in row blocks (the fast path: the
block stays in the CPU cache) or whole (when its maths spans the whole weight, like DoRA's
norms), and how large its change can be (which lets the engine skip the overflow scan). The
engine knows nothing else about it: LoRA factors, a difference of two models, or anything that
implements :class:`Contribution`.

Tensors are in the single-file (SGM) layout; a LoRA delta is built in the diffusers orientation,
so on a target stored transposed (OpenCLIP-bigG's ``text_projection``) :class:`LowRank` adds it
transposed. A module's bias diff is its own contribution to the bias tensor (:class:`BiasDiff`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from lora_tools.lora.match import module_delta
from lora_tools.lora.scale import module_scale

if TYPE_CHECKING:
    import torch

    from lora_tools.io.sources import TensorSource
    from lora_tools.lora.adapter import LoraAdapter, LoraModule
    from lora_tools.lora.match import MatchedModule

#: ``op(block, r0, r1)`` adds a contribution to the fp32 rows ``[r0, r1)`` held in ``block``.
BlockOp = Callable[["torch.Tensor", int, int], None]


@runtime_checkable
class Contribution(Protocol):
    """Anything that changes one base tensor, viewed as a 2-D ``(rows, cols)`` fp32 matrix."""

    def block_op(self, shape: tuple[int, int]) -> BlockOp | None:
        """The row-block operation (its inputs read now), or ``None`` when only :meth:`apply_whole` works."""

    def apply_whole(self, weight: torch.Tensor) -> None:
        """Add the contribution to the whole fp32 tensor ``weight`` (in the base's shape), in place."""

    def delta_bound(self) -> float | None:
        """An upper bound of ``|change|`` for every element, or ``None`` when unknown."""


def read_factor(module: LoraModule, adapter: LoraAdapter, role: str) -> torch.Tensor:
    """The one place the engine reads a LoRA factor (``up``, ``down``, ``dora_scale``...)."""
    return module.factor(role)


def dense_delta(adapter: LoraAdapter, match: MatchedModule) -> torch.Tensor:
    """The one place the engine builds a module's dense delta (fp32, alpha/rank applied)."""
    return module_delta(adapter, match)


def _transposed(match: MatchedModule) -> bool:
    """Whether the target is stored transposed (a target without the attribute, as duck-typed
    targets of other callers, is not)."""
    return bool(getattr(match.target, "transposed", False))


@dataclass(frozen=True)
class LowRank:
    """``W[rows] += scale * delta`` for one LoRA module (its delta includes alpha/rank).

    Args:
        adapter: the LoRA the module belongs to (its factors are read through :func:`read_factor`).
        match: the module and the base target it changes.
        scale: the multiplier of the module's delta (the LoRA's strength).
        rows: the rows of the base tensor it changes (one part of a fused qkv weight), or ``None`` for all.
        max_abs: ``(max|up|, max|down|)`` measured beforehand, which bounds the change; ``None`` when unknown.
    """

    adapter: LoraAdapter
    match: MatchedModule
    scale: float
    rows: slice | None = None
    max_abs: tuple[float, float] | None = None

    @property
    def module(self) -> LoraModule:
        return self.match.module

    def _plain(self) -> bool:
        m = self.module
        return m.kind == "lora" and "mid" not in m.keys and not m.is_dora

    def _span(self, rows: int) -> tuple[int, int]:
        if self.rows is None:
            return 0, rows
        first, stop, _ = self.rows.indices(rows)
        return first, stop - first

    def block_op(self, shape: tuple[int, int]) -> BlockOp | None:
        import torch

        if self.module.is_dora:
            return None
        first, count = self._span(shape[0])
        transposed = _transposed(self.match)
        if self._plain():
            up = read_factor(self.module, self.adapter, "up").to(torch.float32).flatten(1)
            down = read_factor(self.module, self.adapter, "down").to(torch.float32).flatten(1)
            if transposed:  # (up @ down).T == down.T @ up.T: the rows are the weight's inputs
                up, down = down.t().contiguous(), up.t().contiguous()
            alpha = self.scale * module_scale(self.module.alpha, self.module.rank)

            def add_lora(block: torch.Tensor, r0: int, r1: int) -> None:
                a, b = max(r0, first), min(r1, first + count)
                if a < b:
                    block[a - r0:b - r0].addmm_(up[a - first:b - first], down, alpha=alpha)
            return add_lora
        dense = dense_delta(self.adapter, self.match)
        dense = (dense.t().contiguous() if transposed else dense).reshape(count, -1)
        strength = self.scale

        def add_dense(block: torch.Tensor, r0: int, r1: int) -> None:
            a, b = max(r0, first), min(r1, first + count)
            if a < b:
                block[a - r0:b - r0].add_(dense[a - first:b - first], alpha=strength)
        return add_dense

    def apply_whole(self, weight: torch.Tensor) -> None:
        import torch

        view = weight if self.rows is None else weight[self.rows]
        if _transposed(self.match):
            view = view.t()
        delta = dense_delta(self.adapter, self.match).reshape(view.shape)
        if self.module.is_dora:
            from lora_tools.lora.delta import dora_apply

            scale = read_factor(self.module, self.adapter, "dora_scale").to(torch.float32)
            view.copy_(dora_apply(view, delta, scale.reshape(-1), strength=self.scale, axis=self.module.dora_axis))
        else:
            view.add_(delta, alpha=self.scale)

    def delta_bound(self) -> float | None:
        """``|scale * alpha/rank * up @ down| <= |scale * alpha/rank| * rank * max|up| * max|down|``."""
        if not self._plain() or self.max_abs is None:
            return None
        m = self.module
        up, down = self.max_abs
        return abs(self.scale * module_scale(m.alpha, m.rank)) * m.rank * up * down


@dataclass(frozen=True)
class BiasDiff:
    """``b[rows] += scale * diff_b`` for one LoRA module's bias diff (``.diff_b``/``.b_norm``).

    Args:
        adapter: the LoRA the module belongs to.
        match: the module and its target (whose ``bias_key`` is the tensor changed).
        scale: the multiplier of the difference (the LoRA's strength; alpha/rank does not apply).
        rows: the rows of the bias it changes (one part of a fused qkv bias), or ``None`` for all.
    """

    adapter: LoraAdapter
    match: MatchedModule
    scale: float
    rows: slice | None = None

    def block_op(self, shape: tuple[int, int]) -> BlockOp:
        first, stop, _ = (self.rows or slice(None)).indices(shape[0])
        dense = self.match.module.bias_delta().reshape(stop - first, -1)
        strength = self.scale

        def add_bias(block: torch.Tensor, r0: int, r1: int) -> None:
            a, b = max(r0, first), min(r1, stop)
            if a < b:
                block[a - r0:b - r0].add_(dense[a - first:b - first], alpha=strength)
        return add_bias

    def apply_whole(self, weight: torch.Tensor) -> None:
        view = weight if self.rows is None else weight[self.rows]
        view.add_(self.match.module.bias_delta().reshape(view.shape), alpha=self.scale)

    def delta_bound(self) -> float | None:
        return None


def module_contribution(adapter: LoraAdapter, match: MatchedModule, key: str, scale: float,
                        rows: slice | None = None, max_abs: tuple[float, float] | None = None) -> Contribution:
    """What one matched LoRA module adds to the base tensor ``key`` (one of ``match.keys``): its
    weight delta (:class:`LowRank`) or, on its bias, its bias diff (:class:`BiasDiff`)."""
    if key == getattr(match.target, "bias_key", None):
        return BiasDiff(adapter, match, scale, rows)
    return LowRank(adapter, match, scale, rows, max_abs)


@dataclass(frozen=True)
class DenseDifference:
    """``W += scale * (tuned[key] - original[key])``: add-difference of two models' tensors.

    Args:
        tuned: the reader holding the tuned tensor.
        original: the reader holding the tensor it was tuned from.
        key: the tensor's name in both readers (same number of elements as the base tensor).
        scale: the multiplier of the difference.
    """

    tuned: TensorSource
    original: TensorSource
    key: str
    scale: float

    def block_op(self, shape: tuple[int, int]) -> BlockOp:
        import torch

        t = self.tuned.tensor(self.key).reshape(shape[0], -1)
        o = self.original.tensor(self.key).reshape(shape[0], -1)
        s = self.scale

        def add_diff(block: torch.Tensor, r0: int, r1: int) -> None:
            block.add_(t[r0:r1].to(torch.float32) - o[r0:r1].to(torch.float32), alpha=s)
        return add_diff

    def apply_whole(self, weight: torch.Tensor) -> None:
        flat = weight.view(weight.shape[0], -1)
        self.block_op((flat.shape[0], flat.shape[1]))(flat, 0, flat.shape[0])

    def delta_bound(self) -> float | None:
        return None


__all__ = ["BiasDiff", "BlockOp", "Contribution", "LowRank", "DenseDifference", "dense_delta", "module_contribution",
           "read_factor"]
