"""``verify`` on a tiny SDXL-topology model: preset auto-detection, refusals, and one end-to-end
faithfulness run through the CLI (diffusers' runtime ``load_lora_weights`` as the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from lora_tools.cli import cli
from lora_tools.diffusers_folder import write_byte_tokenizer
from lora_tools.errors import UsageError
from lora_tools.layouts import TINY
from lora_tools.ops.fuse import fuse
from lora_tools.testing import synthetic
from lora_tools.testing.synthetic_lora import write_lightning_lora
from lora_tools.verify import plan_verify
from lora_tools.verify.grid import grid_size
from lora_tools.verify.workflow import comfy_workflow

#: Node classes and their inputs as ComfyUI defines them (nodes.py: CheckpointLoaderSimple, CLIPTextEncode,
#: EmptyLatentImage, KSampler, VAEDecode, SaveImage; comfy_extras/nodes_model_advanced.py: ModelSamplingDiscrete).
COMFY_NODES = {
    "CheckpointLoaderSimple": {"ckpt_name"},
    "CLIPTextEncode": {"text", "clip"},
    "EmptyLatentImage": {"width", "height", "batch_size"},
    "KSampler": {"model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image",
                 "denoise"},
    "VAEDecode": {"samples", "vae"},
    "SaveImage": {"images", "filename_prefix"},
    "ModelSamplingDiscrete": {"model", "sampling", "zsnr"},
}
COMFY_SAMPLING = {"eps", "v_prediction", "lcm", "x0"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("verify")
    base = synthetic.write_checkpoint(d / "base.safetensors", "tiny", dtype="fp32", seed=1)
    lora = write_lightning_lora(d / "L" / "sdxl_lightning_4step_lora.safetensors", "tiny")
    config = d / "config"  # what a user's --config DIR holds: the tokenizers
    for name, te in (("tokenizer", TINY.te1), ("tokenizer_2", TINY.te2)):
        write_byte_tokenizer(config / name, te.vocab, te.positions)
    full = fuse(base, lightning=4, lightning_dir=d / "L", saves=("checkpoint",), output=d / "fused.safetensors")
    half = fuse(base, lightning=4, lightning_dir=d / "L", lightning_strength=0.5, saves=("checkpoint",),
                output=d / "half.safetensors")
    return {"base": base, "lora": lora, "config": config, "fused": full.files[0].path, "half": half.files[0].path,
            "dir": d}


def test_preset_auto_from_the_fuse_record_and_refusals(tiny: dict[str, Path]) -> None:
    plan = plan_verify(tiny["fused"], size=(64, 64))
    assert plan.preset == "lightning-4step" and plan.sampler.steps == 4 and plan.kind == "checkpoint"
    with pytest.raises(UsageError, match="4-step model") as info:
        plan_verify(tiny["fused"], steps=8)
    assert "force=True" in str(info.value)
    assert plan_verify(tiny["fused"], steps=8, force=True).sampler.steps == 8
    with pytest.raises(UsageError, match="fused with lightning-4step, not dmd2-4step"):
        plan_verify(tiny["fused"], preset="dmd2-4step")
    with pytest.raises(UsageError, match="no sampler settings recorded"):
        plan_verify(tiny["base"])
    result = CliRunner().invoke(cli, ["verify", str(tiny["fused"]), "--steps", "8"])
    assert result.exit_code == 1 and "--force" in result.output and "force=True" not in result.output


def test_workflow_uses_only_comfy_nodes() -> None:
    from lora_tools.presets import LIGHTNING, get_preset

    for sampler in (LIGHTNING[1].sampler, LIGHTNING[4].sampler, get_preset("dmd2-4step").sampler):
        wf = comfy_workflow("m.safetensors", sampler, prompt="a cat")
        for node in wf.values():
            assert set(node["inputs"]) == COMFY_NODES[node["class_type"]]
            if node["class_type"] == "ModelSamplingDiscrete":
                assert node["inputs"]["sampling"] in COMFY_SAMPLING
    assert any(n["class_type"] == "ModelSamplingDiscrete" and n["inputs"]["sampling"] == "x0"
               for n in comfy_workflow("m", LIGHTNING[1].sampler, prompt="x").values())


@pytest.mark.slow
def test_verify_against_passes_for_the_fused_file_and_fails_at_another_strength(tiny: dict[str, Path]) -> None:
    out = tiny["dir"] / "out"
    args = ["--against", str(tiny["base"]), "--lora", f"{tiny['lora']}:1.0", "--config", str(tiny["config"]),
            "--size", "32x32", "--prompt", "a cat", "--seeds", "0,1", "--device", "cpu", "--dtype", "fp32"]
    ok = CliRunner().invoke(cli, ["verify", str(tiny["fused"]), *args, "--out", str(out), "--workflow"])
    assert ok.exit_code == 0, ok.output
    assert "Verdict:  PASS" in ok.output
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "pass" and report["threshold"]["psnr_db"] == 50.0
    assert report["settings"]["timesteps"] == [999, 749, 499, 249]
    assert report["settings"]["scheduler"] == "EulerDiscreteScheduler" and report["settings"]["guidance_scale"] == 0.0
    assert report["device"] == "cpu" and report["dtype"] == "fp32" and len(report["model"]["sha256"]) == 64
    assert [(i["prompt"], i["seed"]) for i in report["images"]] == [("a cat", 0), ("a cat", 1)]
    assert all(i["psnr_db"] >= 50 and i["seconds"] > 0 and len(i["step_seconds"]) == 4 for i in report["images"])
    assert Image.open(out / "grid.png").size == grid_size(1, 2, (32, 32))
    assert (out / "report.md").is_file() and len(list((out / "images").glob("*.png"))) == 2
    workflow = json.loads((out / "workflow.json").read_text())
    assert {n["class_type"] for n in workflow.values()} <= set(COMFY_NODES)
    bad = CliRunner().invoke(cli, ["verify", str(tiny["half"]), *args[:-4], "--seeds", "0", "--device", "cpu",
                                   "--dtype", "fp32"])
    assert bad.exit_code == 1 and "Verdict:  FAIL" in bad.output
