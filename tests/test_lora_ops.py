"""rescale, resize, merge, convert: against dense references, diffusers and our own fuse of the inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_tools.errors import InvalidFileError, UsageError
from lora_tools.io.safetensors import TensorFile, load_tensors, read_header, save_tensors
from lora_tools.layouts import TINY
from lora_tools.layouts.targets import TargetIndex
from lora_tools.lora.load import load_lora
from lora_tools.lora.lowrank import RankRule
from lora_tools.ops.merge import WeightedLora, merge_loras
from lora_tools.ops.rescale import rescale_lora
from lora_tools.ops.resize import resize_lora
from lora_tools.testing.synthetic_lora import write_lora
from tests.fuse_helpers import FuseAssets, diffusers_fuse
from tests.lora_helpers import assert_deltas_close, assert_same_weights, deltas, file_deltas, fused, run_fails, run_ok

_INDEX = TargetIndex(TINY.table)
KOHYA_META = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_output_name": "style",
              "modelspec.title": "Style", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}


# ---------------------------------------------------------------------------------------- rescale


@pytest.mark.slow
def test_rescale_delta_is_strength_times_delta(assets: FuseAssets) -> None:
    with load_lora(assets.style) as a:
        before = deltas(a)
        out, report = rescale_lora(a, 0.6)
        after = deltas(out)
    assert_deltas_close(after, {k: 0.6 * v for k, v in before.items()})
    assert report.scaled == len(before) and report.dropped == 0
    # only the text encoders: the UNet keeps its strength
    with load_lora(assets.style) as a:
        out, _ = rescale_lora(a, -2.0, components=["te1", "te2"])
        after = deltas(out)
    assert_deltas_close(after, {k: (v if k[0] == "unet" else -2.0 * v) for k, v in before.items()})


@pytest.mark.slow
def test_rescale_per_block_is_the_block_weight_times_delta(assets: FuseAssets, tmp_path: Path) -> None:
    from lora_tools.layouts.blocks import block_of, parse_block_weights

    bw = parse_block_weights("IN04-IN08:0.5,OUT*:0")
    with load_lora(assets.lightning_lora) as a:
        before = deltas(a)
        out, report = rescale_lora(a, 0.8, blocks=bw)
        after = deltas(out)
    ref = {}
    for (comp, key, part), d in before.items():
        w = 0.8 * bw.weight(block_of(comp, key))
        if w != 0:
            ref[(comp, key, part)] = w * d
    assert report.dropped > 0 and report.dropped == len(before) - len(ref)
    assert_deltas_close(after, ref, rtol=1e-3)  # the fp16 up factors are scaled in fp32 and stored in fp16 again
    run_fails(tmp_path, "rescale", assets.lightning_lora, "--strength", "1", "--blocks", "IN99:0",
              "-o", tmp_path / "x.safetensors", names="IN99")
    run_fails(tmp_path, "rescale", assets.style, "--strength", "1", "--blocks", "IN00-IN02:0.5",
              "-o", tmp_path / "x.safetensors", names="matches no module")


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_rescale_cli_fuses_like_the_input_at_that_strength(assets: FuseAssets, tmp_path: Path) -> None:
    tensors, md_in = load_tensors(assets.style), read_header(assets.style).metadata
    src = save_tensors(tmp_path / "style.safetensors", tensors, {**md_in, **KOHYA_META})
    out = tmp_path / "style-0.6.safetensors"
    result = run_ok("rescale", src, "--strength", "0.6", "-o", out, "--json")
    report = json.loads(result.stdout)
    assert report["strength"] == 0.6 and report["output"] == str(out)
    md = read_header(out).metadata
    assert {k: md[k] for k in KOHYA_META} == KOHYA_META  # ss_*/modelspec.* kept
    assert "loratool" in md
    ours = fused(assets.base, tmp_path / "a.safetensors", str(out))
    ref = fused(assets.base, tmp_path / "b.safetensors", f"{assets.style}:0.6")
    assert_same_weights(ours, ref)


# ---------------------------------------------------------------------------------------- resize


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_resize_is_the_truncated_svd_of_each_delta(assets: FuseAssets) -> None:
    with load_lora(assets.lightning_lora) as a:
        before = deltas(a)
        out, report = resize_lora(a, RankRule(rank=3))
        after = deltas(out)
    assert all(m.rank == 3 and m.alpha == 3.0 for m in out.modules)
    by_name = {f.name: f for f in report.modules}
    with load_lora(assets.lightning_lora) as a:
        names = {}
        for m in a.modules:
            t = _INDEX.lookup(m.component, m.name)
            assert t is not None
            names[(m.component, t.sgm_key, t.part)] = m.name
    for k, dense in before.items():
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        scale = float(dense.abs().max())
        assert float((after[k] - best).abs().max()) <= 1e-4 * scale, k
        fit = by_name[names[k]]
        dropped = float(s[3:].norm())
        assert fit.relative_error == pytest.approx(dropped / float(s.norm()), rel=1e-3, abs=1e-6)
        assert fit.retained == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-5)


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_resize_cli_report_and_rules(assets: FuseAssets, tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    rep = json.loads(run_ok("resize", assets.lightning_lora, "--energy", "0.9", "-o", out, "--json").stdout)
    assert rep["retained_energy"] >= 0.9 - 1e-9
    assert all(m["retained_energy"] >= 0.9 - 1e-6 for m in rep["modules"])
    assert rep["size_bytes"] > 0 and rep["max_relative_error"] > 0
    assert json.loads(read_header(out).metadata["loratool"])["operation"] in ("resize", "save")
    text = run_ok("resize", assets.lightning_lora, "--rank", "4", "-o", tmp_path / "r4.safetensors").stdout
    assert "retained energy" in text and "largest relative error" in text


@pytest.mark.parametrize("args,names", [
    (("--rank", "99"), "larger than the LoRA's largest rank (8)"),
    (("--energy", "1.5"), "energy must be in (0, 1]"),
    (("--energy", "0"), "energy must be in (0, 1]"),
    (("--rank", "4", "--energy", "0.5"), "exactly one of"),
])
def test_resize_bad_rules_write_nothing(assets: FuseAssets, tmp_path: Path, args: tuple[str, ...], names: str) -> None:
    run_fails(tmp_path, "resize", assets.lightning_lora, *args, "-o", tmp_path / "x.safetensors", names=names)


def test_output_never_overwrites_an_input(assets: FuseAssets, tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    src.write_bytes(assets.style.read_bytes())
    run_fails(tmp_path, "rescale", src, "--strength", "0.5", "-o", src, "--overwrite", names="is an input")


# ---------------------------------------------------------------------------------------- merge


@pytest.mark.slow
def test_merge_concat_is_the_exact_weighted_sum(assets: FuseAssets) -> None:
    with load_lora(assets.lightning_lora) as a, load_lora(assets.style) as b:
        da, db = deltas(a), deltas(b)
        out, report = merge_loras([WeightedLora(a, 1.0, "l"), WeightedLora(b, 0.6, "s")])
        merged = deltas(out)
    assert report is None
    ref = {k: da.get(k, 0) + 0.6 * db[k] if k in db else da[k] for k in set(da) | set(db)}
    assert_deltas_close(merged, ref)  # type: ignore[arg-type]


@pytest.mark.diffusers
def test_merge_concat_fuses_like_diffusers_fusing_both(assets: FuseAssets, tmp_path: Path) -> None:
    merged = tmp_path / "merged.safetensors"
    run_ok("merge", assets.lightning_lora, f"{assets.style}:0.6", "-o", merged)
    ours = fused(assets.base, tmp_path / "m.safetensors", str(merged))
    ref = fused(assets.base, tmp_path / "r.safetensors", str(assets.lightning_lora), f"{assets.style}:0.6")
    assert_same_weights(ours, ref)


@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_merge_svd_is_the_truncated_svd_of_the_sum(assets: FuseAssets, tmp_path: Path) -> None:
    other = write_lora(tmp_path / "o.safetensors", "tiny", fmt="kohya-diffusers", targets="lightning", rank=5,
                       alpha=2.0, dtype="fp32", seed=11)
    with load_lora(assets.lightning_lora) as a, load_lora(other) as b:
        da, db = deltas(a), deltas(b)
        out, report = merge_loras([WeightedLora(a, 0.5, "a"), WeightedLora(b, 1.5, "b")], method="svd",
                                  rule=RankRule(rank=6))
        merged = deltas(out)
    assert report is not None
    for k in da:
        dense = 0.5 * da[k] + 1.5 * db[k]
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :6] * s[:6]) @ vh[:6]
        assert float((merged[k] - best).abs().max()) <= 1e-4 * float(dense.abs().max()), k
    errs = sorted(m.relative_error for m in report.modules)
    assert errs[-1] == pytest.approx(report.max_relative_error)


def test_merge_refuses_different_architectures(assets: FuseAssets, tmp_path: Path) -> None:
    from lora_tools.lora.adapter import LoraAdapter

    with load_lora(assets.style) as b:
        m = b.modules[0]
        up = torch.zeros(m.factor_shape("up")[0] + 3, m.rank)
        bad = LoraAdapter.from_tensors({(m.component, m.name): {"up": up, "down": m.factor("down")}},
                                       format=b.format)
        with pytest.raises(InvalidFileError, match="different architectures"):
            merge_loras([WeightedLora(b, 1.0, "style"), WeightedLora(bad, 1.0, "other")])
        with pytest.raises(UsageError, match="svd"):
            merge_loras([WeightedLora(b), WeightedLora(b)], rule=RankRule(rank=2))


# ---------------------------------------------------------------------------------------- convert


@pytest.mark.parametrize("to", ["kohya", "kohya-diffusers", "diffusers", "peft", "comfy"])
@pytest.mark.slow  # over a second on a quiet machine: full selection
def test_convert_round_trip_is_bit_exact(assets: FuseAssets, tmp_path: Path, to: str) -> None:
    there, back = tmp_path / f"{to}.safetensors", tmp_path / "back.safetensors"
    run_ok("convert", assets.lightning_lora, "--to", to, "-o", there)
    with load_lora(there) as a:
        assert a.format == to
    run_ok("convert", there, "--to", "kohya-diffusers", "-o", back)
    with TensorFile(assets.lightning_lora) as f, TensorFile(back) as g:
        assert set(f.keys()) == set(g.keys())
        for k in f.keys():
            assert bytes(f.read_bytes(k)) == bytes(g.read_bytes(k)), k
    assert_deltas_close(file_deltas(there), file_deltas(assets.lightning_lora), rtol=0)


@pytest.mark.diffusers
def test_converted_files_load_in_diffusers_with_the_same_weights(assets: FuseAssets, tmp_path: Path) -> None:
    # Raw peft files are not a diffusers format: PEFT itself is their oracle (test_lora_convert_oracle.py).
    for src, formats in ((assets.style, ("kohya", "diffusers")), (assets.lightning_lora, ("diffusers", "kohya"))):
        ref = diffusers_fuse(assets.folder, [(src, 1.0)])[0]
        for to in formats:
            out = tmp_path / f"{src.stem}-{to}.safetensors"
            run_ok("convert", src, "--to", to, "-o", out)
            got = diffusers_fuse(assets.folder, [(out, 1.0)])[0]
            for comp in ref:
                assert_same_weights(got[comp], ref[comp], rtol=1e-6)


def test_convert_comfy_spells_comfy_names(assets: FuseAssets, tmp_path: Path) -> None:
    out = tmp_path / "c.safetensors"
    run_ok("convert", assets.lightning_lora, "--to", "comfy", "-o", out)
    keys = list(read_header(out).tensors)
    assert keys and all(k.startswith("diffusion_model.") for k in keys)
    assert any(k.endswith(".lora_up.weight") for k in keys) and any(k.endswith(".lora_down.weight") for k in keys)
