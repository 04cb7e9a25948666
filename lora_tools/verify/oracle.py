"""diffusers as the oracle of a fused file's images: the base with the LoRAs applied at run time,
and the distance (PSNR, max abs) a faithful fusion must stay within. The weight-by-weight check
is :func:`lora_tools.verify.weights.compare_with_runtime_lora`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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


def runtime_lora_loader(loras: Sequence[tuple[str | Path, float]], unet_config: Any) -> Callable[[Any, str], None]:
    """What :func:`apply_runtime_loras` does, one model at a time: called with the pipeline and the attribute of a
    model just loaded (:class:`lora_tools.verify.pipeline.ModelParts`' ``on_load``), it gives that model the LoRAs'
    layers through diffusers' own loaders and sets their strengths. ``unet_config``: the UNet's config (kohya-named
    LoRAs are mapped by it) while the UNet itself is not loaded."""
    names = [f"l{i}" for i in range(len(loras))]
    strengths = dict(zip(names, (float(s) for _, s in loras), strict=True))

    def on_load(pipe: Any, attr: str) -> None:
        if not loras or attr not in ("unet", "text_encoder", "text_encoder_2"):
            return
        from diffusers.loaders.lora_base import set_adapters_for_text_encoder

        model = getattr(pipe, attr)
        with quiet_diffusers():
            for name, (path, _) in zip(names, loras, strict=True):
                state, alphas, metadata = pipe.lora_state_dict(str(path), unet_config=unet_config,
                                                               return_lora_metadata=True)
                if attr == "unet":
                    pipe.load_lora_into_unet(state, network_alphas=alphas, unet=model, adapter_name=name,
                                             metadata=metadata, _pipeline=pipe)
                else:
                    pipe.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=model, prefix=attr,
                                                     lora_scale=pipe.lora_scale, adapter_name=name,
                                                     metadata=metadata, _pipeline=pipe)
            present = [n for n in names if n in getattr(model, "peft_config", {})]
            if not present:
                return
            weights = [strengths[n] for n in present]
            if attr == "unet":
                model.set_adapters(present, weights)
            else:
                set_adapters_for_text_encoder(present, model, weights)

    return on_load


def psnr_db(ours: Any, ref: Any, peak: float | None = None) -> float:
    """PSNR in dB of ``ours`` against ``ref`` with ``peak`` as signal, by default the reference's own peak-to-peak
    range (``inf`` when equal; ``nan`` when either holds NaN). 8-bit images: ``peak=255``."""
    import torch

    a, b = ours.double(), ref.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    mse = float(((a - b) ** 2).mean())
    peak = peak if peak is not None else float(b.max() - b.min()) or 1.0
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


#: Faithfulness threshold (PSNR, dB) per dtype of the run: fp32 maths differ only by rounding
#: (>= 50 dB on tiny models); fp16/bf16 thresholds are provisional until measured on a GPU.
PSNR_THRESHOLDS_DB: dict[str, float] = {"fp32": 50.0, "fp16": 30.0, "bf16": 25.0}
#: Threshold for a model whose weights are fp8 (lora_tools.io.fp8) against its fp16/fp32 counterpart: the fp8
#: rounding (~2.5 % relative weight error) is a real change, not rounding noise. Tiny models on CPU measure
#: ~40 dB on final latents (README); provisional until measured at 1024x1024 on a GPU.
FP8_PSNR_THRESHOLD_DB = 30.0
