"""extract: a LoRA from two models, against the LoRA that made the difference and the dense SVD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_tools.errors import InvalidFileError
from lora_tools.io.safetensors import load_tensors, read_header, save_tensors
from lora_tools.lora.load import load_lora
from lora_tools.lora.lowrank import RankRule
from lora_tools.ops.extract import extract_lora
from tests.fuse_helpers import FuseAssets
from tests.lora_helpers import deltas, fused, run_fails, run_ok


@pytest.fixture(scope="module")
def tuned(assets: FuseAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base with the Lightning-shaped LoRA (rank 8) fused in at 1.0, fp32."""
    out = tmp_path_factory.mktemp("extract") / "tuned.safetensors"
    fused(assets.base, out, str(assets.lightning_lora))
    return out


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_extract_at_the_lora_rank_recovers_the_lora(assets: FuseAssets, tuned: Path) -> None:
    # every module group included: those the LoRA does not touch (time/label embeddings, conv_in/out) are identical
    res = extract_lora(tuned, assets.base, RankRule(rank=8), include=["all"])
    with load_lora(assets.lightning_lora) as lora:
        ref = deltas(lora)
    got = deltas(res.adapter)
    assert set(got) == set(ref)
    for k, d in ref.items():
        # the fused checkpoint holds the delta rounded to fp32 once; rank 8 captures all of it
        assert float((got[k] - d).abs().max()) <= 1e-4 * float(d.abs().max()), k
    assert res.report.retained_energy == pytest.approx(1.0, abs=1e-6)
    assert res.identical > 0  # every module the LoRA does not touch is left out


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_extract_lower_rank_is_the_truncated_svd(assets: FuseAssets, tuned: Path) -> None:
    res = extract_lora(tuned, assets.base, RankRule(rank=2))
    with load_lora(assets.lightning_lora) as lora:
        ref = deltas(lora)
    got = deltas(res.adapter)
    assert all(m.rank == 2 for m in res.adapter.modules)
    rel = []
    for k, d in ref.items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert float((got[k] - best).abs().max()) <= 1e-3 * float(d.abs().max()), k
        rel.append(float(s[2:].norm() / s.norm()))
    # the reported (measured) errors are the dropped singular values' norms
    assert res.report.max_relative_error == pytest.approx(max(rel), rel=1e-3, abs=1e-5)
    assert sorted(f.relative_error for f in res.report.modules) == pytest.approx(sorted(rel), rel=1e-3, abs=1e-5)


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_extract_cli_writes_a_lora_and_reports(assets: FuseAssets, tuned: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    rep = json.loads(run_ok("extract", tuned, assets.base, "--rank", "8", "-o", out, "--json",
                            "--include", "all").stdout)
    assert rep["retained_energy"] == pytest.approx(1.0, abs=1e-6)
    assert rep["modules_count"] > 0 and rep["identical_modules"] > 0
    with load_lora(out) as lora:
        assert lora.format == "kohya-diffusers" and len(lora.modules) == rep["modules_count"]
    assert json.loads(read_header(out).metadata["loratool"])


def test_extract_refuses_models_of_different_shapes(assets: FuseAssets, tmp_path: Path) -> None:
    t = load_tensors(assets.base)
    key = next(k for k in t if k.endswith("attn1.to_q.weight"))
    t[key] = torch.zeros(t[key].shape[0] + 8, t[key].shape[1])
    other = save_tensors(tmp_path / "other.safetensors", t, read_header(assets.base).metadata)
    with pytest.raises(InvalidFileError):
        extract_lora(other, assets.base, RankRule(rank=4))
    run_fails(tmp_path, "extract", other, assets.base, "--rank", "4", "-o", tmp_path / "o.safetensors", names="other")


def test_extract_energy_outside_range_is_refused(assets: FuseAssets, tuned: Path, tmp_path: Path) -> None:
    run_fails(tmp_path, "extract", tuned, assets.base, "--energy", "1.2", "-o", tmp_path / "o.safetensors",
              names="energy must be in (0, 1]")


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_extract_randomized_svd_reports_its_measured_error(assets: FuseAssets, tuned: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every matrix counted as large: torch.svd_lowrank is used, and each reported error is the norm of
    the residual of the factors written (not the truncated singular values), near the optimal one."""
    import lora_tools.lora.lowrank as lowrank

    monkeypatch.setattr(lowrank, "RANDOMIZED_MIN_ELEMENTS", 0)
    res = extract_lora(tuned, assets.base, RankRule(rank=2))
    with load_lora(assets.lightning_lora) as lora:
        ref = deltas(lora)
    got = deltas(res.adapter)
    fits = {f.name: f for f in res.report.modules}
    assert {f.method for f in fits.values()} == {"randomized"}
    from lora_tools.layouts import TINY
    from lora_tools.layouts.targets import TargetIndex

    index = TargetIndex(TINY.table)
    for m in res.adapter.modules:
        t = index.lookup(m.component, m.name)
        assert t is not None
        k = (m.component, t.sgm_key, t.part)
        d = ref[k]
        residual = float((d - got[k]).norm() / d.norm())
        s = torch.linalg.svdvals(d)
        optimal = float(s[2:].norm() / s.norm())
        fit = fits[t.diffusers_module]
        # the fused checkpoint holds the delta rounded to fp32 once: a 1e-4 margin
        assert fit.relative_error == pytest.approx(residual, rel=1e-3, abs=1e-4), m.name
        assert optimal - 1e-4 <= fit.relative_error <= 1.05 * optimal + 1e-4, m.name
