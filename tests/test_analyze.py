"""analyze: recover the strengths LoRAs were fused at, and report ~0 for one not fused in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tools.lora.load import load_lora
from lora_tools.ops.analyze import analyze_model
from tests.fuse_helpers import FuseAssets
from tests.lora_helpers import fused, run_ok


@pytest.mark.slow
@pytest.mark.parametrize("strength", [0.3, 0.8, 1.0])
def test_analyze_recovers_the_fused_strength(assets: FuseAssets, tmp_path: Path, strength: float) -> None:
    model = tmp_path / "m.safetensors"
    fused(assets.base, model, f"{assets.lightning_lora}:{strength}")
    with load_lora(assets.lightning_lora) as light, load_lora(assets.style) as style:
        report = analyze_model(model, assets.base, [("lightning", light), ("style", style)])
    by = {f.label: f for f in report.fits}
    assert by["lightning"].strength == pytest.approx(strength, abs=1e-3)
    assert by["style"].strength == pytest.approx(0.0, abs=1e-3)
    assert by["lightning"].explained == pytest.approx(1.0, abs=1e-3)
    assert all(v == pytest.approx(strength, abs=1e-3) for v in by["lightning"].per_block.values())
    # both adapt the attention modules: interference is reported there
    assert report.interference and all(0.0 <= i.overlap <= 1.0 + 1e-9 for i in report.interference)


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_analyze_cli_two_loras(assets: FuseAssets, tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    fused(assets.base, model, f"{assets.lightning_lora}:0.8", f"{assets.style}:0.3")
    rep = json.loads(run_ok("analyze", model, "--base", assets.base, "--lora", assets.lightning_lora,
                            "--lora", assets.style, "--json").stdout)
    by = {f["label"]: f for f in rep["loras"]}
    assert by[assets.lightning_lora.name]["strength"] == pytest.approx(0.8, abs=1e-3)
    assert by[assets.style.name]["strength"] == pytest.approx(0.3, abs=1e-3)
    assert rep["explained"] == pytest.approx(1.0, abs=1e-3)
    text = run_ok("analyze", model, "--base", assets.base, "--lora", assets.lightning_lora).stdout
    assert "strength 0.8" in text
