"""Local vs Ray executor on one machine: wall time and Ray's per-job overhead (a benchmark, not a test).

    python benchmarks/ray_executor.py                # 12 tiny jobs, then 6 full-size fuse jobs
    python benchmarks/ray_executor.py --tiny-only    # the 12 tiny jobs only (a smoke run, seconds)

The tiny batch (2 bases x 2/4/8 steps x fp16/fp32) runs whole, once with the local executor and once
with ``--executor ray`` on a local Ray instance, into two folders. The full-size batch (one 6.9 GB
base x 2/4/8 steps x fp16/bf16) runs job by job, local then Ray, and each output is deleted as soon
as it is compared, so the disk holds one full-size output at a time. Outputs are compared by tensor
bytes and by record (``created`` aside). Ray is started once, inside a network namespace that holds
only loopback (``unshare --net``): the script re-runs itself there when it is not already in one
(root needed). Full-size inputs are the synthetic SDXL checkpoint that ``benchmarks/fuse_sdxl.py``
builds (``benchmarks/.cache/full``) and Lightning-shaped LoRAs built next to it.
Writes ``benchmarks/RAY_RESULTS.md`` (the table the README quotes) and a JSON file of the same rows.
The point is correctness and the per-job overhead, not speed-up: on 2 cores a fuse job already uses both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

RECIPE = """\
version: 1
output_dir: {out}
inputs:
  base_a: {base_a}
  base_b: {base_b}
  lightning: {lightning}
matrix:
  base: {bases}
  steps: [2, 4, 8]
  dtype: {dtypes}
jobs:
  - name: ${{base}}-${{steps}}step-${{dtype}}
    fuse:
      base: ${{base}}
      lightning: ${{steps}}
      lightning_dir: lightning
      dtype: ${{dtype}}
      output: ${{base}}-lightning-${{steps}}step-${{dtype}}.safetensors
"""


def only_loopback() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def tiny_inputs(root: Path) -> dict[str, Path]:
    from lora_tools.testing.synthetic import write_checkpoint
    from lora_tools.testing.synthetic_lora import write_lightning_lora

    lightning = root / "lightning"
    lightning.mkdir(parents=True, exist_ok=True)
    for steps in (2, 4, 8):
        write_lightning_lora(lightning / f"sdxl_lightning_{steps}step_lora.safetensors", "tiny", seed=steps, rank=4)
    return {"base_a": write_checkpoint(root / "a.safetensors", "tiny", seed=0, dtype="fp16"),
            "base_b": write_checkpoint(root / "b.safetensors", "tiny", seed=1, dtype="fp16"), "lightning": lightning}


def full_inputs(cache: Path) -> dict[str, Path]:
    from lora_tools.testing.synthetic import write_checkpoint
    from lora_tools.testing.synthetic_lora import write_lightning_lora

    root = cache / "full"
    base = root / "sdxl-full-fp16.safetensors"
    lightning = root / "lightning-all"
    lightning.mkdir(parents=True, exist_ok=True)
    if not base.exists():
        print(f"building {base} ...", flush=True)
        write_checkpoint(base, "full", dtype="fp16")
    for steps in (2, 4, 8):
        path = lightning / f"sdxl_lightning_{steps}step_lora.safetensors"
        if not path.exists():
            print(f"building {path} ...", flush=True)
            write_lightning_lora(path, "full", seed=steps)
    return {"base_a": base, "base_b": base, "lightning": lightning}


def digest(path: Path) -> tuple[str, dict]:
    """(sha256 of the tensors' names and bytes in file order, the record without ``created``)."""
    import hashlib

    from lora_tools.io.safetensors import TensorFile, read_header

    h = hashlib.sha256()
    with TensorFile(path) as tf:
        for k in tf.keys():
            h.update(k.encode())
            h.update(bytes(tf.read_bytes(k)))
    record = json.loads(read_header(path).metadata["loratool"])
    record.pop("created")
    return h.hexdigest(), record


def plan_batch(work: Path, tag: str, out: Path, inputs: dict[str, Path], bases: list[str], dtypes: list[str],
               only: list[str] | None = None):  # type: ignore[no-untyped-def]
    from lora_tools.recipes import plan_recipe

    recipe = work / f"{tag}.yaml"
    recipe.write_text(RECIPE.format(out=out, bases=json.dumps(bases), dtypes=json.dumps(dtypes),
                                    **{k: str(v) for k, v in inputs.items()}))
    return plan_recipe(recipe, only=only or ())


def timed_run(plan, executor) -> tuple[float, list]:  # type: ignore[no-untyped-def]
    from lora_tools.recipes import run_recipe

    t = time.perf_counter()
    results = run_recipe(plan, executor=executor)
    seconds = time.perf_counter() - t
    assert all(r.outcome == "done" for r in results), [(r.name, r.outcome, r.message) for r in results]
    return seconds, results


def ray_executor(plan):  # type: ignore[no-untyped-def]
    from lora_tools.recipes.ray_executor import RayExecutor

    return RayExecutor(peak_bytes={n: c.peak_bytes for n, c in plan.checks.items()})


def tiny_batch(inputs: dict[str, Path], work: Path) -> dict[str, object]:
    """12 tiny jobs, each executor running the whole batch."""
    from lora_tools.recipes import LocalExecutor

    bases, dtypes = ["base_a", "base_b"], ["fp16", "fp32"]
    local, remote = work / "tiny-local", work / "tiny-ray"
    local_s, results = timed_run(plan_batch(work, "tiny-local", local, inputs, bases, dtypes), LocalExecutor())
    plan = plan_batch(work, "tiny-ray", remote, inputs, bases, dtypes)
    ray_s, _ = timed_run(plan, ray_executor(plan))
    want = {f.name: digest(f) for f in sorted(local.iterdir())}
    got = {f.name: digest(f) for f in sorted(remote.iterdir())}
    assert len(want) == len(results) and got == want, "Ray's files differ from the local executor's"
    out_bytes = sum(f.stat().st_size for f in local.iterdir()) // len(results)
    shutil.rmtree(local)
    shutil.rmtree(remote)
    jobs = len(results)
    return {"batch": "tiny", "jobs": jobs, "bytes_per_output": out_bytes, "local_s": round(local_s, 2),
            "ray_s": round(ray_s, 2), "overhead_per_job_s": round((ray_s - local_s) / jobs, 3),
            "identical_files": len(got)}


def full_batch(inputs: dict[str, Path], work: Path) -> dict[str, object]:
    """6 full-size fuse jobs, one at a time: local, Ray, compare, delete both outputs."""
    from lora_tools.recipes import LocalExecutor

    bases, dtypes = ["base_a"], ["fp16", "bf16"]
    local, remote = work / "full-local", work / "full-ray"
    names = [j.name for j in plan_batch(work, "full-names", local, inputs, bases, dtypes).jobs]
    local_s = ray_s = 0.0
    same = out_bytes = 0
    for name in names:
        plan = plan_batch(work, "full-local", local, inputs, bases, dtypes, only=[name])
        seconds, [result] = timed_run(plan, LocalExecutor())
        local_s += seconds
        [path] = [Path(p) for p in result.outputs]
        out_bytes = path.stat().st_size
        want = digest(path)
        path.unlink()
        plan = plan_batch(work, "full-ray", remote, inputs, bases, dtypes, only=[name])
        seconds, [result] = timed_run(plan, ray_executor(plan))
        ray_s += seconds
        [path] = [Path(p) for p in result.outputs]
        got = digest(path)
        path.unlink()
        assert got == want, f"{name}: Ray's file differs from the local executor's"
        same += 1
        print(f"  {name}: identical", flush=True)
    jobs = len(names)
    return {"batch": "full", "jobs": jobs, "bytes_per_output": out_bytes, "local_s": round(local_s, 2),
            "ray_s": round(ray_s, 2), "overhead_per_job_s": round((ray_s - local_s) / jobs, 3), "identical_files": same}


def write_markdown(path: Path, report: dict) -> None:
    def size(n: int) -> str:
        from lora_tools.units import format_bytes

        return format_bytes(n)

    how = {"tiny": "the whole batch per executor", "full": "job by job (each output deleted once compared)"}
    lines = ["# Ray executor: local vs Ray on one machine", "",
             f"`python benchmarks/ray_executor.py{' --tiny-only' if report['tiny_only'] else ''}`, {report['date']}, "
             f"{report['machine']}, Ray {report['ray']}, load average {report['load_before']} before the run.", "",
             f"Ray start {report['ray_start_s']} s, shutdown {report['ray_stop_s']} s (not in the times below).", "",
             "| batch | jobs | output each | run | local | Ray | Ray overhead per job | identical files |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['jobs']} | {size(r['bytes_per_output'])} | {how[r['batch']]} | "
                     f"{r['local_s']} s | {r['ray_s']} s | {r['overhead_per_job_s']} s | "
                     f"{r['identical_files']} of {r['jobs']} |")
    if report["tiny_only"]:
        lines += ["", "Full-size batch: not run (`--tiny-only`)."]
    lines += ["", "Identical: the same tensor bytes and the same `loratool` record apart from `created`.",
              "Overhead per job = (Ray wall time - local wall time) / jobs; on 2 cores a fuse already uses both, "
              "so no speed-up is expected. Ray's times include its workers' first import of torch and lora_tools "
              "(the tiny batch runs first, so the full-size jobs find them warm).", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny-only", action="store_true", help="skip the 6 full-size fuse jobs")
    ap.add_argument("--cache-dir", type=Path, default=HERE / ".cache")
    ap.add_argument("--json", type=Path, default=HERE / "ray_executor-results.json")
    ap.add_argument("--markdown", type=Path, default=HERE / "RAY_RESULTS.md")
    args = ap.parse_args()
    if not only_loopback():
        if os.environ.get("LORATOOL_RAY_NETNS") == "1":
            sys.exit("inside the namespace but it has more than loopback: refusing to start Ray")
        cmd = f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} " + " ".join(sys.argv[1:])
        env = {**os.environ, "LORATOOL_RAY_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        sys.exit(subprocess.run(["unshare", "--net", "sh", "-c", cmd], env=env).returncode)
    import ray

    full = None if args.tiny_only else full_inputs(args.cache_dir)  # build (once) before any timing
    report: dict = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": f"{os.cpu_count()} cores",
                    "ray": ray.__version__, "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
                    "tiny_only": args.tiny_only, "rows": []}
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ray-bench-", dir=args.cache_dir) as tmp:
        work = Path(tmp)
        tiny = tiny_inputs(work / "inputs")
        t = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=False, log_to_driver=False)
        report["ray_start_s"] = round(time.perf_counter() - t, 2)
        try:
            report["rows"].append(tiny_batch(tiny, work))
            print(json.dumps(report["rows"][-1]), flush=True)
            if full is not None:
                report["rows"].append(full_batch(full, work))
                print(json.dumps(report["rows"][-1]), flush=True)
        finally:
            t = time.perf_counter()
            ray.shutdown()
            report["ray_stop_s"] = round(time.perf_counter() - t, 2)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.markdown, report)
    print(f"wrote {args.markdown} and {args.json}")


if __name__ == "__main__":
    main()
