"""Every script in examples/ runs and says what it should."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest

#: conftest's ``example_run``: each script runs once per session (test_output_examples reads the same run).
Runs = Callable[[str], SimpleNamespace]


def _run(example_run: Runs, name: str) -> str:
    proc = example_run(name)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_inspect_example_reports_lightning(example_run: Runs):
    out = _run(example_run, "inspect_lora.py")
    assert '"kind": "lora"' in out and '"modules": 788' in out
    assert '"acceleration": "SDXL-Lightning 4-step"' in out or "lightning" in out.split('"acceleration"')[1].lower()


def test_fuse_example_writes_checkpoint_and_unet(example_run: Runs):
    out = _run(example_run, "fuse_lightning.py")
    assert "checkpoint: my-checkpoint-lightning-4step.safetensors" in out
    assert "unet: my-checkpoint-lightning-4step-unet.safetensors" in out
    assert "'timestep_spacing': 'trailing'" in out


@pytest.mark.slow
def test_several_loras_example_matches_diffusers(example_run: Runs):
    out = _run(example_run, "fuse_several_loras.py")
    assert out.strip().endswith("OK"), out
