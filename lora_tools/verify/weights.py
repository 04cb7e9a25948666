"""diffusers as the oracle of a fused file's weights: the base loaded into diffusers models, the
LoRAs applied with ``load_lora_weights`` + ``fuse_lora``, and every weight compared with the fused file."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_tools.io.fp8 import dequantize_state
from lora_tools.io.safetensors import load_tensors, read_header
from lora_tools.layouts.sdxl import config_from_shapes, sgm_to_diffusers_state_dicts
from lora_tools.verify.sampler import quiet_diffusers

__all__ = ["FuseCheck", "compare_with_runtime_lora"]

_PIPE_NAMES = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


@dataclass(frozen=True)
class FuseCheck:
    """Result of comparing a fused file with diffusers' fusion of the same LoRAs.

    Attributes:
        tensors_compared: weights of the fused file found in diffusers' models.
        tensors_changed: of those, the ones diffusers' fusion changed (the LoRAs reached them).
        max_rel_diff: the largest ``max |ours - diffusers| / max |diffusers|`` over the weights.
        tolerance: the bound ``max_rel_diff`` must stay within.
        worst_key: the weight of ``max_rel_diff``.
    """

    tensors_compared: int
    tensors_changed: int
    max_rel_diff: float
    tolerance: float
    worst_key: str

    @property
    def ok(self) -> bool:
        """The fused file is within ``tolerance`` of diffusers' fusion everywhere."""
        return self.max_rel_diff <= self.tolerance


def compare_with_runtime_lora(base: str | Path, fused: str | Path, loras: Sequence[tuple[str | Path, float]],
                              *, tolerance: float | None = None) -> FuseCheck:
    """Compare ``fused`` with diffusers' ``load_lora_weights`` + ``fuse_lora`` of ``loras`` on ``base``.

    Args:
        base (`str` or `Path`): the SGM single-file checkpoint the fused file was made from.
        fused (`str` or `Path`): the fused SGM single-file checkpoint.
        loras (`Sequence[tuple[str | Path, float]]`): the LoRAs and strengths that were fused.
        tolerance (`float`, *optional*): the relative bound; defaults to 1e-6 for fp32 files, 2e-3 else.

    Returns:
        [`FuseCheck`]: counts and the worst relative difference.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # PEFT's many small ops run far faster without thread hand-offs on small models
    try:
        return _compare(Path(base), Path(fused), loras, tolerance)
    finally:
        torch.set_num_threads(threads)


def _compare(base: Path, fused: Path, loras: Sequence[tuple[str | Path, float]], tolerance: float | None) -> FuseCheck:
    from lora_tools.verify.pipeline import build_pipeline

    pipe = build_pipeline(base, dtype="fp32", device="cpu", tokenizers=False).pipe
    cfg = config_from_shapes({k: t.shape for k, t in read_header(base).tensors.items()})
    names = [f"l{i}" for i in range(len(loras))]
    with quiet_diffusers():
        for name, (path, _) in zip(names, loras, strict=True):
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(names, adapter_weights=[float(s) for _, s in loras])
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    before = sgm_to_diffusers_state_dicts(dequantize_state(load_tensors(base)), cfg.table, ["unet", "te1", "te2"])
    header = read_header(fused)
    fused_sd = sgm_to_diffusers_state_dicts(dequantize_state(load_tensors(fused)), cfg.table, ["unet", "te1", "te2"])
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
