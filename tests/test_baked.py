"""Presets already baked in: analyze's default candidates (the preset LoRAs available locally) and
fuse's refusal to bake a preset into a checkpoint that holds it, found by least squares against an
SDXL base reference (not by lora_tools' own record: the test checkpoints carry none)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tools.io.model import open_model
from lora_tools.io.safetensors import load_tensors, read_header, save_tensors
from lora_tools.lora.load import load_lora
from lora_tools.ops.baked import baked_fit, is_baked
from lora_tools.presets import PRESETS, SDXL_BASE_REPO, SDXL_BASE_UNET_FILE
from lora_tools.presets.local import local_preset_loras
from tests.fuse_helpers import LIGHTNING_LORA, FuseAssets, fill_hub_cache
from tests.lora_helpers import fused, run_fails, run_ok

N_PRESET_LORAS = sum(p.lora_file is not None for p in PRESETS.values())


def _without_record(src: Path, out: Path, assets: FuseAssets) -> Path:
    """The fused checkpoint with the base's metadata: nothing says what was fused into it."""
    return save_tensors(out, load_tensors(src), read_header(assets.base).metadata)


@pytest.fixture(scope="module")
def lightning_baked(assets: FuseAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("baked")
    fused(assets.base, d / "with-record.safetensors", f"{assets.lightning_lora}:1.0")
    return _without_record(d / "with-record.safetensors", d / "lightning-baked.safetensors", assets)


# ------------------------------------------------------------------------------------ analyze


def test_local_preset_loras_looks_in_the_folder_then_the_cache(assets: FuseAssets, offline_hub: Path) -> None:
    none = local_preset_loras()
    assert none.found == [] and len(none.missing) == N_PRESET_LORAS
    in_folder = local_preset_loras(assets.lightning_dir)
    assert [(p.name, path) for p, path in in_folder.found] == [
        ("lightning-4step", assets.lightning_dir / LIGHTNING_LORA)]
    fill_hub_cache(offline_hub, "tianweiy/DMD2", "dmd2_sdxl_4step_lora.safetensors", b"not read here")
    both = local_preset_loras(assets.lightning_dir)
    assert sorted(p.name for p, _ in both.found) == ["dmd2-4step", "lightning-4step"]
    assert len(both.missing) == N_PRESET_LORAS - 2


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_analyze_without_lora_tries_the_cached_presets(assets: FuseAssets, tmp_path: Path, offline_hub: Path) -> None:
    fill_hub_cache(offline_hub, "ByteDance/SDXL-Lightning", LIGHTNING_LORA, assets.lightning_lora.read_bytes())
    model = tmp_path / "m.safetensors"
    fused(assets.base, model, f"{assets.lightning_lora}:0.8")
    rep = json.loads(run_ok("analyze", model, "--base", assets.base, "--json").stdout)
    assert rep["presets"]["tried"] == ["lightning-4step"]
    assert len(rep["presets"]["unavailable"]) == N_PRESET_LORAS - 1 and "dmd2-4step" in rep["presets"]["unavailable"]
    (fit,) = rep["loras"]
    assert fit["label"] == "lightning-4step" and fit["strength"] == pytest.approx(0.8, abs=1e-3)
    text = run_ok("analyze", model, "--base", assets.base).stdout
    assert text.startswith("Tried the presets available locally: lightning-4step; not available: lightning-2step, ")
    assert "lightning-4step: strength 0.800" in text


def test_analyze_without_any_candidate_fails_cleanly(assets: FuseAssets, tmp_path: Path, offline_hub: Path) -> None:
    line = run_fails(tmp_path, "analyze", assets.base, "--base", assets.base, "--preset-dir", tmp_path,
                     names="No candidate LoRA")
    assert "the Hugging Face cache" in line and "--lora PATH" in line


# ------------------------------------------------------------------------------------ fuse


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_baked_fit_on_a_sample(assets: FuseAssets, lightning_baked: Path) -> None:
    with load_lora(assets.lightning_lora) as lora, open_model(lightning_baked) as model, \
            open_model(assets.base) as base, open_model(assets.original_unet) as unrelated:
        fit = baked_fit(model, base, "l", lora)
        assert fit is not None and fit.modules == 8 < len(lora.modules)
        assert fit.strength == pytest.approx(1.0, abs=1e-3) and fit.explained == pytest.approx(1.0, abs=1e-3)
        assert is_baked(fit)
        clean = baked_fit(base, base, "l", lora)  # no difference at all
        assert clean is not None and clean.explained == 0.0 and not is_baked(clean)
        other = baked_fit(base, unrelated, "l", lora)  # a model that differs, but not by the LoRA
        assert other is not None and other.explained < 1e-3 and not is_baked(other)
        tuned = baked_fit(model, unrelated, "l", lora)  # differs by a "fine-tune" and the LoRA
        assert tuned is not None and tuned.strength == pytest.approx(1.0, abs=0.05) and is_baked(tuned)
        assert 0.01 < tuned.explained < 0.5


@pytest.mark.slow
def test_fuse_refuses_a_preset_already_baked_in(assets: FuseAssets, lightning_baked: Path, tmp_path: Path) -> None:
    out = tmp_path / "twice.safetensors"
    line = run_fails(tmp_path, "fuse", lightning_baked, "--lora", assets.lightning_lora, "--original-unet", assets.base,
                     "-o", out,
                     names=f"'{lightning_baked}' already has SDXL-Lightning 4-step baked in (strength 1.00, ")
    assert line.endswith("fusing it again doubles it; pass --force to fuse anyway."), line
    assert "sampled modules" in line and "'base.safetensors'" in line
    run_ok("fuse", lightning_baked, "--lora", assets.lightning_lora, "--original-unet", assets.base, "-o", out,
           "--force", "-q")
    assert out.exists()


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_fuse_finds_the_reference_in_the_hub_cache(assets: FuseAssets, lightning_baked: Path, tmp_path: Path,
                                                   offline_hub: Path) -> None:
    out = tmp_path / "twice.safetensors"
    run_ok("fuse", lightning_baked, "--lora", assets.lightning_lora, "-o", out, "-q")  # no reference: not checked
    out.unlink()
    # The cached "SDXL base" is another model (seed 3): both checkpoints differ from it everywhere, like
    # fine-tunes do; the one holding Lightning is still told apart.
    fill_hub_cache(offline_hub, SDXL_BASE_REPO, SDXL_BASE_UNET_FILE, assets.original_unet.read_bytes())
    run_ok("fuse", assets.base, "--lora", assets.lightning_lora, "-o", out, "-q")
    line = run_fails(tmp_path, "fuse", lightning_baked, "--lora", assets.lightning_lora, "-o", out, names="baked in")
    assert "(strength 1.00, " in line and "'diffusion_pytorch_model.fp16.safetensors'" in line


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_fuse_into_a_base_without_the_preset_is_not_refused(assets: FuseAssets, tmp_path: Path) -> None:
    styled = _without_record(fused(assets.base, tmp_path / "s0.safetensors", f"{assets.style}:1.0") and
                             tmp_path / "s0.safetensors", tmp_path / "styled.safetensors", assets)
    for model in (assets.base, styled):
        out = tmp_path / f"{model.stem}-l.safetensors"
        run_ok("fuse", model, "--lora", assets.lightning_lora, "--original-unet", assets.base, "-o", out, "-q")
        assert out.exists()
