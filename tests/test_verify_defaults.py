"""``verify`` without ``--size``: the model's own size (SDXL-sized UNet: 1024x1024; test-sized: 64x64), its CPU
cost said before anything loads, and per-step progress on stderr (never in ``--json``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import SafetensorsHeader, TensorInfo
from lora_tools.verify import plan_verify
from lora_tools.verify.cost import SDXL_UNET_PARAMS, UnetScale, predicted_cpu_seconds, unet_scale


def _header(prefix: str, width: int) -> SafetensorsHeader:
    key = prefix + ("input_blocks.0.0.weight" if prefix else "conv_in.weight")
    tensors = {key: TensorInfo(key, "F16", (width, 4, 3, 3), 0, 2 * width * 36)}
    return SafetensorsHeader(Path("x.safetensors"), tensors, {}, 0, 0)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_native_size_comes_from_the_unets_width(prefix: str) -> None:
    assert unet_scale(_header(prefix, 320)).native_size == (1024, 1024)
    assert unet_scale(_header(prefix, 32)).native_size == (64, 64)


def test_a_test_sized_model_is_planned_small_and_cheap(tiny_checkpoint: Path, tmp_path: Path) -> None:
    fused = tiny_checkpoint
    plan = plan_verify(fused, device="cpu", preset="lightning-4step")
    assert plan.size == (64, 64) and plan.unet is not None and plan.unet.test_sized
    assert plan.renders == 2 and plan.unet_steps == 8
    assert plan.predicted_cpu_seconds() < 60
    assert plan_verify(fused, device="cpu", preset="lightning-4step", size=(128, 96)).size == (128, 96)  # --size still wins


def test_sdxl_at_1024_is_predicted_in_minutes_on_a_cpu() -> None:
    sdxl = UnetScale(320, SDXL_UNET_PARAMS)
    assert predicted_cpu_seconds(sdxl, (1024, 1024), 4, 1) >= 60


@pytest.mark.diffusers
def test_verify_prints_its_cost_and_each_step_on_stderr(micro_verify: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_tools.cli import _progress

    monkeypatch.setattr(_progress, "on_terminal", lambda: True)  # progress is for terminals, not logs
    args = ["verify", str(micro_verify["fused"]), "--prompt", "a cat", "--config", str(micro_verify["config"]),
            "--device", "cpu"]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    lines = run.stderr.split("\n")
    assert lines[0].startswith("Plan:     1 renders of 4 steps at 64x64 on cpu, about ")
    assert lines[1].split("\r")[1:] == [f"  model, prompt 1/1, seed 0: step {i}/4" for i in range(1, 5)]
    assert "step 1/4" not in run.stdout
    as_json = CliRunner().invoke(cli, [*args, "--json"])
    assert as_json.exit_code == 0 and as_json.stderr == ""
    assert json.loads(as_json.stdout)["images"][0]["prompt"] == "a cat"
