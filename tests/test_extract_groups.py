"""extract's default module set is what kohya's loader, A1111/Forge and ComfyUI all load; the rest only on request,
with each left-out group's share of the difference's energy reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.io.safetensors import load_tensors, read_header, save_tensors
from tests.fuse_helpers import FuseAssets

pytestmark = pytest.mark.slow  # extracts of the tiny model: full selection

P = "model.diffusion_model."
#: group -> the single-file weights of the tiny SDXL the tuned model changes (None: a module every loader loads).
CHANGED = {"time_embedding": [P + "time_embed.0.weight", P + "time_embed.2.weight"],
           "label_embedding": [P + "label_emb.0.0.weight"],
           "conv_in": [P + "input_blocks.0.0.weight"],
           "conv_out": [P + "out.2.weight"],
           None: [P + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"]}


@pytest.fixture(scope="module")
def tuned(assets: FuseAssets, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[object, float]]:
    """The tiny base with a known random change to each group's weights, and each group's energy."""
    t = load_tensors(assets.base)
    base = load_tensors(assets.base)
    g = torch.Generator().manual_seed(5)
    energy: dict[object, float] = {}
    for group, keys in CHANGED.items():
        for k in keys:
            d = torch.randn(t[k].shape, generator=g) * (0.01 if group is None else 0.003)
            t[k] = t[k] + d
            d = t[k].double() - base[k].double()  # what the fp32 file really holds
            energy[group] = energy.get(group, 0.0) + float((d ** 2).sum())
    out = tmp_path_factory.mktemp("groups") / "tuned.safetensors"
    save_tensors(out, t, metadata=read_header(assets.base).metadata)
    return out, energy


def _extract(assets: FuseAssets, tuned: Path, out: Path, *extra: str) -> dict:
    run = CliRunner().invoke(cli, ["extract", str(tuned), str(assets.base), "--rank", "2", "-o", str(out),
                                   "--json", *extra])
    assert run.exit_code == 0, run.output
    return json.loads(run.stdout)


def _groups_written(path: Path) -> set[object]:
    keys = read_header(path).tensors
    names = {"time_embedding": "time_embedding", "label_embedding": "add_embedding", "conv_in": "conv_in",
             "conv_out": "conv_out", None: "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"}
    return {g for g, n in names.items() if any(n in k for k in keys)}


def test_default_leaves_out_what_the_loaders_drop_and_reports_its_energy(assets: FuseAssets, tuned: tuple,
                                                                          tmp_path: Path) -> None:
    path, energy = tuned
    out = tmp_path / "x.safetensors"
    rep = _extract(assets, path, out)
    assert _groups_written(out) == {None}
    total = sum(energy.values())
    assert set(rep["left_out"]) == {"time_embedding", "label_embedding", "conv_in", "conv_out"}
    for group, v in rep["left_out"].items():
        assert v["energy"] == pytest.approx(energy[group], rel=1e-6)
        assert v["share"] == pytest.approx(energy[group] / total, rel=1e-6)
    text = CliRunner().invoke(cli, ["extract", str(path), str(assets.base), "--rank", "2", "-o", str(out),
                                    "--overwrite"]).stdout
    assert "Left out" in text and f"time_embedding {energy['time_embedding']:.3g}" in text and "--include" in text


def test_include_names_the_groups_to_add(assets: FuseAssets, tuned: tuple, tmp_path: Path) -> None:
    path, energy = tuned
    out = tmp_path / "x.safetensors"
    rep = _extract(assets, path, out, "--include", "time_embedding,conv_out")
    assert _groups_written(out) == {None, "time_embedding", "conv_out"}
    assert set(rep["left_out"]) == {"label_embedding", "conv_in"}
    assert json.loads(read_header(out).metadata["loratool"])["params"]["include"] == ["time_embedding", "conv_out"]
    every = tmp_path / "all.safetensors"
    rep = _extract(assets, path, every, "--include", "all")
    assert _groups_written(every) == set(CHANGED) and rep["left_out"] == {}
    assert rep["retained_energy"] < 1.0  # rank 2 of a full-rank change: the energy report covers them now


def test_an_unknown_group_is_refused_before_any_work(assets: FuseAssets, tuned: tuple, tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    run = CliRunner().invoke(cli, ["extract", str(tuned[0]), str(assets.base), "--rank", "2", "-o", str(out),
                                   "--include", "time_embed"])
    assert run.exit_code != 0 and "'time_embed'" in run.stderr and "--include GROUPS" in run.stderr
    assert not out.exists()
