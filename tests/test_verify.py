"""``verify`` on a micro SDXL-topology model: preset auto-detection, refusals, and one end-to-end
faithfulness run through the CLI (diffusers' runtime ``load_lora_weights`` as the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from lora_tools.cli import cli
from lora_tools.errors import UsageError
from lora_tools.testing.synthetic_lora import write_lora
from lora_tools.verify import plan_verify
from lora_tools.verify.grid import HEADER_HEIGHT, grid_size, label_width
from lora_tools.verify.workflow import comfy_workflow

#: Node classes and their required inputs as ComfyUI defines them, read from comfyanonymous/ComfyUI:
#: ``nodes.py`` at e60e19b1 (``INPUT_TYPES()["required"]`` of CLIPTextEncode: text, clip; VAEDecode: samples, vae;
#: CheckpointLoaderSimple: ckpt_name, outputs MODEL 0, CLIP 1, VAE 2; KSampler: model, seed, steps, cfg,
#: sampler_name, scheduler, positive, negative, latent_image, denoise; SaveImage: images, filename_prefix;
#: EmptyLatentImage: width, height, batch_size) and ``comfy_extras/nodes_model_advanced.py`` at 04842679
#: (ModelSamplingDiscrete: model, sampling in ["eps", "v_prediction", "lcm", "x0"], zsnr).
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
#: Output slots of CheckpointLoaderSimple (RETURN_TYPES = ("MODEL", "CLIP", "VAE")).
COMFY_CHECKPOINT_OUTPUTS = {"MODEL": 0, "CLIP": 1, "VAE": 2}


def _assert_comfy_nodes(wf: dict[str, dict[str, object]]) -> None:
    """Every node a class ComfyUI defines with exactly its required inputs; links point at real nodes."""
    for node in wf.values():
        inputs = node["inputs"]
        assert isinstance(inputs, dict) and set(inputs) == COMFY_NODES[str(node["class_type"])]
        for value in inputs.values():
            if isinstance(value, list):
                assert str(value[0]) in wf and isinstance(value[1], int)
        if node["class_type"] == "ModelSamplingDiscrete":
            assert inputs["sampling"] in COMFY_SAMPLING
    loader = next(k for k, n in wf.items() if n["class_type"] == "CheckpointLoaderSimple")
    for node in wf.values():
        inputs = node["inputs"]
        assert isinstance(inputs, dict)
        if node["class_type"] == "CLIPTextEncode":
            assert inputs["clip"] == [loader, COMFY_CHECKPOINT_OUTPUTS["CLIP"]]
        if node["class_type"] == "VAEDecode":
            assert inputs["vae"] == [loader, COMFY_CHECKPOINT_OUTPUTS["VAE"]]


def test_preset_auto_from_the_fuse_record_and_refusals(micro_verify: dict[str, Path]) -> None:
    plan = plan_verify(micro_verify["fused"], size=(64, 64))
    assert plan.preset == "lightning-4step" and plan.sampler.steps == 4 and plan.kind == "checkpoint"
    with pytest.raises(UsageError, match="4-step model") as info:
        plan_verify(micro_verify["fused"], steps=8)
    assert "force=True" in str(info.value)
    assert plan_verify(micro_verify["fused"], steps=8, force=True).sampler.steps == 8
    with pytest.raises(UsageError, match="fused with lightning-4step, not dmd2-4step"):
        plan_verify(micro_verify["fused"], preset="dmd2-4step")
    with pytest.raises(UsageError, match="no sampler settings recorded"):
        plan_verify(micro_verify["base"])
    result = CliRunner().invoke(cli, ["verify", str(micro_verify["fused"]), "--steps", "8"])
    assert result.exit_code == 1 and "--force" in result.output and "force=True" not in result.output


def test_workflow_uses_only_comfy_nodes() -> None:
    from lora_tools.presets import LIGHTNING, get_preset

    for sampler in (LIGHTNING[1].sampler, LIGHTNING[4].sampler, get_preset("dmd2-4step").sampler):
        wf = comfy_workflow("m.safetensors", sampler, prompt="a cat")
        _assert_comfy_nodes(wf)
    assert any(n["class_type"] == "ModelSamplingDiscrete" and n["inputs"]["sampling"] == "x0"
               for n in comfy_workflow("m", LIGHTNING[1].sampler, prompt="x").values())


@pytest.mark.diffusers
@pytest.mark.smoke
def test_verify_against_passes_for_the_fused_file_and_fails_at_another_strength(micro_verify: dict[str, Path]) -> None:
    out = micro_verify["dir"] / "out"
    args = ["--against", str(micro_verify["base"]), "--lora", f"{micro_verify['lora']}:1.0", "--config", str(micro_verify["config"]),
            "--size", "32x32", "--prompt", "a cat", "--seeds", "0,1", "--device", "cpu", "--dtype", "fp32"]
    ok = CliRunner().invoke(cli, ["verify", str(micro_verify["fused"]), *args, "--out", str(out), "--workflow"])
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
    bad = CliRunner().invoke(cli, ["verify", str(micro_verify["half"]), *args[:-4], "--seeds", "0", "--device", "cpu",
                                   "--dtype", "fp32"])
    assert bad.exit_code == 1 and "Verdict:  FAIL" in bad.output


@pytest.mark.diffusers
def test_show_wrong_adds_a_column_rendered_with_the_wrong_settings(micro_verify: dict[str, Path]) -> None:
    out = micro_verify["dir"] / "wrong"
    run = CliRunner().invoke(cli, ["verify", str(micro_verify["fused"]), "--size", "32x32", "--prompt", "a cat", "--seeds", "3",
                                   "--device", "cpu", "--dtype", "fp32", "--show-wrong", "--out", str(out)])
    assert run.exit_code == 0, run.output
    grid = Image.open(out / "grid.png").convert("RGB")
    assert grid.size == grid_size(1, 2, (32, 32))  # the seed's column and the wrong-settings column
    left, top = label_width(32), HEADER_HEIGHT
    right = grid.crop((left, top, left + 32, top + 32))
    wrong = grid.crop((left + 32, top, left + 64, top + 32))
    assert right.tobytes() == Image.open(out / "images" / "p0-seed3.png").convert("RGB").tobytes()
    assert wrong.tobytes() != right.tobytes() and len(set(wrong.getdata())) > 1  # rendered, not blank
    report = json.loads((out / "report.json").read_text())
    wrong_settings = report["wrong_settings"]
    assert wrong_settings["timestep_spacing"] == "leading" and wrong_settings["guidance_scale"] == 7.0
    assert wrong_settings["steps"] == 30 and len(wrong_settings["timesteps"]) == 30
    assert wrong_settings["timesteps"][0] != 999 and wrong_settings["seed"] == 3  # leading spacing skips t=999
    assert report["settings"]["timesteps"] == [999, 749, 499, 249]  # the model's own settings are unchanged
    md = (out / "report.md").read_text()
    assert "wrong settings column" in md and "timestep_spacing leading, 30 steps, guidance_scale 7" in md
    measured = json.dumps({k: v for k, v in report.items() if k != "wrong_settings"}).replace(str(out), "OUT")
    assert "wrong" not in measured.lower()  # the wrong column is shown and described, never measured
    with pytest.raises(UsageError, match="output folder"):
        plan_verify(micro_verify["fused"], show_wrong=True)


def test_fuse_workflow_writes_the_comfy_workflow_beside_the_checkpoint(micro_verify: dict[str, Path]) -> None:
    d = micro_verify["dir"]
    target = d / "wf.safetensors"
    args = ["fuse", str(micro_verify["base"]), "--lightning", "4", "--lightning-dir", str(d / "L"), "-o", str(target),
            "--workflow"]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    path = d / "wf-workflow.json"
    assert f"Wrote {path}" in run.output
    wf = json.loads(path.read_text())
    _assert_comfy_nodes(wf)
    by_class = {n["class_type"]: n["inputs"] for n in wf.values()}
    assert by_class["CheckpointLoaderSimple"]["ckpt_name"] == "wf.safetensors"
    ks = by_class["KSampler"]
    assert (ks["sampler_name"], ks["scheduler"], ks["steps"], ks["cfg"]) == ("euler", "sgm_uniform", 4, 1.0)
    assert "ModelSamplingDiscrete" not in by_class  # 4-step Lightning predicts eps, ComfyUI's default
    before = path.read_bytes()
    target.unlink()  # only the workflow is left to clash: refused before the fuse writes anything
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "wf-workflow.json' already exists" in again.stderr and "--overwrite" in again.stderr
    assert path.read_bytes() == before and not target.exists()
    plain = d / "plain.safetensors"
    style = write_lora(d / "style.safetensors", "micro", fmt="kohya", rank=4, alpha=2.0, seed=3)  # no preset's LoRA
    no_preset = CliRunner().invoke(cli, ["fuse", str(micro_verify["base"]), "--lora", f"{style}:1.0", "-o", str(plain),
                                         "-q", "--workflow"])
    assert no_preset.exit_code == 1 and "--preset" in no_preset.stderr and no_preset.stdout == ""
    assert not plain.exists() and not (d / "plain-workflow.json").exists()


@pytest.mark.diffusers
def test_compile_wraps_the_unet_and_reports_compile_time_apart(micro_verify: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compile`` runs the UNet through ``torch.compile`` (here Dynamo with the eager backend: real graph
    capture, no C++ code generation, which takes minutes on CPU), reports the compile time apart from the
    per-image times, and renders what the uncompiled pipeline renders."""
    import torch

    real_compile = torch.compile
    calls: list[dict[str, object]] = []

    def eager_compile(model, **kwargs):  # type: ignore[no-untyped-def]
        calls.append({"type": type(model).__name__, **kwargs})
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    args = ["--config", str(micro_verify["config"]), "--size", "32x32", "--prompt", "a cat", "--seeds", "0", "--device", "cpu",
            "--dtype", "fp32"]
    plain, compiled = micro_verify["dir"] / "plain", micro_verify["dir"] / "compiled"
    ok = CliRunner().invoke(cli, ["verify", str(micro_verify["fused"]), *args, "--out", str(plain)])
    assert ok.exit_code == 0, ok.output
    assert calls == []
    ok = CliRunner().invoke(cli, ["verify", str(micro_verify["fused"]), *args, "--compile", "--out", str(compiled)])
    assert ok.exit_code == 0, ok.output
    assert calls == [{"type": "UNet2DConditionModel"}]  # the UNet, once, default mode on CPU
    report = json.loads((compiled / "report.json").read_text())
    assert report["compile_seconds"] > 0 and json.loads((plain / "report.json").read_text())["compile_seconds"] is None
    assert sum(report["images"][0]["step_seconds"]) < report["compile_seconds"] + report["images"][0]["seconds"]
    a = [p.read_bytes() for p in sorted((plain / "images").glob("*.png"))]
    b = [p.read_bytes() for p in sorted((compiled / "images").glob("*.png"))]
    assert a == b and len(a) == 1


def test_psnr_takes_a_fixed_peak_for_8_bit_images() -> None:
    import math

    import torch

    from lora_tools.verify.oracle import psnr_db

    ref = torch.tensor([[0.0, 100.0], [200.0, 250.0]])
    ours = ref + torch.tensor([[1.0, -1.0], [2.0, 0.0]])  # mse 1.5
    assert psnr_db(ours, ref, peak=255.0) == pytest.approx(10 * math.log10(255.0**2 / 1.5))
    assert psnr_db(ours, ref) == pytest.approx(10 * math.log10(250.0**2 / 1.5))  # the reference's own range
    assert psnr_db(ref, ref, peak=255.0) == math.inf
