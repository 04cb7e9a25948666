"""Overlap reading, maths and writing, with a bounded number of bytes in flight.

One thread reads ahead (plain positional reads release the GIL), the calling thread or a few
worker threads compute (torch releases the GIL), one thread writes in order. Memory stays at
the read-ahead and write-behind budgets plus the tensors being computed, whatever the model size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
W = TypeVar("W")

#: Bytes read ahead, and bytes waiting to be written, at most (each).
MAX_INFLIGHT_BYTES = 96 << 20
#: Items handed to the compute workers ahead, per worker (queued for whichever is free first).
QUEUED_PER_WORKER = 2


def run_pipeline(
    items: Sequence[T],
    *,
    read: Callable[[T], R],
    process: Callable[[T, R], W],
    write: Callable[[T, W], None],
    size: Callable[[T], int],
    on_done: Callable[[T], None] | None = None,
    budget: int = MAX_INFLIGHT_BYTES,
    workers: int = 1,
) -> None:
    """``write(item, process(item, read(item)))`` for every item, in order, overlapped.

    With ``workers`` > 1, that many items are processed at once on threads of their own (their
    ``process`` calls must be independent); with one, on the calling thread. Reads and writes stay
    in order. Items are handed to the workers :data:`QUEUED_PER_WORKER` per worker ahead, as soon as
    they are read: a worker that finishes a small item goes on with the next one while another still
    works on a big one, instead of waiting for the big one to be written first.
    """
    depth = workers * QUEUED_PER_WORKER if workers > 1 else 1
    reads: deque[tuple[T, Future[R]]] = deque()
    procs: deque[tuple[T, Future[W]]] = deque()
    writes: deque[tuple[int, Future[None]]] = deque()
    pending_read = pending_write = 0
    source: Iterable[T] = iter(items)
    exhausted = False
    with ThreadPoolExecutor(1, thread_name_prefix="loratool-read") as reader, \
            ThreadPoolExecutor(max(1, workers), thread_name_prefix="loratool-compute") as computer, \
            ThreadPoolExecutor(1, thread_name_prefix="loratool-write") as writer:

        def start(item: T, data: R) -> Future[W]:
            if workers > 1:
                return computer.submit(process, item, data)
            done: Future[W] = Future()  # one worker: the calling thread processes (no hand-off)
            done.set_result(process(item, data))
            return done

        try:
            while True:
                while not exhausted and (not reads or pending_read < budget):
                    nxt = next(source, None)  # type: ignore[call-overload]
                    if nxt is None:
                        exhausted = True
                        break
                    reads.append((nxt, reader.submit(read, nxt)))
                    pending_read += size(nxt)
                # keep every worker busy: hand them the next items as soon as they are read
                while reads and len(procs) < depth and (not procs or reads[0][1].done()):
                    item, fut = reads.popleft()
                    data = fut.result()
                    pending_read -= size(item)
                    procs.append((item, start(item, data)))
                    del data
                if not procs:
                    break
                item, pf = procs[0]
                if len(procs) < depth and reads and not pf.done():
                    pending: list[Future[Any]] = [pf, reads[0][1]]
                    wait(pending, return_when=FIRST_COMPLETED)
                    if not pf.done():
                        continue  # the next item is read: to a worker first
                procs.popleft()
                result = pf.result()
                n = size(item)
                writes.append((n, writer.submit(write, item, result)))
                del result
                pending_write += n
                while writes and (pending_write > budget or writes[0][1].done()):
                    done_n, wf = writes.popleft()
                    wf.result()
                    pending_write -= done_n
                if on_done is not None:
                    on_done(item)
            while writes:
                writes.popleft()[1].result()
        except BaseException:
            for queue in (reads, procs):
                for _, f in queue:
                    f.cancel()
            for _, wf in writes:
                wf.cancel()
            raise
