"""The cyclic garbage collector kept off the objects that exist before a long run."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_LOCK = threading.Lock()
_DEPTH = 0


@contextmanager
def frozen_heap() -> Iterator[None]:
    """While inside, the objects that existed on entry (torch's and diffusers' ~500k import-time ones) are left out of
    the collector's walks (``gc.freeze``): a collection, automatic or ``gc.collect()`` after a model is dropped,
    walks only what the run made (~0.3 s saved each). Objects made inside are collected as usual. Runs may nest or
    overlap on threads: the objects are handed back (``gc.unfreeze``) when the last one leaves."""
    global _DEPTH
    with _LOCK:
        gc.freeze()
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                gc.unfreeze()


def freeze_loaded() -> None:
    """Inside a :func:`frozen_heap`, leave the objects made since (a module loaded meanwhile: torch, by
    :func:`lora_tools.engine.stream.stream`) out of the collector's walks too; outside, nothing."""
    with _LOCK:
        if _DEPTH > 0:
            gc.freeze()
