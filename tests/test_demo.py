"""``loratool demo``, the README's first command, run as users run it (a subprocess, offline). The full demo and a
``--no-render`` re-run over its folder run once per session (conftest's ``demo_run`` and ``demo_rerun_no_render``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from lora_tools.cli.demo import DEMO_SIZE
from lora_tools.verify.grid import TITLE_LINES, font_size, grid_size, header_height, label_width
from tests.fork_server import ForkedRun


@pytest.mark.slow  # two verify steps (fused vs runtime LoRAs, fp8 vs fp16): over two minutes on a busy CPU
def test_demo_runs_offline_and_prints_only_its_own_steps(demo_run: SimpleNamespace,
                                                         demo_rerun_no_render: SimpleNamespace) -> None:
    folder, run, shown = demo_run.folder, demo_run, demo_run.shown
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
    assert f"grid {shown / 'verify' / 'grid.png'}" in out and f"{shown / 'verify' / 'report.md'}" in out
    assert Image.open(folder / "verify" / "grid.png").size == grid_size(1, 1, (DEMO_SIZE, DEMO_SIZE))
    noise = [line for line in (run.stdout + run.stderr).splitlines()
             if line.startswith(("Loading", "[transformers]", "No LoRA keys")) or "Warning" in line]
    assert noise == []
    _check_comparison(folder / "verify")
    shown_fused = shown / fused.name
    shown_fp8 = shown / "community-checkpoint-lightning-4step-style-lora-fp8.safetensors"
    assert f"6. Fusing in fp8 (UNet weights in 8 bits, for small GPUs): loratool fuse {shown}" in out
    assert f"7. Verifying fp8 against fp16: loratool verify {shown_fp8} --against {shown_fused}" in out
    assert "Verdict: PASS (threshold 30 dB for fp32, fp8 scaled weights)" in out
    fp8_report = json.loads((folder / "verify-fp8" / "report.json").read_text())
    assert fp8_report["verdict"] == "pass" and fp8_report["threshold"]["weights"] == "fp8 scaled"
    assert fp8_report["against"]["base"] == str(shown_fused) and fp8_report["against"]["loras"] == []
    _check_comparison(folder / "verify-fp8")
    again = demo_rerun_no_render  # over a copy of this folder: emptied and rebuilt
    assert again.returncode == 0, again.stderr
    assert (again.cwd / shown).is_dir() and not (again.cwd / shown / "verify").exists()
    assert "Verifying" not in again.stdout


def _check_comparison(out: Path) -> None:
    """The comparison picture: the title (verdict in green), three labelled columns, the model's image in the first,
    a rendered reference in the second, and their difference in the third."""
    picture = Image.open(out / "comparison.png").convert("RGB")
    assert picture.size == grid_size(1, 3, (DEMO_SIZE, DEMO_SIZE))
    left, top, line = label_width(DEMO_SIZE), header_height(DEMO_SIZE), font_size(DEMO_SIZE) + 4
    title = picture.crop((0, 0, picture.width, 2 + TITLE_LINES * line))
    assert any(g > 80 and r < 60 and b < 60 for r, g, b in title.getdata()), "no green PASS line in the title"
    cells = [picture.crop((left + i * DEMO_SIZE, top, left + (i + 1) * DEMO_SIZE, top + DEMO_SIZE)) for i in range(3)]
    labels = [picture.crop((left + i * DEMO_SIZE, 2 + TITLE_LINES * line, left + (i + 1) * DEMO_SIZE, top))
              for i in range(3)]
    assert all(min(label.convert("L").getdata()) < 128 for label in labels), "a column has no label"
    assert cells[0].tobytes() == Image.open(out / "images" / "p0-seed0.png").convert("RGB").tobytes()
    assert len(set(cells[1].getdata())) > 16  # rendered, not blank
    assert max(max(px) for px in cells[2].getdata()) < 255  # the sides agree: the x10 difference is not saturated


def test_demo_without_renders_fuses_fp8_too(demo_rerun_no_render: SimpleNamespace) -> None:
    """``--no-render`` skips both verify steps; the fp8 fuse (size saved, weight error) still runs, step 5."""
    run, folder, shown = demo_rerun_no_render, demo_rerun_no_render.folder, demo_rerun_no_render.shown
    assert run.returncode == 0, run.stderr
    fused = folder / "community-checkpoint-lightning-4step-style-lora.safetensors"
    fp8 = folder / "community-checkpoint-lightning-4step-style-lora-fp8.safetensors"
    assert f"5. Fusing in fp8 (UNet weights in 8 bits, for small GPUs): loratool fuse {shown}" in run.stdout
    assert f"--dtype fp8 -o {shown / fp8.name} --overwrite" in run.stdout and "Verifying" not in run.stdout
    saved = fused.stat().st_size - fp8.stat().st_size
    assert 0.3 < saved / fused.stat().st_size < 0.6  # linear weights in fp8; convs stay fp16 (ComfyUI scales linear layers only)
    assert f"fp8 scaled: {fp8.name} is " in run.stdout and "smaller than in fp16" in run.stdout
    assert "fp8 rounding: 743 UNet weights, relative Frobenius error " in run.stdout


def test_demo_refuses_a_folder_it_did_not_make(forked_cli: Callable[..., ForkedRun], tmp_path: Path) -> None:
    """A process of its own (conftest's ``forked_cli``): the refusal needs no fresh interpreter."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    run = forked_cli(["demo", "--dir", str(folder)], cwd=tmp_path)
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 1
    assert stderr.strip().splitlines() == [f"Error: '{folder}' exists and was not made by loratool demo: pass another --dir."]
    assert [p.name for p in folder.iterdir()] == ["precious.txt"]
