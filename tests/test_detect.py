"""Architecture detection from headers alone, and the clear 'not supported, because...' messages."""

from __future__ import annotations

import pytest

from lora_tools.errors import UnsupportedModelError
from lora_tools.io.model import open_model
from lora_tools.io.safetensors import save_tensors
from lora_tools.layouts import FULL, TINY
from lora_tools.layouts.detect import detect_checkpoint


def _full_shapes() -> dict[str, tuple[int, ...]]:
    return {r.sgm_key: r.shape for r in FULL.table.rows}


def test_sdxl_base_full_and_tiny():
    assert detect_checkpoint(_full_shapes()).architecture == "sdxl-base"
    kind = detect_checkpoint({r.sgm_key: r.shape for r in TINY.table.rows})
    assert kind.architecture == "sdxl-base" and kind.supported and kind.prediction == "epsilon"
    assert set(kind.components) == {"unet", "vae", "te1", "te2"}


def test_inpaint_is_recognised_by_its_nine_channel_conv_in():
    shapes = _full_shapes()
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    kind = detect_checkpoint(shapes)
    assert kind.architecture == "sdxl-inpaint" and not kind.supported
    assert "9 input channels" in kind.why_unsupported()


def test_refiner_is_recognised():
    shapes = {k: s for k, s in _full_shapes().items() if not k.startswith("conditioner.")}
    shapes["model.diffusion_model.label_emb.0.0.weight"] = (1536, 2560)
    shapes["conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"] = (1280,)
    assert detect_checkpoint(shapes).architecture == "sdxl-refiner"


@pytest.mark.parametrize("ctx,prefix,arch", [(768, "cond_stage_model.transformer.", "sd1.x"),
                                              (1024, "cond_stage_model.model.", "sd2.x")])
def test_sd1_and_sd2(ctx, prefix, arch):
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, ctx),
        prefix + "text_model.embeddings.token_embedding.weight": (49408, ctx),
    }
    kind = detect_checkpoint(shapes)
    assert kind.architecture == arch and not kind.supported
    assert "SDXL" in kind.why_unsupported()


@pytest.mark.parametrize("markers,prediction", [(("v_pred",), "v_prediction"), (("v_pred", "ztsnr"), "v_prediction"),
                                                 (("edm_mean", "edm_std"), "edm")])
def test_prediction_markers(markers, prediction):
    shapes = _full_shapes() | {m: (0,) for m in markers}
    kind = detect_checkpoint(shapes)
    assert kind.prediction == prediction and set(kind.markers) == set(markers)


def test_sd15_single_file_is_refused_with_a_reason(tmp_path):
    import torch

    path = tmp_path / "sd15.safetensors"
    save_tensors(path, {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
                        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 768)})
    with pytest.raises(UnsupportedModelError) as err:
        from lora_tools.ops.fuse_plan import plan_fuse

        plan_fuse(path, loras=[(str(path), 1.0)])
    assert "sd15.safetensors" in str(err.value) and "Stable Diffusion 1.x" in str(err.value)


def test_lora_passed_as_base_says_so(tmp_path):
    from lora_tools.testing.synthetic_lora import write_lora

    lora = write_lora(tmp_path / "style.safetensors", "tiny")
    from lora_tools.cli import error_message

    with pytest.raises(UnsupportedModelError, match="It looks like a LoRA; pass lora=PATH") as err:
        open_model(lora)
    assert "--lora" not in str(err.value)  # the library names the parameter, the CLI the flag
    assert "It looks like a LoRA; pass --lora PATH" in error_message(err.value)
