"""Refused stems name the reason (SDXL's structure), in the library and through ``loratool fuse``;
``allow_unmatched`` skips them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.layouts import TINY
from lora_tools.layouts.sdxl import FULL
from lora_tools.layouts.targets import TargetIndex
from lora_tools.lora.formats import load_lora
from lora_tools.lora.resolve import match_lora
from lora_tools.safetensors_io import save_tensors
from lora_tools.testing.synthetic import write_checkpoint

_NO_SHORTCUT = "SDXL's resnet down_blocks.0.resnets.0 has no conv_shortcut"


@pytest.mark.parametrize("table", [TINY.table, FULL.table], ids=["tiny", "full"])
@pytest.mark.parametrize("component, name, reason", [
    ("unet", "down_blocks.0.resnets.0.conv_shortcut", _NO_SHORTCUT),
    ("unet", "down_blocks_0_resnets_0_conv_shortcut", _NO_SHORTCUT),
    ("unet", "input_blocks_1_0_skip_connection", _NO_SHORTCUT),
    ("unet", "input_blocks.1.0.skip_connection", _NO_SHORTCUT),
    ("te1", "text_projection", "CLIP-L (te1) has no text_projection"),
    ("te2", "text_projection", "not a target yet"),
    ("te1", "text_model_embeddings_token_embedding", "not targets yet"),
])
def test_why_not_names_what_sdxl_lacks(table, component: str, name: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    index = TargetIndex(table)
    assert index.lookup(component, name) is None  # type: ignore[arg-type]
    why = index.why_not(component, name)  # type: ignore[arg-type]
    assert why is not None and reason in why


@pytest.mark.parametrize("name", ["down_blocks.1.resnets.0.conv_shortcut", "input_blocks_4_0_skip_connection"])
def test_existing_conv_shortcuts_resolve(name: str) -> None:
    index = TargetIndex(TINY.table)
    assert index.lookup("unet", name) is not None
    assert index.why_not("unet", "down_blocks.9.resnets.0.conv_shortcut") is None  # no such resnet: no claim


def _lora(path: Path) -> Path:
    t = {}
    for name, out, fan_in in (("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64),
                              ("down_blocks_0_resnets_0_conv_shortcut", 32, 32)):
        t[f"lora_unet_{name}.lora_down.weight"] = torch.randn(2, fan_in)
        t[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, 2)
    return save_tensors(path, t)


def test_match_keeps_the_reason(tmp_path: Path) -> None:
    with load_lora(_lora(tmp_path / "l.safetensors")) as a:
        m = match_lora(a, TargetIndex(TINY.table))
        assert [u.name for u in m.unmatched] == ["down_blocks_0_resnets_0_conv_shortcut"]
        assert m.reasons_text() == f" unet:down_blocks_0_resnets_0_conv_shortcut: {_NO_SHORTCUT} " \
                                   "(its input and output widths are equal), so that LoRA module changes nothing SDXL has."


def test_fuse_refuses_with_the_reason_and_allow_unmatched_skips(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base.safetensors", "tiny", dtype="fp16", components=("unet",))
    lora = _lora(tmp_path / "l.safetensors")
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(cli, ["fuse", str(base), "--lora", str(lora), "-o", str(out)])
    assert r.exit_code == 1 and not out.exists()
    (line,) = r.stderr.strip().splitlines()
    assert _NO_SHORTCUT in line and "--allow-unmatched" in line
    r = CliRunner().invoke(cli, ["fuse", str(base), "--lora", str(lora), "-o", str(out), "--allow-unmatched"])
    assert r.exit_code == 0, r.stderr
    assert out.is_file()
