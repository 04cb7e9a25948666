"""LoRAs for other model families are named as such: SD1.x vs SD2.x by their cross-attention
context width, Flux by its block names under every envelope; SDXL LoRAs are never mistaken."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_tools.errors import UnsupportedModelError
from lora_tools.io.safetensors import save_tensors
from lora_tools.lora.family import HINTS, foreign_format_name, looks_like_flux, sd_family
from lora_tools.lora.load import load_lora
from lora_tools.testing.synthetic_lora import make_lora


def _kohya(path: Path, modules: dict[str, tuple[int, int, int]]) -> Path:
    t = {}
    for name, (out, fan_in, r) in modules.items():
        t[f"lora_unet_{name}.lora_down.weight"] = torch.zeros(r, fan_in)
        t[f"lora_unet_{name}.lora_up.weight"] = torch.zeros(out, r)
    return save_tensors(path, t)


@pytest.mark.parametrize("width, family", [(768, "sd1.x"), (1024, "sd2.x"), (512, "sd1.x/sd2.x")])
def test_cross_attention_width_names_the_sd_family(tmp_path: Path, width: int, family: str) -> None:
    path = _kohya(tmp_path / "a.safetensors", {"down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320, 2),
                                               "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v": (320, width, 2)})
    with load_lora(path) as a:
        assert sd_family(a.modules) == family
        assert foreign_format_name(a.format, a.modules) == "kohya"
    assert "SD1.x/SD2.x" in HINTS["sd1.x/sd2.x"]


def test_sd_block_names_without_cross_attention_stay_undecided(tmp_path: Path) -> None:
    path = _kohya(tmp_path / "a.safetensors", {"up_blocks_3_attentions_2_proj_out": (320, 320, 2)})
    with load_lora(path) as a:
        assert sd_family(a.modules) == "sd1.x/sd2.x"


@pytest.mark.parametrize("fmt", ["kohya", "kohya-diffusers", "diffusers", "comfy", "peft"])
def test_sdxl_loras_are_neither_sd1_nor_flux(fmt: str) -> None:
    tensors, _ = make_lora("tiny", fmt=fmt, targets="all", components=("unet",))
    keys = list(tensors)
    assert not looks_like_flux(keys)
    from lora_tools.lora.load import detect_format

    assert detect_format(keys) == fmt


@pytest.mark.parametrize("key", [
    "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
    "transformer.transformer_blocks.3.ff.net.0.proj.lora_B.weight",
    "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
    "lora_unet_single_blocks_7_linear1.lora_up.weight",
    "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight",
    "lora_transformer_single_transformer_blocks_0_attn_to_k.lora_A.weight",
])
def test_flux_key_families_are_named_flux(tmp_path: Path, key: str) -> None:
    path = save_tensors(tmp_path / "flux.safetensors", {key: torch.zeros(2, 8)})
    with pytest.raises(UnsupportedModelError) as e:
        load_lora(path)
    assert str(e.value) == f"'{path}' is a Flux LoRA (first key: {key}), which does not fit SDXL."
