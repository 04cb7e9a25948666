"""The streaming engine on its own: a tiny model, hand-made contributions, sinks that collect.

References are computed here with plain torch from the factors (``W + s * alpha/r * up @ down``,
``W + s * (A - B)``, LoHa's Hadamard product), never through the engine's own code.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_tools.engine import DenseDifference, LowRank, needs_check, stream, stream_order, stream_pairs
from lora_tools.errors import NonFiniteError
from lora_tools.io.model import TensorRef, open_model
from lora_tools.io.sources import StateDictSource
from lora_tools.lora.adapter import LoraModule
from lora_tools.lora.match import MatchedModule


class CollectSink:
    """Keeps a copy of every tensor it is given (the engine reuses its read buffers)."""

    def __init__(self, only: str | None = None):
        self.only = only
        self.tensors: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        self.finalized = self.aborted = False

    def wants(self, ref: TensorRef) -> bool:
        return self.only is None or ref.key.startswith(self.only)

    def position(self, ref: TensorRef) -> int | None:
        return None

    def add(self, ref: TensorRef, payload) -> None:  # type: ignore[no-untyped-def]
        self.tensors[ref.key] = payload.as_tensor(ref).clone()
        self.order.append(ref.key)

    def complete(self) -> None:
        pass

    def commit(self) -> list:  # type: ignore[type-arg]
        self.finalized = True
        return []

    def rollback(self) -> None:
        self.finalized = False

    def cleanup(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


@pytest.fixture(scope="module")
def model_file(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint  # the session's tiny SGM checkpoint (fp32)


def _keys(path: Path) -> tuple[str, str, str]:
    sd = load_file(str(path))
    linear = sorted(k for k, v in sd.items() if k.startswith("model.diffusion_model.") and v.dim() == 2
                    and k.endswith("attn1.to_q.weight"))[0]
    conv = sorted(k for k, v in sd.items() if k.startswith("model.diffusion_model.") and v.dim() == 4
                  and v.shape[2] == 3 and v.shape[0] >= 4)[0]
    other = sorted(k for k, v in sd.items() if k.startswith("model.diffusion_model.") and v.dim() == 2
                   and k.endswith("ff.net.2.weight"))[0]
    return linear, conv, other


def _lora(name: str, shape: tuple[int, ...], rank: int, alpha: float, seed: int, kind: str = "lora"):  # type: ignore[no-untyped-def]
    """A one-module adapter held in memory, and its factors."""
    g = torch.Generator().manual_seed(seed)
    out, rest = shape[0], shape[1:]
    if kind == "lora":
        inner = rest[0] if len(rest) == 1 else rest[0] * rest[1] * rest[2]
        f = {"up": torch.randn(out, rank, generator=g) * 0.1,
             "down": torch.randn(rank, *rest, generator=g) * 0.1 if len(rest) > 1 else torch.randn(rank, inner, generator=g) * 0.1}
        if len(rest) > 1:
            f["up"] = f["up"].reshape(out, rank, 1, 1)
    else:  # loha on a 2-D weight
        f = {"w1a": torch.randn(out, rank, generator=g) * 0.3, "w1b": torch.randn(rank, rest[0], generator=g) * 0.3,
             "w2a": torch.randn(out, rank, generator=g) * 0.3, "w2b": torch.randn(rank, rest[0], generator=g) * 0.3}
    tensors = {f"{name}.{role}": t.to(torch.float16) for role, t in f.items()}
    source = StateDictSource(Path(f"{name}.safetensors"), tensors)
    module = LoraModule("unet", name, kind, {role: f"{name}.{role}" for role in f}, alpha, rank,  # type: ignore[arg-type]
                           source=source)
    adapter = SimpleNamespace(source=source)
    match = MatchedModule(module, SimpleNamespace(shape=shape, part=None))  # type: ignore[arg-type]
    return adapter, match, {role: t.float() for role, t in ((r, tensors[f"{name}.{r}"]) for r in f)}


def test_stream_applies_low_rank_and_dense_differences_like_the_dense_reference(model_file: Path) -> None:
    base = load_file(str(model_file))
    linear, conv, other = _keys(model_file)
    a_lin, m_lin, f_lin = _lora("lin", tuple(base[linear].shape), rank=4, alpha=2.0, seed=1)
    a_conv, m_conv, f_conv = _lora("conv", tuple(base[conv].shape), rank=2, alpha=1.0, seed=2)
    a_loha, m_loha, f_loha = _lora("loha", tuple(base[other].shape), rank=2, alpha=4.0, seed=3, kind="loha")
    g = torch.Generator().manual_seed(9)
    tuned = StateDictSource(Path("tuned"), {"x": (base[linear] + torch.randn(base[linear].shape, generator=g) * 0.05).half()})
    original = StateDictSource(Path("original"), {"x": base[linear].clone()})
    half = base[other].shape[0] // 2
    patches = {
        linear: [LowRank(a_lin, m_lin, 0.7), DenseDifference(tuned, original, "x", 0.5)],  # type: ignore[arg-type]
        conv: [LowRank(a_conv, m_conv, -1.5)],  # type: ignore[arg-type]
        other: [LowRank(a_loha, m_loha, 0.8, rows=None)],  # type: ignore[arg-type]
    }
    # the second half of `other` also gets a plain LoRA limited to those rows (a fused weight's part)
    a_part, m_part, f_part = _lora("part", (base[other].shape[0] - half, base[other].shape[1]), rank=3, alpha=3.0, seed=4)
    patches[other].append(LowRank(a_part, m_part, 1.0, rows=slice(half, None)))  # type: ignore[arg-type]

    sink = CollectSink()
    seen: list[int] = []
    with open_model(model_file) as model:
        stats = stream(model, patches, [sink], out_dtype=lambda dt: dt, progress=seen.append)
        total = model.total_bytes()
    assert sink.finalized and not sink.aborted
    assert stats.tensors_patched == 3 and stats.contributions == 5
    assert sum(seen) == total and set(sink.tensors) == set(base)

    ref_lin = base[linear].float() + 0.7 * 0.5 * (f_lin["up"] @ f_lin["down"]) \
        + 0.5 * (tuned.tensors["x"].float() - original.tensors["x"].float())
    ref_conv = base[conv].float() - 1.5 * 0.5 * (f_conv["up"].flatten(1) @ f_conv["down"].flatten(1)).reshape(base[conv].shape)
    ref_other = base[other].float() + 0.8 * 2.0 * ((f_loha["w1a"] @ f_loha["w1b"]) * (f_loha["w2a"] @ f_loha["w2b"]))
    ref_other[half:] += f_part["up"] @ f_part["down"]
    for key, ref in ((linear, ref_lin), (conv, ref_conv), (other, ref_other)):
        got = sink.tensors[key]
        assert got.dtype == torch.float32
        assert not torch.equal(got, base[key])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for key in set(base) - set(patches):
        assert torch.equal(sink.tensors[key], base[key]), key  # untouched bytes pass through


def test_stream_casts_patched_tensors_and_follows_the_given_order(model_file: Path) -> None:
    base = load_file(str(model_file))
    linear, _, _ = _keys(model_file)
    adapter, match, f = _lora("lin", tuple(base[linear].shape), rank=4, alpha=4.0, seed=5)
    sink = CollectSink(only="model.diffusion_model.")
    with open_model(model_file) as model:
        order = stream_order(model.refs, {linear})
        stats = stream(model, {linear: [LowRank(adapter, match, 2.0)]}, [sink],  # type: ignore[arg-type]
                       out_dtype=lambda dt: "F16", order=order)
    assert sink.order == [r.key for r in order if r.key.startswith("model.diffusion_model.")]  # no VAE read
    assert stats.tensors == len(sink.order)
    got = sink.tensors[linear]
    assert got.dtype == torch.float16  # rounded once, from the fp32 sum
    assert torch.equal(got, (base[linear] + 2.0 * (f["up"] @ f["down"])).half())


class WholeOnly:
    """A contribution with no row-block form (like DoRA): the engine takes the whole-tensor path."""

    def __init__(self, add: torch.Tensor):
        self.add = add

    def block_op(self, shape):  # type: ignore[no-untyped-def]
        return None

    def apply_whole(self, weight: torch.Tensor) -> None:
        weight.add_(self.add.reshape(weight.shape))

    def delta_bound(self) -> float | None:
        return None


def test_a_contribution_without_row_blocks_takes_the_whole_tensor_path(model_file: Path) -> None:
    base = load_file(str(model_file))
    _, conv, _ = _keys(model_file)
    add = torch.linspace(-1, 1, base[conv].numel()).reshape(base[conv].shape)
    sink = CollectSink()
    with open_model(model_file) as model:
        stream(model, {conv: [WholeOnly(add)]}, [sink], out_dtype=lambda dt: dt)
    assert torch.equal(sink.tensors[conv], base[conv] + add)


def test_overflow_raises_non_finite_and_aborts_every_sink(model_file: Path) -> None:
    base = load_file(str(model_file))
    linear, _, _ = _keys(model_file)
    adapter, match, _ = _lora("lin", tuple(base[linear].shape), rank=4, alpha=4.0, seed=6)
    sinks = [CollectSink(), CollectSink()]
    with open_model(model_file) as model, pytest.raises(NonFiniteError, match="NaN/Inf"):
        stream(model, {linear: [LowRank(adapter, match, 1e9)]}, sinks, out_dtype=lambda dt: "F16")  # type: ignore[arg-type]
    assert all(s.aborted and not s.finalized for s in sinks)


def test_the_overflow_scan_is_skipped_only_when_the_bounds_rule_it_out(model_file: Path) -> None:
    base = load_file(str(model_file))
    linear, _, _ = _keys(model_file)
    adapter, match, f = _lora("lin", tuple(base[linear].shape), rank=4, alpha=4.0, seed=7)
    bounds = (float(f["up"].abs().max()), float(f["down"].abs().max()))
    f16, f32 = torch.float16, torch.float32
    small = LowRank(adapter, match, 1.0, max_abs=bounds)  # type: ignore[arg-type]
    assert small.delta_bound() == pytest.approx(4 * bounds[0] * bounds[1])
    assert needs_check([small], f16, f16) is False
    assert needs_check([LowRank(adapter, match, 1e36, max_abs=bounds)], f32, f32) is True  # type: ignore[arg-type]
    assert needs_check([LowRank(adapter, match, 1e6, max_abs=bounds)], f32, f32) is False  # type: ignore[arg-type]
    assert needs_check([small], f32, f16) is True  # a cast: always scanned
    assert needs_check([LowRank(adapter, match, 1.0)], f16, f16) is True  # no bounds measured  # type: ignore[arg-type]
    assert needs_check([LowRank(adapter, match, 1e6, max_abs=bounds)], f16, f16) is True  # type: ignore[arg-type]
    diff = DenseDifference(adapter.source, adapter.source, "lin.up", 1.0)  # type: ignore[arg-type]
    assert needs_check([small, diff], f16, f16) is True


def test_stream_pairs_reads_two_models_side_by_side(model_file: Path, tiny_diffusers_folder: Path) -> None:
    a_sd = load_file(str(model_file))
    keys = sorted(k for k in a_sd if k.startswith("model.diffusion_model.output_blocks."))[:12]
    # a tensor reader on the other side, holding other values under other names
    tuned = StateDictSource(Path("tuned"), {f"w{i}": a_sd[k] * 2 + 1 for i, k in enumerate(keys)})
    diffs: dict[str, torch.Tensor] = {}
    seen: list[int] = []
    with open_model(model_file) as a:
        n = stream_pairs(a, tuned, [(k, f"w{i}") for i, k in enumerate(keys)],
                         lambda k, ta, tb: diffs.__setitem__(k, tb - ta), progress=seen.append, budget=1)
    assert n == len(keys) and list(diffs) == keys
    for k in keys:
        assert torch.equal(diffs[k], a_sd[k] * 2 + 1 - a_sd[k])
    assert sum(seen) == 2 * sum(a_sd[k].numel() * 4 for k in keys)
    # two layouts side by side: the checkpoint and the same model as a diffusers folder (SGM key space)
    got: list[tuple[str, bool]] = []
    with open_model(model_file) as a, open_model(tiny_diffusers_folder) as b:
        stream_pairs(a, b, keys, lambda k, ta, tb: got.append((k, torch.equal(ta, a_sd[k]) and torch.equal(tb, a_sd[k]))))
    assert got == [(k, True) for k in keys]


def test_a_free_worker_goes_on_while_another_works_on_a_big_item() -> None:
    """Item 0 (a big tensor) finishes only once item 2 has been processed: the other worker must be
    handed items 1 and 2 meanwhile, not wait for item 0 to be written (head-of-line blocking)."""
    import threading

    from lora_tools.engine.pipeline import run_pipeline

    item2_done = threading.Event()
    order: list[int] = []

    def process(item: int, data: int) -> int:
        if item == 0:
            assert item2_done.wait(20), "the second worker was left idle while the first worked on item 0"
        if item == 2:
            item2_done.set()
        return data * 10

    run_pipeline(list(range(6)), read=lambda i: i, process=process, write=lambda i, r: order.append(r),
                 size=lambda i: 1, workers=2)
    assert order == [0, 10, 20, 30, 40, 50]


def test_frozen_heap_hands_the_objects_back_when_the_last_run_leaves() -> None:
    """A fuse inside a verify (or two runs on threads) nest: the inner run's exit must not unfreeze the outer's."""
    import gc

    from lora_tools.heap import frozen_heap

    with frozen_heap():
        outer = gc.get_freeze_count()
        assert outer > 0
        with frozen_heap():
            pass
        assert gc.get_freeze_count() >= outer  # still frozen for the outer run
    assert gc.get_freeze_count() == 0


@pytest.mark.slow
def test_untouched_runs_give_the_bytes_tensor_by_tensor_writes_give(model_file: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Adjacent untouched tensors go through the pipeline as runs (one read, one write each): the file is
    the one the tensor-by-tensor path writes, byte for byte, and the runs hold only what they may."""
    import importlib

    from lora_tools.ops.fuse import plan_fuse, run_fuse
    from lora_tools.testing.synthetic_lora import write_lightning_lora

    engine_stream = importlib.import_module("lora_tools.engine.stream")  # the module (the package exports the function)
    lora = write_lightning_lora(tmp_path / "l.safetensors", "tiny")
    seen: list[list[object]] = []
    grouped = engine_stream._runs

    def spy(order, model, sinks, patches):  # type: ignore[no-untyped-def]
        items = grouped(order, model, sinks, patches)
        seen.append(items)
        return items

    outputs = {}
    for name, runs in (("runs", spy), ("single", lambda order, *rest: list(order))):
        monkeypatch.setattr(engine_stream, "_runs", runs)
        monkeypatch.setattr(engine_stream, "RUN_BYTES", 4096)  # several runs at tiny size
        plan = plan_fuse(model_file, loras=[(str(lora), 1.0)], output=tmp_path / f"{name}.safetensors")
        try:
            outputs[name] = run_fuse(plan, created="2026-01-01T00:00:00Z").files[0].path.read_bytes()
        finally:
            plan.close()
    assert outputs["runs"] == outputs["single"]
    runs = [item for item in seen[0] if isinstance(item, engine_stream._Run)]
    assert len(runs) > 5 and all(1 < len(r.refs) and r.nbytes == sum(x.nbytes for x in r.refs) for r in runs)
    with open_model(model_file) as model:
        patched = set(plan.patched_keys())
        for r in runs:
            spans = [model.span(x) for x in r.refs]
            assert not patched & {x.key for x in r.refs}  # untouched only
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # adjacent in the base
            assert r.nbytes <= 4096 or len(r.refs) == 1
