"""The one block scheme: total over the SDXL layout, counts that follow the structure, the spec parser."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources

import pytest

from lora_tools.errors import KeyMismatchError, UsageError
from lora_tools.layouts.blocks import (
    BLOCKS,
    BlockSpecError,
    block_of,
    block_of_diffusers,
    block_of_key,
    parse_block_weights,
)
from lora_tools.layouts.sdxl import FULL, TINY
from lora_tools.layouts.table import SGM_PREFIXES
from lora_tools.layouts.targets import TargetIndex


def _golden_keys() -> dict[str, str]:
    """Full-size SDXL single-file key -> its component in the golden list (sd-mecha's names)."""
    data = json.loads(resources.files("lora_tools.layouts").joinpath("data/sdxl-sgm-keys.json").read_text())
    return {k: v[0] for k, v in data["keys"].items()}


def test_every_key_of_the_golden_full_size_list_has_a_block():
    golden = _golden_keys()
    prefixes = tuple(SGM_PREFIXES.values())
    model = {k for k in golden if k.startswith(prefixes)}
    others = sorted(k for k in golden if not k.startswith(prefixes))
    assert len(model) > 2500 and len(others) == 16  # 12 scheduler buffers, 4 v-pred/EDM/ztsnr markers
    blocks = Counter(block_of_key(k) for k in model)
    assert set(blocks) == set(BLOCKS)  # every block is used by the full-size model
    # the golden list (a real checkpoint's header) and our layout table agree block by block
    assert blocks == Counter(block_of_key(k) for k in FULL.table.sgm_keys())
    for k in others:  # buffers and markers, not weights
        with pytest.raises(KeyMismatchError):
            block_of_key(k)


def test_counts_per_block_follow_the_sdxl_structure():
    # Tensors of one resnet (norm1, conv1, time_emb_proj, norm2, conv2; weight + bias) and of one
    # transformer block (4 projections in each of 2 attentions, 3 biased, 2 ff, 3 norms).
    resnet, skip = 10, 2
    tblock = 2 * (3 + 2) + 2 * 2 + 3 * 2
    attention = 2 + 2 + 2 + 0  # norm, proj_in, proj_out (weight + bias each)
    counts = Counter(block_of(r.component, r.sgm) for r in FULL.table.rows)
    assert counts["TIME"] == counts["LABEL"] == counts["OUT"] == 4
    assert counts["IN00"] == 2  # conv_in
    assert counts["IN01"] == counts["IN02"] == resnet  # level 0: no attention
    assert counts["IN03"] == counts["IN06"] == 2  # downsamplers
    assert counts["IN04"] == resnet + skip + attention + 2 * tblock  # level 1: 2 transformer blocks
    assert counts["IN05"] == resnet + attention + 2 * tblock
    assert counts["IN07"] == resnet + skip + attention + 10 * tblock
    assert counts["IN08"] == resnet + attention + 10 * tblock
    assert counts["M00"] == 2 * resnet + attention + 10 * tblock
    assert counts["OUT00"] == counts["OUT01"] == resnet + skip + attention + 10 * tblock
    assert counts["OUT02"] == resnet + skip + attention + 10 * tblock + 2  # + upsampler conv
    assert counts["OUT05"] == resnet + skip + attention + 2 * tblock + 2
    assert counts["OUT06"] == counts["OUT07"] == counts["OUT08"] == resnet + skip
    assert counts["TE1"] == len(FULL.table.component_rows("te1"))
    assert counts["TE2"] == len(FULL.table.component_rows("te2"))
    assert counts["VAE"] == len(FULL.table.component_rows("vae"))
    assert sum(counts.values()) == len(FULL.table.rows)


@pytest.mark.parametrize("cfg", [FULL, TINY], ids=["full", "tiny"])
def test_diffusers_names_land_in_the_block_of_their_single_file_key(cfg):
    for r in cfg.table.rows:
        if r.diffusers is not None:
            assert block_of_diffusers(r.component, r.diffusers, cfg.table) == block_of(r.component, r.sgm), r


def test_known_spellings_of_one_module():
    assert block_of("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight") == "IN04"
    assert block_of("unet", "model.diffusion_model.output_blocks.8.0.skip_connection") == "OUT08"
    assert block_of_key("model.diffusion_model.time_embed.0.weight") == "TIME"
    assert block_of_key("conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight") == "TE2"
    assert block_of_diffusers("unet", "down_blocks.1.attentions.0.proj_in") == "IN04"
    assert block_of_diffusers("unet", "up_blocks.0.upsamplers.0.conv.weight") == "OUT02"
    assert block_of_diffusers("unet", "conv_out.weight") == "OUT"
    # kohya spellings go through the target index to the single-file key
    index = TargetIndex(FULL.table)
    t = index.lookup("unet", "down_blocks_2_attentions_1_transformer_blocks_9_ff_net_2")
    assert t is not None and block_of("unet", t.sgm_key) == "IN08"
    t = index.lookup("unet", "middle_block_1_transformer_blocks_0_attn2_to_k")
    assert t is not None and block_of("unet", t.sgm_key) == "M00"


@pytest.mark.parametrize("key, message", [
    ("input_blocks.11.1.proj_in.weight", "'input_blocks.11.1.proj_in.weight' is not in any SDXL UNet block"),
    ("output_blocks.9.0.skip_connection.weight", "'output_blocks.9.0.skip_connection.weight' is not in any"),
    ("model.diffusion_model.nonsense.weight", "'model.diffusion_model.nonsense.weight' is not in any"),
])
def test_keys_outside_the_structure_are_refused(key, message):
    with pytest.raises(KeyMismatchError, match=message):
        block_of("unet", key)


def test_block_of_key_needs_a_component_prefix():
    with pytest.raises(KeyMismatchError, match="'lora_unet_x' has no SDXL component prefix"):
        block_of_key("lora_unet_x")


def test_blocks_are_in_model_order():
    assert BLOCKS[:3] == ("TIME", "LABEL", "IN00")
    assert BLOCKS[BLOCKS.index("IN08") + 1] == "M00"
    assert BLOCKS[BLOCKS.index("M00") + 1] == "OUT00"
    assert BLOCKS[-4:] == ("OUT", "TE1", "TE2", "VAE")
    assert len(BLOCKS) == 2 + 9 + 1 + 9 + 1 + 3


def test_the_spec_of_the_issue():
    bw = parse_block_weights("IN04-IN08:0.5,M00:0,OUT*:1", default=0.25)
    assert [bw.weight(b) for b in ("IN03", "IN04", "IN06", "IN08", "M00")] == [0.25, 0.5, 0.5, 0.5, 0.0]
    assert all(bw.weight(f"OUT{i:02d}") == 1.0 for i in range(9)) and bw.weight("OUT") == 1.0
    assert bw.weight("TE1") == bw.weight("TIME") == 0.25
    assert bw.matches("IN05") and bw.matches("OUT") and not bw.matches("TE2")
    assert bw.describe() == "TIME-IN03 0.25, IN04-IN08 0.5, M00 0, OUT00-OUT 1, TE1-VAE 0.25"
    assert bw.weight_of("unet", "output_blocks.3.1.proj_in.weight") == 1.0
    assert bw.weight_of("te1", "text_model.encoder.layers.0.mlp.fc1.weight") == 0.25


def test_later_entries_win_and_a_bare_number_sets_every_block():
    bw = parse_block_weights("0, IN0?:2, in05:3")
    assert bw.weight("TIME") == 0 and bw.weight("IN04") == 2 and bw.weight("IN05") == 3
    assert bw.weight("IN08") == 2 and bw.weight("OUT00") == 0
    bw = parse_block_weights("BASE:0,MID:0.5")  # supermerger / LoRA Block Weight aliases
    assert bw.weight("TE1") == bw.weight("TE2") == 0 and bw.weight("M00") == 0.5 and bw.weight("IN00") == 1


@pytest.mark.parametrize("spec, message", [
    ("", "Empty block-weight spec: give PATTERN:WEIGHT entries."),
    ("IN04:1,,M00:0", "Empty entry in block-weight spec 'IN04:1,,M00:0'."),
    ("IN4:0.5", "Unknown block 'IN4' in 'IN4:0.5' (did you mean IN04?)."),
    ("IN09:1", "Unknown block 'IN09' in 'IN09:1' (did you mean IN08?)."),
    ("MIDDLE:1", "Unknown block 'MIDDLE' in 'MIDDLE:1' (did you mean MID?)."),
    ("IN04-IN12:1", "Unknown block 'IN12' in 'IN04-IN12:1' (did you mean IN02?)."),
    ("OUT08-IN01:1", "Block range 'OUT08-IN01' in 'OUT08-IN01:1' runs backwards: OUT08 comes after IN01."),
    ("Q*:1", "Block pattern 'Q*' in 'Q*:1' matches no SDXL block (blocks: TIME, LABEL, IN00,"),
    ("OUT*:x", "Weight 'x' in 'OUT*:x' is not a number."),
    ("M00:inf", "Weight 'inf' in 'M00:inf' is not finite."),
    (":1", "Block-weight entry ':1' names no block."),
    ("zzz:1", "Unknown block 'zzz' in 'zzz:1' (blocks: TIME, LABEL, IN00,"),
])
def test_bad_specs_name_the_entry_and_the_nearest_block(spec, message):
    with pytest.raises(BlockSpecError) as e:
        parse_block_weights(spec)
    assert str(e.value).startswith(message)
    assert isinstance(e.value, UsageError) and "--" not in str(e.value)


def test_weight_of_an_unknown_block_suggests_one():
    with pytest.raises(KeyMismatchError, match=r"'OUT9' is not an SDXL block \(did you mean OUT\?\)"):
        parse_block_weights("1").weight("OUT9")
