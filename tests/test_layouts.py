"""Layouts against the golden SDXL key list and against diffusers' own conversion."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lora_tools.errors import KeyMismatchError
from lora_tools.io.safetensors import load_tensors, read_header
from lora_tools.layouts import FULL, TINY, config_from_shapes
from lora_tools.layouts.sdxl import diffusers_to_sgm_state_dict, sgm_to_diffusers_state_dicts
from lora_tools.layouts.targets import TargetIndex
from lora_tools.testing import synthetic

GOLDEN = Path(__file__).resolve().parents[1] / "lora_tools" / "layouts" / "data" / "sdxl-sgm-keys.json"


def _golden() -> dict[str, list]:
    return json.loads(GOLDEN.read_text())["keys"]


def test_full_layout_is_exactly_the_real_sdxl_key_list():
    golden = {k: tuple(v[2]) for k, v in _golden().items() if v[0] != "scheduler"}
    markers = {k for k, v in _golden().items() if v[3] and v[0] == "diffuser"}  # v_pred, ztsnr, edm_vpred.*
    mine = {r.sgm_key: r.shape for r in FULL.table.rows}
    assert set(golden) - set(mine) == markers
    assert set(mine) - set(golden) == set()
    assert {k: s for k, s in mine.items() if golden[k] != s} == {}


def test_full_unet_has_sdxl_parameter_count():
    n = sum(math.prod(r.shape) for r in FULL.table.rows if r.component == "unet")
    assert n == 2_567_463_684


def test_full_size_synthetic_header_covers_the_layout(tmp_path):
    # Writing 6.9 GB is the benchmark's job; the plan it streams from is checked here.
    plan = synthetic.checkpoint_plan(FULL, synthetic.ALL_COMPONENTS, "F16")
    golden = {k for k, v in _golden().items() if not v[3]}
    keys = {k for k, _, _ in plan}
    assert golden <= keys
    assert keys - golden <= {k for k, v in _golden().items() if v[3]}


def test_lightning_target_list_has_788_modules_on_full_sdxl():
    from lora_tools.testing.synthetic_lora import select_targets

    targets = select_targets(FULL, "lightning")
    assert len(targets) == 788
    assert sum(64 * (t.shape[0] + math.prod(t.shape[1:])) for t in targets) == 196_751_360  # rank-64 factors


def test_config_is_read_back_from_file_shapes(tiny_checkpoint):
    shapes = {k: t.shape for k, t in read_header(tiny_checkpoint).tensors.items()}
    assert config_from_shapes(shapes) == TINY


@pytest.mark.diffusers
def test_tiny_single_file_loads_in_diffusers_from_single_file(tiny_checkpoint, tiny_diffusers_folder):
    """The oracle: diffusers reads our single file into exactly the model of our diffusers folder."""
    from diffusers import StableDiffusionXLPipeline

    ours = StableDiffusionXLPipeline.from_single_file(str(tiny_checkpoint), config=str(tiny_diffusers_folder),
                                                      local_files_only=True, dtype=torch.float32)
    ref = StableDiffusionXLPipeline.from_pretrained(tiny_diffusers_folder, local_files_only=True, dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(ref, name).state_dict()
        assert a.keys() == b.keys()
        diff = [k for k in a if not torch.equal(a[k], b[k])]
        assert diff == [], f"{name}: {len(diff)} tensors differ, first {diff[:3]}"


@pytest.mark.diffusers
@pytest.mark.smoke  # the default selection's oracle (diffusers' own converters; a fraction of a second)
def test_sgm_to_diffusers_equals_diffusers_own_conversion(tiny_checkpoint):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    ckpt = {k: v.float() for k, v in load_tensors(tiny_checkpoint).items()}
    ours = sgm_to_diffusers_state_dicts(ckpt, TINY.table, ["unet", "vae", "te1", "te2"])
    theirs = {
        "unet": convert_ldm_unet_checkpoint(ckpt, TINY.unet.diffusers_config()),
        "vae": convert_ldm_vae_checkpoint(ckpt, TINY.vae.diffusers_config()),
        "te1": convert_ldm_clip_checkpoint(ckpt, remove_prefix="conditioner.embedders.0.transformer."),
    }
    te2_cfg = {k: v for k, v in TINY.te2.transformers_config().items() if k not in ("architectures", "model_type", "torch_dtype")}
    theirs["te2"] = convert_open_clip_checkpoint(CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg)), ckpt,
                                                 prefix="conditioner.embedders.1.model.")
    for comp in ("unet", "vae", "te1", "te2"):
        mine = ours[comp]
        other = {k: v for k, v in theirs[comp].items() if not k.endswith("position_ids")}
        assert mine.keys() == other.keys(), comp
        bad = [k for k in mine if not torch.equal(mine[k], other[k])]
        assert bad == [], f"{comp}: {bad[:3]}"


def test_open_clip_qkv_and_projection_are_not_plain_renames(tiny_checkpoint):
    ckpt = load_tensors(tiny_checkpoint)
    sd = sgm_to_diffusers_state_dicts(ckpt, TINY.table, ["te2"])["te2"]
    fused = ckpt["conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"]
    h = fused.shape[1]
    assert torch.equal(sd["text_model.encoder.layers.3.self_attn.k_proj.weight"], fused[h:2 * h])
    proj = ckpt["conditioner.embedders.1.model.text_projection"]
    assert torch.equal(sd["text_projection.weight"], proj.t())


def test_round_trip_diffusers_to_sgm_is_exact(tiny_checkpoint):
    ckpt = load_tensors(tiny_checkpoint)
    sds = sgm_to_diffusers_state_dicts(ckpt, TINY.table, ["unet", "vae", "te1", "te2"])
    back = diffusers_to_sgm_state_dict(sds, TINY.table)
    skipped = {k for k in ckpt if k.endswith(("position_ids", "logit_scale"))}
    assert set(back) == set(ckpt) - skipped
    assert all(torch.equal(back[k], ckpt[k]) for k in back)


def test_conversion_is_total_and_names_leftovers(tiny_checkpoint):
    ckpt = load_tensors(tiny_checkpoint)
    ckpt["model.diffusion_model.input_blocks.99.0.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError, match=r"1 not in the SDXL layout \(first: model.diffusion_model.input_blocks.99.0.weight\)"):
        sgm_to_diffusers_state_dicts(ckpt, TINY.table, ["unet"], source="x.safetensors")
    del ckpt["model.diffusion_model.input_blocks.99.0.weight"]
    del ckpt["model.diffusion_model.out.2.weight"]
    with pytest.raises(KeyMismatchError, match="1 missing"):
        sgm_to_diffusers_state_dicts(ckpt, TINY.table, ["unet"])


def test_target_index_resolves_every_spelling_to_one_tensor():
    index = TargetIndex(FULL.table)
    by_sgm = index.lookup("unet", "input_blocks_4_1_transformer_blocks_0_attn1_to_q")
    by_diffusers = index.lookup("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert by_sgm is by_diffusers is not None
    assert by_sgm.sgm_key == "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    up = index.lookup("unet", "up_blocks_0_upsamplers_0_conv")
    assert up is not None and up.sgm_key == "model.diffusion_model.output_blocks.2.2.conv.weight"
    v = index.lookup("te2", "text_model_encoder_layers_31_self_attn_v_proj")
    assert v is not None and v.part == (2, 3) and v.shape == (1280, 1280)
    assert v.sgm_key == "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"
    assert index.lookup("unet", "down_blocks_0_attentions_0_proj_in") is None  # SD1.5 has it, SDXL does not
