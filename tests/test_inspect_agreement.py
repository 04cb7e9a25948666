"""inspect agrees with the fuse and tells the truth about bad files (issue 7.11, issue 11).

Scale as the fuse applies it, blocks of the one block scheme, mis-shaped modules named, the
recorded prediction type, the Lightning-name warning, file text escaped, sizes in binary units.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import save_tensors
from lora_tools.layouts.blocks import BLOCKS
from lora_tools.lora.load import load_lora
from lora_tools.lora.scale import module_scale
from lora_tools.ops.inspect import inspect_path
from lora_tools.testing.synthetic import write_checkpoint
from lora_tools.testing.synthetic_lora import write_lightning_lora, write_lora

# Tiny SDXL (lora_tools.layouts.TINY): level 1 is 64 channels wide, level 2 128.
_GOOD = {"down_blocks_1_attentions_0_proj_in": (64, 64), "down_blocks_2_attentions_1_proj_out": (128, 128),
         "up_blocks_0_attentions_2_proj_in": (128, 128)}


def _kohya(path: Path, modules: dict[str, tuple[int, int]], *, alpha: float | None = 2.0, rank: int = 4,
           metadata: dict[str, str] | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out, fan_in) in modules.items():
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g)
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, rank, generator=g)
        if alpha is not None:
            tensors[f"lora_unet_{name}.alpha"] = torch.tensor(float(alpha))
    return save_tensors(path, tensors, metadata or {})


def _invoke(*args: str | Path):
    return CliRunner().invoke(cli, ["inspect", *map(str, args)])


def test_scale_is_the_fuse_scale_for_alpha_zero(tmp_path: Path):
    path = _kohya(tmp_path / "alpha0.safetensors", _GOOD, alpha=0.0)
    adapter = load_lora(path)
    want = {f"{module_scale(m.alpha, m.rank):g}" for m in adapter.modules}
    assert want == {"1"}  # kohya/ComfyUI/diffusers: alpha 0 means alpha = rank
    lora = inspect_path(path).lora
    assert lora is not None and set(lora.scales) == want and lora.alphas == {"0": 3}


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_blocks_follow_the_block_scheme(tmp_path: Path):
    path = write_lightning_lora(tmp_path / "l.safetensors", "tiny")
    report = json.loads(_invoke(path, "--json").stdout)["lora"]
    blocks = report["blocks"]
    assert list(blocks) == [b for b in BLOCKS if b in blocks]  # model order
    assert sum(blocks.values()) == report["modules"] - report["unmatched"]["count"]
    # the same modules counted by SGM prefix: input_blocks.4 is IN04, middle_block is M00
    assert blocks["IN04"] == report["modules_per_block"]["unet"]["input_blocks.4"]
    assert blocks["M00"] == report["modules_per_block"]["unet"]["middle_block"]
    text = _invoke(path).stdout
    assert "IN04  unet input_blocks.4" in text and "M00  unet middle_block" in text


def test_one_mis_shaped_module_is_named_and_the_report_still_printed(tmp_path: Path):
    bad = "down_blocks_2_attentions_0_proj_in"  # a real module, given 64 wide instead of 128
    path = _kohya(tmp_path / "one_bad.safetensors", {**_GOOD, bad: (128, 64)})
    report = inspect_path(path)
    assert report.lora is not None and report.lora.layout == "sdxl-tiny"
    assert [m.module for m in report.lora.mismatched] == [f"unet:{bad}"]
    assert report.lora.mismatched[0].target == "model.diffusion_model.input_blocks.7.1.proj_in.weight"
    assert f"module '{bad}' does not fit" in report.lora.mismatched[0].message
    assert report.lora.modules == 4 and sum(report.lora.blocks.values()) == 3
    result = _invoke(path)
    assert result.exit_code == 1
    assert "modules that do not fit:" in result.stdout and f"unet:{bad}" in result.stdout
    assert result.stderr.splitlines() == [
        f"Error: '{path}': 1 module(s) do not fit the weights they name: unet:{bad}."]
    good_names = [n for n in _GOOD if n in result.stderr]
    assert good_names == []  # the culprit, not a module that fits
    js = _invoke(path, "--json")
    assert js.exit_code == 1 and json.loads(js.stdout)["lora"]["mismatched"][0]["module"] == f"unet:{bad}"


def test_a_file_whose_every_module_misfits_still_fails_with_the_right_module(tmp_path: Path):
    bad = "down_blocks_2_attentions_0_proj_in"
    path = _kohya(tmp_path / "all_bad.safetensors", {bad: (128, 64)})
    result = _invoke(path)
    assert result.exit_code == 1 and result.stdout == ""
    assert f"module '{bad}' does not fit" in result.stderr and len(result.stderr.splitlines()) == 1


_HOSTILE = "ok\x1b[2J\x1b]0;pwned\x07\x08\rforged   row\nnext\u202e"


def test_file_text_is_escaped_on_one_line(tmp_path: Path):
    path = _kohya(tmp_path / "hostile.safetensors", _GOOD,
                  metadata={"ss_output_name": _HOSTILE, "evil\x1b[31mkey": "v\x9bx"})
    result = _invoke(path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert not any(c in out for c in "\x1b\x07\x08\r\x9b\u202e")
    line = next(x for x in out.splitlines() if "ss_output_name" in x)
    assert line.endswith(r"ok\x1b[2J\x1b]0;pwned\x07\x08\rforged   row\nnext\u202e")
    assert any(x.strip().startswith(r"evil\x1b[31mkey") and x.endswith(r"v\x9bx") for x in out.splitlines())
    data = json.loads(_invoke(path, "--json").stdout)  # JSON escapes as JSON does, value intact
    assert data["metadata"]["kohya"]["ss_output_name"] == _HOSTILE
    assert data["metadata"]["other"]["evil\x1b[31mkey"] == "v\x9bx"


def test_sizes_are_binary_units(tmp_path: Path):
    path = _kohya(tmp_path / "small.safetensors", _GOOD)
    size = path.stat().st_size
    row = next(x for x in _invoke(path).stdout.splitlines() if x.strip().startswith("size"))
    assert row.split()[1:3] == [f"{size / 1024:.1f}", "KiB,"]


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_lightning_name_without_its_signature_warns(tmp_path: Path):
    path = write_lora(tmp_path / "sdxl_lightning_4step_lora.safetensors", "tiny", targets="attn")
    lora = inspect_path(path).lora
    assert lora is not None and lora.acceleration is not None and not lora.acceleration.key_signature
    assert lora.warnings == ("'sdxl_lightning_4step_lora.safetensors' is named like the Lightning 4-step LoRA, "
                             "but its keys do not have that LoRA's signature: the name may be misleading.",)
    assert "warning" in _invoke(path).stdout
    real = inspect_path(write_lightning_lora(tmp_path / "x" / "sdxl_lightning_4step_lora.safetensors", "tiny"))
    assert real.lora is not None and real.lora.warnings == ()


@pytest.mark.parametrize("recorded, shown", [("sample", "sample (from record)"), (None, "epsilon")])
def test_prediction_comes_from_our_record(tmp_path: Path, recorded: str | None, shown: str):
    sampler = {"scheduler": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "steps": 1,
               "guidance_scale": 0.0, "comfy_sampler": "euler", "comfy_scheduler": "sgm_uniform", "comfy_cfg": 1.0}
    if recorded:
        sampler["prediction_type"] = recorded
    record = {"operation": "fuse", "sources": [], "sampler": sampler}
    path = write_checkpoint(tmp_path / "x0.safetensors", "tiny", components=("unet",),
                            metadata={"loratool": json.dumps(record)})
    ckpt = inspect_path(path).checkpoint
    assert ckpt is not None and ckpt.prediction == (recorded or "epsilon")
    assert ckpt.prediction_source == ("record" if recorded else "default")
    row = next(x for x in _invoke(path).stdout.splitlines() if x.strip().startswith("prediction"))
    assert row.split(None, 1)[1] == shown
    assert not any("predicts sample" in w for w in ckpt.warnings)
