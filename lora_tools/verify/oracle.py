"""diffusers as the oracle of a fused file: its weights, and its images with the LoRAs applied at run time.

diffusers is the oracle: the base is loaded into diffusers models, the LoRAs are applied with
``load_lora_weights`` + ``fuse_lora``, and every weight is compared with the fused file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lora_tools.layouts.sdxl import sgm_to_diffusers_state_dicts
from lora_tools.safetensors_io import load_tensors, read_header
from lora_tools.verify.pipeline import build_pipeline
from lora_tools.verify.sampler import quiet_diffusers

_PIPE_NAMES = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


@dataclass(frozen=True)
class FuseCheck:
    """Result of comparing a fused file with diffusers' fusion of the same LoRAs."""

    tensors_compared: int
    tensors_changed: int
    max_rel_diff: float
    tolerance: float
    worst_key: str

    @property
    def ok(self) -> bool:
        return self.max_rel_diff <= self.tolerance


def apply_runtime_loras(pipe: Any, loras: Sequence[tuple[str | Path, float]]) -> None:
    """Apply ``loras`` to ``pipe`` at run time through diffusers (``load_lora_weights`` +
    ``set_adapters``), not fused: the reference a fused file must behave like."""
    with quiet_diffusers():
        names = [f"l{i}" for i in range(len(loras))]
        for name, (path, _) in zip(names, loras):
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


def compare_with_runtime_lora(base: str | Path, fused: str | Path, loras: Sequence[tuple[str | Path, float]],
                              *, tolerance: float | None = None) -> FuseCheck:
    """Compare ``fused`` with diffusers' ``load_lora_weights`` + ``fuse_lora`` of ``loras`` on ``base``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # PEFT's many small ops run far faster without thread hand-offs on small models
    try:
        return _compare(base, fused, loras, tolerance)
    finally:
        torch.set_num_threads(threads)


def _compare(base: str | Path, fused: str | Path, loras: Sequence[tuple[str | Path, float]],
             tolerance: float | None) -> FuseCheck:
    loaded = build_pipeline(base, tokenizers=False)
    pipe, cfg = loaded.pipe, loaded.cfg
    assert cfg is not None
    with quiet_diffusers():
        for i, (path, strength) in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        pipe.set_adapters([f"l{i}" for i in range(len(loras))], adapter_weights=[s for _, s in loras])
        pipe.fuse_lora(adapter_names=[f"l{i}" for i in range(len(loras))], lora_scale=1.0)
        pipe.unload_lora_weights()
    before = sgm_to_diffusers_state_dicts(load_tensors(base), cfg.table, ["unet", "te1", "te2"])
    header = read_header(fused)
    fused_sd = sgm_to_diffusers_state_dicts(load_tensors(fused), cfg.table, ["unet", "te1", "te2"])
    fused_dtype = next(iter(header.tensors.values())).dtype
    tol = tolerance if tolerance is not None else (1e-6 if fused_dtype == "F32" else 2e-3)
    compared = changed = 0
    worst, worst_key = 0.0, ""
    for comp, name in _PIPE_NAMES.items():
        oracle = getattr(pipe, name).state_dict()
        for key, ours in fused_sd[comp].items():  # type: ignore[index]
            ref = oracle.get(key, oracle.get(key.removeprefix("text_model.")))
            if ref is None:
                continue
            compared += 1
            if not bool((ref.float() == before[comp][key].float()).all()):  # type: ignore[index]
                changed += 1
            scale = ref.float().abs().max().item() or 1.0
            err = (ours.float() - ref.float()).abs().max().item() / scale
            if err > worst or math.isnan(err):
                worst, worst_key = err, f"{name}.{key}"
    return FuseCheck(compared, changed, worst, tol, worst_key)
