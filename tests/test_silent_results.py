"""Results that would be empty or wrong without a word: LoRA Block Weight vectors are read as vectors (or refused
in one line), an operation that would write no modules is an error, ``extract`` of identical models and with
its arguments swapped is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import read_header
from lora_tools.layouts.blocks import parse_block_weights
from lora_tools.lora.load import load_lora
from lora_tools.testing.synthetic import write_checkpoint
from lora_tools.testing.synthetic_lora import write_lora


def test_a_12_number_lbw_vector_weighs_the_attention_blocks() -> None:
    bw = parse_block_weights("1,1,1,1,0,0,0,0,0,0,0,0")
    assert [bw.weight(b) for b in ("TE1", "TE2", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT05")] == \
        [1, 1, 1, 1, 1, 0, 0, 0, 0]
    full = parse_block_weights(",".join(["0"] + ["1"] * 9 + ["0.5"] + ["0"] * 9))
    assert (full.weight("TE1"), full.weight("IN00"), full.weight("M00"), full.weight("OUT08")) == (0, 1, 0.5, 0)


@pytest.mark.parametrize("spec,words", [("1," * 16 + "1", "SD1.x"), ("1," * 25 + "1", "SD1.x"),
                                        ("1,0,1", "3 bare numbers"), ("INS", "preset name"), ("MIDD", "preset name")])
def test_other_vectors_and_preset_names_are_refused_in_one_line(spec: str, words: str, tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "a.safetensors", "micro", fmt="kohya", rank=4)
    run = CliRunner().invoke(cli, ["rescale", str(lora), "--strength", "1", "--blocks", spec,
                                   "-o", str(tmp_path / "o.safetensors")])
    assert run.exit_code != 0 and words in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_rescale_with_an_lbw_vector_keeps_the_weighted_blocks(tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "a.safetensors", "micro", fmt="kohya", rank=4)
    out = tmp_path / "o.safetensors"
    run = CliRunner().invoke(cli, ["rescale", str(lora), "--strength", "1", "--blocks", "1,1,1,1,1,0,0,0,0,0,0,0",
                                   "-o", str(out)])
    assert run.exit_code == 0, run.output
    with load_lora(out) as written:
        assert len(written.modules) > 0


def test_an_operation_that_would_write_no_modules_is_an_error(tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "a.safetensors", "micro", fmt="kohya", rank=4)
    out = tmp_path / "o.safetensors"
    run = CliRunner().invoke(cli, ["rescale", str(lora), "--strength", "1", "--blocks", "*:0", "-o", str(out)])
    assert run.exit_code == 1 and "no modules" in run.stderr and not out.exists()


def test_extract_of_identical_models_is_an_error(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "m.safetensors", "micro", dtype="fp16", seed=1, components=("unet",))
    out = tmp_path / "x.safetensors"
    run = CliRunner().invoke(cli, ["extract", str(model), str(model), "--rank", "4", "-o", str(out)])
    assert run.exit_code == 1 and "no LoRA to extract" in run.stderr and not out.exists()


@pytest.mark.slow
def test_extract_with_the_fused_model_second_is_refused(tmp_path: Path) -> None:
    from lora_tools.ops.fuse import fuse
    from lora_tools.testing.synthetic_lora import write_lightning_lora

    base = write_checkpoint(tmp_path / "base.safetensors", "micro", dtype="fp32", seed=1)
    write_lightning_lora(tmp_path / "L" / "sdxl_lightning_4step_lora.safetensors", "micro")
    fused = fuse(base, lightning=4, lightning_dir=tmp_path / "L", saves=("checkpoint",),
                 output=tmp_path / "fused.safetensors").files[0].path
    assert read_header(fused).metadata.get("loratool")
    out = tmp_path / "x.safetensors"
    swapped = CliRunner().invoke(cli, ["extract", str(base), str(fused), "--rank", "4", "-o", str(out)])
    assert swapped.exit_code == 1 and "the order is TUNED ORIGINAL" in swapped.stderr and not out.exists()
    right = CliRunner().invoke(cli, ["extract", str(fused), str(base), "--rank", "4", "-o", str(out)])
    assert right.exit_code == 0, right.output
    assert f"TUNED {fused} minus ORIGINAL {base}:" in right.output
