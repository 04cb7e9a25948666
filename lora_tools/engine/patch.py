"""Patch one base tensor: ``W + sum(contributions)`` in fp32, rounded once.

The fast path works in row blocks that stay in the CPU cache: each block is upcast to fp32,
every contribution adds into it (a LoRA: one small GEMM ``up[rows] @ down``, no dense delta), it
is checked for NaN/Inf/overflow (unless the contributions' bounds rule that out), and rounded
into the output buffer, or handed to an encoder (fp8: rounded into its codes while the block is
in the cache). Memory traffic is one read and one write of the tensor, whatever the
number of contributions. A contribution without a row-block form (DoRA needs whole-tensor
norms) sends the tensor down the plain path: the whole tensor in fp32.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from lora_tools.engine.contributions import BlockOp, Contribution
from lora_tools.errors import NonFiniteError

if TYPE_CHECKING:
    import torch

#: fp32 elements per row block (1 MiB: fits the L2 cache with room for the factors).
BLOCK_ELEMS = 256 * 1024

#: Largest |delta| that cannot take a finite weight of each dtype out of range once rounded
#: (fp16: half the spacing at its maximum of 65504 is 16; the others have room to spare).
_SAFE_DELTA = {"float16": 8.0, "bfloat16": 1e30, "float32": 1e30, "float64": 1e30}


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """A tensor's shape as ``(rows, cols)``: the first dimension, and the product of the others."""
    cols = 1
    for dim in shape[1:]:
        cols *= dim
    return int(shape[0]), cols


def block_ops(contributions: Sequence[Contribution], shape: Sequence[int]) -> list[BlockOp] | None:
    """The row-block operations of ``contributions`` for a tensor of ``shape`` (their inputs read
    now, in fp32), or ``None`` when one of them needs the whole-tensor path."""
    ops: list[BlockOp] = []
    rc = matrix_shape(shape)
    for c in contributions:
        op = c.block_op(rc)
        if op is None:
            return None
        ops.append(op)
    return ops


def needs_check(contributions: Sequence[Contribution], base_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether the result must be scanned for NaN/Inf/overflow.

    Not when the base is already in the output dtype and the contributions' bounds (each one's
    largest possible change of an element) add up to less than what could push a finite weight
    out of range once rounded.
    """
    safe = _SAFE_DELTA.get(str(out_dtype).replace("torch.", ""))
    if safe is None or base_dtype != out_dtype:
        return True
    total = 0.0
    for c in contributions:
        bound = c.delta_bound()
        if bound is None:
            return True
        total += bound
    return not total < safe


#: ``encode(block, start)``: takes one fp32 row block of a result (its values may be used up) and the
#: index of its first element in the tensor; returns the block's largest magnitude (NaN when it holds one).
BlockEncoder = Callable[["torch.Tensor", int], float]


def patch_tensor(key: str, contributions: Sequence[Contribution], base: torch.Tensor, out_dtype: torch.dtype,
                 ops: list[BlockOp] | None = None, *, check: bool | None = None,
                 amax: list[float] | None = None, into: torch.Tensor | None = None,
                 encode: BlockEncoder | None = None) -> tuple[torch.Tensor, int]:
    """The patched tensor in ``out_dtype`` and the number of contributions applied.

    Args:
        key: the tensor's name (for errors).
        contributions: what to add, in order.
        base: the base tensor.
        out_dtype: the result's dtype.
        ops: from :func:`block_ops` (computed here when not given).
        check: scan the result for NaN/Inf/overflow; ``None`` applies :func:`needs_check`.
        amax: when the result is scanned, receives its largest magnitude (measured by the scan, while
            each block is in the cache: the fp8 rounding needs it).
        into: where to put the result when it is not written back into ``base`` (``out_dtype``,
            ``base``'s shape, contiguous: e.g. a reused scratch); default: a new tensor.
        encode: where each fp32 row block of the result goes instead (needs ``ops``): no result
            tensor is made, ``base`` is left as it is and returned. The encoder measures each block's
            largest magnitude, which is checked as the scan would be.

    When ``out_dtype`` is the base's dtype the result is written back into ``base`` (each row
    block is read before it is overwritten), so no second buffer is needed.

    Raises:
        NonFiniteError: the result holds NaN/Inf or values beyond the range of ``out_dtype``.
    """
    import torch

    if ops is None:
        ops = block_ops(contributions, base.shape)
        if ops is None:
            return _patch_whole(key, contributions, base, out_dtype, amax)
    if check is None:
        check = needs_check(contributions, base.dtype, out_dtype)
    rows = base.shape[0]
    src = base.reshape(rows, -1)
    if encode is not None:
        out = base
    elif base.dtype == out_dtype and base.is_contiguous():
        out = base
    elif into is not None:
        assert into.dtype == out_dtype and into.shape == base.shape and into.is_contiguous()
        out = into
    else:
        out = torch.empty(base.shape, dtype=out_dtype)
    dst = out.view(rows, -1)
    cols = src.shape[1]
    step = max(1, BLOCK_ELEMS // cols) if cols else 1
    # An fp32 result is worked on in place, block by block (no copy from a scratch block to it).
    direct = encode is None and out_dtype == torch.float32
    buf = None if direct else _block_buffer(min(step, rows), cols)
    limit = torch.finfo(out_dtype).max
    largest = 0.0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = dst[r0:r1] if buf is None else buf[: r1 - r0]
        if block.data_ptr() != src[r0:r1].data_ptr():
            block.copy_(src[r0:r1])
        for op in ops:
            op(block, r0, r1)
        if encode is not None:
            largest = max(largest, _within(encode(block, r0 * cols), key, limit, out_dtype))
            continue
        if check:
            largest = max(largest, _check(block, key, limit, out_dtype))
        if buf is not None:
            dst[r0:r1].copy_(block)
    if (check or encode is not None) and amax is not None and rows and src.shape[1]:
        amax.append(largest)
    return out, len(ops)


_local = threading.local()


def _block_buffer(rows: int, cols: int) -> torch.Tensor:
    """This thread's fp32 row block of ``rows x cols``, kept from tensor to tensor (no fresh pages)."""
    import torch

    buf = getattr(_local, "block", None)
    if buf is None or buf.numel() < rows * cols:
        buf = _local.block = torch.empty(max(rows * cols, BLOCK_ELEMS), dtype=torch.float32)
    return buf[: rows * cols].view(rows, cols)


def _check(block: torch.Tensor, key: str, limit: float, out_dtype: torch.dtype) -> float:
    """Raise unless every value of ``block`` is finite and within ``limit``; its largest magnitude."""
    import torch

    lo, hi = torch.aminmax(block)
    return _within(max(-lo.item(), hi.item()), key, limit, out_dtype)


def _within(largest: float, key: str, limit: float, out_dtype: torch.dtype) -> float:
    """``largest`` (a largest magnitude), unless it is NaN or beyond ``limit``: then raise."""
    if not largest <= limit:  # also true for NaN
        raise NonFiniteError(f"Fusing produced NaN/Inf or values beyond the range of {str(out_dtype).replace('torch.', '')} "
                             f"in '{key}': nothing was written. Check the strengths and the LoRA (loratool inspect).")
    return largest


def _patch_whole(key: str, contributions: Sequence[Contribution], base: torch.Tensor,
                 out_dtype: torch.dtype, amax: list[float] | None = None) -> tuple[torch.Tensor, int]:
    """Whole-tensor fp32 path (DoRA's norms span the whole weight); always scanned."""
    import torch

    w = base.to(torch.float32, copy=True)
    for c in contributions:
        c.apply_whole(w)
    if w.numel():
        largest = _check(w, key, torch.finfo(out_dtype).max, out_dtype)
        if amax is not None:
            amax.append(largest)
    return w.to(out_dtype), len(contributions)


__all__ = ["BLOCK_ELEMS", "BlockEncoder", "block_ops", "needs_check", "patch_tensor", "matrix_shape"]
