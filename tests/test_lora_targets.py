"""Refused stems name the reason (SDXL's structure), in the library and through ``loratool fuse``;
``allow_unmatched`` skips them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import save_tensors
from lora_tools.layouts import TINY
from lora_tools.layouts.sdxl import FULL
from lora_tools.layouts.targets import TargetIndex
from lora_tools.lora.load import load_lora
from lora_tools.lora.match import match_lora
from lora_tools.testing.synthetic import write_checkpoint

_NO_SHORTCUT = "SDXL's resnet down_blocks.0.resnets.0 has no conv_shortcut"


@pytest.mark.parametrize("table", [TINY.table, FULL.table], ids=["tiny", "full"])
@pytest.mark.parametrize("component, name, reason", [
    ("unet", "down_blocks.0.resnets.0.conv_shortcut", _NO_SHORTCUT),
    ("unet", "down_blocks_0_resnets_0_conv_shortcut", _NO_SHORTCUT),
    ("unet", "input_blocks_1_0_skip_connection", _NO_SHORTCUT),
    ("unet", "input_blocks.1.0.skip_connection", _NO_SHORTCUT),
    ("te1", "text_projection", "CLIP-L (te1) has no text_projection"),
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


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_norms_and_embeddings_are_targets_fused_like_the_dense_reference(tmp_path: Path) -> None:
    """Full diffs on norm weights and the token embedding, a LoRA on bigG's position embedding:
    each fused tensor equals W + delta computed in fp64 from the formulas."""
    from lora_tools.io.safetensors import load_tensors

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


_TE2, _TE1, _UNET = "conditioner.embedders.1.model.", "conditioner.embedders.0.transformer.", "model.diffusion_model."


@pytest.fixture(scope="module")
def sgm_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny single file, fp32, UNet and both text encoders (shared: the fuses only read it)."""
    return write_checkpoint(tmp_path_factory.mktemp("sgm") / "base.safetensors", "tiny", dtype="fp32",
                            components=("unet", "te1", "te2"))


@pytest.fixture(scope="module")
def folder_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_tools.testing.synthetic import write_diffusers_folder

    return write_diffusers_folder(tmp_path_factory.mktemp("folder") / "base", "tiny", dtype="fp32")


def _text_projection_lora(path: Path, naming: str, g: torch.Generator) -> tuple[Path, torch.Tensor]:
    """A rank-2 LoRA on bigG's text_projection (diffusers orientation: out x in) and its delta (alpha 1)."""
    up, down = torch.randn(32, 2, generator=g), torch.randn(2, 32, generator=g)
    stem = {"kohya": "lora_te2_text_projection", "comfy": "text_encoders.clip_g.transformer.text_projection",
            "diffusers": "text_encoder_2.text_projection"}[naming]
    if naming == "diffusers":
        t = {f"{stem}.lora_B.weight": up, f"{stem}.lora_A.weight": down}
        delta = up.double() @ down.double()  # no alpha: alpha = rank
    else:
        t = {f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down, f"{stem}.alpha": torch.tensor(1.0)}
        delta = up.double() @ down.double() * 0.5
    return save_tensors(path, t), delta


@pytest.mark.parametrize("table", [TINY.table, FULL.table], ids=["tiny", "full"])
def test_text_projection_is_a_transposed_target(table) -> None:  # type: ignore[no-untyped-def]
    index = TargetIndex(table)
    t = index.lookup("te2", "text_projection")
    assert t is not None and t.transposed and t.bias_key is None
    assert t.sgm_key == _TE2 + "text_projection" and t.diffusers_key == "text_projection.weight"
    assert t not in index.targets  # look-up only: extract and the synthetic LoRAs walk the trainer set


@pytest.mark.parametrize("naming", ["kohya", "comfy", "diffusers"])
@pytest.mark.slow
def test_text_projection_lora_lands_transposed_on_a_single_file(tmp_path: Path, sgm_base: Path, naming: str) -> None:
    """OpenCLIP stores text_projection as P with x @ P; the LoRA's delta is on W = P.T (diffusers
    and ComfyUI's Linear): P' = (P.T + s * delta).T, checked in fp64."""
    from lora_tools.io.safetensors import load_tensors

    base = sgm_base
    lora, delta = _text_projection_lora(tmp_path / "l.safetensors", naming, torch.Generator().manual_seed(1))
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(cli, ["fuse", str(base), "--lora", f"{lora}:0.7", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    a, b = load_tensors(base), load_tensors(out)
    key = _TE2 + "text_projection"
    assert [k for k in a if not torch.equal(a[k], b[k])] == [key]
    want = (a[key].double().T + 0.7 * delta).T
    assert torch.allclose(b[key].double(), want, rtol=0, atol=1e-6)
    wrong = a[key].double() + 0.7 * delta  # the same delta without the transpose
    assert not torch.allclose(b[key].double(), wrong, rtol=0, atol=1e-3)


def test_text_projection_lora_on_a_diffusers_folder_matches_diffusers_orientation(tmp_path: Path,
                                                                                  folder_base: Path) -> None:
    """The same LoRA fused into a diffusers folder changes text_encoder_2's ``text_projection.weight``
    by exactly s * up @ down (the orientation transformers' Linear uses), read straight from the output file.
    diffusers itself has no oracle here: its text-encoder loader maps only q/k/v/out_proj and fc1/fc2
    (``convert_state_dict_to_peft`` cannot infer a state dict holding only ``text_projection``)."""
    from lora_tools.io.safetensors import load_tensors

    folder = folder_base
    lora, delta = _text_projection_lora(tmp_path / "l.safetensors", "kohya", torch.Generator().manual_seed(2))
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["fuse", str(folder), "--lora", f"{lora}:0.5", "--save", "diffusers", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    a = load_tensors(folder / "text_encoder_2" / "model.safetensors")
    b = load_tensors(out / "text_encoder_2" / "model.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == ["text_projection.weight"]
    want = a["text_projection.weight"].double() + 0.5 * delta
    assert torch.allclose(b["text_projection.weight"].double(), want, rtol=0, atol=1e-6)


def _bias_lora(path: Path, g: torch.Generator) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Bias diffs in every shape ComfyUI reads: a full diff with .diff_b, a LoRA with .diff_b, a bias-only
    module, a LyCORIS norm module (.w_norm/.b_norm), a LoHa with .diff_b, a bigG q/k/v slice with its bias
    slice, a 3x3 conv. Returns the file and the fp64 reference delta of every changed single-file tensor
    (strength 1; alpha/rank scales weight deltas only)."""
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    proj = "lora_unet_down_blocks_1_attentions_0_proj_in"
    t[f"{proj}.diff"], t[f"{proj}.diff_b"] = r(64, 64), r(64)
    want[_UNET + "input_blocks.4.1.proj_in.weight"] = t[f"{proj}.diff"].double()
    want[_UNET + "input_blocks.4.1.proj_in.bias"] = t[f"{proj}.diff_b"].double()
    ff = "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2"
    t[f"{ff}.lora_up.weight"], t[f"{ff}.lora_down.weight"], t[f"{ff}.alpha"] = r(64, 4), r(4, 256), torch.tensor(2.0)
    t[f"{ff}.diff_b"] = r(64)
    want[_UNET + "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight"] = \
        t[f"{ff}.lora_up.weight"].double() @ t[f"{ff}.lora_down.weight"].double() * 0.5
    want[_UNET + "input_blocks.4.1.transformer_blocks.0.ff.net.2.bias"] = t[f"{ff}.diff_b"].double()
    conv = "lora_unet_input_blocks_1_0_in_layers_2"
    t[f"{conv}.diff_b"] = r(32)
    want[_UNET + "input_blocks.1.0.in_layers.2.bias"] = t[f"{conv}.diff_b"].double()
    norm = "lora_unet_conv_norm_out"
    t[f"{norm}.w_norm"], t[f"{norm}.b_norm"] = r(32), r(32)
    want[_UNET + "out.0.weight"] = t[f"{norm}.w_norm"].double()
    want[_UNET + "out.0.bias"] = t[f"{norm}.b_norm"].double()
    loha = "lora_unet_down_blocks_1_attentions_0_proj_out"
    for k, shape in (("hada_w1_a", (64, 2)), ("hada_w1_b", (2, 64)), ("hada_w2_a", (64, 2)), ("hada_w2_b", (2, 64))):
        t[f"{loha}.{k}"] = r(*shape)
    t[f"{loha}.alpha"], t[f"{loha}.diff_b"] = torch.tensor(1.0), r(64)
    h = {k: t[f"{loha}.{k}"].double() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    want[_UNET + "input_blocks.4.1.proj_out.weight"] = \
        (h["hada_w1_a"] @ h["hada_w1_b"]) * (h["hada_w2_a"] @ h["hada_w2_b"]) * 0.5
    want[_UNET + "input_blocks.4.1.proj_out.bias"] = t[f"{loha}.diff_b"].double()
    v = "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"
    t[f"{v}.lora_up.weight"], t[f"{v}.lora_down.weight"], t[f"{v}.diff_b"] = r(32, 2), r(2, 32), r(32)
    qkv_w, qkv_b = torch.zeros(96, 32, dtype=torch.float64), torch.zeros(96, dtype=torch.float64)
    qkv_w[64:] = t[f"{v}.lora_up.weight"].double() @ t[f"{v}.lora_down.weight"].double()
    qkv_b[64:] = t[f"{v}.diff_b"].double()
    want[_TE2 + "transformer.resblocks.0.attn.in_proj_weight"] = qkv_w
    want[_TE2 + "transformer.resblocks.0.attn.in_proj_bias"] = qkv_b
    ln = "lora_te1_text_model_encoder_layers_1_layer_norm2"
    t[f"{ln}.w_norm"], t[f"{ln}.b_norm"] = r(32), r(32)
    want[_TE1 + "text_model.encoder.layers.1.layer_norm2.weight"] = t[f"{ln}.w_norm"].double()
    want[_TE1 + "text_model.encoder.layers.1.layer_norm2.bias"] = t[f"{ln}.b_norm"].double()
    return save_tensors(path, t), t, want


def test_bias_and_norm_diffs_fuse_like_the_dense_reference(tmp_path: Path, sgm_base: Path) -> None:
    """Every bias diff lands on the bias beside its module's weight (q/k/v: its row slice of
    in_proj_bias), w_norm/b_norm like diff/diff_b (ComfyUI's load_lora), at the LoRA's strength;
    nothing else changes."""
    from lora_tools.io.safetensors import load_tensors

    base = sgm_base
    lora, _, want = _bias_lora(tmp_path / "l.safetensors", torch.Generator().manual_seed(4))
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(cli, ["fuse", str(base), "--lora", f"{lora}:0.6", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert "Fused 7 modules into 13 tensors" in r.stdout  # a weight delta and its bias diff: one module
    a, b = load_tensors(base), load_tensors(out)
    assert sorted(k for k in a if not torch.equal(a[k], b[k])) == sorted(want)
    for k, delta in want.items():
        assert torch.allclose(b[k].double(), a[k].double() + 0.6 * delta, rtol=0, atol=1e-6), k


@pytest.mark.slow
def test_bias_diff_on_a_diffusers_folder(tmp_path: Path, folder_base: Path) -> None:
    from lora_tools.io.safetensors import load_tensors

    folder = folder_base
    lora, t, _ = _bias_lora(tmp_path / "l.safetensors", torch.Generator().manual_seed(5))
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["fuse", str(folder), "--lora", str(lora), "--save", "diffusers", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    a = load_tensors(folder / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_tensors(out / "unet" / "diffusion_pytorch_model.safetensors")
    for key, diff in (("down_blocks.1.attentions.0.proj_in.bias", "lora_unet_down_blocks_1_attentions_0_proj_in.diff_b"),
                      ("conv_norm_out.bias", "lora_unet_conv_norm_out.b_norm"),
                      ("down_blocks.0.resnets.0.conv1.bias", "lora_unet_input_blocks_1_0_in_layers_2.diff_b")):
        assert torch.allclose(b[key].double(), a[key].double() + t[diff].double(), rtol=0, atol=1e-6), key
    a2 = load_tensors(folder / "text_encoder_2" / "model.safetensors")
    b2 = load_tensors(out / "text_encoder_2" / "model.safetensors")
    key = "text_model.encoder.layers.0.self_attn.v_proj.bias"
    d = t["lora_te2_text_model_encoder_layers_0_self_attn_v_proj.diff_b"].double()
    assert torch.allclose(b2[key].double(), a2[key].double() + d, rtol=0, atol=1e-6)
    key = "text_model.encoder.layers.0.self_attn.k_proj.bias"
    assert torch.equal(a2[key], b2[key])


def test_a_bias_diff_on_a_module_without_bias_is_refused_with_its_reason(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base.safetensors", "tiny", dtype="fp16", components=("unet",))
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = save_tensors(tmp_path / "b.safetensors", {f"{name}.diff": torch.zeros(64, 64), f"{name}.diff_b": torch.ones(64)})
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(cli, ["fuse", str(base), "--lora", str(lora), "-o", str(out)])
    assert r.exit_code == 1 and not out.exists()
    (line,) = r.stderr.strip().splitlines()
    assert ".diff_b" in line and "attn1.to_q has no bias" in line and "1 of 1 modules" in line


def test_a_bias_diff_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base.safetensors", "tiny", dtype="fp16", components=("unet",))
    name = "lora_unet_down_blocks_1_attentions_0_proj_in"
    lora = save_tensors(tmp_path / "b.safetensors", {f"{name}.diff_b": torch.ones(65)})
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(cli, ["fuse", str(base), "--lora", str(lora), "-o", str(out)])
    assert r.exit_code == 1 and not out.exists()
    assert "bias diff" in r.stderr and "[65]" in r.stderr and "[64]" in r.stderr


@pytest.mark.parametrize("table", [TINY.table, FULL.table], ids=["tiny", "full"])
def test_every_unet_and_text_encoder_tensor_is_a_target(table) -> None:  # type: ignore[no-untyped-def]
    """The index is total over the base: every UNet/CLIP-L/bigG tensor with a diffusers counterpart is
    reached by its module's diffusers name, as that module's weight (its row block, for fused q/k/v)
    or as the bias beside it, and by its SGM name wherever the single file names it alike."""
    from lora_tools.layouts.table import module_of

    index = TargetIndex(table)
    rows = [r for r in table.rows if r.component != "vae" and r.diffusers is not None]
    assert len(rows) > 1000 if table is FULL.table else len(rows) > 500
    for r in rows:
        leaf = r.diffusers.rsplit(".", 1)[1]
        t = index.lookup(r.component, module_of(r.diffusers))
        assert t is not None, r.diffusers
        if leaf == "bias":
            assert (t.bias_key, t.part) == (r.sgm_key, r.part), r.diffusers
            assert t.bias_shape == r.diffusers_shape
        else:
            assert (t.sgm_key, t.part, t.transposed) == (r.sgm_key, r.part, r.transform == "transpose"), r.diffusers
            assert t.shape == r.diffusers_shape
            if r.transform == "rename" and r.sgm.endswith(".weight"):
                assert index.lookup(r.component, module_of(r.sgm).replace(".", "_")) == t


def test_rescale_scales_a_bias_diff_with_its_module(tmp_path: Path) -> None:
    """Baking a strength into a LoRA scales the bias diff beside its weight delta too (both are linear)."""
    from lora_tools.ops.rescale import rescale_lora

    g = torch.Generator().manual_seed(7)
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2"
    t = {f"{name}.lora_up.weight": torch.randn(64, 2, generator=g), f"{name}.lora_down.weight": torch.randn(2, 256, generator=g),
         f"{name}.diff_b": torch.randn(64, generator=g), "lora_unet_input_blocks_1_0_in_layers_2.diff_b": torch.randn(32, generator=g)}
    with load_lora(save_tensors(tmp_path / "l.safetensors", t)) as lora:
        out, _ = rescale_lora(lora, 0.25)
        for a, b in zip(lora.modules, out.modules, strict=True):
            assert torch.allclose(b.bias_delta(), 0.25 * a.bias_delta())
            if a.changes_weight:
                assert torch.allclose(b.delta(), 0.25 * a.delta(), atol=1e-6)


@pytest.mark.parametrize("stem", ["lora_te2_text_projection", "lora_prior_te_text_projection",
                                  "text_encoders.clip_g.transformer.text_projection", "text_encoder_2.text_projection"])
def test_every_name_comfyui_gives_text_projection_resolves_to_it(tmp_path: Path, stem: str) -> None:
    """ComfyUI's model_lora_keys_clip: lora_te2_/lora_prior_te_text_projection and the generic
    text_encoders.clip_g.transformer.text_projection; diffusers' own module name too."""
    t = {f"{stem}.lora_up.weight": torch.ones(32, 2), f"{stem}.lora_down.weight": torch.ones(2, 32)}
    with load_lora(save_tensors(tmp_path / "p.safetensors", t)) as lora:
        m = match_lora(lora, TargetIndex(TINY.table))
        (mm,) = m.matched
        assert (mm.target.sgm_key, mm.target.transposed) == (_TE2 + "text_projection", True)


@pytest.mark.parametrize("command", ["resize", "merge"])
def test_resize_and_merge_refuse_a_bias_diff_instead_of_dropping_it(tmp_path: Path, command: str) -> None:
    """Their outputs are low-rank weight deltas: a module's .diff_b would be lost, so they refuse, one line."""
    lora, _, _ = _bias_lora(tmp_path / "l.safetensors", torch.Generator().manual_seed(5))
    out = tmp_path / "o.safetensors"
    args = (["resize", str(lora), "--rank", "1"] if command == "resize"
            else ["merge", str(lora), str(lora), "--method", "svd", "--rank", "1"])
    before = lora.read_bytes()
    r = CliRunner().invoke(cli, [*args, "-o", str(out)])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "also changes its bias (.diff_b)" in lines[0] and f"{command} writes" in lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors"]
    assert lora.read_bytes() == before
