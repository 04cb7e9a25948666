"""``verify`` holds one model at a time, loaded tensor by tensor from the file (issue #24: a full-size SDXL in fp32
on a CPU within 16 GB), and refuses up front, in one line, a run whose predicted peak is above the memory there is."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import SafetensorsHeader, TensorInfo
from lora_tools.verify import WRONG_SETTINGS, plan_verify
from lora_tools.verify.cost import AVAILABLE_MEMORY_ENV, ModelParams, model_params, predicted_memory


def _whole_pipeline_render(model: Path, config: Path, jobs: list[tuple[Any, str, int]],
                           loras: list[tuple[Path, float]] = ()) -> list[Any]:  # type: ignore[assignment]
    """The way verify rendered before: every model of the pipeline in memory, the weights loaded from a state
    dict of the whole file (``load_state_dict``), runtime LoRAs applied by ``load_lora_weights``."""
    import torch

    from lora_tools.io.safetensors import load_tensors
    from lora_tools.layouts.sdxl import sgm_to_diffusers_state_dicts
    from lora_tools.verify.oracle import apply_runtime_loras
    from lora_tools.verify.pipeline import build_pipeline
    from lora_tools.verify.render import prepare, render

    loaded = build_pipeline(model, config=config, dtype="fp32", device="cpu")
    pipe = loaded.pipe
    assert loaded.cfg is not None
    state = sgm_to_diffusers_state_dicts(load_tensors(model), loaded.cfg.table, ["unet", "vae", "te1", "te2"])
    for comp, attr in (("unet", "unet"), ("vae", "vae"), ("te1", "text_encoder"), ("te2", "text_encoder_2")):
        module = getattr(pipe, attr)
        weights = {k: v.float() for k, v in state[comp].items()}  # type: ignore[index]
        if comp == "te1" and not any(k in module.state_dict() for k in weights):
            weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
        missing, _ = module.load_state_dict(weights, strict=False)
        assert not [k for k in missing if not k.endswith("position_ids")]
    apply_runtime_loras(pipe, loras)
    out = []
    for sampler, prompt, seed in jobs:
        prepare(pipe, sampler)
        with torch.inference_mode():
            out.append(render(pipe, sampler, prompt, seed, (64, 64), "whole"))
    return out


def _staged_render(model: Path, config: Path, jobs: list[tuple[Any, str, int]],
                   loras: list[tuple[Path, float]] = ()) -> list[Any]:  # type: ignore[assignment]
    from lora_tools.verify.oracle import runtime_lora_loader
    from lora_tools.verify.pipeline import open_parts
    from lora_tools.verify.render import Job, render_staged

    parts = open_parts(model, config=config, dtype="fp32", device="cpu")
    parts.on_load = runtime_lora_loader(loras, parts.components.config("unet"))
    run = render_staged(parts, [Job(prompt, seed, sampler, "staged") for sampler, prompt, seed in jobs], (64, 64))
    parts.close()
    assert all(r.error is None for r in run.results)
    assert all(getattr(parts.pipe, a) is None for a in ("unet", "vae", "text_encoder", "text_encoder_2"))
    return [r.rendered for r in run.results]


@pytest.mark.diffusers
def test_one_model_at_a_time_renders_the_whole_pipelines_images_bit_for_bit(micro_verify: dict[str, Path]) -> None:
    import torch

    from lora_tools.presets import get_preset

    lightning = get_preset("lightning-4step").sampler
    wrong = dataclasses.replace(WRONG_SETTINGS, steps=3)  # CFG 7: the negative prompt's embeddings too
    jobs = [(lightning, "a cat", 0), (lightning, "a lighthouse at dusk", 3), (wrong, "a cat", 0)]
    whole = _whole_pipeline_render(micro_verify["fused"], micro_verify["config"], jobs)
    staged = _staged_render(micro_verify["fused"], micro_verify["config"], jobs)
    for a, b in zip(whole, staged, strict=True):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.image, b.image)
        assert float(a.image.std()) > 0  # a picture, not a blank
    assert not torch.equal(staged[0].latents, staged[1].latents)  # another prompt and seed: another image


@pytest.mark.diffusers
def test_runtime_loras_applied_model_by_model_match_load_lora_weights(micro_verify: dict[str, Path]) -> None:
    import torch

    from lora_tools.presets import get_preset

    jobs = [(get_preset("lightning-4step").sampler, "a cat", 0)]
    loras = [(micro_verify["lora"], 0.75)]
    whole = _whole_pipeline_render(micro_verify["base"], micro_verify["config"], jobs, loras)
    staged = _staged_render(micro_verify["base"], micro_verify["config"], jobs, loras)
    plain = _staged_render(micro_verify["base"], micro_verify["config"], jobs)
    assert torch.equal(whole[0].latents, staged[0].latents) and torch.equal(whole[0].image, staged[0].image)
    assert not torch.equal(plain[0].latents, staged[0].latents)  # the LoRA was applied


def _sdxl_header() -> SafetensorsHeader:
    """A header with SDXL's parameter counts per component, fp16, in tensors of at most OpenCLIP's token embedding
    (49408 x 1280, SDXL's largest)."""
    counts = {"model.diffusion_model.": 2_567_463_684, "first_stage_model.": 83_653_863,
              "conditioner.embedders.0.transformer.": 123_060_480, "conditioner.embedders.1.model.": 694_659_841}
    largest = 49408 * 1280
    tensors = {}
    for prefix, n in counts.items():
        for i in range(0, n, largest):
            k = f"{prefix}t{i}.weight"
            tensors[k] = TensorInfo(k, "F16", (min(largest, n - i),), 0, 2 * min(largest, n - i))
    return SafetensorsHeader(Path("sdxl.safetensors"), tensors, {}, 0, 0)


def test_sdxl_in_fp32_at_256_is_predicted_under_16_gb_and_the_unet_is_its_peak() -> None:
    params = model_params(dict.fromkeys(("unet", "vae", "te1", "te2"), [_sdxl_header()]))
    assert (params.unet, params.te2) == (2_567_463_684, 694_659_841)
    fp32 = predicted_memory(params, "fp32", (256, 256), guided=False)
    assert fp32.stage == "the UNet" and 4 * params.unet < fp32.peak < 16 * 10**9
    half = predicted_memory(params, "bf16", (256, 256), guided=False)
    assert half.peak < fp32.peak - params.unet  # half the UNet's weights
    big = predicted_memory(ModelParams(params.unet, params.vae, params.te1, params.te2), "fp32", (4096, 4096), False)
    assert big.stage == "the VAE decode" and big.activations > big.weights


def _verify_args(micro_verify: dict[str, Path], *extra: str) -> list[str]:
    return ["verify", str(micro_verify["fused"]), "--prompt", "a cat", "--config", str(micro_verify["config"]),
            "--device", "cpu", "--dtype", "fp32", *extra]


@pytest.mark.diffusers
def test_a_run_predicted_above_the_available_memory_is_refused_in_one_line(micro_verify: dict[str, Path],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_verify(micro_verify["fused"], config=micro_verify["config"], device="cpu", dtype="fp32")
    assert plan.memory is not None
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, str(plan.memory.peak - 1))
    run = CliRunner().invoke(cli, _verify_args(micro_verify, "--out", str(micro_verify["dir"] / "refused")))
    assert run.exit_code == 6, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "verify needs about" in lines[0]
    assert "--dtype bf16" in lines[0] and "available" in lines[0]
    assert not (micro_verify["dir"] / "refused").exists()  # refused before anything was written
    run = CliRunner().invoke(cli, _verify_args(micro_verify, "--size", "2048x2048"))  # activations: the size
    assert run.exit_code == 6 and "--size WxH" in run.stderr
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, f"{plan.memory.peak / 2**30 + 0.01:.3f}G")  # it fits: the plan goes on
    assert plan_verify(micro_verify["fused"], config=micro_verify["config"], device="cpu", dtype="fp32").memory
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, "lots")
    run = CliRunner().invoke(cli, _verify_args(micro_verify))
    assert run.exit_code == 1 and f"{AVAILABLE_MEMORY_ENV}='lots' is not a size" in run.stderr


@pytest.mark.diffusers
def test_the_cost_line_shows_the_predicted_peak(micro_verify: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_tools.cli import _progress

    monkeypatch.setattr(_progress, "on_terminal", lambda: True)
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, "1T")
    run = CliRunner().invoke(cli, _verify_args(micro_verify))
    assert run.exit_code == 0, run.output
    assert ", peak memory about " in run.stderr.split("\n")[0] and "(the UNet)" in run.stderr.split("\n")[0]


_PEAK_OF_CHILD = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.subprocess
@pytest.mark.diffusers
def test_the_predicted_peak_is_within_a_factor_2_of_the_measured_one(micro_verify: dict[str, Path]) -> None:
    """On a micro model the runtime (Python, torch, diffusers) is most of both figures: this checks the prediction
    is of the right size, not its per-stage terms (benchmarks/verify_memory.py measures those at full size)."""
    plan = plan_verify(micro_verify["fused"], config=micro_verify["config"], device="cpu", dtype="fp32",
                       prompts=["a cat"])
    assert plan.memory is not None
    # Linux carries a process's peak RSS across fork and exec: a child of this (large) pytest process would report
    # this process's peak. A small Python in between starts the verify and reports its own peak alone.
    run = subprocess.run([sys.executable, "-c", _PEAK_OF_CHILD, sys.executable, "-m", "lora_tools",
                          *_verify_args(micro_verify)], capture_output=True, text=True, env=os.environ.copy())
    assert run.returncode == 0, run.stderr
    measured = int(run.stdout.split()[-1]) * 1024
    assert measured / 2 < plan.memory.peak < measured * 2, (measured, plan.memory)
