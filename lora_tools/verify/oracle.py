"""diffusers as the oracle of a fused file's images: the base with the LoRAs applied at run time,
and the distance (PSNR, max abs) a faithful fusion must stay within. The weight-by-weight check
is :func:`lora_tools.verify.weights.compare_with_runtime_lora`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_tools.verify.sampler import quiet_diffusers


def apply_runtime_loras(pipe: Any, loras: Sequence[tuple[str | Path, float]]) -> None:
    """Apply ``loras`` to ``pipe`` at run time through diffusers (``load_lora_weights`` +
    ``set_adapters``), not fused: the reference a fused file must behave like (none: the pipe as it is)."""
    if not loras:
        return
    with quiet_diffusers():
        names = [f"l{i}" for i in range(len(loras))]
        for name, (path, _) in zip(names, loras, strict=True):
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(names, adapter_weights=[float(s) for _, s in loras])


def psnr_db(ours: Any, ref: Any) -> float:
    """PSNR in dB of ``ours`` against ``ref`` with the reference's own peak-to-peak range as signal
    (``inf`` when equal; ``nan`` when either holds NaN)."""
    import torch

    a, b = ours.double(), ref.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    mse = float(((a - b) ** 2).mean())
    peak = float(b.max() - b.min()) or 1.0
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


#: Faithfulness threshold (PSNR, dB) per dtype of the run: fp32 maths differ only by rounding
#: (>= 50 dB on tiny models); fp16/bf16 thresholds are provisional until measured on a GPU.
PSNR_THRESHOLDS_DB: dict[str, float] = {"fp32": 50.0, "fp16": 30.0, "bf16": 25.0}
#: Threshold for a model whose weights are fp8 (lora_tools.io.fp8) against its fp16/fp32 counterpart: the fp8
#: rounding (~2.5 % relative weight error) is a real change, not rounding noise. Tiny models on CPU measure
#: ~40 dB on final latents (README); provisional until measured at 1024x1024 on a GPU.
FP8_PSNR_THRESHOLD_DB = 30.0
