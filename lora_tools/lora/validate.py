"""Whether a LoRA can be used at all: its factors fit each other and its values are finite.

The shape rules are those :mod:`lora_tools.lora.delta` applies when it builds a delta (up's rank is
down's, a Tucker core chains its factors, LoKr's two Kronecker factors are whole), checked at plan
time without reading a tensor, so a bad module is named before anything is written rather than
failing mid-stream. The finite-values check reads each factor once. :func:`validate_lora` is THE
plan-time check every LoRA operation (fuse, rescale, resize, merge, convert, analyze) runs on
each input LoRA. Whether the product fits the *base* weight is :mod:`lora_tools.lora.match`'s
job (it needs the base).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lora_tools.errors import NonFiniteError, ShapeMismatchError
from lora_tools.io.magnitudes import largest_magnitude, tensor_largest_magnitude
from lora_tools.io.safetensors import is_float_dtype
from lora_tools.io.sources import SafetensorsSource
from lora_tools.lora.adapter import LoraAdapter, LoraModule

Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FactorProblem:
    """One module whose factors do not fit each other.

    Attributes:
        component: ``unet``, ``te1`` or ``te2``.
        module: the module name as spelled in the file.
        reason: what does not fit, with the shapes (``up (320, 4) has rank 4, down (8, 320) has rank 8``).
    """

    component: str
    module: str
    reason: str

    def describe(self) -> str:
        return f"module '{self.module}' ({self.component}): {self.reason}"


class _Misfit(Exception):
    pass


def _need(cond: bool, reason: str) -> None:
    if not cond:
        raise _Misfit(reason)


def _pointwise(s: Shape) -> bool:
    return len(s) >= 2 and all(d == 1 for d in s[2:])


def _pair(kind: str, a: Shape, b: Shape) -> Shape:
    _need(len(a) >= 2 and len(b) >= 2 and _pointwise(a), f"{kind}: expected a (out, r) and b (r, in...), got a {a}, b {b}")
    _need(a[1] == b[0], f"{kind}: a {a} has rank {a[1]}, b {b} has rank {b[0]}")
    return (a[0], *b[1:])


def _cp(kind: str, t: Shape, a: Shape, b: Shape) -> Shape:
    _need(len(t) == 4 and len(a) == 2 and len(b) == 2,
          f"{kind}: the Tucker core must be 4-D and its factors 2-D, got core {t}, a {a}, b {b}")
    _need(t[0] == a[0] and t[1] == b[0], f"{kind}: the Tucker core {t} does not chain with a {a} and b {b}")
    return (a[1], b[1], t[2], t[3])


def _lora(s: Mapping[str, Shape]) -> None:
    up, down, mid = s["up"], s["down"], s.get("mid")
    _need(len(up) >= 2 and len(down) >= 2, f"up {up} and down {down} must have at least 2 dims")
    _need(_pointwise(up), f"up must be (out, r) or (out, r, 1, 1), got {up}")
    if mid is None:
        _need(up[1] == down[0], f"up {up} has rank {up[1]}, down {down} has rank {down[0]}")
        return
    _need(len(mid) == 4, f"the Tucker mid must be (r, r, kh, kw), got {mid}")
    _need(_pointwise(down), f"with a Tucker mid, down must be (r, in) or (r, in, 1, 1), got {down}")
    _need(mid[1] == down[0] and up[1] == mid[0],
          f"the Tucker mid {mid} does not chain up {up} and down {down} (need up[1] == mid[0], mid[1] == down[0])")


def _loha(s: Mapping[str, Shape]) -> None:
    _need(all(r in s for r in ("w1a", "w1b", "w2a", "w2b")), "a LoHa module needs hada_w1_a/b and hada_w2_a/b")
    _need(("t1" in s) == ("t2" in s), "hada_t1 and hada_t2 must come together")
    if "t1" in s:
        s1, s2 = _cp("term 1", s["t1"], s["w1a"], s["w1b"]), _cp("term 2", s["t2"], s["w2a"], s["w2b"])
    else:
        s1, s2 = _pair("term 1", s["w1a"], s["w1b"]), _pair("term 2", s["w2a"], s["w2b"])
    _need(s1 == s2, f"the two Hadamard terms have different shapes, {s1} and {s2}")


def _lokr_factor(name: str, s: Mapping[str, Shape], core: str | None) -> Shape:
    full, a, b = s.get(name), s.get(name + "a"), s.get(name + "b")
    if full is not None:
        _need(a is None and b is None and (core is None or core not in s), f"give {name} or {name}a/{name}b, not both")
        _need(len(full) >= 2, f"{name} must have at least 2 dims, got {full}")
        return full
    _need(a is not None and b is not None, f"factor {name} is missing (neither {name} nor both {name}a and {name}b)")
    assert a is not None and b is not None
    if core is not None and core in s:
        return _cp(f"{name}", s[core], a, b)
    return _pair(f"{name}", a, b)


def _lokr(s: Mapping[str, Shape]) -> None:
    _lokr_factor("w1", s, None)
    _lokr_factor("w2", s, "t2")


def _full(s: Mapping[str, Shape]) -> None:
    _need("diff" in s or "diff_b" in s, "a full-diff module needs its diff (or bias diff) tensor")


_RULES: dict[str, Callable[[Mapping[str, Shape]], None]] = {"lora": _lora, "loha": _loha, "lokr": _lokr, "full": _full}


def module_problem(module: LoraModule, shapes: Mapping[str, Shape]) -> FactorProblem | None:
    """The problem with one module's factors (``shapes``: role -> shape), or ``None`` when they fit."""
    try:
        _RULES[module.kind](shapes)
        if "dora_scale" in shapes and module.kind == "lora":
            out, inp, scale = shapes["up"][0], shapes["down"][1], shapes["dora_scale"]
            if module.dora_axis == "in":  # LyCORIS without wd_on_out: (1, in[, 1, 1]), read by ComfyUI too
                _need(math.prod(scale) == inp, f"dora_scale {scale} does not have one value per input ({inp})")
            else:
                _need(math.prod(scale) == out, f"dora_scale {scale} does not have one value per output ({out})")
    except _Misfit as e:
        return FactorProblem(module.component, module.name, str(e))
    return None


def check_factor_shapes(adapter: LoraAdapter) -> list[FactorProblem]:
    """Every module of ``adapter`` whose factors do not fit each other (header shapes only).

    Args:
        adapter: a LoRA read with :func:`lora_tools.lora.load.load_lora` (no tensor is read).

    Returns:
        One :class:`FactorProblem` per misfit module, in file order; empty when all fit.

    Example:
        >>> problems = check_factor_shapes(load_lora("style.safetensors"))
        >>> [p.describe() for p in problems]
        ["module 'lora_unet_mid_block_attentions_0_proj_in' (unet): up (1280, 4) has rank 4, down (8, 1280) has rank 8"]
    """
    problems = []
    for m in adapter.modules:
        shapes = {role: m.factor_shape(role) for role in m.keys}
        problem = module_problem(m, shapes)
        if problem is not None:
            problems.append(problem)
    return problems


def raise_factor_problems(adapter: LoraAdapter) -> None:
    """Raise when any module's factors do not fit each other (for planners: refuse before writing).

    Raises:
        ShapeMismatchError: names the file, the first misfit module and how many there are.
    """
    problems = check_factor_shapes(adapter)
    if problems:
        more = f" ({len(problems) - 1} more modules do not fit either)" if len(problems) > 1 else ""
        raise ShapeMismatchError(f"'{_label(adapter)}': the factors of {problems[0].describe()}{more}.")


def _label(adapter: LoraAdapter) -> str:
    return str(adapter.path) if adapter.path is not None else "(in-memory LoRA)"


def raise_non_finite(adapter: LoraAdapter, *, verb: str) -> dict[str, float]:
    """Refuse NaN/Inf in any factor or alpha; return each float factor's largest magnitude.

    One pass per factor (:func:`_largest_magnitude`). The magnitudes bound the deltas, which lets
    the fuse patcher skip its own overflow checks where they cannot trigger.

    Args:
        adapter: the LoRA (file-backed or in memory).
        verb: what the caller would do with it (``fuse``, ``rescale``...), for the message.

    Returns:
        Tensor key -> ``max |value|`` of every non-empty floating-point factor.

    Raises:
        NonFiniteError: names the file and the first tensor (in file order) that holds NaN/Inf,
            or the first module with a non-finite alpha.
    """
    max_abs: dict[str, float] = {}
    for mod in adapter.modules:
        for role, key in mod.keys.items():
            largest = _largest_magnitude(mod, role)
            if largest is None:
                continue
            if not math.isfinite(largest):
                raise NonFiniteError(f"'{_label(adapter)}' holds NaN or Inf values (first in '{key}'): "
                                     f"refusing to {verb} it.")
            max_abs[key] = largest
        if mod.alpha is not None and not math.isfinite(mod.alpha):
            raise NonFiniteError(f"'{_label(adapter)}' has a non-finite alpha for module '{mod.name}'.")
    return max_abs


def _largest_magnitude(mod: LoraModule, role: str) -> float | None:
    """``max |x|`` of a non-empty float factor (``inf`` with NaN/Inf), ``None`` for others. A factor in a file is
    read as bits, without torch (a fuse plans while torch loads); one in memory, or of another dtype, through
    :func:`~lora_tools.io.magnitudes.tensor_largest_magnitude` on one torch thread (on a busy 2-core machine
    OpenMP's hand-offs around 1,576 small reductions took 9 s instead of 0.03 s)."""
    if isinstance(mod.source, SafetensorsSource):
        meta = mod.source.meta(mod.keys[role])
        if not is_float_dtype(meta.dtype) or math.prod(meta.shape) == 0:
            return None
        largest = largest_magnitude(mod.source.raw(mod.keys[role]), meta.dtype)
        if largest is not None:
            return largest
    from lora_tools.lora.lowrank import module_threads

    t = mod.factor(role)
    if not t.is_floating_point() or t.numel() == 0:
        return None
    with module_threads():
        return tensor_largest_magnitude(t)


def validate_lora(adapter: LoraAdapter, *, verb: str) -> dict[str, float]:
    """The plan-time check of one input LoRA: factors that fit each other, finite values.

    Every LoRA operation calls this on each input before it computes or writes anything, so a bad
    LoRA gets the same one-line message whichever command reads it.

    Args:
        adapter: the input LoRA.
        verb: the operation (``rescale``, ``merge``...), for the NaN/Inf message.

    Returns:
        Each float factor's largest magnitude (see :func:`raise_non_finite`).

    Raises:
        ShapeMismatchError: a module's factors do not fit each other (:func:`raise_factor_problems`).
        NonFiniteError: a factor or alpha is NaN/Inf.

    Example:
        >>> validate_lora(load_lora("nan.safetensors"), verb="rescale")
        NonFiniteError: 'nan.safetensors' holds NaN or Inf values (first in 'lora_unet_..._to_k.lora_up.weight'): refusing to rescale it.
    """
    raise_foreign_base(adapter, verb=verb)
    raise_factor_problems(adapter)
    return raise_non_finite(adapter, verb=verb)


def raise_foreign_base(adapter: LoraAdapter, *, verb: str) -> None:
    """Refuse a LoRA whose metadata says it was trained for another model than SDXL (SD1.x...): its text
    encoder keys may fit SDXL's CLIP-L by shape, and the result would apply to the wrong model.

    Raises:
        UnsupportedModelError: ``ss_base_model_version`` or ``modelspec.architecture`` names another model.
    """
    from lora_tools.errors import UnsupportedModelError
    from lora_tools.lora.family import metadata_base

    found = metadata_base(adapter.metadata)
    if found is not None:
        family, key, value = found
        raise UnsupportedModelError(f"'{adapter.path}' was trained for {family} ({key} '{value}'), not SDXL: "
                                    f"refusing to {verb} it.")
