#!/usr/bin/env python
"""Benchmark: resize, svd merge and extract on full-size Lightning-shaped inputs, ours vs dense (not a test).

Inputs (built once, cached under ``<cache-dir>/<size>/``, like ``fuse_sdxl.py``'s):
  the synthetic SDXL checkpoint ``sdxl-<size>-fp16.safetensors``; two Lightning-shaped LoRAs (788 UNet
  modules at full size, rank 64, from ``lora_tools.testing``'s builders, seeds 0 and 1); the "tuned"
  checkpoint: the base with the first LoRA fused in at 1.0 by ``loratool fuse``.

Each job runs in its own process (its peak RSS is its ``ru_maxrss``, from a small launcher), and each
operation is measured against the dense approach in the same run:

  resize          every module rank 64 -> 16 (``resize_lora``: QR of the factors, SVD of the 64 x 64 core)
  resize-dense    kohya's ``resize_lora.py`` way: each module's dense delta and its full SVD
  merge           svd merge of the two LoRAs to rank 64 (``merge_loras(method="svd")``: stacked factors)
  merge-dense     the dense weighted sum of both deltas and its full SVD
  extract         ``extract_lora(tuned, base, rank 64)``: both checkpoints streamed through the engine,
                  full SVD for small differences, randomized (``torch.svd_lowrank``) for large ones,
                  the error measured on the residual
  extract-dense   every module's difference read and factorised by full SVD

The dense jobs run on a fixed sample of modules (every ``--dense-every``-th, in a fixed shuffled order,
cut after ``--dense-seconds``) and are scaled to the whole model by the SVD cost model
``sum(out * in * min(out, in))`` (all modules / the modules done); on the
same sample they check our results against the dense ones: the singular values resize and merge
keep (they must be the dense ones: Eckart-Young), and extract's measured error against the optimal
rank-64 error of the dense SVD.

Usage:
    python benchmarks/lora_ops.py                  # full size (the integrator's run; under 6 minutes)
    python benchmarks/lora_ops.py --size tiny      # smoke run, seconds
Writes the markdown table to ``benchmarks/LORA_OPS.md`` (full size) or ``<cache-dir>/tiny/LORA_OPS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MARK = "@@lora_ops "
GB = 1 << 30
LORA_A = "sdxl_lightning_4step_lora.safetensors"
LORA_B = "lightning_shaped_seed1.safetensors"
RANK_IN = 64

#: A fresh, small interpreter forks the job and reports wait4's rusage (a child forked from this
#: process would start its ru_maxrss at this process's size).
_LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write('%d' % ru.ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


# --------------------------------------------------------------------------------------------
# inputs


@dataclass
class Inputs:
    root: Path
    base: Path
    lora_a: Path
    lora_b: Path
    tuned: Path


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_inputs(cache: Path, size: str) -> Inputs:
    root = cache / size
    inp = Inputs(root, root / f"sdxl-{size}-fp16.safetensors", root / "lightning" / LORA_A,
                 root / "lightning" / LORA_B, root / f"sdxl-{size}-fp16-lightning-fused.safetensors")
    inp.lora_a.parent.mkdir(parents=True, exist_ok=True)
    if not inp.base.exists():
        from lora_tools.testing.synthetic import write_checkpoint

        _say(f"building {inp.base} (synthetic SDXL, fp16) ...")
        write_checkpoint(inp.base, size, dtype="fp16")  # type: ignore[arg-type]
    if not inp.lora_a.exists():
        from lora_tools.testing.synthetic_lora import write_lightning_lora

        _say(f"building {inp.lora_a} (Lightning-shaped LoRA, seed 0) ...")
        write_lightning_lora(inp.lora_a, size, seed=0)  # type: ignore[arg-type]
    if not inp.lora_b.exists():
        from lora_tools.testing.synthetic_lora import write_lightning_lora

        _say(f"building {inp.lora_b} (Lightning-shaped LoRA, seed 1) ...")
        write_lightning_lora(inp.lora_b, size, seed=1)  # type: ignore[arg-type]
    if not inp.tuned.exists():
        _say(f"building {inp.tuned} (loratool fuse of the base with the first LoRA) ...")
        subprocess.run([sys.executable, "-m", "lora_tools", "fuse", str(inp.base), "--lora", str(inp.lora_a),
                        "-o", str(inp.tuned), "-q"], check=True, env=_env(), cwd=REPO)
    return inp


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# --------------------------------------------------------------------------------------------
# jobs (each in its own process)


def _cost(shape: tuple[int, ...]) -> float:
    """Dense SVD cost model of a weight of this shape: ``out * in * min(out, in)``."""
    out, inn = shape[0], 1
    for d in shape[1:]:
        inn *= d
    return float(out) * inn * min(out, inn)


def _pairs(path: Path) -> list[tuple[str, object, object, float]]:
    """``(name, up, down, scale)`` of every module, 2-D float32 (the LoRA is read in full)."""
    from lora_tools.lora.load import load_lora
    from lora_tools.lora.pairs import pair_of

    with load_lora(path) as lora:
        out = []
        for m in lora.modules:
            p = pair_of(m)
            out.append((m.name, p.up, p.down, p.scale))
    return out


def _emit(result: dict[str, object]) -> None:
    print(MARK + json.dumps(result), flush=True)


def job_resize(inp: Inputs, args: argparse.Namespace) -> None:
    from lora_tools.lora.load import load_lora
    from lora_tools.lora.lowrank import RankRule
    from lora_tools.ops.resize import resize_lora

    with load_lora(inp.lora_a) as lora:
        for m in lora.modules:  # read the factors before the clock starts: the maths is measured
            m.factor("up"), m.factor("down")
        t = time.perf_counter()
        _, report = resize_lora(lora, RankRule(rank=args.rank))
        seconds = time.perf_counter() - t
    _emit({"op_s": seconds, "modules": len(report.modules), "retained_energy": report.retained_energy,
           "max_relative_error": report.max_relative_error})


def _sample(n: int, every: int) -> list[int]:
    """Every `every`-th module, in a fixed shuffled order (so a prefix cut by the time budget is
    still spread over the whole model)."""
    import random

    picked = list(range(0, n, max(1, every)))
    random.Random(0).shuffle(picked)
    return picked


def _timed(sample: list[int], budget: float, work) -> tuple[list[int], float]:  # type: ignore[no-untyped-def]
    """Run ``work(i)`` over the sample until `budget` seconds are spent (at least 3 modules);
    the modules done and the seconds taken."""
    done: list[int] = []
    t = time.perf_counter()
    for i in sample:
        work(i)
        done.append(i)
        if len(done) >= 3 and time.perf_counter() - t >= budget:
            break
    return done, time.perf_counter() - t


def job_resize_dense(inp: Inputs, args: argparse.Namespace) -> None:
    import torch

    from lora_tools.lora.lowrank import RankRule, truncate

    mods = _pairs(inp.lora_a)
    sample = _sample(len(mods), args.dense_every)
    costs = [_cost((u.shape[0], d.shape[1])) for _, u, d, _ in mods]  # type: ignore[attr-defined]
    dense_s = {}

    def work(i: int) -> None:
        _, u, d, s = mods[i]
        dense_s[i] = torch.linalg.svd(s * (u @ d), full_matrices=False)[1]  # type: ignore[operator]

    sample, seconds = _timed(sample, args.dense_seconds, work)
    worst = 0.0
    for i in sample:  # our truncation keeps the dense singular values
        _, u, d, s = mods[i]
        ours = truncate(u, d, RankRule(rank=args.rank), scale=s)  # type: ignore[arg-type]
        k = ours.singular_values.numel()
        worst = max(worst, float((ours.singular_values - dense_s[i][:k]).abs().max() / dense_s[i][0]))
    factor = sum(costs) / sum(costs[i] for i in sample)
    _emit({"op_s": seconds * factor, "sample_s": seconds, "sample": f"{len(sample)} of {len(mods)} modules, x{factor:.1f}",
           "check": f"singular values kept = dense ones within {worst:.1e} (relative to the largest)", "worst": worst})


def job_merge(inp: Inputs, args: argparse.Namespace) -> None:
    from lora_tools.lora.load import load_lora
    from lora_tools.lora.lowrank import RankRule
    from lora_tools.ops.merge import WeightedLora, merge_loras

    with load_lora(inp.lora_a) as a, load_lora(inp.lora_b) as b:
        for lora in (a, b):
            for m in lora.modules:
                m.factor("up"), m.factor("down")
        t = time.perf_counter()
        _, report = merge_loras([WeightedLora(a, 1.0, "a"), WeightedLora(b, 0.5, "b")], method="svd",
                                rule=RankRule(rank=RANK_IN))
        seconds = time.perf_counter() - t
    assert report is not None
    _emit({"op_s": seconds, "modules": len(report.modules), "retained_energy": report.retained_energy,
           "max_relative_error": report.max_relative_error})


def job_merge_dense(inp: Inputs, args: argparse.Namespace) -> None:
    import torch

    from lora_tools.lora.lowrank import RankRule, stack_factors, truncate

    a, b = _pairs(inp.lora_a), _pairs(inp.lora_b)
    sample = _sample(len(a), args.dense_every)
    costs = [_cost((u.shape[0], d.shape[1])) for _, u, d, _ in a]  # type: ignore[attr-defined]
    dense_s = {}

    def work(i: int) -> None:
        (_, ua, da, sa), (_, ub, db, sb) = a[i], b[i]
        dense_s[i] = torch.linalg.svd(sa * (ua @ da) + 0.5 * sb * (ub @ db), full_matrices=False)[1]  # type: ignore[operator]

    sample, seconds = _timed(sample, args.dense_seconds, work)
    worst = 0.0
    for i in sample:
        (_, ua, da, sa), (_, ub, db, sb) = a[i], b[i]
        up, down = stack_factors([(ua, da, sa), (ub, db, 0.5 * sb)])  # type: ignore[list-item]
        ours = truncate(up, down, RankRule(rank=RANK_IN))
        k = ours.singular_values.numel()
        worst = max(worst, float((ours.singular_values - dense_s[i][:k]).abs().max() / dense_s[i][0]))
    factor = sum(costs) / sum(costs[i] for i in sample)
    _emit({"op_s": seconds * factor, "sample_s": seconds, "sample": f"{len(sample)} of {len(a)} modules, x{factor:.1f}",
           "check": f"singular values = dense ones within {worst:.1e} (relative to the largest)", "worst": worst})


def job_extract(inp: Inputs, args: argparse.Namespace) -> None:
    from lora_tools.lora.lowrank import RankRule
    from lora_tools.ops.extract import extract_lora

    t = time.perf_counter()
    res = extract_lora(inp.tuned, inp.base, RankRule(rank=RANK_IN))
    seconds = time.perf_counter() - t
    rep = res.report
    methods = sorted({m.method for m in rep.modules})
    _emit({"op_s": seconds, "modules": len(rep.modules), "identical": res.identical,
           "retained_energy": rep.retained_energy, "max_relative_error": rep.max_relative_error,
           "methods": {k: sum(m.method == k for m in rep.modules) for k in methods}})


def job_extract_dense(inp: Inputs, args: argparse.Namespace) -> None:
    import torch

    from lora_tools.engine.differences import paired_targets, target_weight
    from lora_tools.io.model import open_model
    from lora_tools.lora.lowrank import RankRule, dense_svd

    names = {name for name, *_ in _pairs(inp.lora_a)}
    from lora_tools.layouts.targets import TargetIndex

    with open_model(inp.tuned) as a, open_model(inp.base) as b:
        index = TargetIndex(a.cfg.table)
        wanted = {(t.sgm_key, t.part) for n in names if (t := index.lookup("unet", n)) is not None}
        targets = [t for t in paired_targets(a, b, ["unet"], ("tuned", "base")) if (t.sgm_key, t.part) in wanted]
        sample = _sample(len(targets), args.dense_every)
        costs = [_cost(tuple(t.shape)) for t in targets]
        diffs, dense_err = {}, {}

        def work(i: int) -> None:
            t = targets[i]
            d = (target_weight(a, t) - target_weight(b, t)).reshape(t.shape[0], -1)
            s = torch.linalg.svd(d, full_matrices=False)[1]
            dense_err[i] = float(s[RANK_IN:].double().norm())
            diffs[i] = d

        sample, seconds = _timed(sample, args.dense_seconds, work)
    ratio = 1.0
    for i in sample:  # our factorisation's measured error vs the optimal (dense) one
        ours = dense_svd(diffs[i], RankRule(rank=RANK_IN))
        if dense_err[i] > 0:
            ratio = max(ratio, ours.error / dense_err[i])
    factor = sum(costs) / sum(costs[i] for i in sample)
    _emit({"op_s": seconds * factor, "sample_s": seconds,
           "sample": f"{len(sample)} of {len(targets)} modules, x{factor:.1f}",
           "check": f"our measured error <= {ratio:.3f} x the optimal rank-{RANK_IN} error", "worst": ratio})


JOBS = {"resize": job_resize, "resize-dense": job_resize_dense, "merge": job_merge, "merge-dense": job_merge_dense,
        "extract": job_extract, "extract-dense": job_extract_dense}


def run_job(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    inp = ensure_inputs(args.cache_dir, args.size)
    JOBS[args.job](inp, args)


# --------------------------------------------------------------------------------------------
# the run


def baseline_root(cache: Path, rev: str) -> Path:
    """lora_tools/ as it was at git revision ``rev`` (``git archive``), for the before/after jobs."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"--baseline {rev}: not a commit of this repository")
    root = cache / "snapshots" / f"rev-{sha.stdout.strip()[:12]}"
    if not (root / "lora_tools").is_dir():
        tmp = root.with_name(root.name + ".tmp")
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha.stdout.strip(), "lora_tools"], cwd=REPO, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        tmp.rename(root)
    return root


def measure(name: str, args: argparse.Namespace, log_dir: Path, library: Path | None = None,
            label: str | None = None) -> dict[str, object]:
    """Run one job in a fresh process: its result, wall time and peak RSS (``library``: import
    lora_tools from there instead of this checkout)."""
    label = label or name
    rss_file = log_dir / f"{label}.rss"
    env = _env()
    if library is not None:
        env["PYTHONPATH"] = str(library)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", name, "--size", args.size,
           "--cache-dir", str(args.cache_dir), "--threads", str(args.threads), "--rank", str(args.rank),
           "--dense-every", str(args.dense_every), "--dense-seconds", str(args.dense_seconds)]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(rss_file), *cmd], capture_output=True,
                          text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    (log_dir / f"{label}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"job {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith(MARK))
    result: dict[str, object] = json.loads(line[len(MARK):])
    kb = int(rss_file.read_text().split()[-1])
    result.update(wall_s=wall, peak_rss=kb * (1 if sys.platform == "darwin" else 1024))
    _say(f"{label}: {result['op_s']:.2f} s (job {wall:.1f} s, peak RSS {result['peak_rss'] / GB:.2f} GB, "
         f"load {os.getloadavg()[0]:.1f})")
    return result


def _gb(n: object) -> str:
    return f"{int(n) / GB:.2f} GB"  # type: ignore[call-overload]


def _times(x: float) -> str:
    return f"{x:.1f}x" if x < 10 else f"{x:.0f}x"


def table(res: dict[str, dict[str, object]], args: argparse.Namespace) -> str:
    rows = [("resize 64 -> 16", "resize", "resize-dense"), ("svd merge of two LoRAs to rank 64", "merge", "merge-dense"),
            ("extract at rank 64 (tuned - base)", "extract", "extract-dense")]
    lines = ["| operation | ours (s) | dense (s) | speedup | ours: peak RSS | ours: fit | dense sample (scaled) | check on the sample |",
             "|---|---:|---:|---:|---:|---|---|---|"]
    for label, ours, dense in rows:
        o, d = res[ours], res[dense]
        fit = f"retained {float(o['retained_energy']):.4f}, max rel. error {float(o['max_relative_error']):.3g}"  # type: ignore[arg-type]
        if ours == "extract":
            fit += ", " + ", ".join(f"{v} {k}" for k, v in o["methods"].items())  # type: ignore[attr-defined]
        lines.append(f"| {label} | {float(o['op_s']):.2f} | {float(d['op_s']):.1f} | "  # type: ignore[arg-type]
                     f"{_times(float(d['op_s']) / max(float(o['op_s']), 1e-9))} | {_gb(o['peak_rss'])} | {fit} | "  # type: ignore[arg-type]
                     f"{d['sample']} | {d['check']} |")
    return "\n".join(lines)


def goals(res: dict[str, dict[str, object]]) -> list[str]:
    r, rd, e = float(res["resize"]["op_s"]), float(res["resize-dense"]["op_s"]), res["extract"]  # type: ignore[arg-type]
    return [f"- resize of the Lightning LoRA in under 10 s: {r:.2f} s ({'met' if r < 10 else 'NOT met'})",
            f"- resize at least 20x faster than dense: {_times(rd / r)} ({'met' if rd / r >= 20 else 'NOT met'})",
            f"- extract streaming, peak RSS under 2 GB: {_gb(e['peak_rss'])} "
            f"({'met' if int(e['peak_rss']) < 2 * GB else 'NOT met'})"]  # type: ignore[call-overload]


def before_after(res: dict[str, dict[str, object]], before: dict[str, dict[str, object]], rev: str) -> str:
    """Issue 23: the same operations with the library at ``rev``, measured alternately in this run."""
    lines = [f"Before/after (issue 23), lora_tools at `{rev}` vs now, alternating in this run:", "",
             "| operation | before (s) | now (s) | speedup | before: peak RSS | now: peak RSS | before: fit | now: fit | goal |",
             "|---|---:|---:|---:|---:|---:|---|---|---|"]
    goal = {"merge": 8.0, "extract": 60.0}
    for name, b in before.items():
        o = res[name]
        ob, oo = float(b["op_s"]), float(o["op_s"])  # type: ignore[arg-type]

        def fit(x: dict[str, object]) -> str:
            return f"retained {float(x['retained_energy']):.6f}, max rel. error {float(x['max_relative_error']):.4g}"  # type: ignore[arg-type]
        lines.append(f"| {name} | {ob:.2f} | {oo:.2f} | {ob / max(oo, 1e-9):.2f}x | {_gb(b['peak_rss'])} | {_gb(o['peak_rss'])} | "
                     f"{fit(b)} | {fit(o)} | <= {goal[name]:.0f} s: {'met' if oo <= goal[name] else 'NOT met'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "full"], default="full")
    ap.add_argument("--cache-dir", type=Path, default=HERE / ".cache")
    ap.add_argument("--dense-every", type=int, default=None,
                    help="dense reference on every N-th module (default: 16 at full size, 1 at tiny)")
    ap.add_argument("--dense-seconds", type=float, default=40.0,
                    help="time budget of each dense job: it stops after the modules done by then (at least 3)")
    ap.add_argument("--rank", type=int, default=16, help="resize target rank")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="markdown output (default: benchmarks/LORA_OPS.md at full size)")
    ap.add_argument("--job", choices=sorted(JOBS), help=argparse.SUPPRESS)
    ap.add_argument("--baseline", metavar="REV",
                    help="also run merge and extract with lora_tools as it was at this git revision (before/after in one run)")
    ap.add_argument("--only", nargs="+", choices=sorted(JOBS), help="run only these jobs")
    args = ap.parse_args()
    args.cache_dir = args.cache_dir.resolve()
    if args.dense_every is None:
        args.dense_every = 16 if args.size == "full" else 1
    if args.job:
        run_job(args)
        return
    start = time.perf_counter()
    inp = ensure_inputs(args.cache_dir, args.size)
    log_dir = inp.root / "lora_ops-logs"
    log_dir.mkdir(exist_ok=True)
    names = [n for n in JOBS if not args.only or n in args.only]
    before: dict[str, dict[str, object]] = {}
    if args.baseline:
        root = baseline_root(args.cache_dir, args.baseline)
        res = {}
        for name in names:  # before and after alternate, so both see the same machine
            if name in ("merge", "extract"):
                before[name] = measure(name, args, log_dir, library=root, label=f"{name}-before")
            res[name] = measure(name, args, log_dir)
    else:
        res = {name: measure(name, args, log_dir) for name in names}
    if args.only:
        print(json.dumps({"after": res, "before": before}, indent=1, default=str))
        return
    text = table(res, args)
    head = (f"# LoRA operations: ours vs dense ({args.size} size)\n\n"
            f"`python benchmarks/lora_ops.py --size {args.size}` on {platform.machine()} "
            f"({os.cpu_count()} cores visible, torch threads {args.threads}), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Inputs: two Lightning-shaped LoRAs "
            f"({res['resize']['modules']} modules, rank {RANK_IN}) and the synthetic checkpoint with the first fused in. "
            "`ours (s)` is the operation itself (factors already read; extract: the whole streamed run, both "
            "checkpoints read); `dense (s)` is the dense approach (full SVD of each module's dense delta) on a "
            "fixed sample of modules, scaled to all of them by the SVD cost model out x in x min(out, in). "
            "Peak RSS is the job process's `ru_maxrss`.\n\n")
    body = head + text + "\n\nGoals (issue #8):\n\n" + "\n".join(goals(res)) + "\n"
    if before:
        body += "\n" + before_after(res, before, args.baseline) + "\n"
    print(body)
    out = args.out or (HERE / "LORA_OPS.md" if args.size == "full" else inp.root / "LORA_OPS.md")
    out.write_text(body)
    _say(f"wrote {out} ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
