"""The preset registry, field by field against the model cards' and papers' text, and the
timesteps the built diffusers schedulers actually run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.errors import UsageError
from lora_tools.presets import LIGHTNING, PRESETS, SamplerSettings, get_preset, identify_file, sampler_from_record
from lora_tools.verify.sampler import build_scheduler, timesteps_run

_ROOT = Path(__file__).resolve().parents[1]
#: The facts the registry is checked against, in the repository (sections 1.1-1.3, 4 and 7.2 of the design notes).
DOMAIN = _ROOT / "tests" / "data" / "preset_facts.md"
DOMAIN_TEXT = DOMAIN.read_text()


def _row(model: str) -> str:
    """The section-4 table row whose first cell starts with ``model``."""
    for line in DOMAIN_TEXT.splitlines():
        if line.startswith((f"| **{model}", f"| {model}")):
            return line
    raise AssertionError(f"no row for {model} in {DOMAIN.name}")


class TestAgainstDomainText:
    def test_every_file_name_is_in_the_text(self) -> None:
        for p in PRESETS.values():
            for f in p.files:
                stem = f.split(".")[0]
                assert stem in DOMAIN_TEXT or re.sub(r"_(\d)step", r"_{N}step", f) in DOMAIN_TEXT or \
                    "sdxl_lightning_{2,4,8}step_lora" in DOMAIN_TEXT, f
            assert p.repo_id in DOMAIN_TEXT, p.repo_id

    def test_hashes_are_the_ones_in_the_text(self) -> None:
        for p in PRESETS.values():
            for f, sha in p.known_sha256.items():
                assert sha in DOMAIN_TEXT, (p.name, f)
                assert re.search(re.escape(f.split(".")[0]) + r".{0,80}" + sha[:12], DOMAIN_TEXT, re.S) or p.family in (
                    "lightning", "lcm"), (p.name, f)

    def test_lightning(self) -> None:
        row = _row("SDXL-Lightning")
        assert 'EulerDiscreteScheduler(timestep_spacing="trailing")' in row and "`guidance_scale=0`" in row
        assert "Euler + `sgm_uniform`, CFG 1.0, LoRA strength 1.0" in row
        for p in LIGHTNING.values():
            s = p.sampler
            assert (s.scheduler, s.timestep_spacing, s.guidance_scale, s.steps) == ("EulerDiscreteScheduler", "trailing", 0.0, p.steps)
            assert (s.comfy_sampler, s.comfy_scheduler, s.comfy_cfg, s.lora_strength) == ("euler", "sgm_uniform", 1.0, 1.0)
        assert '1-step adds `prediction_type="sample"`' in row and LIGHTNING[1].sampler.prediction_type == "sample"
        assert "There is no 1-step LoRA." in DOMAIN_TEXT and LIGHTNING[1].lora_file is None

    def test_hyper_sd(self) -> None:
        row = _row("Hyper-SD (SDXL)")
        assert 'N-step LoRAs: `DDIMScheduler(timestep_spacing="trailing")`, steps = N, `guidance_scale=0`' in row
        for n in (2, 4, 8):
            s = get_preset(f"hyper-sd-{n}step").sampler
            assert (s.scheduler, s.timestep_spacing, s.steps, s.guidance_scale) == ("DDIMScheduler", "trailing", n, 0.0)
            assert (s.comfy_sampler, s.comfy_scheduler) == ("ddim", "sgm_uniform")  # 7.2: DDIM + sgm_uniform
        assert "1-step LoRA is \"unified\" (1–8 steps): `TCDScheduler`, `eta` (1.0 for 1 step" in row
        one = get_preset("hyper-sd-1step").sampler
        assert (one.scheduler, one.eta, one.steps_range, one.guidance_scale) == ("TCDScheduler", 1.0, (1, 8), 0.0)
        assert "ComfyUI-TCD node for unified LoRA" in row and "ComfyUI-TCD" in (one.comfy_node or "")
        assert "1-step UNet: `LCMScheduler`, `timesteps=[800]`, guidance 0" in row
        unet = get_preset("hyper-sd-1step-unet")
        assert (unet.sampler.scheduler, unet.sampler.timesteps, unet.sampler.guidance_scale) == ("LCMScheduler", (800,), 0.0)
        assert unet.lora_file is None and unet.unet_file == "Hyper-SDXL-1step-Unet.safetensors"
        assert "800" in (unet.sampler.comfy_node or "")
        cfg_row = _row("Hyper-SD **CFG-preserved**")
        assert "DDIM trailing; CFG about 5–8" in cfg_row.replace("**", "")
        for n in (8, 12):
            s = get_preset(f"hyper-sd-{n}step-cfg").sampler
            assert s.guidance_range == (5.0, 8.0) and 5.0 <= s.guidance_scale <= 8.0 and s.steps == n
            assert s.scheduler == "DDIMScheduler" and s.timestep_spacing == "trailing"
        assert "SDXL LoRAs fuse at 1.0" in DOMAIN_TEXT and get_preset("hyper-sd-4step").sampler.lora_strength == 1.0

    def test_lcm(self) -> None:
        row = _row("LCM-LoRA SDXL")
        assert "`LCMScheduler`; about 4 (2–8) steps; guidance 1.0 (off) or up to 2.0" in row
        s = get_preset("lcm-lora-sdxl").sampler
        assert (s.scheduler, s.steps, s.steps_range, s.guidance_scale, s.guidance_range) == (
            "LCMScheduler", 4, (2, 8), 1.0, (1.0, 2.0))
        assert "native `lcm` sampler" in row and s.comfy_sampler == "lcm" and s.comfy_model_sampling == "lcm"

    def test_tcd(self) -> None:
        row = _row("TCD-SDXL LoRA")
        assert "`TCDScheduler`; 4–8 steps" in row and "`guidance_scale=0`" in row and "**0.3 recommended**" in row
        s = get_preset("tcd-sdxl").sampler
        assert (s.scheduler, s.steps_range, s.guidance_scale, s.eta) == ("TCDScheduler", (4, 8), 0.0, 0.3)
        assert "ComfyUI-TCD custom node" in row and "ComfyUI-TCD" in (s.comfy_node or "")

    def test_dmd2(self) -> None:
        row = _row("DMD2 SDXL")
        assert "`LCMScheduler`, `num_inference_steps=4`, `guidance_scale=0`, **`timesteps=[999, 749, 499, 249]`**" in row
        four = get_preset("dmd2-4step")
        assert four.sampler.timesteps == (999, 749, 499, 249) and four.sampler.scheduler == "LCMScheduler"
        assert four.sampler.guidance_scale == 0.0 and four.sampler.lora_strength == 1.0  # fuse_lora(lora_scale=1.0)
        assert "0.5–0.75" in row and four.sampler.strength_range == (0.5, 0.75)
        assert "1-step UNet: `timesteps=[399]`" in row
        one = get_preset("dmd2-1step")
        assert one.sampler.timesteps == (399,) and one.unet_file == "dmd2_sdxl_1step_unet_fp16.bin" and one.pickle
        assert "DMD2's UNets ship as `.bin` pickles (weights-only loading)" in DOMAIN_TEXT


class TestSchedulersRun:
    """The timesteps of the scheduler each row builds, as diffusers runs them."""

    def test_lightning_4step_trailing(self) -> None:
        s = LIGHTNING[4].sampler
        sched = build_scheduler(s)
        assert type(sched).__name__ == "EulerDiscreteScheduler" and sched.config.timestep_spacing == "trailing"
        assert timesteps_run(s) == [999, 749, 499, 249]

    def test_lightning_1step_x0(self) -> None:
        s = LIGHTNING[1].sampler
        assert timesteps_run(s) == [999]
        assert build_scheduler(s).config.prediction_type == "sample"

    def test_dmd2_explicit_list_equals_euler_trailing(self) -> None:
        dmd2 = get_preset("dmd2-4step").sampler
        assert type(build_scheduler(dmd2)).__name__ == "LCMScheduler"
        assert timesteps_run(dmd2) == [999, 749, 499, 249] == timesteps_run(LIGHTNING[4].sampler)  # the trailing spacing of 4 steps
        assert dmd2.call_kwargs() == {"guidance_scale": 0.0, "timesteps": [999, 749, 499, 249]}
        assert timesteps_run(get_preset("dmd2-1step").sampler) == [399]
        assert timesteps_run(get_preset("hyper-sd-1step-unet").sampler) == [800]

    def test_every_row_builds_its_class(self) -> None:
        for p in PRESETS.values():
            sched = build_scheduler(p.sampler)
            assert type(sched).__name__ == p.sampler.scheduler
            assert len(timesteps_run(p.sampler)) == p.sampler.steps
        assert get_preset("tcd-sdxl").sampler.call_kwargs()["eta"] == 0.3

    def test_over_a_base_config_keeps_its_betas(self) -> None:
        base = {"beta_start": 0.001, "beta_end": 0.02, "beta_schedule": "scaled_linear", "timestep_spacing": "leading"}
        sched = build_scheduler(LIGHTNING[4].sampler, base)
        assert sched.config.beta_end == 0.02 and sched.config.timestep_spacing == "trailing"


class TestIdentify:
    def test_shared_base_name_needs_repo_or_sha(self) -> None:
        assert identify_file("pytorch_lora_weights.safetensors") is None
        assert identify_file("h1t/TCD-SDXL-LoRA/pytorch_lora_weights.safetensors") is get_preset("tcd-sdxl")
        assert identify_file("latent-consistency/lcm-lora-sdxl/pytorch_lora_weights.safetensors") is get_preset("lcm-lora-sdxl")
        cache = "/root/.cache/huggingface/hub/models--h1t--TCD-SDXL-LoRA/snapshots/abc/pytorch_lora_weights.safetensors"
        assert identify_file(cache) is get_preset("tcd-sdxl")
        lcm_sha = get_preset("lcm-lora-sdxl").known_sha256["pytorch_lora_weights.safetensors"]
        assert identify_file("pytorch_lora_weights.safetensors", lcm_sha) is get_preset("lcm-lora-sdxl")

    def test_family_file_names(self) -> None:
        assert identify_file("Hyper-SDXL-4steps-lora.safetensors") is get_preset("hyper-sd-4step")
        assert identify_file("hyper-sdxl-12steps-cfg-lora.safetensors") is get_preset("hyper-sd-12step-cfg")
        assert identify_file("dmd2_sdxl_4step_lora_fp16.safetensors") is get_preset("dmd2-4step")
        assert identify_file("/x/dmd2_sdxl_1step_unet_fp16.bin") is get_preset("dmd2-1step")
        sha = get_preset("hyper-sd-8step").known_sha256["Hyper-SDXL-8steps-lora.safetensors"]
        assert identify_file("renamed.safetensors", sha) is get_preset("hyper-sd-8step")

    def test_names_are_unique_and_get_preset_suggests(self) -> None:
        assert len(PRESETS) == 15
        with pytest.raises(UsageError, match="Did you mean 'dmd2-4step'"):
            get_preset("dmd2-4steps")


class TestRecords:
    def test_old_lightning_steps_record(self) -> None:
        assert sampler_from_record({"lightning_steps": 4}) is LIGHTNING[4].sampler
        assert sampler_from_record({"preset": "dmd2-4step"}) is get_preset("dmd2-4step").sampler
        assert sampler_from_record({"operation": "fuse"}) is None

    def test_old_sampler_dict_without_scheduler(self) -> None:
        old = {"steps": 4, "guidance_scale": 0.0, "timestep_spacing": "trailing", "prediction_type": "epsilon"}
        assert SamplerSettings.from_dict(old) == LIGHTNING[4].sampler

    def test_new_fields_round_trip_through_string_metadata(self) -> None:
        for p in PRESETS.values():
            d = p.sampler.to_dict()
            assert SamplerSettings.from_dict(d) == p.sampler
            assert SamplerSettings.from_dict(json.loads(json.dumps(d))) == p.sampler
            as_strings = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in d.items()}
            assert SamplerSettings.from_dict(as_strings) == p.sampler
        assert LIGHTNING[4].sampler.to_dict().keys() == {"scheduler", "timestep_spacing", "steps", "guidance_scale",
                                                         "prediction_type", "comfy_sampler", "comfy_scheduler", "comfy_cfg"}

    def test_bad_timesteps(self) -> None:
        with pytest.raises(UsageError, match="timesteps"):
            SamplerSettings("LCMScheduler", None, 2, 0.0, "epsilon", "lcm", "sgm_uniform", 1.0, timesteps=(249, 999))


class TestCli:
    def test_list_and_one_json(self) -> None:
        runner = CliRunner()
        listed = runner.invoke(cli, ["presets"])
        assert listed.exit_code == 0, listed.output
        assert [line.split()[0] for line in listed.output.splitlines()] == list(PRESETS)
        one = runner.invoke(cli, ["presets", "dmd2-4step", "--json"])
        data = json.loads(one.output)
        assert data["sampler"]["timesteps"] == [999, 749, 499, 249] and data["repo_id"] == "tianweiy/DMD2"
        everything = json.loads(runner.invoke(cli, ["presets", "--json"]).output)
        assert [d["name"] for d in everything] == list(PRESETS)

    def test_unknown_name_is_one_line(self) -> None:
        result = CliRunner().invoke(cli, ["presets", "lightning-3step"])
        assert result.exit_code == 1
        assert result.output.strip().startswith("Error: Unknown preset 'lightning-3step'")
        assert "--preset NAME" in result.output
