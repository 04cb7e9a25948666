"""Every script in examples/ runs and says what it should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_inspect_example_reports_lightning():
    out = _run("inspect_lora.py")
    assert '"kind": "lora"' in out and '"modules": 788' in out
    assert '"acceleration": "SDXL-Lightning 4-step"' in out or "lightning" in out.split('"acceleration"')[1].lower()


def test_fuse_example_writes_checkpoint_and_unet():
    out = _run("fuse_lightning.py")
    assert "checkpoint: my-checkpoint-lightning-4step.safetensors" in out
    assert "unet: my-checkpoint-lightning-4step-unet.safetensors" in out
    assert "'timestep_spacing': 'trailing'" in out


@pytest.mark.slow
def test_several_loras_example_matches_diffusers():
    out = _run("fuse_several_loras.py")
    assert out.strip().endswith("OK"), out
