"""``loratool demo``, the README's first command, run as users run it (a subprocess, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from lora_tools.cli.demo import DEMO_SIZE
from lora_tools.verify.grid import grid_size


def _demo(folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", "from lora_tools.cli import main; main()", "demo", "--dir", str(folder), *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def test_demo_runs_offline_and_prints_only_its_own_steps(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    run = _demo(folder)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "Lightning 4-step" in out and "(OK)" in out and "Done." in out
    fused = folder / "community-checkpoint-lightning-4step-style-lora.safetensors"
    assert fused.is_file() and (folder / "community-checkpoint-lightning-4step-style-lora-unet.safetensors").is_file()
    assert (folder / "community-checkpoint-lightning-4step-style-lora-diffusers" / "model_index.json").is_file()
    assert "5. Verifying: loratool verify" in out and "Verdict: PASS (threshold 50 dB for fp32)" in out
    report = json.loads((folder / "verify" / "report.json").read_text())
    assert report["verdict"] == "pass" and report["settings"]["timesteps"] == [999, 749, 499, 249]
    assert [lo["strength"] for lo in report["against"]["loras"]] == [1.0, 0.6]
    assert all(i["psnr_db"] >= 50 for i in report["images"]) and len(report["images"]) == 1
    assert f"grid {folder / 'verify' / 'grid.png'}" in out and f"{folder / 'verify' / 'report.md'}" in out
    assert Image.open(folder / "verify" / "grid.png").size == grid_size(1, 1, (DEMO_SIZE, DEMO_SIZE))
    noise = [line for line in (run.stdout + run.stderr).splitlines()
             if line.startswith(("Loading", "[transformers]", "No LoRA keys")) or "Warning" in line]
    assert noise == []
    again = _demo(folder, "--no-render")  # its own folder: emptied and rebuilt
    assert again.returncode == 0, again.stderr
    assert not (folder / "verify").exists() and "Verifying" not in again.stdout


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    run = _demo(folder)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [f"Error: '{folder}' exists and was not made by loratool demo: pass another --dir."]
    assert [p.name for p in folder.iterdir()] == ["precious.txt"]
