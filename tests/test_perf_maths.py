"""The fast paths of issue 23 give the results of the plain ones: the randomized SVD against the exact
one, the per-module thread pool against a sequential run (bit for bit), and the fuse's output hash
rule (outputs over the limit are hashed only when asked; the bytes never depend on it)."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest
import torch

from lora_tools.io.safetensors import load_tensors, read_header
from lora_tools.lora import lowrank
from lora_tools.lora.load import load_lora
from lora_tools.lora.lowrank import (
    ModulePool,
    RankRule,
    dense_svd,
    map_modules,
    randomized_svd,
)
from lora_tools.output import sinks
from lora_tools.output.plan import WrittenFile
from lora_tools.testing.synthetic import write_checkpoint
from lora_tools.testing.synthetic_lora import write_lightning_lora


def _spectrum_matrix(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize("shape", [(1280, 2048), (2048, 640)])
@pytest.mark.parametrize("spectrum", ["lora-plus-rounding", "power-law", "flat-tail"])
@pytest.mark.slow
def test_randomized_svd_is_as_accurate_as_the_exact_svd(shape: tuple[int, int], spectrum: str) -> None:
    m, n = shape
    k = min(m, n)
    i = torch.arange(1, k + 1, dtype=torch.float64)
    s = {"lora-plus-rounding": torch.where(i <= 64, 1.0 / i, 1e-4 * torch.ones_like(i)),  # a fused rank-64 LoRA
         "power-law": i ** -1.0,  # a real fine-tune's difference decays slowly
         "flat-tail": torch.where(i <= 64, 2.0 - i / 64, 0.05 * torch.ones_like(i))}[spectrum]
    a = _spectrum_matrix(m, n, s, seed=k)
    optimal = float(s[64:].norm())  # Eckart-Young: the best rank-64 error
    exact = dense_svd(a, RankRule(rank=64), method="full")
    fast = dense_svd(a, RankRule(rank=64), method="randomized")
    assert fast.method == "randomized" and fast.rank == 64
    assert exact.error == pytest.approx(optimal, rel=1e-3)
    # the measured residual of the randomized factors is within 1 % of the optimal one
    assert fast.error <= 1.01 * exact.error + 1e-6 * float(s[0])
    assert fast.total_energy == pytest.approx(float((s ** 2).sum()), rel=1e-5)
    _, sv, _ = randomized_svd(a, 74)
    assert torch.allclose(sv[:32].double(), s[:32], rtol=1e-3, atol=1e-6)  # the leading singular values


def test_randomized_svd_is_torchs_sketch_and_leaves_the_global_random_state_alone() -> None:
    a = torch.randn(700, 300, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    u, s, v = randomized_svd(a, 20, 2, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        ru, rs, rv = torch.svd_lowrank(a, q=20, niter=2)
    assert torch.allclose(s, rs, rtol=1e-5) and torch.allclose((u * s) @ v.T, (ru * rs) @ rv.T, atol=1e-4)
    wide_u, wide_s, wide_v = randomized_svd(a.T.contiguous(), 20, 2, seed=7)
    assert wide_u.shape == (300, 20) and wide_v.shape == (700, 20)
    assert torch.allclose(wide_s, s, rtol=1e-4)


def test_the_module_pool_gives_the_sequential_results_in_order_bit_for_bit() -> None:
    mats = [torch.randn(300 + 7 * i, 200, generator=torch.Generator().manual_seed(i)) for i in range(12)]

    def work(x: torch.Tensor) -> torch.Tensor:
        return dense_svd(x, RankRule(rank=8), method="randomized").up

    before = torch.get_num_threads()
    seq = [work(x) for x in mats]
    par = map_modules(work, mats, workers=3)
    got: list[torch.Tensor] = []
    with ModulePool(work, got.append, depth=2) as pool:
        for x in mats:
            pool.submit(x)
    assert all(torch.equal(a, b) for a, b in zip(seq, par, strict=True)) and all(
        torch.equal(a, b) for a, b in zip(seq, got, strict=True))
    assert len(got) == len(mats) and torch.get_num_threads() == before  # the thread setting comes back


def test_the_module_pool_stops_on_the_first_error() -> None:
    def work(x: int) -> int:
        if x == 3:
            raise ValueError("bad module")
        return x

    got: list[int] = []
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="bad module"):
        with ModulePool(work, got.append, depth=1) as pool:
            for x in range(8):
                pool.submit(x)
    assert got == [0, 1, 2] and torch.get_num_threads() == before


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    from lora_tools.ops.fuse import fuse

    root = tmp_path_factory.mktemp("perf")
    base = write_checkpoint(root / "base.safetensors", "tiny", dtype="fp32")
    lora_a = write_lightning_lora(root / "a.safetensors", "tiny", seed=0, rank=8)
    lora_b = write_lightning_lora(root / "b.safetensors", "tiny", seed=1, rank=8)
    tuned = root / "tuned.safetensors"
    fuse(base, loras=[(str(lora_a), 1.0)], output=tuned)
    return Path(base), Path(lora_a), Path(lora_b), tuned


def _threads(n: int) -> None:
    torch.set_num_threads(n)


def _factors(adapter: object) -> dict[str, torch.Tensor]:
    return {f"{m.name}.{role}": m.factor(role).clone() for m in adapter.modules for role in m.roles}  # type: ignore[attr-defined]


@pytest.mark.slow  # full SVDs of every module, twice: the full selection
def test_svd_merge_and_extract_do_not_depend_on_the_number_of_cores(models: tuple[Path, Path, Path, Path]) -> None:
    from lora_tools.ops.extract import extract_lora
    from lora_tools.ops.merge import WeightedLora, merge_loras

    base, lora_a, lora_b, tuned = models
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):  # 1: the plain sequential loop; more: the pool
            _threads(n)
            with load_lora(lora_a) as a, load_lora(lora_b) as b:
                merged, report = merge_loras([WeightedLora(a, 1.0, "a"), WeightedLora(b, 0.5, "b")], method="svd",
                                             rule=RankRule(rank=6))
                m = _factors(merged)
            assert report is not None
            ex = extract_lora(tuned, base, RankRule(rank=8))
            results.append((m, [(f.name, f.relative_error) for f in report.modules], _factors(ex.adapter),
                            [(f.name, f.relative_error) for f in ex.report.modules]))
    finally:
        _threads(before)
    first = results[0]
    assert first[0] and first[2]
    for other in results[1:]:
        for i in (0, 2):
            assert list(other[i]) == list(first[i])
            assert all(torch.equal(other[i][k], first[i][k]) for k in first[i])
        assert other[1] == first[1] and other[3] == first[3]


@pytest.mark.slow
def test_outputs_over_the_limit_are_hashed_only_when_asked(models: tuple[Path, Path, Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_tools.ops.fuse import run_fuse
    from lora_tools.ops.fuse_plan import plan_fuse

    base, lora_a, _, _ = models
    plans = [sinks.TensorPlan("w", "F16", (4, 4))]
    assert sinks.wants_hash(plans, None, False)  # small: hashed by default
    monkeypatch.setattr(sinks, "FULL_HASH_MAX_BYTES", 16)  # every output is now "big"
    assert not sinks.wants_hash(plans, None, False)
    assert sinks.wants_hash(plans, True, False) and sinks.wants_hash(plans, None, True)
    written = {}
    for name, ask in (("default", None), ("asked", True)):
        plan = plan_fuse(base, loras=[(str(lora_a), 1.0)], output=tmp_path / f"{name}.safetensors")
        plan.hash_output = ask
        try:
            written[name] = run_fuse(plan, created="2026-01-01T00:00:00Z").files[0]
        finally:
            plan.close()
    assert written["default"].sha256 is None and written["default"].autov2 is None
    digest = hashlib.sha256(written["asked"].path.read_bytes()).hexdigest()
    assert written["asked"].sha256 == digest and written["asked"].autov2 == digest[:10]
    _same_data_the_big_one_records_its_hash(written["default"], written["asked"])
    assert load_tensors(written["default"].path).keys() == load_tensors(base).keys()


def _same_data_the_big_one_records_its_hash(default: WrittenFile, asked: WrittenFile) -> None:
    """The same tensors, sha256 asked or not; unasked, a big output records its data's xxh3-128 in its header."""
    import xxhash

    from lora_tools.io.hashing import DATA_HASH_KEY

    data = {}
    for f in (default, asked):
        raw = f.path.read_bytes()
        data[f] = raw[8 + int.from_bytes(raw[:8], "little"):]
    assert data[default] == data[asked]
    assert default.data_xxh3_128 == xxhash.xxh3_128(data[default]).hexdigest() and asked.data_xxh3_128 is None
    assert read_header(default.path).metadata[DATA_HASH_KEY] == default.data_xxh3_128
    assert DATA_HASH_KEY not in read_header(asked.path).metadata


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form,spread", [("scaled", 0.02), ("plain", 0.02), ("plain", 300.0)])
def test_chunked_fp8_rounding_gives_the_plain_casts_bits_and_error(dtype: torch.dtype, form: str, spread: float,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_tools.io import fp8

    monkeypatch.setattr(fp8, "CHUNK_ELEMS", 1000)  # several chunks, a short last one
    codes = torch.arange(256, dtype=torch.uint8)
    widened = fp8._widen_magnitude(codes, torch.empty(256, dtype=torch.int16), torch.empty(256))
    exact = codes.view(torch.float8_e4m3fn).float().abs() / 256
    assert torch.equal(widened[~exact.isnan()], exact[~exact.isnan()])  # every code but NaN
    w = (torch.randn(70, 9, 3, 3, generator=torch.Generator().manual_seed(1)) * spread).to(dtype)
    w.view(-1)[5] = 0.0
    q, scale, rounding = fp8.quantize_measured(w, form)  # type: ignore[arg-type]
    x = w.double()
    s = 1.0 if scale is None else scale
    want = (w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn) if scale is not None else \
        w.float().clamp(-448, 448).to(torch.float8_e4m3fn)
    assert q.shape == w.shape and torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    err = float(((want.double() * s - x) ** 2).sum())
    assert rounding.err_sq == pytest.approx(err, rel=1e-5) and rounding.ref_sq == pytest.approx(float((x ** 2).sum()), rel=1e-5)
    assert rounding.saturated == int((x.abs() > 448).sum()) * (scale is None)
    consumed = w.float().clone()
    q2, scale2, _ = fp8.quantize_measured(consumed, form, amax=float(w.float().abs().max()), consume=True)  # type: ignore[arg-type]
    assert scale2 == scale and torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


@pytest.mark.slow
def test_fp8_outputs_follow_the_hash_rule_and_round_the_fusion_once(models: tuple[Path, Path, Path, Path],
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8 outputs over the limit are hashed only when asked (they always were); on an fp32 base the
    fusion is rounded in place in the read buffer, and the file holds e4m3fn(fusion / scale) all the same."""
    from lora_tools.io import fp8
    from lora_tools.ops.fuse import run_fuse
    from lora_tools.ops.fuse_plan import plan_fuse

    base, lora_a, _, tuned = models  # tuned: the same fusion in fp32
    monkeypatch.setattr(sinks, "FULL_HASH_MAX_BYTES", 16)
    written = {}
    for name, ask in (("default", None), ("asked", True)):
        plan = plan_fuse(base, loras=[(str(lora_a), 1.0)], output=tmp_path / f"{name}.safetensors", dtype="fp8")
        plan.hash_output = ask
        try:
            written[name] = run_fuse(plan, created="2026-01-01T00:00:00Z").files[0]
        finally:
            plan.close()
    assert written["default"].sha256 is None
    assert written["asked"].sha256 == hashlib.sha256(written["asked"].path.read_bytes()).hexdigest()
    _same_data_the_big_one_records_its_hash(written["default"], written["asked"])
    got, fusion = load_tensors(written["default"].path), load_tensors(tuned)
    keys = [k for k, v in got.items() if v.dtype == torch.float8_e4m3fn and not k.endswith(fp8.MARKER)]
    assert len(keys) > 10
    for k in keys:
        w = fusion[k]
        scale = float(got[fp8.scale_key(k)])
        assert 224.0 < float(w.abs().max()) / scale <= 448.0 and math.log2(scale).is_integer()  # a power of two
        assert torch.equal(got[k].view(torch.uint8), (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.slow
def test_big_inputs_are_pinned_by_a_sampled_sha256_unless_asked(models: tuple[Path, Path, Path, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The record's run entry pins an input over the limit by its size and a sampled sha256 (the
    CLI fuse then reads no byte of a 7 GB base twice); --hash-base asks for the full sha256,
    --hash-output for the output's, both as ``sha256sum`` gives them."""
    from click.testing import CliRunner

    from lora_tools.cli import cli
    from lora_tools.io import hashing
    from lora_tools.io.safetensors import read_header
    from lora_tools.provenance import read_record

    base, lora_a, _, _ = models
    full = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (base, lora_a)}
    monkeypatch.setattr(hashing, "FULL_HASH_MAX_BYTES", lora_a.stat().st_size)  # the base is now "big", the LoRA not
    monkeypatch.setattr(sinks, "FULL_HASH_MAX_BYTES", 16)
    hashed: list[Path] = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p, **kw: hashed.append(Path(p)) or real(p, **kw))
    records, stdout = {}, {}
    for name, flags in (("default", []), ("asked", ["--hash-base", "--hash-output"])):
        out = tmp_path / f"{name}.safetensors"
        hashed.clear()
        res = CliRunner().invoke(cli, ["fuse", str(base), "--lora", str(lora_a), "-o", str(out), *flags],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        records[name], stdout[name] = read_record(read_header(out).metadata), res.stdout
        assert base not in hashed or name == "asked"
        assert hashed.count(base) == (name == "asked")  # never twice (record sources and run entry share it)
    pins = {name: {i["option"]: i for i in r["recipe"]["inputs"]} for name, r in records.items()}
    assert pins["default"]["base"] == {"option": "base", "name": "base.safetensors", "size": base.stat().st_size,
                                       "sampled_sha256": hashing.sampled_sha256(base)}
    assert pins["default"]["loras"]["sha256"] == full[lora_a] == pins["asked"]["loras"]["sha256"]
    assert pins["asked"]["base"] == {"option": "base", "name": "base.safetensors", "sha256": full[base]}
    source = {name: next(s for s in r["sources"] if s["role"] == "base") for name, r in records.items()}
    assert "sha256" not in source["default"] and source["default"]["sampled_sha256"] == hashing.sampled_sha256(base)
    assert source["asked"]["sha256"] == full[base]
    assert "sha256" not in stdout["default"]
    digest = hashlib.sha256((tmp_path / "asked.safetensors").read_bytes()).hexdigest()
    assert f"sha256 {digest}, AutoV2 {digest[:10]}" in stdout["asked"]


def test_the_sampled_sha256_sees_the_header_and_the_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_tools.io import hashing

    monkeypatch.setattr(hashing, "SAMPLE_STRIDE", 1 << 16)
    monkeypatch.setattr(hashing, "SAMPLE_BYTES", 1 << 10)
    path = tmp_path / "m.safetensors"
    header = b'{"w":{"dtype":"U8","shape":[300000],"data_offsets":[0,300000]}}'
    data = bytearray(os.urandom(300000))
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    first = hashing.sampled_sha256(path)
    seen = {}
    for name, at in (("header", 9), ("sample", 8 + len(header) + (1 << 16) - 8 - len(header) + 5),
                     ("last", 8 + len(header) + 300000 - 1), ("between", 8 + len(header) + 3 * (1 << 16) // 2)):
        raw = bytearray(path.read_bytes())
        raw[at] ^= 1
        path.write_bytes(raw)
        seen[name] = hashing.sampled_sha256(path) != first
        raw[at] ^= 1
        path.write_bytes(raw)
    assert seen == {"header": True, "sample": True, "last": True, "between": False}
    assert hashing.sampled_sha256(path) == first
    assert hashing.file_pin(path, full=True) == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_module_threads_nest() -> None:
    before = torch.get_num_threads()
    with lowrank.module_threads() as outer:
        assert torch.get_num_threads() == 1 and outer == before
        with lowrank.module_threads() as inner:
            assert inner == before and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_the_fuse_output_does_not_depend_on_the_compute_threads(models: tuple[Path, Path, Path, Path],
                                                                  tmp_path: Path) -> None:
    from lora_tools.engine import pipeline
    from lora_tools.ops.fuse import run_fuse
    from lora_tools.ops.fuse_plan import plan_fuse

    base, lora_a, lora_b, _ = models
    before = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2):  # 1: the sequential pipeline; 2: two tensors patched at once (two compute threads)
            _threads(n)
            plan = plan_fuse(base, loras=[(str(lora_a), 0.8), (str(lora_b), -0.3)], output=tmp_path / f"t{n}.safetensors")
            calls: list[int] = []
            real = pipeline.run_pipeline

            def spy(*args: object, calls: list[int] = calls, real: object = real, **kwargs: object) -> None:
                calls.append(int(kwargs["workers"]))  # type: ignore[call-overload]
                real(*args, **kwargs)  # type: ignore[arg-type]

            pipeline.run_pipeline = spy  # type: ignore[assignment]
            try:
                outputs.append((run_fuse(plan, created="2026-01-01T00:00:00Z").files[0].path, calls))
            finally:
                pipeline.run_pipeline = real  # type: ignore[assignment]
                plan.close()
    finally:
        _threads(before)
    (one, seq_calls), (two, par_calls) = outputs
    assert seq_calls == [1] and par_calls == [min(2, os.cpu_count() or 1)] or (os.cpu_count() or 1) < 2
    assert one.read_bytes() == two.read_bytes()
    assert torch.get_num_threads() == before
