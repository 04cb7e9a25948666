"""``--dtype keep`` (the default) on resize, merge and extract: the input's dtype, not the fp32 of the maths; the
size printed is the size of the file written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import read_header
from lora_tools.testing.synthetic import write_checkpoint
from lora_tools.testing.synthetic_lora import write_lora
from lora_tools.units import format_bytes


def _dtypes(path: Path) -> set[str]:
    return {t.dtype for t in read_header(path).tensors.values()}


def _written_size_is_printed(output: str, path: Path) -> None:
    m = re.search(r"Wrote \S+ \(([^)]+)\)", output)
    assert m is not None, output
    assert m.group(1) == format_bytes(path.stat().st_size)


@pytest.mark.parametrize("verb", ["resize", "merge"])
def test_keep_is_the_inputs_dtype(verb: str, tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "in.safetensors", "micro", fmt="kohya", rank=8, alpha=4.0, dtype="fp16", seed=3)
    other = write_lora(tmp_path / "b.safetensors", "micro", fmt="kohya", rank=8, alpha=4.0, dtype="fp16", seed=4)
    out = tmp_path / "out.safetensors"
    args = {"resize": ["resize", str(lora), "--rank", "4"],
            "merge": ["merge", f"{lora}:0.5", f"{other}:0.5"]}[verb]
    run = CliRunner().invoke(cli, [*args, "-o", str(out)])
    assert run.exit_code == 0, run.output
    assert _dtypes(out) == {"F16"}
    if verb == "resize":
        assert out.stat().st_size < lora.stat().st_size  # a smaller LoRA is a smaller file
        _written_size_is_printed(run.output, out)
    fp32 = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "f32.safetensors"), "--dtype", "fp32"])
    assert fp32.exit_code == 0 and _dtypes(tmp_path / "f32.safetensors") == {"F32"}


def test_extract_keeps_the_models_dtype(tmp_path: Path) -> None:
    tuned = write_checkpoint(tmp_path / "tuned.safetensors", "micro", dtype="fp16", seed=1, components=("unet",))
    original = write_checkpoint(tmp_path / "orig.safetensors", "micro", dtype="fp16", seed=2, components=("unet",))
    out = tmp_path / "x.safetensors"
    run = CliRunner().invoke(cli, ["extract", str(tuned), str(original), "--rank", "4", "-o", str(out)])
    assert run.exit_code == 0, run.output
    assert _dtypes(out) == {"F16"}
    _written_size_is_printed(run.output, out)
