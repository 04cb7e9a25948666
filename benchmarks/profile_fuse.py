#!/usr/bin/env python
"""Where does ``loratool fuse`` spend its time and memory?  (Diagnostic, not a test.)

Runs the library's own ``plan_fuse`` + ``run_fuse`` in this process, with:

- phase wall times: imports, planning (and ``_check_finite`` inside it), the streaming run;
- per-stage busy time of the engine's three stages (read thread, compute thread, write
  thread), in wall and thread-CPU seconds, through the engine's ``stage_hook`` (no copy of its loop);
- an RSS sampler (``/proc/self/statm`` every 10 ms): peak RSS per phase, and the in-flight bytes
  of the pipeline at the moment of the peak.

Optional experiments change the library *at runtime only* (monkeypatching, nothing on disk) to
measure suggested fixes:

  --finite-sum      NaN/Inf checks as ``isfinite(t.sum())`` instead of ``isfinite(t).all()``
  --no-hash         outputs written without the streaming sha256
  --budget MB       the pipeline's read-ahead / write-behind budget
  --block-elems N   the library's row-block size for the patch maths (fp32 elements)
  --threads N       force torch's intra-op threads (the library uses cores - 1)
  --no-mallopt      skip the library's return_freed_memory() (glibc's dynamic mmap threshold)
  --dtype fp8       profile the fp8 fuse (any of the fuse's --dtype values)
  --direct on|off   outputs written with O_DIRECT forced on / off (the library's StreamingWriter
                    switch; default: the library's own choice)

Malloc behaviour can be tried with glibc's environment variables, e.g.
``MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=0``.

Example:
    python benchmarks/profile_fuse.py benchmarks/.cache/full/sdxl-full-fp16.safetensors \\
        --lightning-dir benchmarks/.cache/full/lightning -o benchmarks/.cache/full/out/prof.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, os.environ.get("FUSE_SDXL_LIBRARY_ROOT", str(Path(__file__).resolve().parent.parent)))

PAGE = os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.peak = 0
        self.peak_state: dict[str, object] = {}
        self.state: dict[str, object] = {}
        self._halt = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        r = self.rss()
        if r > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = r
        if r > self.peak:
            self.peak = r
            self.peak_state = dict(self.state, phase=self.phase)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--lightning-dir", required=True)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--save", default="checkpoint", choices=["checkpoint", "unet"])
    ap.add_argument("--dtype", default="keep", help="the fuse's --dtype (e.g. fp8)")
    ap.add_argument("--finite-sum", action="store_true")
    ap.add_argument("--no-hash", action="store_true")
    ap.add_argument("--budget", type=int, default=None, help="MB read-ahead / write-behind")
    ap.add_argument("--direct", choices=["auto", "on", "off"], default="auto",
                    help="StreamingWriter(direct=...) for the outputs: the library's default, O_DIRECT forced on, or off")
    ap.add_argument("--block-elems", type=int, default=None, help="lora_tools.engine.patch.BLOCK_ELEMS (fp32 elements per row block)")
    ap.add_argument("--threads", type=int, default=None, help="force torch's intra-op threads (ignores the library's choice)")
    ap.add_argument("--no-mallopt", action="store_true", help="skip the library's mallopt (fixed 1 MiB mmap threshold)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from fuse_sdxl import cpu_busy_seconds  # the benchmark's /proc/stat reader

    busy0 = cpu_busy_seconds()
    sampler = RssSampler()
    sampler.start()
    sampler.phase = "import"
    import torch  # noqa: F401

    import lora_tools.engine.patch as PT
    import lora_tools.engine.pipeline as S
    import lora_tools.ops.fuse as F
    import lora_tools.ops.fuse_plan as FP
    import lora_tools.output.sinks as O
    t_import = time.perf_counter()
    out: dict[str, object] = {"import_s": t_import - T0, "rss_after_import": sampler.rss()}

    # ---- experiments (runtime patches only) ------------------------------------------------
    if args.finite_sum:
        real_isfinite = torch.isfinite

        def isfinite(t):  # type: ignore[no-untyped-def]
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1:
                return real_isfinite(t.sum(dtype=torch.float32))
            return real_isfinite(t)
        torch.isfinite = isfinite  # type: ignore[assignment]
    if args.no_hash or args.direct != "auto":
        import dataclasses

        real_writer = O.StreamingWriter
        if args.direct != "auto" and "direct" not in {f.name for f in dataclasses.fields(real_writer)}:
            raise SystemExit("this lora_tools has no StreamingWriter(direct=...) switch")

        def writer(*a, **k):  # type: ignore[no-untyped-def]
            if args.no_hash:
                k["hash"] = False
            if args.direct != "auto":
                k["direct"] = args.direct == "on"
            return real_writer(*a, **k)
        O.StreamingWriter = writer  # type: ignore[assignment,misc]
    if args.block_elems:
        PT.BLOCK_ELEMS = args.block_elems
    if args.threads:
        real_set = torch.set_num_threads
        real_set(args.threads)
        torch.set_num_threads = lambda n: None  # type: ignore[assignment]
    if args.no_mallopt and hasattr(F, "return_freed_memory"):
        F.return_freed_memory = lambda *a, **k: True  # type: ignore[attr-defined]
    if args.budget:
        S.MAX_INFLIGHT_BYTES = args.budget << 20  # the engine reads it at each stream

    # ---- instrument the engine's stages ----------------------------------------------------
    stages = {n: {"wall": 0.0, "cpu": 0.0, "calls": 0} for n in ("read", "process", "write")}
    inflight = {"read_bytes": 0, "process_bytes": 0, "write_bytes": 0}
    lock = threading.Lock()

    def timed(name, fn):  # type: ignore[no-untyped-def]
        key = f"{name}_bytes"

        def wrapper(*a):  # type: ignore[no-untyped-def]
            n = a[0].nbytes
            with lock:
                inflight[key] += n
                sampler.state = dict(inflight)
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a)
            finally:
                st = stages[name]
                st["wall"] += time.perf_counter() - w0
                st["cpu"] += time.thread_time() - c0
                st["calls"] += 1
                with lock:
                    inflight[key] -= n
                    sampler.state = dict(inflight)
        return wrapper

    check_s = [0.0]
    real_check = FP._check_finite

    def check_finite(adapter):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return real_check(adapter)
        finally:
            check_s[0] += time.perf_counter() - t
    FP._check_finite = check_finite

    # ---- plan + run ---------------------------------------------------------------------
    sampler.phase = "plan"
    t = time.perf_counter()
    plan = FP.plan_fuse(args.base, "lightning-4step", preset_dir=args.lightning_dir, saves=(args.save,),
                        output=args.output, overwrite=True, dtype=args.dtype)
    out["plan_s"] = time.perf_counter() - t
    out["check_finite_s"] = check_s[0]
    out["rss_after_plan"] = sampler.rss()
    sampler.phase = "run"
    t = time.perf_counter()
    try:
        res = F.run_fuse(plan, stage_hook=timed)
    finally:
        plan.close()
    out["run_s"] = time.perf_counter() - t
    out["total_s"] = time.perf_counter() - T0
    sampler.stop()
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = ru.ru_utime + ru.ru_stime
    out["other_busy_cores"] = max(0.0, cpu_busy_seconds() - busy0 - out["cpu_s"]) / out["total_s"]  # type: ignore[operator]
    out["tensors_patched"] = res.tensors_patched
    out["stages"] = {k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in stages.items()}
    out["peak_rss"] = sampler.peak
    out["peak_rss_by_phase"] = sampler.peaks
    out["inflight_at_peak"] = sampler.peak_state
    out["experiments"] = {k: getattr(args, k) for k in ("finite_sum", "no_hash", "budget", "direct", "no_mallopt", "threads", "block_elems")}
    out["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if args.json:
        print(json.dumps(out))
    else:
        mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
        print(f"import {out['import_s']:.1f} s | plan {out['plan_s']:.1f} s (check_finite {out['check_finite_s']:.1f} s) | "
              f"run {out['run_s']:.1f} s | total {out['total_s']:.1f} s | process CPU {out['cpu_s']:.1f} s | "
              f"other busy cores {out['other_busy_cores']:.2f}")
        for k, v in out["stages"].items():  # type: ignore[union-attr]
            print(f"  {k:<8} wall {v['wall']:6.1f} s  thread-cpu {v['cpu']:6.1f} s  calls {v['calls']:.0f}")
        print(f"RSS after import {mib(out['rss_after_import'])}, after plan {mib(out['rss_after_plan'])}, "  # type: ignore[arg-type]
              f"peak {mib(sampler.peak)} ({', '.join(f'{k} {mib(v)}' for k, v in sampler.peaks.items())})")
        print(f"in flight at the peak: {sampler.peak_state}")


if __name__ == "__main__":
    main()
