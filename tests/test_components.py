"""The one component table and the one diffusers-folder discovery rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tools.errors import InvalidFileError
from lora_tools.io.diffusers_folder import component_weight_files
from lora_tools.io.model import open_model
from lora_tools.layouts.components import COMPONENTS, LORA_COMPONENTS, component_label, spelling
from lora_tools.layouts.table import DIFFUSERS_FOLDERS, SGM_PREFIXES
from lora_tools.testing.synthetic import write_diffusers_folder

DIFFUSERS = Path(__import__("diffusers").__file__).parent


def test_table_spellings_agree_with_diffusers_pipeline_and_loaders():
    """diffusers is the oracle: pipeline attributes, LoRA prefixes, weight file names."""
    pipeline_src = (DIFFUSERS / "pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py").read_text()
    for spec in COMPONENTS.values():
        assert f"self.{spec.pipeline_attr}" in pipeline_src or f"{spec.pipeline_attr}=" in pipeline_src, spec
        assert spec.diffusers_folder == spec.pipeline_attr  # save_pretrained writes one folder per attribute
    constants = (DIFFUSERS / "utils/constants.py").read_text()
    assert 'SAFETENSORS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"' in constants
    assert COMPONENTS["unet"].weights_stem == COMPONENTS["vae"].weights_stem == "diffusion_pytorch_model"
    assert COMPONENTS["te1"].weights_stem == COMPONENTS["te2"].weights_stem == "model"  # transformers' name
    lora_pipeline = (DIFFUSERS / "loaders/lora_pipeline.py").read_text()
    for comp in ("unet", "te1", "te2"):
        prefix = COMPONENTS[comp].peft_prefix
        assert prefix is not None and f'"{prefix.rstrip(".")}"' in lora_pipeline
    assert LORA_COMPONENTS == ("unet", "te1", "te2") and COMPONENTS["vae"].kohya_prefix is None


def test_derived_maps_are_the_table():
    assert SGM_PREFIXES == spelling("sgm_prefix") and DIFFUSERS_FOLDERS == spelling("diffusers_folder")
    assert list(SGM_PREFIXES) == ["unet", "vae", "te1", "te2"]  # single-file order, as before
    assert spelling("kohya_prefix") == {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}
    assert spelling("comfy_prefix")["te2"] == "text_encoders.clip_g.transformer."
    assert component_label("te2") == "OpenCLIP-bigG text encoder" and component_label("x") == "x"


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


def test_discovery_prefers_no_variant_then_fp16_and_keeps_shards_together(tmp_path: Path):
    _touch(tmp_path / "unet", "diffusion_pytorch_model.bf16.safetensors", "diffusion_pytorch_model.fp16.safetensors")
    assert [f.name for f in component_weight_files(tmp_path, "unet")] == ["diffusion_pytorch_model.fp16.safetensors"]
    _touch(tmp_path / "unet", "diffusion_pytorch_model.safetensors")
    assert [f.name for f in component_weight_files(tmp_path, "unet")] == ["diffusion_pytorch_model.safetensors"]
    assert [f.name for f in component_weight_files(tmp_path, "unet", variant="bf16")] == [
        "diffusion_pytorch_model.bf16.safetensors"]
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    _touch(tmp_path / "text_encoder", *shards)
    assert [f.name for f in component_weight_files(tmp_path, "te1")] == shards
    # diffusers' index spelling for a variant: <stem>.safetensors.index.<variant>.json
    te2 = tmp_path / "text_encoder_2"
    _touch(te2, "model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors")
    (te2 / "model.safetensors.index.fp16.json").write_text(json.dumps({"weight_map": {
        "a": "model.fp16-00002-of-00002.safetensors", "b": "model.fp16-00001-of-00002.safetensors"}}))
    assert [f.name for f in component_weight_files(tmp_path, "te2", variant="fp16")] == [
        "model.fp16-00002-of-00002.safetensors", "model.fp16-00001-of-00002.safetensors"]
    assert component_weight_files(tmp_path, "vae") == []


def test_bin_weights_only_when_asked(tmp_path: Path):
    _touch(tmp_path / "vae", "diffusion_pytorch_model.bin")
    assert component_weight_files(tmp_path, "vae") == []
    assert [f.name for f in component_weight_files(tmp_path, "vae", allow_bin=True)] == ["diffusion_pytorch_model.bin"]


def test_an_index_naming_a_shard_outside_the_folder_is_refused(tmp_path: Path):
    _touch(tmp_path / "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(InvalidFileError, match="names a shard outside its folder"):
        component_weight_files(tmp_path, "unet")


def test_a_missing_variant_is_named_not_reported_as_no_weights(tmp_path: Path):
    root = write_diffusers_folder(tmp_path / "pipe", "tiny")
    with pytest.raises(InvalidFileError) as e:
        open_model(root, variant="fp16")
    assert str(e.value) == f"'{root / 'unet'}' has no 'fp16' variant of its weights (it has: no variant)."
    assert "no unet" not in str(e.value)


def test_open_model_reads_a_variant_folder(tmp_path: Path):
    root = write_diffusers_folder(tmp_path / "pipe16", "tiny", variant="fp16")
    model = open_model(root, variant="fp16")
    assert set(model.kind.components) == {"unet", "vae", "te1", "te2"}
    with pytest.raises(InvalidFileError, match=r"has no 'bf16' variant of its weights \(it has: fp16\)"):
        open_model(root, variant="bf16")
