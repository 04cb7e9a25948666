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


def test_norms_and_embeddings_are_targets_fused_like_the_dense_reference(tmp_path: Path) -> None:
    """Full diffs on norm weights and the token embedding, a LoRA on bigG's position embedding:
    each fused tensor equals W + delta computed in fp64 from the formulas."""
    from lora_tools.safetensors_io import load_tensors

    base = write_checkpoint(tmp_path / "base.safetensors", "tiny", dtype="fp32")
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(77, 2, generator=g), torch.randn(2, 32, generator=g)
    t = {"lora_te1_text_model_final_layer_norm.diff": torch.randn(32, generator=g),
         "lora_te1_text_model_embeddings_token_embedding.diff": torch.randn(1000, 32, generator=g),
         "lora_te2_text_model_embeddings_position_embedding.lora_up.weight": up,
         "lora_te2_text_model_embeddings_position_embedding.lora_down.weight": down,
         "lora_te2_text_model_embeddings_position_embedding.alpha": torch.tensor(1.0),
         "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_norm1.diff": torch.randn(64, generator=g),
         "lora_unet_conv_norm_out.diff": torch.randn(32, generator=g)}
    lora = save_tensors(tmp_path / "l.safetensors", t)
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(cli, ["fuse", str(base), "--lora", f"{lora}:0.5", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    a, b = load_tensors(base), load_tensors(out)
    te1, te2, unet = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.", "model.diffusion_model."
    want = {te1 + "text_model.final_layer_norm.weight": t["lora_te1_text_model_final_layer_norm.diff"],
            te1 + "text_model.embeddings.token_embedding.weight": t["lora_te1_text_model_embeddings_token_embedding.diff"],
            te2 + "positional_embedding": up.double() @ down.double() * (1.0 / 2),
            unet + "input_blocks.4.1.transformer_blocks.0.norm1.weight":
                t["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_norm1.diff"],
            unet + "out.0.weight": t["lora_unet_conv_norm_out.diff"]}
    assert sorted(k for k in a if not torch.equal(a[k], b[k])) == sorted(want)
    for k, delta in want.items():
        ref = a[k].double() + 0.5 * delta.double()
        assert torch.allclose(b[k].double(), ref, rtol=0, atol=1e-6), k


def test_a_bias_diff_is_refused_with_its_reason_not_half_applied(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base.safetensors", "tiny", dtype="fp16", components=("unet",))
    name = "lora_unet_down_blocks_1_attentions_0_proj_in"
    lora = save_tensors(tmp_path / "b.safetensors", {f"{name}.diff": torch.zeros(64, 64), f"{name}.diff_b": torch.ones(64)})
    r = CliRunner().invoke(cli, ["fuse", str(base), "--lora", str(lora), "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 1
    assert ".diff_b" in r.stderr and "1 of 1 modules" in r.stderr
