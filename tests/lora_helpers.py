"""Helpers of the LoRA-op tests (test_lora_ops.py, test_extract.py, test_baked.py, test_analyze.py,
test_merge_oracle.py): dense deltas of a LoRA, CLI runs that must pass or be refused, fused weights."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner, Result

from lora_tools.cli import cli
from lora_tools.io.safetensors import load_tensors
from lora_tools.layouts import TINY
from lora_tools.layouts.targets import TargetIndex
from lora_tools.lora.load import load_lora
from tests.fuse_helpers import listing

_INDEX = TargetIndex(TINY.table)


def deltas(adapter) -> dict[tuple[str, str], torch.Tensor]:  # type: ignore[no-untyped-def]
    """Every module's scaled dense delta, flattened to 2-D, keyed by (component, SGM key, q/k/v part)."""
    out = {}
    for m in adapter.modules:
        t = _INDEX.lookup(m.component, m.name)
        assert t is not None, m.name
        d = m.delta()
        out[(m.component, t.sgm_key, t.part)] = d.reshape(d.shape[0], -1).double()
    return out


def file_deltas(path: Path) -> dict[tuple[str, str], torch.Tensor]:
    with load_lora(path) as a:
        return deltas(a)


def run_ok(*args: object) -> Result:
    result = CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def run_fails(folder: Path, *args: object, names: str) -> str:
    """A refused command: one ``Error:`` line naming `names`, nothing written, inputs untouched."""
    before = listing(folder)
    result = CliRunner().invoke(cli, [*map(str, args)])
    assert result.exit_code == 1, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert names in lines[0], lines[0]
    assert listing(folder) == before
    return lines[0]


def assert_deltas_close(ours: dict, ref: dict, rtol: float = 1e-5) -> None:  # type: ignore[type-arg]
    assert set(ours) == set(ref)
    for k in ref:
        scale = float(ref[k].abs().max()) or 1.0
        assert float((ours[k] - ref[k]).abs().max()) <= rtol * scale, k


def fused(base: Path, out: Path, *loras: str) -> dict[str, torch.Tensor]:
    args: list[object] = ["fuse", base]
    for spec in loras:
        args += ["--lora", spec]
    run_ok(*args, "-o", out, "-q")
    return load_tensors(out)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 2e-6) -> None:
    assert set(a) == set(b)
    for k in a:
        scale = float(a[k].abs().max()) or 1.0
        assert float((a[k].double() - b[k].double()).abs().max()) <= rtol * scale, k
