"""``verify``'s checks on a micro SDXL-topology model, beyond the faithfulness run of test_verify.py: the
timesteps each preset actually runs (read off the scheduler used), a NaN in the latents is a failed
check naming where, no tokenizers offline is one line, the report's fields, the workflow's sampler and
scheduler names are ComfyUI's own, and a diffusers folder named by its header hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.ops.fuse import fuse
from lora_tools.presets import PRESETS
from lora_tools.verify import plan_verify, run_verify
from lora_tools.verify.workflow import comfy_workflow

#: Sampler and scheduler names ComfyUI's KSampler accepts, read from comfyanonymous/ComfyUI
#: ``comfy/samplers.py`` (``KSAMPLER_NAMES``, ``SAMPLER_NAMES = KSAMPLER_NAMES + ["ddim", "uni_pc",
#: "uni_pc_bh2"]``, ``SCHEDULER_NAMES``); only the ones a preset could name are kept here.
COMFY_SAMPLER_NAMES = {"euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_sde", "ddpm", "lcm",
                       "ddim", "uni_pc"}
COMFY_SCHEDULER_NAMES = {"normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"}


def test_workflow_sampler_and_scheduler_are_comfy_names() -> None:
    for p in PRESETS.values():
        wf = comfy_workflow("m.safetensors", p.sampler, prompt="a cat")
        ks = next(n["inputs"] for n in wf.values() if n["class_type"] == "KSampler")
        assert ks["sampler_name"] in COMFY_SAMPLER_NAMES, p.name
        assert ks["scheduler"] in COMFY_SCHEDULER_NAMES, p.name
        assert ks["steps"] == p.sampler.steps and ks["cfg"] == p.sampler.comfy_cfg


def test_no_tokenizers_offline_is_one_line(micro_verify: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real-vocabulary model needs the CLIP tokenizers: without ``config`` and with an empty hub cache,
    one line naming what to provide (the tiny models take the byte tokenizer, so the lookup is called
    here directly); a ``--config`` folder without them is one line from the CLI."""
    from lora_tools.cli import error_message
    from lora_tools.errors import UsageError
    from lora_tools.verify.pipeline import find_config_dir

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError) as info:
        find_config_dir(None)
    assert error_message(info.value) == (
        "A single-file model needs the SDXL tokenizers: none given and stabilityai/stable-diffusion-xl-base-1.0 "
        "is not in the hub cache; pass --config DIR with a diffusers SDXL folder (tokenizer/, tokenizer_2/).")
    bad = tmp_path / "not-a-config"
    bad.mkdir()
    result = CliRunner().invoke(cli, ["verify", str(micro_verify["fused"]), "--config", str(bad), "--size", "32x32",
                                      "--device", "cpu", "--prompt", "a cat"])
    assert result.exit_code == 1 and result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"Error: {bad}: not a diffusers folder with tokenizer and tokenizer_2/")


@pytest.mark.diffusers
@pytest.mark.parametrize(("preset", "timesteps", "prediction"), [
    ("lightning-1step", [999], "sample"),
    ("dmd2-4step", [999, 749, 499, 249], "epsilon"),
    ("lightning-2step", [999, 499], "epsilon"),
])
def test_timesteps_as_run_are_the_presets(micro_verify: dict[str, Path], preset: str, timesteps: list[int],
                                          prediction: str) -> None:
    """Read off the scheduler the pipeline actually ran (``report.settings``), not the preset's table."""
    report = run_verify(plan_verify(micro_verify["fused"], preset=preset, force=True, prompts=["a cat"], seeds=[0],
                                    size=(32, 32), config=micro_verify["config"], device="cpu", dtype="fp32"))
    s = report.settings
    assert s["timesteps"] == timesteps and s["steps"] == len(timesteps) and s["prediction_type"] == prediction
    assert s["scheduler"] == PRESETS[preset].sampler.scheduler
    assert len(report.images[0].step_seconds) == len(timesteps)


@pytest.mark.diffusers
def test_nan_in_the_latents_is_a_failed_check_naming_where(micro_verify: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from lora_tools.io.safetensors import read_header

    tensors = load_file(str(micro_verify["fused"]))
    key = "model.diffusion_model.out.2.weight"  # the UNet's last conv: every latent goes through it
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=dict(read_header(micro_verify["fused"]).metadata))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["verify", str(broken), "--config", str(micro_verify["config"]), "--size", "32x32",
                                      "--prompt", "a cat", "--seeds", "0", "--device", "cpu", "--dtype", "fp32",
                                      "--out", str(out)])
    assert result.exit_code == 1, result.output
    where = f"{broken}: NaN or Inf in the latents after the UNet (prompt 'a cat', seed 0)."
    assert f"Failed:   {where}" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["failures"] == [where] and report["images"] == []


@pytest.mark.diffusers
def test_report_json_fields(micro_verify: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    lora = micro_verify["dir"] / "L" / "sdxl_lightning_4step_lora.safetensors"
    result = CliRunner().invoke(cli, ["verify", str(micro_verify["fused"]), "--against", str(micro_verify["base"]), "--lora",
                                      f"{lora}:1.0", "--config", str(micro_verify["config"]), "--size", "32x32",
                                      "--prompt", "a cat", "--seeds", "5", "--device", "cpu", "--dtype", "fp32",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads((out / "report.json").read_text())
    assert r["settings"]["options"]["timestep_spacing"] == "trailing"
    assert r["settings"]["guidance_scale"] == 0.0 and r["settings"]["prediction_type"] == "epsilon"
    import hashlib

    assert r["model"]["sha256"] == hashlib.sha256(micro_verify["fused"].read_bytes()).hexdigest()
    (image,) = r["images"]
    assert (image["prompt"], image["seed"]) == ("a cat", 5) and image["seconds"] >= sum(image["step_seconds"])
    assert image["psnr_db"] >= 50 and 0 <= image["max_abs"] < 1e-3 and image["decode_seconds"] > 0
    assert r["verdict"] == "pass" and r["threshold"] == {"psnr_db": 50.0, "on": "final latents", "dtype": "fp32"}
    assert r["against"]["loras"] == [{"path": str(lora), "strength": 1.0}]


@pytest.mark.diffusers
def test_a_diffusers_folder_is_named_by_its_header_hash(micro_verify: dict[str, Path]) -> None:
    import hashlib

    folder = micro_verify["dir"] / "fused-folder"
    fuse(micro_verify["base"], preset="lightning-4step", preset_dir=micro_verify["dir"] / "L", saves=("diffusers",), output=folder)
    plan = plan_verify(folder, prompts=["a cat"], seeds=[0], size=(32, 32), device="cpu", dtype="fp32")
    assert plan.kind == "diffusers" and plan.preset == "lightning-4step"  # auto: the UNet file's record
    report = run_verify(plan)
    digest = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        data = f.read_bytes()
        digest.update(data[8:8 + int.from_bytes(data[:8], "little")])
    assert report.model == {"path": str(folder), "kind": "diffusers", "header_sha256": digest.hexdigest()}
    assert report.settings["timesteps"] == [999, 749, 499, 249]
