"""Dense weight changes (delta W) of single adapter modules, in float32.

Pure functions: each takes the factor tensors of one module (in any floating dtype), upcasts them
to float32 and returns the dense, *unscaled* delta in the shape of the base weight it targets.
The scale (`alpha / rank`, see :func:`module_scale`) and the user strength are applied by the
caller, except for DoRA, whose magnitude step needs the base weight (:func:`dora_apply`).

Formulas follow ComfyUI (`comfy/weight_adapter/{lora,loha,lokr,base}.py`) and LyCORIS
(`lycoris/modules/{locon,loha,lokr}.py`, and the DoRA paper, arXiv 2402.09353). Factor layouts, per family:

- LoRA / LoCon: `up` (out, r[, 1, 1]), `down` (r, in[, kh, kw]); Tucker: `down` (r, in, 1, 1),
  `mid` (r', r, kh, kw), `up` (out, r'[, 1, 1]).
- LoHa: `w1a`/`w2a` (out, r), `w1b`/`w2b` (r, in[*kh*kw]); CP (Tucker) variant: `w1a`/`w2a`
  (r, out), `w1b`/`w2b` (r, in), `t1`/`t2` (r, r, kh, kw).
- LoKr: `w1` (o1, i1) or `w1a` (o1, r) @ `w1b` (r, i1); `w2` (o2, i2[, kh, kw]) or `w2a` (o2, r)
  @ `w2b` (r, i2[*kh*kw]); Tucker: `w2a` (r, o2), `w2b` (r, i2), `t2` (r, r, kh, kw).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from lora_tools.errors import ShapeMismatchError
from lora_tools.lora.scale import module_scale

logger = logging.getLogger(__name__)

__all__ = [
    "dora_apply",
    "lokr_delta",
    "lokr_scale_applies",
    "loha_delta",
    "lora_delta",
    "module_scale",
]

# LyCORIS/ComfyUI Tucker/CP contraction: core (i, j, kh, kw), in-factor (j, in), out-factor (i, out).
_TUCKER = "i j k l, j r, i p -> p r k l"


def _f32(t: Tensor) -> Tensor:
    """Upcast to float32; a float32 tensor is returned as is (no copy)."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _shape(t: Tensor | tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    return tuple(int(d) for d in (t.shape if isinstance(t, Tensor) else t))


def _strip_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    end = len(shape)
    while end > 1 and shape[end - 1] == 1:
        end -= 1
    return shape[:end]


def _fits(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a delta of `shape` is, element for element, a delta of `target` shape.

    Accepted: the same shape; the same shape up to trailing singleton dims (a 1x1 conv vs a linear);
    or the row-major flattened form `(out, prod(target[1:]))` that ComfyUI reshapes.
    """
    if shape == target or _strip_ones(shape) == _strip_ones(target):
        return True
    return (
        len(shape) == 2
        and len(target) >= 2
        and shape[0] == target[0]
        and shape[1] == math.prod(target[1:])
    )


def _check_target(kind: str, shape: tuple[int, ...], target_shape: tuple[int, ...]) -> tuple[int, ...]:
    target = _shape(target_shape)
    if len(target) < 2:
        raise ShapeMismatchError(
            f"{kind}: target_shape {target} is not a weight shape; expected (out, in) or "
            "(out, in, kh, kw)."
        )
    if not _fits(shape, target):
        raise ShapeMismatchError(
            f"{kind}: the factors produce a delta of shape {shape}, which does not fit the target "
            f"weight of shape {target}. Is this module matched to the right base weight?"
        )
    return target


def _is_pointwise(t: Tensor) -> bool:
    """True for a 2-D matrix or a tensor whose dims after the second are all 1 (a 1x1 kernel)."""
    return t.dim() >= 2 and all(d == 1 for d in t.shape[2:])


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ShapeMismatchError(message)


def lora_delta(
    up: Tensor,
    down: Tensor,
    *,
    mid: Tensor | None = None,
    target_shape: tuple[int, ...],
) -> Tensor:
    """Compute the unscaled dense delta `up @ down` of a LoRA / LoCon module.

    The plain case is a single matmul `up.flatten(1) @ down.flatten(1)`, which covers linear
    layers, 1x1 convs and kxk convs whose `down` carries the kernel (kohya/LCM/Lightning layout).
    With a Tucker core (LyCORIS `lora_mid`) the core is folded into `down` first, as ComfyUI does:
    `delta[o, c, k, l] = sum_{p, j} up[o, p] * mid[p, j, k, l] * down[j, c]`, which equals the
    composition of the three convs `down` (1x1), `mid` (kxk) and `up` (1x1).

    Args:
        up (`Tensor`):
            `lora_up` weight, shape `(out, r)` or `(out, r, 1, 1)`.
        down (`Tensor`):
            `lora_down` weight, shape `(r, in)` or `(r, in, kh, kw)`; `(r, in, 1, 1)` or `(r, in)`
            when `mid` is given.
        mid (`Tensor`, *optional*, defaults to `None`):
            Tucker core `lora_mid`, shape `(r_up, r, kh, kw)` (in LyCORIS `r_up == r`).
        target_shape (`tuple[int, ...]`):
            Shape of the base weight, e.g. `(out, in)`, `(out, in, 1, 1)` or `(out, in, 3, 3)`.

    Returns:
        `Tensor`: the float32 delta of shape `target_shape`, not multiplied by alpha / rank.

    Raises:
        [`ShapeMismatchError`]: the factors do not chain, or their product does not fit
            `target_shape`.
    """
    _require(up.dim() >= 2 and down.dim() >= 2,
             f"lora: up {tuple(up.shape)} and down {tuple(down.shape)} must have at least 2 dims.")
    _require(_is_pointwise(up),
             f"lora: up must be (out, r) or (out, r, 1, 1), got {tuple(up.shape)}.")
    if mid is None:
        _require(up.shape[1] == down.shape[0],
                 f"lora: rank mismatch, up {tuple(up.shape)} has rank {up.shape[1]} but down "
                 f"{tuple(down.shape)} has rank {down.shape[0]}.")
        target = _check_target("lora", (up.shape[0], *down.shape[1:]), target_shape)
        return (_f32(up).flatten(1) @ _f32(down).flatten(1)).reshape(target)

    _require(mid.dim() == 4,
             f"lora: mid (Tucker core) must be (r, r, kh, kw), got {tuple(mid.shape)}.")
    _require(_is_pointwise(down),
             f"lora: with a Tucker core, down must be (r, in) or (r, in, 1, 1), got "
             f"{tuple(down.shape)}.")
    _require(mid.shape[1] == down.shape[0] and up.shape[1] == mid.shape[0],
             f"lora: ranks do not chain: up {tuple(up.shape)}, mid {tuple(mid.shape)}, down "
             f"{tuple(down.shape)} (need up[1] == mid[0] and mid[1] == down[0]).")
    target = _check_target("lora", (up.shape[0], down.shape[1], mid.shape[2], mid.shape[3]),
                           target_shape)
    # Fold the core into down (small: r x in x kh x kw), then one matmul for the big product.
    folded = torch.einsum("p j k l, j c -> p c k l", _f32(mid), _f32(down).flatten(1))
    return (_f32(up).flatten(1) @ folded.flatten(1)).reshape(target)


def _cp_check(kind: str, t: Tensor, wa: Tensor, wb: Tensor) -> tuple[int, ...]:
    """Validate a CP/Tucker triple and return the shape `(out, in, kh, kw)` it builds."""
    _require(t.dim() == 4 and wa.dim() == 2 and wb.dim() == 2,
             f"{kind}: Tucker core must be 4-D and its factors 2-D, got core {tuple(t.shape)}, "
             f"a {tuple(wa.shape)}, b {tuple(wb.shape)}.")
    _require(t.shape[0] == wa.shape[0] and t.shape[1] == wb.shape[0],
             f"{kind}: Tucker core {tuple(t.shape)} does not chain with a {tuple(wa.shape)} "
             f"(rank, out) and b {tuple(wb.shape)} (rank, in).")
    return (wa.shape[1], wb.shape[1], t.shape[2], t.shape[3])


def _pair_check(kind: str, wa: Tensor, wb: Tensor) -> tuple[int, ...]:
    """Validate a low-rank pair `wa @ wb` and return the shape of the product."""
    _require(wa.dim() >= 2 and wb.dim() >= 2 and _is_pointwise(wa),
             f"{kind}: expected a (out, r) and b (r, in...), got a {tuple(wa.shape)}, "
             f"b {tuple(wb.shape)}.")
    _require(wa.shape[1] == wb.shape[0],
             f"{kind}: rank mismatch, a {tuple(wa.shape)} has rank {wa.shape[1]} but b "
             f"{tuple(wb.shape)} has rank {wb.shape[0]}.")
    return (wa.shape[0], *wb.shape[1:])


def loha_delta(
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    *,
    t1: Tensor | None = None,
    t2: Tensor | None = None,
    target_shape: tuple[int, ...],
) -> Tensor:
    """Compute the unscaled dense delta `(w1a @ w1b) * (w2a @ w2b)` of a LyCORIS LoHa module.

    In the CP variant (`hada_t1`/`hada_t2` present) each factor is the Tucker contraction
    `einsum("i j k l, j r, i p -> p r k l", t, wb, wa)`, as in LyCORIS and ComfyUI.

    Args:
        w1a (`Tensor`):
            `hada_w1_a`, shape `(out, r)`; `(r, out)` in the CP variant.
        w1b (`Tensor`):
            `hada_w1_b`, shape `(r, in)` or `(r, in * kh * kw)`; `(r, in)` in the CP variant.
        w2a (`Tensor`):
            `hada_w2_a`, laid out like `w1a`.
        w2b (`Tensor`):
            `hada_w2_b`, laid out like `w1b`.
        t1 (`Tensor`, *optional*, defaults to `None`):
            `hada_t1`, shape `(r, r, kh, kw)`. Must be given together with `t2`.
        t2 (`Tensor`, *optional*, defaults to `None`):
            `hada_t2`, shape `(r, r, kh, kw)`. Must be given together with `t1`.
        target_shape (`tuple[int, ...]`):
            Shape of the base weight.

    Returns:
        `Tensor`: the float32 delta of shape `target_shape`, not multiplied by alpha / rank
        (LoHa's rank is `w1b.shape[0]`).

    Raises:
        [`ShapeMismatchError`]: only one of `t1`/`t2` is given, the factors do not chain, the two
            Hadamard terms differ in shape, or the result does not fit `target_shape`.
    """
    if (t1 is None) != (t2 is None):
        raise ShapeMismatchError("loha: hada_t1 and hada_t2 must be given together (CP variant).")
    if t1 is not None and t2 is not None:
        s1 = _cp_check("loha term 1", t1, w1a, w1b)
        s2 = _cp_check("loha term 2", t2, w2a, w2b)
    else:
        s1 = _pair_check("loha term 1", w1a, w1b)
        s2 = _pair_check("loha term 2", w2a, w2b)
    _require(s1 == s2, f"loha: the two Hadamard terms have different shapes, {s1} and {s2}.")
    target = _check_target("loha", s1, target_shape)

    if t1 is not None and t2 is not None:
        m1 = torch.einsum(_TUCKER, _f32(t1), _f32(w1b), _f32(w1a))
        m2 = torch.einsum(_TUCKER, _f32(t2), _f32(w2b), _f32(w2a))
    else:
        m1 = _f32(w1a).flatten(1) @ _f32(w1b).flatten(1)
        m2 = _f32(w2a).flatten(1) @ _f32(w2b).flatten(1)
    return m1.mul_(m2).reshape(target)


def _lokr_factor(
    name: str, full: Tensor | None, a: Tensor | None, b: Tensor | None, t: Tensor | None
) -> tuple[Tensor | None, tuple[int, ...]]:
    """Resolve one Kronecker factor; returns (the full tensor if given, else None) and its shape."""
    if full is not None:
        _require(a is None and b is None and t is None,
                 f"lokr: give either {name} or the pair {name}a/{name}b, not both.")
        _require(full.dim() >= 2, f"lokr: {name} must have at least 2 dims, got {tuple(full.shape)}.")
        return full, _shape(full)
    _require(a is not None and b is not None,
             f"lokr: factor {name} is missing; give {name} or both {name}a and {name}b.")
    assert a is not None and b is not None  # for type checkers
    if t is not None:
        return None, _cp_check(f"lokr {name}", t, a, b)
    return None, _pair_check(f"lokr {name}", a, b)


def lokr_delta(
    *,
    w1: Tensor | None = None,
    w1a: Tensor | None = None,
    w1b: Tensor | None = None,
    w2: Tensor | None = None,
    w2a: Tensor | None = None,
    w2b: Tensor | None = None,
    t2: Tensor | None = None,
    target_shape: tuple[int, ...],
) -> Tensor:
    """Compute the unscaled dense delta `kron(w1, w2)` of a LyCORIS LoKr module.

    Each factor is either given in full (`lokr_w1`, `lokr_w2`) or as a low-rank pair
    (`w1a @ w1b`, `w2a @ w2b`); `w2` may also be a Tucker contraction with core `t2`, as in
    ComfyUI. When one factor is 4-D (a conv kernel) the other gets trailing singleton dims before
    the Kronecker product.

    Args:
        w1 (`Tensor`, *optional*, defaults to `None`):
            `lokr_w1`, shape `(o1, i1)`.
        w1a (`Tensor`, *optional*, defaults to `None`):
            `lokr_w1_a`, shape `(o1, r)`.
        w1b (`Tensor`, *optional*, defaults to `None`):
            `lokr_w1_b`, shape `(r, i1)`.
        w2 (`Tensor`, *optional*, defaults to `None`):
            `lokr_w2`, shape `(o2, i2)` or `(o2, i2, kh, kw)`.
        w2a (`Tensor`, *optional*, defaults to `None`):
            `lokr_w2_a`, shape `(o2, r)`; `(r, o2)` with `t2`.
        w2b (`Tensor`, *optional*, defaults to `None`):
            `lokr_w2_b`, shape `(r, i2)` or `(r, i2 * kh * kw)`; `(r, i2)` with `t2`.
        t2 (`Tensor`, *optional*, defaults to `None`):
            `lokr_t2`, Tucker core of `w2`, shape `(r, r, kh, kw)`.
        target_shape (`tuple[int, ...]`):
            Shape of the base weight, `(o1 * o2, i1 * i2[, kh, kw])`.

    Returns:
        `Tensor`: the float32 delta of shape `target_shape`, not multiplied by any scale (see
        :func:`lokr_scale_applies`).

    Raises:
        [`ShapeMismatchError`]: a factor is missing or given twice, the factors do not chain, or
            the Kronecker product does not fit `target_shape`.
    """
    full1, s1 = _lokr_factor("w1", w1, w1a, w1b, None)
    full2, s2 = _lokr_factor("w2", w2, w2a, w2b, t2)
    n = max(len(s1), len(s2))
    s1p, s2p = s1 + (1,) * (n - len(s1)), s2 + (1,) * (n - len(s2))
    target = _check_target("lokr", tuple(x * y for x, y in zip(s1p, s2p, strict=True)), target_shape)

    if full1 is not None:
        m1 = _f32(full1)
    else:
        assert w1a is not None and w1b is not None
        m1 = _f32(w1a).flatten(1) @ _f32(w1b).flatten(1)
    if full2 is not None:
        m2 = _f32(full2)
    elif t2 is not None:
        assert w2a is not None and w2b is not None
        m2 = torch.einsum(_TUCKER, _f32(t2), _f32(w2b), _f32(w2a))
    else:
        assert w2a is not None and w2b is not None
        m2 = _f32(w2a).flatten(1) @ _f32(w2b).flatten(1)
    # torch.kron needs contiguous operands (an einsum result can be a permuted view).
    m1 = m1.reshape(s1p).contiguous()
    m2 = m2.reshape(s2p).contiguous()
    return torch.kron(m1, m2).reshape(target)


def lokr_scale_applies(*, w1: Tensor | None, w2: Tensor | None) -> bool:
    """Tell whether alpha / rank scaling applies to a LoKr module.

    LyCORIS and ComfyUI scale a LoKr delta by `alpha / dim` only when at least one factor is
    decomposed (given as an a/b pair); with both factors in full the scale is 1.

    Args:
        w1 (`Tensor` or `None`):
            The full `lokr_w1`, or `None` when the factor is given as `lokr_w1_a`/`lokr_w1_b`.
        w2 (`Tensor` or `None`):
            The full `lokr_w2`, or `None` when the factor is given as `lokr_w2_a`/`lokr_w2_b`.

    Returns:
        `bool`: `True` when a factor is decomposed, so `module_scale(alpha, rank)` applies, with
        rank the `b` factor's `shape[0]` (that of `w2b` when both are decomposed, as in ComfyUI).
    """
    return w1 is None or w2 is None


def dora_apply(
    weight: Tensor,
    delta: Tensor,
    dora_scale: Tensor,
    *,
    strength: float = 1.0,
    axis: str | None = None,
) -> Tensor:
    """Apply a DoRA module to a base weight and return the fused weight.

    With `W_c = W + delta`, the norm is taken over `W_c` (the combined weight, as in the DoRA
    paper, PEFT and LyCORIS): per output channel (over all dims but 0) when
    `dora_scale.shape[0] == out`, otherwise per input column (over all dims but 1, ComfyUI's
    transposed case). Then `W_c *= dora_scale / (norm + eps)` with `eps` the float32 machine
    epsilon (ComfyUI, LyCORIS), and the result is `W + strength * (W_c - W)`.

    Note: ComfyUI's `weight_decompose` takes the output-axis norm of the base `W` rather than of
    `W_c`; this function follows PEFT/LyCORIS (norm of `W_c`) in both cases.

    Args:
        weight (`Tensor`):
            Base weight `W`, shape `(out, in)` or `(out, in, kh, kw)`.
        delta (`Tensor`):
            The module's delta, already multiplied by alpha / rank, of the same shape as `weight`.
        dora_scale (`Tensor`):
            Magnitude vector: `out` values (`(out,)`, `(out, 1)`, `(out, 1, 1, 1)`; kohya/LyCORIS
            `wd_on_out`, PEFT `lora_magnitude_vector`), or `in` values (`(1, in)`, `(1, in, 1, 1)`).
        strength (`float`, *optional*, defaults to `1.0`):
            Interpolation from `W` (0) to the full DoRA weight (1).
        axis (`str`, *optional*):
            ``"out"`` (one magnitude per output channel) or ``"in"`` (per input column), as the
            module's format defines it (:attr:`lora_tools.lora.adapter.LoraModule.dora_axis`). By
            default it is read from the shape, which is ambiguous for square weights.

    Returns:
        `Tensor`: the fused float32 weight, shape of `weight`. The inputs are not modified.

    Raises:
        [`ShapeMismatchError`]: `delta` and `weight` differ in shape, or `dora_scale` holds neither
            one value per output channel nor one per input column.
    """
    w_shape, d_shape = _shape(weight), _shape(delta)
    _require(weight.dim() >= 2, f"dora: weight must have at least 2 dims, got {w_shape}.")
    _require(w_shape == d_shape,
             f"dora: delta of shape {d_shape} does not match the weight of shape {w_shape}.")
    out, inp = w_shape[0], w_shape[1]
    if axis is not None:
        want = out if axis == "out" else inp
        _require(axis in ("out", "in") and dora_scale.numel() == want,
                 f"dora: dora_scale of shape {_shape(dora_scale)} does not hold one value per "
                 f"{'output channel' if axis == 'out' else 'input column'} of the weight of shape {w_shape}.")
        dims = tuple(range(1, weight.dim())) if axis == "out" else (0, *range(2, weight.dim()))
    elif dora_scale.dim() >= 1 and dora_scale.shape[0] == out and dora_scale.numel() == out:
        dims = tuple(range(1, weight.dim()))
    elif dora_scale.numel() == inp:
        dims = (0, *range(2, weight.dim()))
    else:
        raise ShapeMismatchError(
            f"dora: dora_scale of shape {_shape(dora_scale)} fits neither the {out} output "
            f"channels nor the {inp} input columns of the weight of shape {w_shape}."
        )

    w = _f32(weight)
    combined = w + _f32(delta)
    norm = torch.linalg.vector_norm(combined, dim=dims, keepdim=True)
    norm.add_(torch.finfo(torch.float32).eps)
    combined.mul_(_f32(dora_scale).reshape(norm.shape) / norm)
    if strength == 1.0:
        return combined
    return combined.sub_(w).mul_(strength).add_(w)
