"""``loratool inspect`` on bad inputs: exit code 1, one ``Error: ...`` line naming the file, no traceback."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import save_tensors
from lora_tools.testing.synthetic_lora import write_lora


def inspect_fails(path: Path, *args: str) -> str:
    """Run ``inspect`` expecting a clean failure; return the error line."""
    result = CliRunner().invoke(cli, ["inspect", str(path), *args])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert str(path) in lines[0]
    return lines[0]


def _header(entries: dict) -> bytes:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    assert "not a valid safetensors file" in inspect_fails(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "cut.safetensors", "tiny", rank=2, alpha=1.0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    assert "is truncated" in inspect_fails(path)


def test_corrupt_header_json(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.safetensors"
    raw = b'{"lora_unet_x.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]'  # no closing brace
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    assert "corrupt safetensors header" in inspect_fails(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert "is empty" in inspect_fails(path)


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in inspect_fails(tmp_path / "nope.safetensors")


def test_directory_that_is_not_a_diffusers_folder(tmp_path: Path) -> None:
    folder = tmp_path / "some_folder"
    (folder / "unet").mkdir(parents=True)
    assert "directory without model_index.json" in inspect_fails(folder)


def test_unknown_key_scheme(tmp_path: Path) -> None:
    path = tmp_path / "mystery.safetensors"
    path.write_bytes(_header({"encoder.layer.0.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
                     + b"\0" * 8)
    line = inspect_fails(path)
    assert "not a LoRA in any known format" in line and "encoder.layer.0.weight" in line


def _sd15_lora(path: Path, modules: dict[str, tuple[int, int]]) -> Path:
    """A kohya LoRA with SD1.5 module names and widths (rank 2)."""
    tensors = {}
    for name, (out, fan_in) in modules.items():
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.zeros(2, fan_in)
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.zeros(out, 2)
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(1.0)
    return save_tensors(path, tensors)


def test_sd15_lora_without_sdxl_targets(tmp_path: Path) -> None:
    path = _sd15_lora(tmp_path / "sd15_style.safetensors", {
        "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
        "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
        "up_blocks_3_attentions_2_proj_out": (320, 320),
    })
    line = inspect_fails(path)
    assert "fits no SDXL model" in line
    assert "SD1.x LoRA (768-wide cross-attention)" in line


def test_sd15_lora_with_wrong_widths(tmp_path: Path) -> None:
    """Names that exist in SDXL, SD1.5 shapes (768-wide cross-attention context)."""
    path = _sd15_lora(tmp_path / "sd15_shapes.safetensors", {
        "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (640, 768),
    })
    line = inspect_fails(path)
    assert "does not fit" in line and "SD1.x LoRA (768-wide cross-attention)" in line


class _RunsCode:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_pickle_needing_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path)
    assert not marker.exists()
    line = inspect_fails(path)
    assert "needs code execution" in line and "never runs untrusted pickles" in line
    assert not marker.exists(), "the pickle's code ran"


@pytest.mark.parametrize("args", [(), ("--json",)])
def test_errors_do_not_depend_on_output_mode(tmp_path: Path, args: tuple[str, ...]) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    inspect_fails(path, *args)
