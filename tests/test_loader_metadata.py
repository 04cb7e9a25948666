"""Every LoRA we write says what model it is for, so A1111/Forge list it with that model's checkpoints.

A1111's rule (``extensions-builtin/Lora/network.py``, ``NetworkOnDisk.detect_version``), reimplemented here
from its documented behaviour: ``ss_base_model_version`` starting with ``sdxl_`` is SDXL; else ``ss_v2`` equal
to ``True`` is SD2; else any non-empty metadata is SD1; no metadata is Unknown. With an SDXL checkpoint loaded,
A1111 hides every LoRA it classifies as another version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lora_tools.cli import cli
from lora_tools.io.safetensors import read_header
from lora_tools.testing.synthetic_lora import write_lora
from tests.fuse_helpers import FuseAssets
from tests.lora_helpers import fused


def a1111_version(metadata: dict[str, str]) -> str:
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def _invoke(*args: object) -> None:
    run = CliRunner().invoke(cli, [str(a) for a in args])
    assert run.exit_code == 0, run.output


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two micro SDXL LoRAs with a trainer's bare metadata (``format: pt``): A1111 takes such a file for SD1."""
    root = tmp_path_factory.mktemp("loaders")
    a = write_lora(root / "a.safetensors", "micro", fmt="kohya", components=("unet", "te1", "te2"), rank=4, seed=1)
    b = write_lora(root / "b.safetensors", "micro", fmt="kohya", components=("unet",), rank=4, seed=2)
    assert a1111_version(read_header(a).metadata) == "SD1"
    return a, b


OPS: dict[str, list[str]] = {
    "rescale": ["rescale", "{a}", "--strength", "0.5"],
    "resize": ["resize", "{a}", "--rank", "2"],
    "resize-kohya": ["resize", "{a}", "--sv-fro", "0.9"],
    "merge-concat": ["merge", "{a}", "{b}"],
    "merge-svd": ["merge", "{a}", "{b}", "--method", "svd", "--rank", "4"],
    **{f"convert-{fmt}": ["convert", "{b}", "--to", fmt] for fmt in ("kohya", "kohya-diffusers", "diffusers",
                                                                     "peft", "comfy")},
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_lora_op_output_of_an_sdxl_lora_is_sdxl_for_a1111(plain: tuple[Path, Path], tmp_path: Path,
                                                                 op: str) -> None:
    out = tmp_path / "out.safetensors"
    _invoke(*[x.format(a=plain[0], b=plain[1]) for x in OPS[op]], "-o", out)
    md = read_header(out).metadata
    assert a1111_version(md) == "SDXL"
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.sai_model_spec"] and md["modelspec.title"] == "out"
    json.loads(md["loratool"])  # the record is still there


@pytest.mark.slow  # a fuse and an extract of the tiny model: full selection
def test_extract_output_is_sdxl_for_a1111(assets: FuseAssets, tmp_path: Path) -> None:
    tuned = tmp_path / "tuned.safetensors"
    fused(assets.base, tuned, str(assets.lightning_lora))
    out = tmp_path / "x.safetensors"
    _invoke("extract", tuned, assets.base, "--rank", "2", "-o", out)
    md = read_header(out).metadata
    assert a1111_version(md) == "SDXL" and md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_what_the_input_says_is_kept(tmp_path: Path) -> None:
    """A LoRA that already names its SDXL base keeps that name (an SDXL 0.9 LoRA stays one)."""
    src = write_lora(tmp_path / "a.safetensors", "micro", fmt="kohya", rank=4, seed=1)
    from safetensors.torch import load_file

    save_file(load_file(str(src)), str(src), metadata={"ss_base_model_version": "sdxl_base_v0-9",
                                                       "modelspec.title": "Mine"})
    out = tmp_path / "o.safetensors"
    _invoke("rescale", src, "--strength", "2", "-o", out)
    md = read_header(out).metadata
    assert md["ss_base_model_version"] == "sdxl_base_v0-9" and md["modelspec.title"] == "Mine"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def _sd1_lora(path: Path) -> Path:
    """An SD1.5-shaped kohya LoRA (level-0 attention, 768-wide cross-attention), no metadata."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for name, (out, inn) in {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
                             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320)}.items():
        t[f"{name}.lora_down.weight"] = torch.randn(4, inn, generator=g)
        t[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=g)
        t[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(t, str(path))
    return path


def test_an_sd1_lora_says_sd1_and_an_unknown_one_says_nothing(tmp_path: Path) -> None:
    from lora_tools.lora.adapter import LoraAdapter
    from lora_tools.lora.family import made_for
    from lora_tools.lora.load import load_lora

    with load_lora(_sd1_lora(tmp_path / "sd1.safetensors")) as a:
        assert made_for(a) == "sd1"
    te_only = {("te1", "text_model.encoder.layers.0.self_attn.q_proj"): {"down": torch.ones(2, 32), "up": torch.ones(32, 2)}}
    assert made_for(LoraAdapter.from_tensors(te_only, format="diffusers")) is None  # CLIP-L alone: SD1 or SDXL


@pytest.mark.parametrize("metadata", [{}, {"format": "pt"}, {"ss_base_model_version": "sdxl_base_v1-0"},
                                      {"ss_base_model_version": "sd_v1"}, {"ss_v2": "True"},
                                      {"ss_base_model_version": "sdxl_base_v0-9", "ss_v2": "True"},
                                      {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}])
def test_the_librarys_a1111_rule_is_a1111s(metadata: dict[str, str]) -> None:
    from lora_tools.lora.family import a1111_version as ours

    assert ours(metadata)[0] == a1111_version(metadata)


def test_inspect_shows_what_a1111_takes_a_lora_for(plain: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    _invoke("rescale", plain[0], "--strength", "0.5", "-o", out)
    views = {}
    for path in (plain[0], out):
        run = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
        assert run.exit_code == 0, run.output
        views[path] = json.loads(run.stdout)["lora"]["loaders"]
    assert views[plain[0]]["a1111_forge"].startswith("SD1 (metadata without an sdxl_ ss_base_model_version)")
    assert views[out]["a1111_forge"].startswith("SDXL (ss_base_model_version 'sdxl_base_v1-0'): listed only with SDXL")
    text = CliRunner().invoke(cli, ["inspect", str(out)]).stdout
    assert "A1111/Forge sees" in text and "SDXL" in text
