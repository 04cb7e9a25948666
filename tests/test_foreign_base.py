"""A LoRA whose metadata says SD1.x (``ss_base_model_version``) is not taken for SDXL, even when its text
encoder keys fit SDXL's CLIP-L by shape: ``inspect`` says so and exits 1, ``rescale`` refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import save_tensors
from lora_tools.lora.family import metadata_base
from lora_tools.testing.synthetic_lora import make_lora


def _sd15_te_lora(path: Path, base: str = "sd_v1") -> Path:
    tensors, meta = make_lora("micro", fmt="kohya", components=("te1",), rank=4)
    tensors = {k.replace("lora_te1_", "lora_te_"): v for k, v in tensors.items()}  # SD1.x's one text encoder
    save_tensors(path, tensors, metadata={**meta, "ss_base_model_version": base})
    return path


@pytest.mark.parametrize("value,family", [("sd_v1", "SD1.x"), ("sd_v2", "SD2.x"), ("sdxl_base_v1-0", None),
                                          ("stable-diffusion-v1/lora", "SD1.x")])
def test_metadata_names_the_base(value: str, family: str | None) -> None:
    key = "modelspec.architecture" if "/" in value else "ss_base_model_version"
    found = metadata_base({key: value})
    assert (found[0] if found else None) == family


def test_inspect_and_rescale_refuse_an_sd15_lora(tmp_path: Path) -> None:
    lora = _sd15_te_lora(tmp_path / "sd15.safetensors")
    inspected = CliRunner().invoke(cli, ["inspect", str(lora)])
    assert inspected.exit_code == 1 and "SD1.x" in inspected.stderr and "ss_base_model_version" in inspected.stderr
    out = tmp_path / "o.safetensors"
    rescaled = CliRunner().invoke(cli, ["rescale", str(lora), "--strength", "0.5", "-o", str(out)])
    assert rescaled.exit_code == 1 and "trained for SD1.x" in rescaled.stderr and not out.exists()


def test_an_sdxl_lora_with_sdxl_metadata_is_fine(tmp_path: Path) -> None:
    lora = _sd15_te_lora(tmp_path / "xl.safetensors", base="sdxl_base_v1-0")
    out = tmp_path / "o.safetensors"
    assert CliRunner().invoke(cli, ["rescale", str(lora), "--strength", "0.5", "-o", str(out)]).exit_code == 0
