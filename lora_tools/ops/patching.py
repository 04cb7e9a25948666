"""Patch one base tensor: ``W + sum(strength * scale * delta)`` in fp32, rounded once.

The fast path works in row blocks that stay in the CPU cache: each block is upcast to fp32,
every LoRA adds ``up[rows] @ down`` into it (one small GEMM, no dense delta), it is checked for
NaN/Inf/overflow (unless the factors' magnitudes rule that out), and rounded into the output
buffer. Memory traffic is one read and one write of the tensor, whatever the number of LoRAs. DoRA needs whole-tensor norms and takes the plain
path: the whole tensor in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from lora_tools.errors import ShapeMismatchError
from lora_tools.lora import delta as d
from lora_tools.lora.resolve import MatchedModule, module_delta
from lora_tools.models import TensorRef

if TYPE_CHECKING:
    import torch

    from lora_tools.ops.fuse_plan import FusePlan, LoraSource

#: fp32 elements per row block (1 MiB: fits the L2 cache with room for the factors).
BLOCK_ELEMS = 256 * 1024

BlockOp = Callable[["torch.Tensor", int, int], None]  # (fp32 block, first row, end row)


def patch_ops(plan: "FusePlan", ref: TensorRef) -> list[BlockOp] | None:
    """The row-block operations that patch ``ref`` (its LoRA factors read now, in fp32), or
    ``None`` when the tensor needs the whole-tensor path (DoRA)."""
    contributions = plan.patches.get(ref.key, [])
    if any(mm.module.is_dora for _, mm in contributions):
        return None
    rows = ref.shape[0]
    cols = 1
    for dim in ref.shape[1:]:
        cols *= dim
    return [_lora_op(source, mm, (rows, cols)) for source, mm in contributions] + _diff_ops(plan, ref, (rows, cols))


def patch_tensor(plan: "FusePlan", ref: TensorRef, base: "torch.Tensor", out_dtype: "torch.dtype",
                 ops: list[BlockOp] | None = None) -> tuple["torch.Tensor", int]:
    """The patched tensor in ``out_dtype`` and the number of modules applied.

    ``ops`` come from :func:`patch_ops` (computed here when not given). When ``out_dtype`` is
    the base's dtype the result is written back into ``base`` (each row block is read before it
    is overwritten), so no second buffer is needed.
    """
    import torch

    if ops is None:
        ops = patch_ops(plan, ref)
        if ops is None:
            return _patch_whole(plan, ref, base, out_dtype)
    check = needs_check(plan, ref, base.dtype, out_dtype)
    rows = base.shape[0]
    src = base.reshape(rows, -1)
    out = base if base.dtype == out_dtype and base.is_contiguous() else torch.empty(base.shape, dtype=out_dtype)
    dst = out.view(rows, -1)
    step = max(1, BLOCK_ELEMS // src.shape[1])
    buf = torch.empty((min(step, rows), src.shape[1]), dtype=torch.float32)
    limit = torch.finfo(out_dtype).max
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = buf[: r1 - r0]
        block.copy_(src[r0:r1])
        for op in ops:
            op(block, r0, r1)
        if check:
            _check(block, ref, limit, out_dtype)
        dst[r0:r1].copy_(block)
    return out, len(ops)


#: Largest |delta| that cannot take a finite weight of each dtype out of range once rounded
#: (fp16: half the spacing at its maximum of 65504 is 16; the others have room to spare).
_SAFE_DELTA = {"float16": 8.0, "bfloat16": 1e30, "float32": 1e30, "float64": 1e30}


def needs_check(plan: "FusePlan", ref: TensorRef, base_dtype: "torch.dtype", out_dtype: "torch.dtype") -> bool:
    """Whether the result must be scanned for NaN/Inf/overflow.

    Not when the base is already in the output dtype and the factors' magnitudes (measured when
    planning) bound the total delta below what could push a finite weight out of range:
    ``|up @ down| <= rank * max|up| * max|down|`` for every element.
    """
    safe = _SAFE_DELTA.get(str(out_dtype).replace("torch.", ""))
    if safe is None or base_dtype != out_dtype or plan.diffs:
        return True
    total = 0.0
    for source, mm in plan.patches.get(ref.key, []):
        module = mm.module
        if module.kind != "lora" or "mid" in module.keys or module.is_dora:
            return True
        up, down = source.max_abs.get(module.keys["up"]), source.max_abs.get(module.keys["down"])
        if up is None or down is None:
            return True
        total += abs(source.strength * d.module_scale(module.alpha, module.rank)) * module.rank * up * down
    return not total < safe


def _check(block: "torch.Tensor", ref: TensorRef, limit: float, out_dtype: "torch.dtype") -> None:
    import torch

    lo, hi = torch.aminmax(block)
    lo_v, hi_v = lo.item(), hi.item()
    if not (-limit <= lo_v and hi_v <= limit):  # also false for NaN
        raise ShapeMismatchError(f"Fusing produced NaN/Inf or values beyond the range of {str(out_dtype).replace('torch.', '')} "
                                 f"in '{ref.key}': nothing was written. Check the strengths and the LoRA (loratool inspect).")


def _lora_op(source: "LoraSource", mm: MatchedModule, shape: tuple[int, int]) -> BlockOp:
    """A row-block operation adding one module's scaled delta."""
    import torch

    module, src = mm.module, source.adapter.source
    first, count = 0, shape[0]
    if mm.target.part is not None:
        i, n = mm.target.part
        count = shape[0] // n
        first = i * count
    if module.kind == "lora" and "mid" not in module.keys:
        up = src.tensor(module.keys["up"]).to(torch.float32).flatten(1)
        down = src.tensor(module.keys["down"]).to(torch.float32).flatten(1)
        alpha = source.strength * d.module_scale(module.alpha, module.rank)

        def add_lora(block: "torch.Tensor", r0: int, r1: int) -> None:
            a, b = max(r0, first), min(r1, first + count)
            if a < b:
                block[a - r0:b - r0].addmm_(up[a - first:b - first], down, alpha=alpha)
        return add_lora
    dense = module_delta(source.adapter, mm).reshape(count, -1)
    strength = source.strength

    def add_dense(block: "torch.Tensor", r0: int, r1: int) -> None:
        a, b = max(r0, first), min(r1, first + count)
        if a < b:
            block[a - r0:b - r0].add_(dense[a - first:b - first], alpha=strength)
    return add_dense


def _diff_ops(plan: "FusePlan", ref: TensorRef, shape: tuple[int, int]) -> list[BlockOp]:
    import torch

    ops: list[BlockOp] = []
    row = ref.rows[0] if ref.rows else None
    if row is None or row.component != "unet" or row.diffusers is None:
        return ops
    for diff in plan.diffs:
        tuned = diff.tuned.tensor(row.diffusers).reshape(shape[0], -1)
        original = diff.original.tensor(row.diffusers).reshape(shape[0], -1)
        strength = diff.strength

        def add_diff(block: "torch.Tensor", r0: int, r1: int, t=tuned, o=original, s=strength) -> None:
            block.add_(t[r0:r1].to(torch.float32) - o[r0:r1].to(torch.float32), alpha=s)
        ops.append(add_diff)
    return ops


def _patch_whole(plan: "FusePlan", ref: TensorRef, base: "torch.Tensor", out_dtype: "torch.dtype") -> tuple["torch.Tensor", int]:
    """Whole-tensor fp32 path (DoRA's norms span the whole weight)."""
    import torch

    w = base.to(torch.float32, copy=True)
    count = 0
    for source, mm in plan.patches.get(ref.key, []):
        view = w
        if mm.target.part is not None:
            i, n = mm.target.part
            step = w.shape[0] // n
            view = w[i * step:(i + 1) * step]
        delta = module_delta(source.adapter, mm).reshape(view.shape)
        if mm.module.is_dora:
            scale = source.adapter.source.tensor(mm.module.keys["dora_scale"]).to(torch.float32)
            view.copy_(d.dora_apply(view, delta, scale.reshape(-1), strength=source.strength, axis=mm.module.dora_axis))
        else:
            view.add_(delta, alpha=source.strength)
        count += 1
    flat = w.view(w.shape[0], -1)
    for op in _diff_ops(plan, ref, (flat.shape[0], flat.shape[1])):
        op(flat, 0, flat.shape[0])
        count += 1
    _check(w, ref, torch.finfo(out_dtype).max, out_dtype)
    return w.to(out_dtype), count
