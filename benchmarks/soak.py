#!/usr/bin/env python
"""Soak benchmark: many fuse and LoRA-op jobs in one process, in a loop and two at a time (not a test).

Every job is a real ``loratool`` command run in this process (``cli.main``), on tiny synthetic
SDXL inputs: ``fuse`` (checkpoint, with ``--verify-output``), ``fuse --save unet``, ``rescale``,
``resize``, ``merge``, ``convert`` and ``extract``, cycled. After each job:

- its output must pass :func:`lora_tools.ops.check.check_file` with ``hash_data=True`` (header
  rules, data length, the record's hashes, finite values), the output folder must hold nothing but
  the output (no temp file), and the output is then deleted (disk use stays bounded);
- the process's resident memory (``VmRSS``, after ``gc.collect()``) is sampled.

Phase ``loop`` runs ``--jobs`` jobs one after another; phase ``pairs`` runs ``--pair-jobs`` more
(default: ``--jobs``), two at a time in two threads. RSS counts as flat when, past a warm-up of ``--warmup`` jobs per phase, it
grows by less than ``--max-growth-mib`` from the first sample after the warm-up to the largest
later one. Exit status 1 when an output fails its check, a job fails, a temp file is left, or RSS
is not flat.

Usage:
    python benchmarks/soak.py                       # 50 jobs per phase
    python benchmarks/soak.py --jobs 14 --warmup 7  # a smaller run on a busy machine
    python benchmarks/soak.py --pair-jobs 25        # 50 in the loop, 25 two at a time
    python benchmarks/soak.py --json soak.json      # also write the figures as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lora_tools.cli import cli
from lora_tools.ops.check import check_file
from lora_tools.testing.synthetic import write_checkpoint
from lora_tools.testing.synthetic_lora import write_lora


def rss_mib() -> float:
    """This process's resident set size in MiB (``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@dataclass(frozen=True)
class Inputs:
    base: Path
    lora_a: Path
    lora_b: Path
    tuned: Path


def build_inputs(root: Path) -> Inputs:
    base = write_checkpoint(root / "base.safetensors", "tiny", dtype="fp16", components=("unet",))
    lora_a = write_lora(root / "style-a.safetensors", "tiny", rank=4, seed=1)
    lora_b = write_lora(root / "style-b.safetensors", "tiny", rank=4, seed=2)
    tuned = root / "tuned.safetensors"
    _run(["fuse", str(base), "--lora", str(lora_a), "-o", str(tuned), "-q"])
    return Inputs(base, lora_a, lora_b, tuned)


#: job kind -> argv writing ``out`` from the inputs
JOBS: dict[str, Callable[[Inputs, Path], list[str]]] = {
    "fuse": lambda i, out: ["fuse", str(i.base), "--lora", f"{i.lora_a}:0.8", "-o", str(out), "-q", "--verify-output"],
    "fuse-unet": lambda i, out: ["fuse", str(i.base), "--lora", str(i.lora_b), "--save", "unet", "-o", str(out), "-q"],
    "rescale": lambda i, out: ["rescale", str(i.lora_a), "--strength", "0.5", "-o", str(out)],
    "resize": lambda i, out: ["resize", str(i.lora_a), "--rank", "2", "-o", str(out)],
    "merge": lambda i, out: ["merge", str(i.lora_a), f"{i.lora_b}:0.5", "-o", str(out)],
    "convert": lambda i, out: ["convert", str(i.lora_a), "--to", "peft", "-o", str(out)],
    "extract": lambda i, out: ["extract", str(i.tuned), str(i.base), "--rank", "2", "-o", str(out)],
}


def _run(argv: list[str]) -> None:
    """One ``loratool`` command in this process; raises when it does not succeed."""
    try:
        cli.main(argv, prog_name="loratool", standalone_mode=False)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"loratool {argv[0]} exited {e.code}") from None


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    rss: list[float] = field(default_factory=list)  # MiB after each job, in finishing order
    failures: list[str] = field(default_factory=list)
    verified: int = 0  # jobs whose output passed check_file(hash_data=True) and left nothing else
    job_seconds: dict[str, list[float]] = field(default_factory=dict)  # kind -> wall time of each job


def one_job(n: int, kind: str, inputs: Inputs, root: Path, phase: Phase, lock: threading.Lock) -> None:
    folder = root / f"job-{phase.name}-{n:03d}"
    folder.mkdir()
    out = folder / f"{kind}.safetensors"
    start = time.perf_counter()
    try:
        _run(JOBS[kind](inputs, out))
        result = check_file(out, hash_data=True)
        left = sorted(p.name for p in folder.iterdir() if p != out)
        problems = result.problems + ([f"left behind: {', '.join(left)}"] if left else [])
    except Exception as e:  # noqa: BLE001 - a soak reports every failure and goes on
        problems = [f"{type(e).__name__}: {e}"]
    shutil.rmtree(folder, ignore_errors=True)
    gc.collect()
    with lock:
        phase.job_seconds.setdefault(kind, []).append(time.perf_counter() - start)
        phase.rss.append(rss_mib())
        phase.failures += [f"{phase.name} job {n} ({kind}): {p}" for p in problems]
        phase.verified += not problems


def run_phase(name: str, jobs: int, workers: int, inputs: Inputs, root: Path) -> Phase:
    phase, lock = Phase(name), threading.Lock()
    kinds = list(JOBS)
    start = time.perf_counter()
    if workers == 1:
        for n in range(jobs):
            one_job(n, kinds[n % len(kinds)], inputs, root, phase, lock)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="soak") as pool:
            for f in [pool.submit(one_job, n, kinds[n % len(kinds)], inputs, root, phase, lock) for n in range(jobs)]:
                f.result()
    phase.seconds = time.perf_counter() - start
    return phase


def growth(rss: list[float], warmup: int) -> float:
    """RSS growth past the warm-up: the largest later sample minus the first one after it."""
    settled = rss[warmup:]
    return max(settled) - settled[0] if len(settled) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=50, help="jobs per phase (default 50)")
    ap.add_argument("--pair-jobs", type=int, help="jobs of the two-at-a-time phase (default: --jobs)")
    ap.add_argument("--warmup", type=int, default=14, help="jobs per phase before RSS must stay flat (default 14: two cycles)")
    ap.add_argument("--max-growth-mib", type=float, default=32.0, help="RSS growth past the warm-up that counts as flat")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args(argv)
    pair_jobs = args.jobs if args.pair_jobs is None else args.pair_jobs
    if min(args.jobs, pair_jobs) <= args.warmup:
        ap.error("--jobs and --pair-jobs must be larger than --warmup")

    root = Path(tempfile.mkdtemp(prefix="loratool-soak-"))
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # the commands' summaries; errors still reach stderr
            inputs = build_inputs(root)
            rss_start = rss_mib()
            phases = [run_phase("loop", args.jobs, 1, inputs, root), run_phase("pairs", pair_jobs, 2, inputs, root)]
        stray = sorted(p.name for p in root.iterdir() if p.name not in {x.name for x in vars(inputs).values()})
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ok = not stray
    report: dict[str, object] = {"jobs_per_phase": {"loop": args.jobs, "pairs": pair_jobs}, "warmup": args.warmup, "rss_start_mib": round(rss_start, 1),
                                 "job_kinds": list(JOBS), "stray_files": stray, "phases": {}}
    print(f"soak: {args.jobs} jobs in a loop, {pair_jobs} two at a time ({', '.join(JOBS)}), "
          f"RSS at start {rss_start:.0f} MiB")
    for p in phases:
        g = growth(p.rss, args.warmup)
        flat = g < args.max_growth_mib
        ok = ok and flat and not p.failures
        report["phases"][p.name] = {  # type: ignore[index]
            "seconds": round(p.seconds, 1), "jobs_per_second": round(len(p.rss) / p.seconds, 2),
            "rss_first_mib": round(p.rss[0], 1), "rss_after_warmup_mib": round(p.rss[args.warmup], 1),
            "rss_max_mib": round(max(p.rss), 1), "rss_last_mib": round(p.rss[-1], 1),
            "growth_after_warmup_mib": round(g, 1), "flat": flat, "verified": p.verified, "failures": p.failures,
            "median_job_seconds": {k: round(statistics.median(v), 2) for k, v in p.job_seconds.items()}}
        print(f"  {p.name:<5}: {len(p.rss)} jobs in {p.seconds:.1f} s; RSS first {p.rss[0]:.0f} MiB, after warm-up "
              f"{p.rss[args.warmup]:.0f}, max {max(p.rss):.0f}, last {p.rss[-1]:.0f}; growth past warm-up {g:.1f} MiB "
              f"({'flat' if flat else 'NOT FLAT'}); {p.verified} of {len(p.rss)} outputs verified, {len(p.failures)} failed")
        print("         median s per job: " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in p.job_seconds.items()))
        for f in p.failures[:10]:
            print(f"    {f}")
    if stray:
        print(f"  stray files in the work folder: {', '.join(stray)}")
    print("soak: OK" if ok else "soak: FAILED")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
