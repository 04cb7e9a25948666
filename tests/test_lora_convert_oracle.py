"""A LoRA converted by save_lora loads into diffusers (and PEFT) with the same weights as the original.

The oracle is diffusers' ``load_lora_weights`` + ``fuse_lora`` (tests/fuse_helpers.py), and for
raw PEFT files PEFT's own ``LoraConfig`` + ``inject_adapter_in_model`` + ``set_peft_model_state_dict``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_tools.io.safetensors import load_tensors, read_header
from lora_tools.lora.load import load_lora
from lora_tools.lora.save import save_lora
from lora_tools.testing.synthetic_lora import write_lora
from tests.fuse_helpers import REL_TOL, FuseAssets, clean_pipeline, diffusers_fuse, torch_threads

COMPONENTS = ("unet", "te1", "te2")


def _worst(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> tuple[float, int]:
    worst, changed = 0.0, 0
    for comp in COMPONENTS:
        assert set(a[comp]) == set(b[comp])
        for k, ref in a[comp].items():
            err = ((b[comp][k].float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()
            worst = max(worst, err)
    return worst, changed


@pytest.mark.parametrize("source_fmt, targets", [("kohya", "attn"), ("kohya-diffusers", "lightning"), ("diffusers", "attn")])
def test_converted_file_fuses_like_the_original_in_diffusers(assets: FuseAssets, tmp_path: Path, source_fmt: str,
                                                             targets: str) -> None:
    src = write_lora(tmp_path / "src.safetensors", "tiny", fmt=source_fmt, targets=targets, components=COMPONENTS,
                     rank=4, alpha=8.0, seed=31)
    (reference,) = diffusers_fuse(assets.folder, [(src, 1.0)])
    base = clean_pipeline(assets.folder)[1]
    changed = sum(not torch.equal(reference[c][k], base[c][k]) for c in COMPONENTS for k in base[c])
    assert changed > 0
    for fmt in ("diffusers", "kohya", "kohya-diffusers"):
        if fmt == source_fmt:
            continue
        with load_lora(src) as lora:
            out = save_lora(lora, tmp_path / f"{fmt}.safetensors", format=fmt)
        (fused,) = diffusers_fuse(assets.folder, [(out, 1.0)])
        worst, _ = _worst(reference, fused)
        assert worst <= REL_TOL, f"{source_fmt} -> {fmt}: {worst:.3g}"


def test_raw_peft_file_loads_in_peft_like_the_original(assets: FuseAssets, tmp_path: Path) -> None:
    """kohya -> peft: PEFT's LoraConfig from our flat metadata + set_peft_model_state_dict, merged."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    src = write_lora(tmp_path / "src.safetensors", "tiny", fmt="kohya", targets="lightning", components=("unet",),
                     rank=4, alpha=2.0, seed=32)
    with load_lora(src) as lora:
        # one module with another alpha, so alpha_pattern is exercised
        from dataclasses import replace

        mods = [replace(m, alpha=8.0) if i == 3 else m for i, m in enumerate(lora.modules)]
        lora = lora.with_modules(mods)
        ref_src = save_lora(lora, tmp_path / "ref.safetensors", format="kohya")
        out = save_lora(lora, tmp_path / "peft.safetensors", format="peft")
    (reference,) = diffusers_fuse(assets.folder, [(ref_src, 1.0)])
    meta = json.loads(read_header(out).metadata["lora_adapter_metadata"])
    assert meta["lora_alpha"] == 2 and len(meta["alpha_pattern"]) == 1

    from diffusers import UNet2DConditionModel

    with torch_threads(1):
        unet = UNet2DConditionModel.from_pretrained(assets.folder, subfolder="unet", torch_dtype=torch.float32,
                                                    local_files_only=True)
        config = LoraConfig(**{k: meta[k] for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern",
                                                    "target_modules", "use_dora")})
        inject_adapter_in_model(config, unet, adapter_name="x")
        sd = {k[len("base_model.model."):]: v for k, v in load_tensors(out).items()}
        result = set_peft_model_state_dict(unet, sd, adapter_name="x")
        assert not [k for k in result.unexpected_keys if "lora" in k]
        for module in unet.modules():
            if hasattr(module, "merge") and hasattr(module, "lora_A"):
                module.merge()
        got = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    worst = max(((got[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item() for k, v in reference["unet"].items())
    assert worst <= REL_TOL
