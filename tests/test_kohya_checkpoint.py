"""A fused single file loads in kohya sd-scripts' SDXL loader (``library/sdxl_model_util.py``,
``load_models_from_sdxl_checkpoint``), which fine-tunes further from it.

kohya's loader, as its code documents it, reimplemented here from the rules (not imported): the UNet is every
``model.diffusion_model.`` key with that prefix removed, which must match the SGM UNet's keys exactly; those keys
correspond one to one with the diffusers UNet's through kohya's prefix table (``make_unet_conversion_map``:
``input_blocks.{3i+j+1}.0.`` <-> ``down_blocks.{i}.resnets.{j}.`` with the resnet renames, ``.1.`` <-> attentions,
``input_blocks.{3(i+1)}.0.op.`` <-> downsamplers, ``output_blocks.{3i+j}.`` <-> up blocks, ``output_blocks.{3i+2}.2.``
<-> upsamplers, ``middle_block.{0,1,2}``, ``time_embed.{0,2}``, ``label_emb.0.{0,2}``, ``input_blocks.0.0.`` <->
``conv_in``, ``out.{0,2}`` <-> ``conv_norm_out``/``conv_out``), matched on the longest prefix of whole dotted
fragments. Text encoder 1 is ``conditioner.embedders.0.transformer.`` stripped (``position_ids`` dropped); text
encoder 2 is ``conditioner.embedders.1.model.`` renamed to the transformers CLIP names (``resblocks`` -> ``layers``,
``ln_`` -> ``layer_norm``, ``c_fc``/``c_proj`` -> ``fc1``/``fc2``, ``in_proj_`` split in three q/k/v, ``logit_scale``
set aside). kohya refuses a checkpoint with any missing or unexpected key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tools.io.safetensors import read_header
from tests.fuse_helpers import FuseAssets
from tests.lora_helpers import fused

pytestmark = [pytest.mark.diffusers, pytest.mark.slow]


def kohya_unet_prefixes() -> dict[str, str]:
    """SGM prefix -> diffusers prefix, kohya's table for SDXL (three levels, two resnets down, three up)."""
    layer: list[tuple[str, str]] = []
    for i in range(3):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        layer.append((f"output_blocks.{3 * i + 2}.2.", f"up_blocks.{i}.upsamplers.0."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    resnet = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
              ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
    table: dict[str, str] = {}
    for sgm, hf in layer:
        for a, b in (resnet if "resnets" in hf else [("", "")]):
            table[sgm + a] = hf + b
    for j in range(2):
        table[f"time_embed.{2 * j}."] = f"time_embedding.linear_{j + 1}."
        table[f"label_emb.0.{2 * j}."] = f"add_embedding.linear_{j + 1}."
    table.update({"input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."})
    return table


def kohya_unet_keys(sgm_keys: list[str]) -> set[str]:
    table = kohya_unet_prefixes()
    out = set()
    for key in sgm_keys:
        fragments = key.split(".")[:-1]
        while fragments and ".".join(fragments) + "." not in table:
            fragments.pop()
        assert fragments, f"kohya's table has no prefix for {key}"
        prefix = ".".join(fragments) + "."
        out.add(table[prefix] + key[len(prefix):])
    return out


def kohya_te2_keys(keys: list[str]) -> set[str]:
    root = "conditioner.embedders.1.model."
    out = set()
    for key in keys:
        k = key.replace(root + "transformer.", "text_model.encoder.").replace(root, "text_model.")
        if ".resblocks." in k:
            k = k.replace(".resblocks.", ".layers.")
            if ".attn.in_proj_" in k:
                stem = k.replace(".attn.in_proj_weight", ".self_attn.").replace(".attn.in_proj_bias", ".self_attn.")
                out |= {f"{stem}{p}_proj.{'weight' if k.endswith('weight') else 'bias'}" for p in "qkv"}
                continue
            k = (k.replace(".ln_", ".layer_norm").replace(".c_fc.", ".fc1.").replace(".c_proj.", ".fc2.")
                 .replace(".attn.out_proj.", ".self_attn.out_proj."))
        elif k.endswith(".positional_embedding"):
            k = k.replace(".positional_embedding", ".embeddings.position_embedding.weight")
        elif k == "text_model.text_projection":
            k = "text_projection.weight"
        elif k.endswith(".logit_scale") or k.endswith(".position_ids"):
            continue
        elif ".token_embedding." in k:
            k = k.replace(".token_embedding.weight", ".embeddings.token_embedding.weight")
        elif ".ln_final" in k:
            k = k.replace(".ln_final", ".final_layer_norm")
        out.add(k)
    return out


def transformers4_keys(model: object) -> set[str]:
    """A CLIP text model's state-dict keys as kohya's pinned transformers (4.54.1) names them: under ``text_model.``
    (transformers 5 drops that level from ``CLIPTextModel``), ``text_projection`` beside it; no ``position_ids``."""
    keys = set(model.state_dict())  # type: ignore[attr-defined]
    out = {k if k.startswith("text_model.") or k.startswith("text_projection.") else "text_model." + k for k in keys}
    return out - {"text_model.embeddings.position_ids"}


@pytest.fixture(scope="module")
def fused_file(assets: FuseAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kohya_ckpt") / "fused.safetensors"
    fused(assets.base, out, str(assets.lightning_lora), str(assets.style))
    return out


def test_a_fused_single_file_has_exactly_the_keys_kohyas_sdxl_loader_needs(assets: FuseAssets,
                                                                           fused_file: Path) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    keys = list(read_header(fused_file).tensors)
    folder = assets.folder  # its configs describe the same tiny model, in diffusers' and transformers' terms
    unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
    unet_keys = [k.removeprefix("model.diffusion_model.") for k in keys if k.startswith("model.diffusion_model.")]
    assert kohya_unet_keys(unet_keys) == set(unet.state_dict())
    assert len(unet_keys) == len(unet.state_dict())  # one to one: no two SGM keys land on one diffusers key

    te1 = CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json"))
    root1 = "conditioner.embedders.0.transformer."
    te1_keys = {k.removeprefix(root1) for k in keys if k.startswith(root1)} - {"text_model.embeddings.position_ids"}
    assert te1_keys == transformers4_keys(te1)

    te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(folder / "text_encoder_2" / "config.json"))
    te2_keys = kohya_te2_keys([k for k in keys if k.startswith("conditioner.embedders.1.model.")])
    assert te2_keys == transformers4_keys(te2)
