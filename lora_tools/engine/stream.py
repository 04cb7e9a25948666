"""Stream a model once into any set of sinks, patching the tensors that receive contributions.

One thread reads ahead into a page-aligned ring (each tensor in phase with its place in the
first sink's file, so the O_DIRECT writer sends it from there uncopied), one thread per core
patches in fp32 row blocks, one thread hands every tensor to every sink, in order.
:func:`stream_pairs` reads two models side by side, a few tensors in memory.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from lora_tools.engine import pipeline
from lora_tools.engine.buffers import RING_BYTES, BufferRing
from lora_tools.engine.contributions import Contribution
from lora_tools.engine.patch import block_ops, patch_tensor
from lora_tools.engine.torch_loading import start_loading_torch
from lora_tools.heap import frozen_heap
from lora_tools.io.magnitudes import tensor_largest_magnitude
from lora_tools.io.model import ModelSource, TensorRef
from lora_tools.io.safetensors import DTYPE_SIZES, torch_dtype
from lora_tools.output.sinks import Payload, Sink, WrittenFile, finalize_all

if TYPE_CHECKING:
    import torch

    from lora_tools.io.sources import TensorSource

Progress = Callable[[int], None]
#: Tensors this large are streamed first, into the empty read ring (see :func:`stream_order`).
OUTSIZED_BYTES = RING_BYTES // 5
#: Untouched bytes streamed before the first patched tensor: about what a disk writes while torch
#: loads (1 to 1.5 s), which :func:`stream` overlaps with that loading.
COLD_LEAD_BYTES = 1 << 30
#: ``hook(stage, fn) -> fn``: wraps the ``read``, ``process`` and ``write`` stages (profilers).
StageHook = Callable[[str, Callable[..., Any]], Callable[..., Any]]


@dataclass(frozen=True)
class _Run:
    """Untouched tensors adjacent in the model's file and in the output, read with one call and written with
    one: a few interpreter hand-offs instead of a few per tensor (they add up while torch loads beside them)."""

    refs: tuple[TensorRef, ...]
    nbytes: int


#: A run's bytes at most (several runs are in flight within the pipeline's budgets).
RUN_BYTES = 32 << 20
#: How long the reader waits for the read ring to have room before it takes memory of its own.
READ_WAIT_S = 2.0


def _runs(order: Sequence[TensorRef], model: ModelSource, sinks: Sequence[Sink],
          patches: Mapping[str, Sequence[Contribution]]) -> list[TensorRef | _Run]:
    """``order`` with each stretch of untouched tensors that the only sink writes as read, adjacent in the
    model's file and in the output, grouped into :class:`_Run` s of at most :data:`RUN_BYTES`."""
    sink = sinks[0] if len(sinks) == 1 else None
    writes_raw = getattr(sink, "writes_raw", None)
    if sink is None or writes_raw is None:
        return list(order)
    out: list[TensorRef | _Run] = []
    run: list[TensorRef] = []
    run_bytes = src_end = out_end = -1

    def close() -> None:
        if run:
            out.append(run[0] if len(run) == 1 else _Run(tuple(run), sum(r.nbytes for r in run)))
            run.clear()

    for ref in order:
        span = model.span(ref) if ref.key not in patches and writes_raw(ref) else None
        pos = sink.position(ref) if span is not None else None
        if span is None or pos is None:
            close()
            out.append(ref)
            continue
        if not run or span[0] != src_end or pos != out_end or run_bytes + ref.nbytes > RUN_BYTES:
            close()
            run_bytes = 0
        run.append(ref)
        run_bytes += ref.nbytes
        src_end, out_end = span[1], pos + ref.nbytes
    close()
    return out


@dataclass
class StreamStats:
    """What a :func:`stream` did: the files the sinks wrote, the contributions applied, the tensors
    patched (and streamed), and the seconds it took."""

    files: list[WrittenFile]
    contributions: int  # contributions applied
    tensors_patched: int
    seconds: float
    tensors: int = 0  # tensors streamed


def stream_order(refs: Sequence[TensorRef], computed: Iterable[str]) -> list[TensorRef]:
    """Processing (and output) order; ``computed``: the keys of the tensors that need torch (patched, or
    encoded by a sink: fp8), the others are copied as read.

    The outsized tensors (a fifth of the read ring or more: a text encoder's token embedding) come
    first, while the ring is empty: later they might find no free span in it and take memory of
    their own (126 MB more peak RSS on SDXL). Then copied tensors up to :data:`COLD_LEAD_BYTES` in
    all: they need no torch, so they are written while torch loads (see :func:`stream`). Then
    computed and copied tensors mixed in proportion to their bytes, so the maths and the copying
    overlap all the way through instead of taking turns (a checkpoint stores its text encoders and
    VAE, all untouched, in one run). The order depends on the tensors alone: the same inputs give
    the same file.
    """
    computed = set(computed)
    big = sorted((r for r in refs if r.nbytes >= OUTSIZED_BYTES), key=lambda r: -r.nbytes)
    rest = [r for r in refs if r.nbytes < OUTSIZED_BYTES]
    hot = [r for r in rest if r.key in computed]
    cold = [r for r in rest if r.key not in computed]
    out: list[TensorRef] = big
    lead = sum(r.nbytes for r in big if r.key not in computed)
    j = 0
    while j < len(cold) and lead < COLD_LEAD_BYTES:
        out.append(cold[j])
        lead += cold[j].nbytes
        j += 1
    cold = cold[j:]
    hot_total = sum(r.nbytes for r in hot) or 1
    cold_total = sum(r.nbytes for r in cold) or 1
    i = j = hot_done = cold_done = 0
    while i < len(hot) or j < len(cold):
        if j >= len(cold) or (i < len(hot) and hot_done / hot_total <= cold_done / cold_total):
            out.append(hot[i])
            hot_done += hot[i].nbytes
            i += 1
        else:
            out.append(cold[j])
            cold_done += cold[j].nbytes
            j += 1
    return out


def stream(model: ModelSource, patches: Mapping[str, Sequence[Contribution]], sinks: Sequence[Sink], *,
           out_dtype: Callable[[str], str], order: Sequence[TensorRef] | None = None,
           progress: Progress | None = None, check_overflow: Literal["auto", "always"] = "auto",
           stage_hook: StageHook | None = None, compute_workers: int | None = None) -> StreamStats:
    """Stream ``model`` once into ``sinks``, adding ``patches[key]`` to each listed tensor.

    Args:
        model: the model read.
        patches: per tensor key, the contributions to add in order (a key with an empty list is
            still patched: upcast, scanned when needed, rounded to its output dtype).
        sinks: where every tensor goes; finalized at the end, aborted on any error.
        out_dtype: safetensors dtype of a tensor (``"F16"``) -> the dtype its patched result takes.
        order: the tensors in stream order, as the sinks were built for (default:
            :func:`stream_order`); tensors no sink wants are not read.
        progress: called with each tensor's bytes once it is processed.
        check_overflow: ``"auto"`` scans results for NaN/Inf/overflow unless the contributions'
            bounds rule it out; ``"always"`` scans every patched tensor.
        stage_hook: wraps each pipeline stage (``"read"``, ``"process"``, ``"write"``), e.g. to time it.
        compute_workers: tensors patched at once, one torch thread each (default: torch's thread
            count, at most the cores).

    Returns:
        :class:`StreamStats` with the files the sinks wrote.

    Raises:
        NonFiniteError: a patched tensor holds NaN/Inf or overflows its output dtype (nothing is left behind).
    """
    start = time.perf_counter()
    default_threads = start_loading_torch()  # on a thread of its own: untouched tensors stream meanwhile
    if order is None:
        order = stream_order(model.refs, patches)
    order = [r for r in order if any(s.wants(r) for s in sinks)]  # e.g. a UNet-only output reads no VAE
    stats = {"contributions": 0, "tensors": 0}
    stats_lock = threading.Lock()
    local = threading.local()
    buffers = BufferRing()
    first = sinks[0] if sinks else None

    def one_torch_thread() -> None:
        """Before a thread's first torch operation (the count is the process's: the first call sets it
        for every thread; see below)."""
        if not getattr(local, "threads_set", False):
            import torch

            torch.set_num_threads(1)
            local.threads_set = True

    def read(ref: TensorRef | _Run) -> Payload | memoryview:
        if isinstance(ref, _Run):
            phase = first.position(ref.refs[0]) or 0  # type: ignore[union-attr]
            return model.read_span(ref.refs, buffers.take(ref.nbytes, phase, wait_s=READ_WAIT_S))
        # The reader thread also reads this tensor's contributions' inputs, off the compute thread.
        contribs = patches.get(ref.key)
        if contribs is not None:
            one_torch_thread()
        ops = block_ops(contribs, ref.shape) if contribs is not None else None
        if ref.raw_ok:
            # Placed in phase with its place in the first output, the writer sends it to the disk
            # from this buffer, uncopied; tensors the file leaves unaligned get aligned memory.
            phase = (first.position(ref) if first is not None else None) or 0
            into = buffers.take(ref.nbytes, phase if phase % DTYPE_SIZES[ref.dtype] == 0 else 0, wait_s=READ_WAIT_S)
            return Payload(model.read_raw(ref, into), None, False, ops)
        return Payload(None, model.read(ref), False, ops)

    preparers = [p for p in (getattr(s, "prepare", None) for s in sinks) if p is not None]
    patch_dtypes = [p for p in (getattr(s, "patch_dtype", None) for s in sinks) if p is not None]

    def target_dtype(ref: TensorRef) -> str:
        """The dtype ``ref``'s patched result is computed into: what a sink asks for (fp8: fp32, to round
        once from the exact fusion), else ``out_dtype``'s."""
        for ask in patch_dtypes:
            dtype = ask(ref)
            if dtype is not None:
                return dtype
        return out_dtype(ref.dtype)

    def process(ref: TensorRef | _Run, payload: Payload | memoryview) -> Payload | memoryview:
        if isinstance(ref, _Run) or isinstance(payload, memoryview):
            return payload
        contribs = patches.get(ref.key)
        if contribs is not None:
            one_torch_thread()
            payload = _patch(ref, contribs, payload)
        for prepare in preparers:  # encodings (fp8) on the compute threads, not on the writer's
            prepare(ref, payload)
        if payload.tensor is not None and getattr(local, "scratch", None) is not None \
                and payload.tensor.untyped_storage().data_ptr() == local.scratch.untyped_storage().data_ptr():
            local.scratch = None  # the result still goes out as it is: the scratch goes with it
        return payload

    def _scratch(source: torch.Tensor, target: torch.dtype) -> torch.Tensor | None:
        """A result tensor that a sink's ``prepare`` encodes and drops (fp8) lives in one buffer per
        compute thread, reused from tensor to tensor: no fresh pages to fault in and zero each time."""
        import torch

        if source.dtype == target and source.is_contiguous():
            return None  # patched in place
        n = source.numel()
        scratch = getattr(local, "scratch", None)
        if scratch is None or scratch.dtype != target or scratch.numel() < n:
            scratch = local.scratch = torch.empty(n, dtype=target)
        return scratch[:n].view(source.shape)

    def block_encoding(ref: TensorRef) -> Any:
        """The encoding every sink that wants ``ref`` asks for its patched value (fp8), when they
        agree: the value is then encoded block by block while it is computed, never whole."""
        asked = [getattr(s, "block_encoding", lambda r: None)(ref) for s in sinks if s.wants(ref)]
        return asked[0] if asked and asked[0] is not None and all(a == asked[0] for a in asked) else None

    def _patch_encoded(ref: TensorRef, contribs: Sequence[Contribution], payload: Payload, encoding: Any) -> Payload:
        """``ref`` patched in fp32 row blocks, each encoded while it is in the cache (``encoding.rounder``)
        into a buffer in phase with its place in the first output. An encoding fixed before the first
        block (fp8's scale) comes from the base's largest magnitude (a LoRA rarely moves it out of its
        binade); when the result's measured largest magnitude asks for another encoding, the blocks
        are computed again (the base is still there)."""
        import torch

        source = payload.as_tensor(ref)
        n = source.numel()
        space = buffers.take(n * encoding.itemsize, (first.position(ref) if first is not None else None) or 0)
        codes = torch.frombuffer(space, dtype=torch.uint8, count=n) if n else torch.empty(0, dtype=torch.uint8)
        bound = tensor_largest_magnitude(source)
        while True:
            rounder = encoding.rounder(codes, bound)
            amax: list[float] = []
            _, applied = patch_tensor(ref.key, contribs, source, torch.float32, payload.ops, check=True, amax=amax,
                                      encode=rounder)
            largest = amax[0] if amax else 0.0
            if rounder.fits(largest):
                break
            bound = largest
        with stats_lock:
            stats["contributions"] += applied
            stats["tensors"] += 1
        if payload.raw is not None:
            buffers.give(payload.raw)
        return Payload(None, None, True, amax=largest, encoded=rounder.encoded(ref.shape), spare=space)

    def _patch(ref: TensorRef, contribs: Sequence[Contribution], payload: Payload) -> Payload:
        if payload.ops is not None and preparers:
            encoding = block_encoding(ref)
            if encoding is not None:
                return _patch_encoded(ref, contribs, payload, encoding)
        source = payload.as_tensor(ref)
        target = torch_dtype(target_dtype(ref))
        check = True if check_overflow == "always" else None
        amax: list[float] = []
        into = _scratch(source, target) if preparers else None
        out, applied = patch_tensor(ref.key, contribs, source, target, payload.ops, check=check, amax=amax, into=into)
        with stats_lock:
            stats["contributions"] += applied
            stats["tensors"] += 1
        largest = amax[0] if amax else None
        if out is source:  # the read buffer now holds the result
            return Payload(payload.raw, out, True, amax=largest)
        spare = None
        if payload.raw is not None:
            if preparers:  # a sink's encoding (fp8) may go there: in phase with the file, written uncopied
                spare = payload.raw
            else:
                buffers.give(payload.raw)
        return Payload(None, out, True, amax=largest, spare=spare)

    def write(ref: TensorRef | _Run, payload: Payload | memoryview) -> None:
        if isinstance(ref, _Run):
            assert isinstance(payload, memoryview)
            sinks[0].add_run(ref.refs, payload)  # type: ignore[attr-defined]
            buffers.give(payload)
            return
        assert isinstance(payload, Payload)
        for s in sinks:
            s.add(ref, payload)
        for buf in (payload.raw, payload.spare):
            if buf is not None:
                buffers.give(buf)

    stages: dict[str, Callable[..., Any]] = {"read": read, "process": process, "write": write}
    if stage_hook is not None:
        stages = {name: stage_hook(name, fn) for name, fn in stages.items()}
    # Every core patches a tensor of its own, on one torch thread each: row-block GEMMs are too
    # small to share between OpenMP threads (their hand-offs and spinning would take the time
    # the reader and writer threads need). Each tensor's result does not depend on the number.
    workers = max(1, min(default_threads, os.cpu_count() or 1)) if compute_workers is None else compute_workers
    try:
        with frozen_heap():  # the collector would otherwise rescan torch's import-time objects, over and over
            pipeline.run_pipeline(_runs(order, model, sinks, patches), read=stages["read"], process=stages["process"],
                                  write=stages["write"], size=lambda r: r.nbytes,
                                  on_done=(lambda r: progress(r.nbytes)) if progress else None,
                                  budget=pipeline.MAX_INFLIGHT_BYTES, workers=workers)
            files = finalize_all(sinks)  # all outputs of the run, or none
    except BaseException:
        for s in sinks:
            s.abort()
        raise
    finally:
        torch_now = sys.modules.get("torch")
        if torch_now is not None and hasattr(torch_now, "set_num_threads"):  # as it was, or as torch loads
            torch_now.set_num_threads(default_threads)
    return StreamStats(files, stats["contributions"], stats["tensors"], time.perf_counter() - start, len(order))


PairSource: TypeAlias = "ModelSource | TensorSource"
PairKey: TypeAlias = "str | tuple[str, str]"


def stream_pairs(a: PairSource, b: PairSource, keys: Iterable[PairKey],
                 consume: Callable[[str, torch.Tensor, torch.Tensor], None], *,
                 progress: Progress | None = None, budget: int | None = None) -> int:
    """Read two models side by side and hand each pair of tensors to ``consume``, in order.

    One thread reads ahead (both tensors of a key), ``consume(key, tensor_a, tensor_b)`` runs on
    the calling thread; at most ``budget`` bytes are read ahead, so memory holds a few tensors
    whatever the models' size (extract: tuned minus original, module by module).

    Args:
        a: the first model (a :class:`~lora_tools.io.model.ModelSource` or any tensor reader).
        b: the second model.
        keys: a key present in both, or a ``(key_in_a, key_in_b)`` pair; ``consume`` gets the first.
        consume: called once per key, in order, with the two tensors (each owning its memory).
        progress: called with the bytes of both tensors once consumed.
        budget: bytes read ahead at most (default: the pipeline's budget).

    Returns:
        The number of pairs consumed.
    """
    read_a, size_a = _reader(a)
    read_b, size_b = _reader(b)
    items = [(k, k) if isinstance(k, str) else (k[0], k[1]) for k in keys]

    def size(item: tuple[str, str]) -> int:
        return size_a(item[0]) + size_b(item[1])

    def read(item: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
        return read_a(item[0]), read_b(item[1])

    def process(item: tuple[str, str], pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        consume(item[0], pair[0], pair[1])

    pipeline.run_pipeline(items, read=read, process=process, write=lambda item, _: None, size=size,
                          on_done=(lambda item: progress(size(item))) if progress else None,
                          budget=budget if budget is not None else pipeline.MAX_INFLIGHT_BYTES)
    return len(items)


def _reader(src: PairSource) -> tuple[Callable[[str], torch.Tensor], Callable[[str], int]]:
    if isinstance(src, ModelSource):
        return (lambda k: src.read(src.ref(k))), (lambda k: src.ref(k).nbytes)

    def nbytes(k: str) -> int:
        meta = src.meta(k)
        n = DTYPE_SIZES.get(meta.dtype, 4)
        for dim in meta.shape:
            n *= dim
        return n
    return src.tensor, nbytes


__all__ = ["Sink", "StreamStats", "StageHook", "stream", "stream_order", "stream_pairs"]
