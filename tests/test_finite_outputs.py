"""Every derived tensor is checked finite before it is written (``lora.save.check_finite``, on the one
path every LoRA writer takes): a result that overflows the output dtype is refused with the module
named and ``--dtype fp32`` as the way out; NaN from the Python API is refused too. Nothing is left
under the output name, the inputs are unchanged."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.errors import NonFiniteError
from lora_tools.io.safetensors import save_tensors
from lora_tools.testing.synthetic_lora import make_lora
from tests.reliability_helpers import write_small_lora


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finite")
    tensors, meta = make_lora("tiny", rank=2)
    keep = sorted({k.split(".", 1)[0] for k in tensors})[:4]
    small = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in keep}
    big = dict(small)
    first = sorted(k for k in big if k.endswith("lora_up.weight"))[0]
    big[first] = big[first].clone()
    big[first][0, 0] = 1e6  # finite in fp32, beyond fp16
    return {"small": write_small_lora(root / "small.safetensors"),
            "big": save_tensors(root / "big.safetensors", big, meta)}


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


CASES = {
    "rescale": lambda io, out: ["rescale", str(io["small"]), "--strength", "1e37", "--dtype", "fp16", "-o", out],
    "merge-concat": lambda io, out: ["merge", str(io["small"]), f"{io['small']}:1e37", "--dtype", "fp16", "-o", out],
    "merge-svd": lambda io, out: ["merge", str(io["small"]), f"{io['small']}:1e37", "--method", "svd", "--dtype",
                                  "fp16", "-o", out],
    "convert": lambda io, out: ["convert", str(io["big"]), "--to", "peft", "--dtype", "fp16", "-o", out],
}


@pytest.mark.parametrize("command", list(CASES))
def test_overflow_of_the_output_dtype_is_refused_naming_the_module(command: str, loras: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    before = {k: _digest(p) for k, p in loras.items()}
    result = CliRunner().invoke(cli, CASES[command](loras, str(out)))
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("Error: the result overflows float16 in module 'unet:"), lines[0]
    assert lines[0].endswith("nothing was written; pass --dtype fp32 to write it wider."), lines[0]
    assert list(tmp_path.iterdir()) == []
    assert {k: _digest(p) for k, p in loras.items()} == before


def test_the_wider_dtype_writes_it(loras: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(loras["big"]), "--to", "peft", "--dtype", "fp32", "-o", str(out)])
    assert result.exit_code == 0, result.output
    from lora_tools.io.safetensors import load_tensors

    assert max(float(t.abs().max()) for t in load_tensors(out).values()) == 1e6


def test_nan_from_the_python_api_is_refused(loras: dict[str, Path], tmp_path: Path) -> None:
    from lora_tools.lora.load import load_lora
    from lora_tools.lora.save import save_lora
    from lora_tools.ops.rescale import rescale_lora

    with load_lora(loras["small"]) as adapter:
        result, _ = rescale_lora(adapter, float("nan"))
        with pytest.raises(NonFiniteError, match=r"^the result holds NaN in module 'unet:"):
            save_lora(result, tmp_path / "nan.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_job_that_overflows_fails_alone(loras: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        version: 1
        output_dir: out
        inputs:
          small: {loras['small']}
        jobs:
          - name: loud
            rescale: {{lora: small, strength: 1e37, dtype: fp16, output: loud.safetensors}}
          - name: fine
            rescale: {{lora: small, strength: 0.5, output: fine.safetensors}}
        """))
    result = CliRunner().invoke(cli, ["run", str(recipe), "-q"])
    assert result.exit_code == 1, result.output
    assert (tmp_path / "out" / "fine.safetensors").is_file()
    assert not (tmp_path / "out" / "loud.safetensors").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["fine.safetensors"]
