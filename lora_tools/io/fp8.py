"""fp8 (e4m3fn) weights as ComfyUI reads them: which tensors, the per-tensor scale, encode and decode.

Two forms are written (and read):

* ``plain``: the UNet's linear and conv weights stored as ``F8_E4M3``, nothing else. ComfyUI's
  ``weight_dtype fp8_e4m3fn`` and Forge's fp8 storage load such a file; the values are the weights
  themselves, so anything beyond e4m3fn's range (+-448) saturates.
* ``scaled`` (the default): the UNet's linear weights stored as ``round(w / scale)`` with one fp32 scalar
  ``<module>.scale_weight`` next to each ``<module>.weight``, and a 2-element ``F8_E4M3`` marker tensor
  ``<unet prefix>scaled_fp8``. The rules follow ComfyUI's own source (read, not copied; checked against
  it by tests/test_comfyui.py):

  - ``comfy/model_detection.py`` (``model_config_from_unet``): the key ``{unet_key_prefix}scaled_fp8``
    marks a scaled checkpoint; the marker's *dtype* names the fp8 format (an fp32 marker means
    e4m3fn) and a 2-element marker turns ComfyUI's fp8 matrix multiplication off. Ours has 2 elements:
    with it on, ComfyUI would also round the *activations* to fp8 (clamped to +-448, no calibrated input
    scale in the file) on GPUs that can, which the weight-error figures and ``verify``'s verdict do not
    measure, and it would log every layer's ``scale_input`` as missing.
  - ``comfy/ops.py`` (``scaled_fp8_ops``): only its ``Linear`` owns a ``scale_weight`` parameter (a 0-dim
    fp32 scalar) and uses ``weight * scale_weight`` as its weight; LoRA patches are applied to that
    product and divided back by the scale. Its ``Conv2d`` has no scale: a scaled conv weight would load
    as ``round(w / scale)`` itself and its ``scale_weight`` be dropped as an unexpected key. So the scaled
    form keeps the conv weights (13 % of SDXL's UNet) in their dtype (:func:`is_fp8_target`).
  - The published fp8 SDXL checkpoints keep norms, biases, the VAE and the text encoders in their
    dtype: only UNet weights are fp8.

The scale is chosen from the tensor's largest magnitude: the smallest power of two with ``amax / scale
<= 448`` (:func:`scale_for`), so the largest weight lands in e4m3fn's top binade and the division by
the scale is exact; an all-zero tensor gets 1.0.
The default is ``scaled`` because a per-tensor scale keeps the small-magnitude layers (most of
SDXL's weights are below 0.1, where plain e4m3fn has few steps left) about as precise as the large
ones, and ComfyUI then recognises the file as scaled fp8 rather than a plain fp8 cast.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lora_tools.io.magnitudes import tensor_largest_magnitude
from lora_tools.io.native import NATIVE as _native  # the one-pass rounding, where it is built (else torch's cast)

if TYPE_CHECKING:
    import torch


Fp8Form = Literal["scaled", "plain"]
FP8_FORMS: tuple[Fp8Form, ...] = ("scaled", "plain")
#: The safetensors dtype of the fp8 tensors (torch.float8_e4m3fn).
FP8_DTYPE = "F8_E4M3"
#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0
#: Name of the scaled form's marker tensor after the UNet's key prefix (comfy/model_detection.py).
MARKER = "scaled_fp8"
#: Suffix of the per-tensor scale next to ``<module>.weight`` (comfy/ops.py scaled_fp8_ops).
SCALE_SUFFIX = "scale_weight"
#: The scaled form's marker has 2 elements: ComfyUI then computes with the weights dequantised (no fp8 matmul).
MARKER_SHAPE = (2,)
#: Where ComfyUI looks for the UNet in a single file (its ``unet_key_prefix`` for SGM checkpoints).
SGM_UNET_PREFIX = "model.diffusion_model."


def is_fp8_target(component: str | None, name: str, shape: Sequence[int], form: Fp8Form) -> bool:
    """Whether a tensor goes to fp8 in ``form``: a UNet linear (2-D) weight, and in the plain form a UNet
    conv (4-D) weight too (ComfyUI's scaled-fp8 ops scale linear layers only); never a norm, bias, VAE or
    text-encoder tensor."""
    dims = (2, 4) if form == "plain" else (2,)
    return component == "unet" and name.endswith(".weight") and len(shape) in dims


def scale_key(weight_key: str) -> str:
    """``a.b.weight`` -> ``a.b.scale_weight`` (ComfyUI's parameter name, comfy/ops.py)."""
    return weight_key[: -len("weight")] + SCALE_SUFFIX


def marker_key(prefix: str) -> str:
    """The scaled form's marker: ``model.diffusion_model.scaled_fp8`` in a single file, ``scaled_fp8``
    in a standalone UNet."""
    return prefix + MARKER


def scale_for(amax: float) -> float:
    """The per-tensor scale of a tensor whose largest magnitude is ``amax``: the smallest power of two
    with ``amax / scale <= 448`` (1.0 for an all-zero tensor).

    A power of two because dividing by it is exact: ``w / scale`` is the fusion itself with its
    exponent moved, so the fp8 cast is the one rounding (a scale of exactly ``amax / 448`` would round
    the quotient to fp32 first). e4m3fn's relative step is the same in every binade, so this costs no
    precision: the largest weight lands in e4m3fn's top binade (224, 448], and only the subnormal
    threshold moves, by less than one binade.
    """
    if not (amax > 0.0 and math.isfinite(amax)):
        return 1.0
    mantissa, exponent = math.frexp(amax / FP8_MAX)  # amax / 448 = mantissa * 2**exponent, 0.5 <= mantissa < 1
    scale = math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)
    while amax / scale > FP8_MAX:  # (never, but the rule is the rule)
        scale *= 2.0
    return max(scale, _SMALLEST_SCALE)


#: Smallest scale written: fp32's smallest normal value (the scale is stored as fp32).
_SMALLEST_SCALE = 2.0 ** -126


def quantize(t: torch.Tensor, form: Fp8Form) -> tuple[torch.Tensor, float | None]:
    """``t`` (any float dtype; computed in fp32) as float8_e4m3fn, rounded once (nearest, ties to
    even), with its scale (``None`` for ``plain``). Values beyond +-448 saturate (torch's cast would
    make them NaN)."""
    q, scale, _ = quantize_measured(t, form)
    return q, scale


@dataclass(frozen=True)
class Rounding:
    """What one tensor's fp8 rounding did: squared Frobenius norms of the error and of the tensor,
    and how many values saturated at +-448."""

    err_sq: float
    ref_sq: float
    saturated: int = 0


#: Elements rounded per chunk (1 MiB of fp32: the working set stays in the CPU cache).
CHUNK_ELEMS = 256 * 1024


class BlockRounder:
    """Rounds one tensor to fp8, block by block, and measures the error as it goes.

    Each call takes an fp32 block of the tensor (contiguous, any shape; its values are used up) and
    where it starts in the tensor, writes its e4m3fn codes there in ``codes`` (one byte per
    element) and returns the block's largest magnitude. The scale (scaled form) is fixed before the first block, from ``bound``: the tensor's
    largest magnitude, or an estimate of it when it is not known yet (a fusion computed block by
    block: its base's); :meth:`fits` then tells whether the tensor's measured largest magnitude gives
    the same rounding, else the blocks are rounded again by a rounder made from it.

    The rounding is the C kernel's (``_native``: one pass over the block) where it is built,
    else torch's cast; both give the same codes, and the error is measured in the same pass.
    """

    def __init__(self, form: Fp8Form, codes: torch.Tensor, bound: float):
        import torch

        self.form, self.codes = form, codes.view(-1).view(torch.uint8)
        self.scale = scale_for(bound) if form == "scaled" else None
        # the plain form clamps (and counts) only where a value may be beyond +-448
        self.saturating = form == "plain" and not bound <= FP8_MAX
        self.err_sq = self.ref_sq = 0.0
        self.saturated = 0

    def __call__(self, block: torch.Tensor, start: int) -> float:
        """Round ``block`` (its values may be used up) into the codes from ``start``; its largest magnitude
        (NaN when it holds a NaN)."""
        x = block.view(-1)
        codes = self.codes[start:start + x.numel()]
        if _native is not None:
            inv = 1.0 / self.scale if self.scale is not None else 1.0
            limit = FP8_MAX if self.saturating else math.inf  # else nothing beyond +-448 where the rounding stands
            err_sq, ref_sq, saturated, amax = _native.round_e4m3fn(x.numpy(), codes.numpy(), inv, limit)
            if math.isfinite(amax):  # else torch's codes for NaN/Inf: rounded again below
                scale = self.scale or 1.0
                self.err_sq += err_sq
                self.ref_sq += ref_sq * scale * scale  # the error stays in the scaled units (see rounding())
                self.saturated += saturated
                return amax
        return self._round_with_torch(x, codes)

    def _round_with_torch(self, x: torch.Tensor, codes: torch.Tensor) -> float:
        import torch

        lo, hi = torch.aminmax(x)
        amax = max(-float(lo), float(hi))
        back, bits = _scratch(x.numel())
        self.ref_sq += float(torch.dot(x, x))
        if self.scale is not None and self.scale != 1.0:
            x.mul_(1.0 / self.scale)  # exact: a power of two
        fp8 = codes.view(torch.float8_e4m3fn)
        if self.saturating:  # the error counts what the clamp took off
            self.saturated += int((x.abs() > FP8_MAX).sum())
            fp8.copy_(torch.clamp(x, -FP8_MAX, FP8_MAX, out=back))
        else:
            fp8.copy_(x)
        x.abs_()  # rounding keeps the sign: |x| - |q| is the error
        x.sub_(_widen_magnitude(codes, bits, back), alpha=256.0)
        self.err_sq += float(torch.dot(x, x))
        return amax

    def fits(self, amax: float) -> bool:
        """Whether the blocks' rounding stands for a tensor whose largest magnitude is ``amax``."""
        if self.form == "scaled":
            return self.scale == scale_for(amax)
        return self.saturating or amax <= FP8_MAX

    def rounding(self) -> Rounding:
        scale = self.scale or 1.0
        return Rounding(self.err_sq * scale * scale, self.ref_sq, self.saturated)

    def encoded(self, shape: Sequence[int]) -> tuple[Fp8Form, torch.Tensor, float | None, Rounding]:
        """What the fp8 sinks take (``Payload.encoded``): the form, the fp8 tensor of ``shape``, its scale
        and its rounding."""
        import torch

        return self.form, self.codes.view(torch.float8_e4m3fn).view(tuple(shape)), self.scale, self.rounding()


@dataclass(frozen=True)
class Fp8Encoding:
    """The fp8 rounding a sink asks the engine for while it computes a tensor (a fusion): bytes per
    element, and a :class:`BlockRounder` for the result's codes."""

    form: Fp8Form
    itemsize: int = 1

    def rounder(self, codes: torch.Tensor, bound: float) -> BlockRounder:
        return BlockRounder(self.form, codes, bound)


def quantize_measured(t: torch.Tensor, form: Fp8Form, *, amax: float | None = None, consume: bool = False,
                      into: memoryview | bytearray | None = None) -> tuple[torch.Tensor, float | None, Rounding]:
    """:func:`quantize` and its error, measured in the same pass.

    The tensor is read once (after its ``amax``: given, e.g. measured while it was computed, or read
    here), chunk by chunk through cache-sized scratch buffers (:class:`BlockRounder`): no full-size
    temporary. With ``consume``, a contiguous fp32 ``t`` is worked on in place (its values are lost).
    ``into``: memory for the result (at least one byte per element, not ``t``'s), e.g. a reused buffer
    the writer sends uncopied; by default a new tensor.
    """
    import torch

    flat = t.reshape(-1)
    n = flat.numel()
    if into is not None and n and memoryview(into).nbytes >= n:
        q = torch.frombuffer(into, dtype=torch.uint8, count=n).view(torch.float8_e4m3fn).view(t.shape)
    else:
        q = torch.empty(t.shape, dtype=torch.float8_e4m3fn)
    if n == 0:
        return q, (1.0 if form == "scaled" else None), Rounding(0.0, 0.0)
    if amax is None:
        amax = tensor_largest_magnitude(t)
    rounder = BlockRounder(form, q, amax)
    in_place = consume and t.dtype == torch.float32 and t.is_contiguous()
    chunk = _local_chunk()
    for i in range(0, n, CHUNK_ELEMS):
        j = min(n, i + CHUNK_ELEMS)
        if in_place:
            x = flat[i:j]
        else:
            x = chunk[:j - i]
            x.copy_(flat[i:j])
        rounder(x, i)
    return q, rounder.scale, rounder.rounding()


_local = threading.local()


def _local_chunk() -> torch.Tensor:
    """This thread's fp32 chunk for :func:`quantize_measured`, kept."""
    import torch

    chunk = getattr(_local, "chunk", None)
    if chunk is None or chunk.numel() != CHUNK_ELEMS:
        chunk = _local.chunk = torch.empty(CHUNK_ELEMS, dtype=torch.float32)
    return chunk


def _scratch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's scratch for a :class:`BlockRounder` block of ``n`` elements (fp32, int16), kept."""
    import torch

    bufs = getattr(_local, "scratch", None)
    if bufs is None or bufs[0].numel() < n:
        bufs = _local.scratch = (torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.int16))
    return bufs[0][:n], bufs[1][:n]


def _widen_magnitude(codes: torch.Tensor, bits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``|value| / 256`` of e4m3fn codes (uint8), exactly, into ``out`` (fp32), through ``bits`` (int16).

    An e4m3fn code's exponent and mantissa bits, shifted into an fp16's (``(code & 0x7f) << 7``), read
    as that fp16 the value times 2**-8 (the exponent biases differ by 8), subnormals included; fp16
    -> fp32 is a fast vectorised cast, torch's fp8 -> fp32 is not.
    """
    import torch

    bits.copy_(codes)
    bits.bitwise_and_(0x7F).bitwise_left_shift_(7)
    return out.copy_(bits.view(torch.float16))


def dequantize(q: torch.Tensor, scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight an fp8 tensor stands for: ``q * scale`` (as comfy/ops.py computes it)."""
    import torch

    w = q.to(torch.float32)
    if scale is None:
        return w
    s = scale if isinstance(scale, float) else float(scale.to(torch.float32).reshape(()))
    return w * s


@dataclass
class Fp8Error:
    """The weight error of the fp8 rounding, accumulated while streaming: relative Frobenius error of
    all fp8 tensors together (``||dequant - w|| / ||w||``) and the worst single tensor."""

    err_sq: float = 0.0
    ref_sq: float = 0.0
    tensors: int = 0
    saturated: int = 0  # values clamped to +-448 (plain form only)
    worst: tuple[str, float] | None = None
    scales: list[float] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set, repr=False)

    def add(self, name: str, r: Rounding, scale: float | None) -> None:
        """Account one tensor (once per name, however many outputs write it)."""
        if name in self._seen:
            return
        self._seen.add(name)
        self.err_sq += r.err_sq
        self.ref_sq += r.ref_sq
        self.tensors += 1
        self.saturated += r.saturated
        if scale is not None:
            self.scales.append(scale)
        rel = math.sqrt(r.err_sq / r.ref_sq) if r.ref_sq > 0 else 0.0
        if self.worst is None or rel > self.worst[1]:
            self.worst = (name, rel)

    @property
    def relative(self) -> float:
        """Relative Frobenius error of all fp8 tensors together."""
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq > 0 else 0.0


@dataclass(frozen=True)
class Fp8Layout:
    """How a file stores fp8 weights: ``form`` (``plain``/``scaled``), how many fp8 tensors, the
    range of their scales (scaled form)."""

    form: Fp8Form
    tensors: int
    scale_range: tuple[float, float] | None = None

    def describe(self) -> str:
        text = f"fp8 {self.form} (e4m3fn): {self.tensors} fp8 tensors"
        if self.scale_range is not None:
            text += f", scale_weight {self.scale_range[0]:.3g} .. {self.scale_range[1]:.3g}"
        return text


def layout_of(dtypes: Mapping[str, str], scales: Mapping[str, float] | None = None) -> Fp8Layout | None:
    """The fp8 layout of a file from its tensors' dtypes (name -> safetensors dtype) and, for the scale
    range, the values of its ``scale_weight`` tensors; ``None`` when it holds no fp8 weight."""
    n = sum(1 for k, d in dtypes.items() if d in ("F8_E4M3", "F8_E5M2") and not k.endswith(MARKER))
    if n == 0:
        return None
    scaled = any(k == MARKER or k.endswith("." + MARKER) for k in dtypes) or any(k.endswith("." + SCALE_SUFFIX)
                                                                                  for k in dtypes)
    rng = (min(scales.values()), max(scales.values())) if scaled and scales else None
    return Fp8Layout("scaled" if scaled else "plain", n, rng)


def is_fp8_extra(name: str) -> bool:
    """The marker and scale tensors of the scaled form: not weights of the model."""
    return name == MARKER or name.endswith("." + MARKER) or name.endswith("." + SCALE_SUFFIX)


def dequantize_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loaded state dict with its fp8 weights as the fp32 weights they stand for (``weight * scale_weight``,
    plain fp8 simply widened) and the scale and marker tensors dropped; other tensors as they are. What a
    reader that computes in fp16/fp32 (diffusers, CPU torch) needs to use an fp8 file."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if is_fp8_extra(k):
            continue
        if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            s = state.get(scale_key(k)) if k.endswith(".weight") else None
            v = dequantize(v, s)
        out[k] = v
    return out


def output_dtype_of(component: str | None, name: str, shape: Sequence[int], dtype: str, form: Fp8Form) -> str:
    """The dtype a tensor takes in an fp8 output of ``form``: fp8 for the targets, its own for the rest."""
    return FP8_DTYPE if is_fp8_target(component, name, shape, form) else dtype


__all__ = ["Fp8Form", "FP8_FORMS", "FP8_DTYPE", "FP8_MAX", "MARKER", "SCALE_SUFFIX", "SGM_UNET_PREFIX", "MARKER_SHAPE", "Fp8Error",
           "Fp8Layout", "Rounding", "BlockRounder", "Fp8Encoding", "quantize_measured", "is_fp8_target", "scale_key", "marker_key", "scale_for", "quantize", "dequantize", "layout_of",
           "is_fp8_extra", "output_dtype_of", "dequantize_state"]
