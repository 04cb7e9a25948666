"""torch, loaded beside work that does not need it.

``import torch`` holds the interpreter for about a second. A stream starts it on a thread of its own
and reads and writes the untouched tensors meanwhile (plain reads and O_DIRECT writes let the
interpreter go); the first patched tensor waits for it.
"""

from __future__ import annotations

import os
import sys
import threading

from lora_tools.heap import freeze_loaded


def start_loading_torch() -> int:
    """Start loading torch on a thread of its own, unless it is loaded (what it loads joins the frozen heap);
    return torch's thread count: the calling thread's when loaded, else what torch will take by default
    (``OMP_NUM_THREADS``, else the physical cores)."""
    loaded = sys.modules.get("torch")
    if loaded is not None and hasattr(loaded, "get_num_threads"):
        return int(loaded.get_num_threads())

    def load() -> None:
        try:
            import torch  # noqa: F401
        except BaseException:  # noqa: BLE001 - the first tensor that needs torch raises it again, where it is handled
            return
        freeze_loaded()

    threading.Thread(target=load, name="loratool-import-torch", daemon=True).start()
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or physical_cores()


def physical_cores() -> int:
    """The cores this process may run on, one per physical core (what torch's default thread count is)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    groups = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                groups.add(f.read().strip())
        except OSError:
            groups.add(str(cpu))
    return max(1, len(groups))


__all__ = ["physical_cores", "start_loading_torch"]
