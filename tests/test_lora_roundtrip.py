"""save_lora(load_lora(f), g): every format, every algorithm, bit for bit; conversions between formats;
in-memory adapters equal to file-backed ones; the scale rule inspect and fuse share."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lora_tools
from lora_tools.errors import OutputExistsError, UsageError
from lora_tools.io.safetensors import load_tensors, read_header
from lora_tools.layouts import TINY
from lora_tools.lora.adapter import LoraAdapter
from lora_tools.lora.formats import available_formats
from lora_tools.lora.load import load_lora
from lora_tools.lora.save import save_lora
from lora_tools.provenance import read_record
from lora_tools.testing.synthetic_lora import module_factors, select_targets, write_lora

FORMATS = ["kohya", "kohya-diffusers", "diffusers", "peft", "comfy", "diffusers-legacy"]
ALGORITHMS = ["lora", "lora-tucker", "loha", "lokr", "dora"]


def _components(fmt: str) -> tuple[str, ...]:
    return ("unet",) if fmt == "peft" else ("unet", "te1", "te2")


def _assert_same_file(a: Path, b: Path) -> None:
    ta, tb = load_tensors(a), load_tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k].reshape(-1).view(torch.uint8), tb[k].reshape(-1).view(torch.uint8)), k
    ma, mb = read_header(a).metadata, read_header(b).metadata
    assert {k: v for k, v in mb.items() if k != "loratool"} == {k: v for k, v in ma.items() if k != "loratool"}
    record = read_record(mb)
    assert record is not None and record["operation"] == "save"


def _picked_targets(components: tuple[str, ...]) -> list:
    """A few targets of every shape kind: linears, a 1x1 and a 3x3 conv, text-encoder layers."""
    unet = select_targets(TINY, "lightning")
    picked = [t for t in unet if len(t.shape) == 2][:3]
    picked += [t for t in unet if len(t.shape) == 4 and t.shape[2] == 3][:2]
    picked += [t for t in unet if len(t.shape) == 4 and t.shape[2] == 1][:1]
    for c in components:
        if c != "unet":
            picked += select_targets(TINY, "attn", (c,))[:2]  # type: ignore[arg-type]
    return picked


def _small_adapter(algorithm: str, components: tuple[str, ...], *, alpha: float | None = 3.0,
                   dtype: torch.dtype = torch.float16, seed: int = 4) -> LoraAdapter:
    factors, alphas = {}, {}
    for t in _picked_targets(components):
        key = (t.component, t.diffusers_module)
        factors[key] = {r: v.to(dtype) for r, v in module_factors(t, algorithm, 4, seed=seed).items()}  # type: ignore[arg-type]
        alphas[key] = alpha
    return LoraAdapter.from_tensors(factors, alphas=alphas, format="diffusers")


def _full_diff_adapter(fmt: str) -> LoraAdapter:
    """Full-diff (``.diff``/``.diff_b``) modules on a linear and a 3x3 conv, fp16."""
    g = torch.Generator().manual_seed(5)
    targets = [t for t in select_targets(TINY, "lightning") if len(t.shape) == 4 and t.shape[2] == 3][:1]
    targets += [t for t in select_targets(TINY, "attn")][:1]
    factors = {(t.component, t.diffusers_module): {"diff": torch.randn(t.shape, generator=g).half(),
                                                   "diff_b": torch.randn(t.shape[0], generator=g).half()}
               for t in targets}
    return LoraAdapter.from_tensors(factors, format="diffusers")


@pytest.mark.parametrize("dtype", [pytest.param("fp32", marks=pytest.mark.slow), "fp16"])  # fp32: full selection
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_same_format_is_bit_exact(tmp_path: Path, fmt: str, dtype: str) -> None:
    alpha = None if fmt == "diffusers-legacy" else 2.0
    src = write_lora(tmp_path / "a.safetensors", "tiny", fmt=fmt, components=_components(fmt), targets="attn",
                     rank=4, alpha=alpha, dtype=dtype, seed=3)
    with load_lora(src) as lora:
        assert lora.format == fmt
        out = save_lora(lora, tmp_path / "b.safetensors")
    _assert_same_file(src, out)
    with load_lora(out) as again:
        assert again.format == fmt


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_algorithm(tmp_path: Path, fmt: str, algorithm: str) -> None:
    adapter = _small_adapter(algorithm, _components(fmt))
    if fmt == "diffusers-legacy" and algorithm in ("loha", "lokr"):
        with pytest.raises(UsageError, match=f"cannot hold {algorithm} modules"):
            save_lora(adapter, tmp_path / "a.safetensors", format=fmt)
        assert not (tmp_path / "a.safetensors").exists()
        return
    src = save_lora(adapter, tmp_path / "a.safetensors", format=fmt)
    with load_lora(src) as lora:
        assert lora.format == fmt
        out = save_lora(lora, tmp_path / "b.safetensors")
    _assert_same_file(src, out)


@pytest.mark.parametrize("fmt", ["kohya", "kohya-diffusers", "diffusers", "comfy"])
def test_round_trip_full_diff_modules(tmp_path: Path, fmt: str) -> None:
    src = save_lora(_full_diff_adapter(fmt), tmp_path / "a.safetensors", format=fmt)
    with load_lora(src) as lora:
        assert {m.kind for m in lora.modules} == {"full"}
        out = save_lora(lora, tmp_path / "b.safetensors")
    _assert_same_file(src, out)


def _modules(path: Path) -> dict[tuple[str, str], tuple[str, int, float, dict[str, torch.Tensor], torch.Tensor]]:
    """Per base target: kind, rank, scale, factor tensors and delta (keyed by diffusers name)."""
    from lora_tools.layouts.targets import TargetIndex

    index = TargetIndex(TINY.table)
    out = {}
    with load_lora(path) as lora:
        for m in lora.modules:
            t = index.lookup(m.component, m.name)
            assert t is not None, m.name
            out[(m.component, t.diffusers_module)] = (m.kind, m.rank, m.scale,
                                                      {r: m.factor(r) for r in m.roles}, m.delta(t.shape))
    return out


@pytest.mark.parametrize("algorithm", ["lora", "lora-tucker", "loha", "lokr", "dora"])
def test_conversion_between_formats_keeps_tensors_and_deltas(tmp_path: Path, algorithm: str) -> None:
    src = save_lora(_small_adapter(algorithm, ("unet",), seed=6), tmp_path / "src.safetensors", format="kohya")
    want = _modules(src)
    for fmt in FORMATS:
        if fmt == "diffusers-legacy" and algorithm in ("loha", "lokr"):
            continue  # refused (test_round_trip_every_algorithm)
        with load_lora(src) as lora:
            out = save_lora(lora, tmp_path / f"{fmt}.safetensors", format=fmt)
        with load_lora(out) as back:
            assert back.format == fmt
        got = _modules(out)
        assert set(got) == set(want), fmt
        for key, (kind, rank, scale, factors, delta) in want.items():
            g = got[key]
            assert (g[0], g[1], g[2]) == (kind, rank, scale), (fmt, key)
            assert set(g[3]) == set(factors)
            assert all(torch.equal(g[3][r], factors[r]) and g[3][r].dtype == factors[r].dtype for r in factors), (fmt, key)
            assert torch.equal(g[4], delta), (fmt, key)
        # and back to kohya: the original file again (keys, bytes; metadata plus the record)
        with load_lora(out) as lora:
            again = save_lora(lora, tmp_path / f"{fmt}-back.safetensors", format="kohya")
        _assert_same_file(src, again)


def test_in_memory_and_file_backed_deltas_are_identical(tmp_path: Path) -> None:
    mem = _small_adapter("lora-tucker", ("unet", "te1", "te2"), alpha=2.0, seed=9)
    path = save_lora(mem, tmp_path / "x.safetensors", format="kohya")
    with load_lora(path) as disk:
        assert disk.path == path and mem.path is None
        assert len(disk.modules) == len(mem.modules)
        for a, b in zip(mem.modules, disk.modules, strict=True):
            assert (a.kind, a.rank, a.alpha, a.scale, a.component) == (b.kind, b.rank, b.alpha, b.scale, b.component)
            assert torch.equal(a.delta(), b.delta())
        copy = disk.with_modules(disk.modules)
    # the in-memory copy outlives the file's source
    assert copy.path is None and torch.equal(copy.modules[0].delta(), mem.modules[0].delta())


def test_delta_matches_the_formula(tmp_path: Path) -> None:
    t = select_targets(TINY, "attn")[0]
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(t.shape[0], 4, generator=g), torch.randn(4, t.shape[1], generator=g)
    lora = LoraAdapter.from_tensors({("unet", t.diffusers_module): {"up": up, "down": down}},
                                    alphas={("unet", t.diffusers_module): 2.0}, format="diffusers")
    m = lora.modules[0]
    assert m.scale == 0.5 and m.factor_shape("up") == tuple(up.shape) and m.factor_dtype("down") == "F32"
    ref = (up.double() @ down.double()) * 0.5
    assert torch.allclose(m.delta().double(), ref, rtol=1e-6, atol=1e-7)
    assert m.delta((t.shape[0], t.shape[1], 1, 1)).shape == (t.shape[0], t.shape[1], 1, 1)


@pytest.mark.parametrize("alpha, scale", [(None, 1.0), (0.0, 1.0), (2.0, 0.5), (8.0, 2.0)])
def test_scale_rule_is_the_fuse_rule(alpha: float | None, scale: float) -> None:
    from lora_tools.lora.delta import module_scale

    t = select_targets(TINY, "attn")[0]
    lora = LoraAdapter.from_tensors({("unet", t.diffusers_module): {"up": torch.ones(t.shape[0], 4),
                                                                    "down": torch.ones(4, t.shape[1])}},
                                    alphas={("unet", t.diffusers_module): alpha})
    assert lora.modules[0].scale == scale == module_scale(alpha, 4)


def test_rescaled_copy_is_a_new_value(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "a.safetensors", "tiny", fmt="kohya-diffusers", rank=4, alpha=4.0)
    with load_lora(path) as lora:
        half = lora.with_modules([replace(m, alpha=m.alpha / 2) for m in lora.modules])
        assert all(m.alpha == 4.0 for m in lora.modules)
        out = save_lora(half, tmp_path / "half.safetensors")
    with load_lora(out) as back:
        assert back.format == "kohya-diffusers" and {m.alpha for m in back.modules} == {2.0}


def test_diffusers_metadata_is_rebuilt_when_alphas_change(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "a.safetensors", "tiny", fmt="diffusers", rank=4, alpha=8.0)
    with load_lora(path) as lora:
        assert {m.scale for m in lora.modules} == {2.0}
        mods = [replace(m, alpha=2.0) if i == 0 else m for i, m in enumerate(lora.modules)]
        out = save_lora(lora.with_modules(mods), tmp_path / "b.safetensors")
        first = lora.modules[0].name
    meta = json.loads(read_header(out).metadata["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8 and meta["unet.alpha_pattern"] == {first: 2}
    with load_lora(out) as back:
        assert back.modules[0].scale == 0.5 and {m.scale for m in back.modules[1:]} == {2.0}


def test_save_refuses_an_existing_file_naming_the_parameter(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "a.safetensors", "tiny")
    before = path.read_bytes()
    with load_lora(path) as lora:
        with pytest.raises(OutputExistsError) as e:
            lora_tools.save_lora(lora, path)
        assert e.value.hint is not None and e.value.hint.param == "overwrite"
        assert "overwrite=True" in str(e.value) and "--" not in str(e.value)
        assert path.read_bytes() == before
        lora_tools.save_lora(lora, tmp_path / "b.safetensors", dtype="bf16")
    assert {i.dtype for i in read_header(tmp_path / "b.safetensors").tensors.values()} == {"BF16"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_format_that_cannot_hold_a_component_is_refused(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "a.safetensors", "tiny", fmt="kohya", components=("unet", "te1"))
    with load_lora(path) as lora, pytest.raises(UsageError, match="cannot hold te1"):
        save_lora(lora, tmp_path / "b.safetensors", format="peft")
    assert not (tmp_path / "b.safetensors").exists()


def test_old_format_names_are_aliases(tmp_path: Path) -> None:
    a = write_lora(tmp_path / "a.safetensors", "tiny", fmt="kohya-sgm")
    b = write_lora(tmp_path / "b.safetensors", "tiny", fmt="peft-raw")
    assert load_lora(a).format == "kohya" and load_lora(b).format == "peft"
    assert set(FORMATS) == set(available_formats())


def test_naming_and_spelling_are_separate(tmp_path: Path) -> None:
    """A kohya-named file with PEFT factor names (issue 10's first refused example) reads."""
    t = select_targets(TINY, "attn")[0]
    name = t.diffusers_module.replace(".", "_")
    g = torch.Generator().manual_seed(0)
    tensors = {f"lora_unet_{name}.lora_A.weight": torch.randn(4, t.shape[1], generator=g),
               f"lora_unet_{name}.lora_B.weight": torch.randn(t.shape[0], 4, generator=g),
               f"lora_unet_{name}.alpha": torch.tensor(2.0)}
    from lora_tools.io.safetensors import save_tensors

    path = save_tensors(tmp_path / "mixed.safetensors", tensors)
    with load_lora(path) as lora:
        assert lora.format == "kohya-diffusers" and lora.naming == "kohya-diffusers" and lora.spelling == "peft"
        assert lora.modules[0].scale == 0.5
        out = save_lora(lora, tmp_path / "again.safetensors")
    assert set(load_tensors(out)) == set(tensors)
