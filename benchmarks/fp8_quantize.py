"""Micro-benchmark of the fp8 rounding (``quantize_measured``) on one large fp32 tensor, one torch thread
(as on the engine's compute threads): wall and CPU seconds of the current code, and of another version
of ``lora_tools/io/fp8.py`` given with ``--baseline FILE`` (e.g. ``git show main:lora_tools/io/fp8.py``),
alternated, medians."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from types import ModuleType


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("fp8_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    import torch

    from lora_tools.io import fp8

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--elements", type=int, default=100_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--form", choices=("scaled", "plain"), default="scaled")
    ap.add_argument("--baseline", help="another fp8.py to time against")
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = torch.randn(args.elements, generator=torch.Generator().manual_seed(0)) * 0.02
    amax = float(w.abs().max())
    versions = {"current": fp8} | ({"baseline": _load(args.baseline)} if args.baseline else {})
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in versions}
    for _ in range(args.reps):
        for name, mod in versions.items():
            t0, c0 = time.perf_counter(), time.process_time()
            mod.quantize_measured(w, args.form, amax=amax)
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    for name, ts in times.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        print(f"{name:9s} {args.form}: wall {wall:.2f} s, cpu {cpu:.2f} s, {cpu / args.elements * 1e9:.2f} ns/element")


if __name__ == "__main__":
    main()
