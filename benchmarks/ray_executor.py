"""Local vs Ray executor on one machine: wall time and Ray's per-job overhead (a benchmark, not a test).

    python benchmarks/ray_executor.py                # 12 tiny jobs, then 6 full-size fuse jobs
    python benchmarks/ray_executor.py --tiny-only

The same recipe runs twice into two folders, once with the local executor and once with
``--executor ray`` on a local Ray instance; the outputs are compared byte for byte (tensors) and by
record (``created`` aside). Ray is started inside a network namespace that holds only loopback
(``unshare --net``): the script re-runs itself there when it is not already in one (root needed).
Full-size inputs are the synthetic SDXL checkpoint and Lightning-shaped LoRAs that
``benchmarks/fuse_sdxl.py`` builds (cached in ``benchmarks/.cache/full``).
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


def run_batch(name: str, inputs: dict[str, Path], work: Path, bases: list[str], dtypes: list[str]) -> dict[str, object]:
    from lora_tools.recipes import LocalExecutor, plan_recipe, run_recipe
    from lora_tools.recipes.ray_executor import RayExecutor
    from lora_tools.safetensors_io import TensorFile, read_header

    def plan(out: Path):  # type: ignore[no-untyped-def]
        recipe = work / f"{name}-{out.name}.yaml"
        recipe.write_text(RECIPE.format(out=out, bases=json.dumps(bases), dtypes=json.dumps(dtypes),
                                        **{k: str(v) for k, v in inputs.items()}))
        return plan_recipe(recipe)

    def digests(folder: Path) -> dict[str, tuple[str, dict]]:
        """file -> (sha256 of its tensors' bytes in key order, record without ``created``)."""
        import hashlib

        out = {}
        for f in sorted(folder.iterdir()):
            h = hashlib.sha256()
            with TensorFile(f) as tf:
                for k in tf.keys():
                    h.update(k.encode())
                    h.update(bytes(tf.read_bytes(k)))
            record = json.loads(read_header(f).metadata["loratool"])
            record.pop("created")
            out[f.name] = (h.hexdigest(), record)
        return out

    local, remote = work / f"{name}-local", work / f"{name}-ray"
    p = plan(local)
    t = time.perf_counter()
    results = run_recipe(p, executor=LocalExecutor())
    local_s = time.perf_counter() - t
    assert all(r.outcome == "done" for r in results), [r.message for r in results]
    out_bytes = sum(f.stat().st_size for f in local.iterdir())
    want = digests(local)
    shutil.rmtree(local)  # full-size outputs: keep the disk to one batch at a time

    import ray

    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    start_s = time.perf_counter() - t
    p = plan(remote)
    t = time.perf_counter()
    results = run_recipe(p, executor=RayExecutor(peak_bytes={n: c.peak_bytes for n, c in p.checks.items()}))
    ray_s = time.perf_counter() - t
    t = time.perf_counter()
    ray.shutdown()
    stop_s = time.perf_counter() - t
    assert all(r.outcome == "done" for r in results), [r.message for r in results]
    got = digests(remote)
    assert got == want, "Ray's files differ from the local executor's"
    same = len(got)
    shutil.rmtree(remote)
    jobs = len(results)
    return {"batch": name, "jobs": jobs, "output_bytes": out_bytes, "local_s": round(local_s, 2),
            "ray_s": round(ray_s, 2), "ray_start_s": round(start_s, 2), "ray_stop_s": round(stop_s, 2),
            "overhead_per_job_s": round((ray_s - local_s) / jobs, 3), "identical_files": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny-only", action="store_true", help="skip the 6 full-size fuse jobs")
    ap.add_argument("--cache-dir", type=Path, default=HERE / ".cache")
    ap.add_argument("--json", type=Path, default=HERE / "ray_executor-results.json")
    args = ap.parse_args()
    if not only_loopback():
        if os.environ.get("LORATOOL_RAY_NETNS") == "1":
            sys.exit("inside the namespace but it has more than loopback: refusing to start Ray")
        cmd = f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} " + " ".join(sys.argv[1:])
        env = {**os.environ, "LORATOOL_RAY_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        sys.exit(subprocess.run(["unshare", "--net", "sh", "-c", cmd], env=env).returncode)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ray-bench-", dir=args.cache_dir if args.cache_dir.exists() else None) as tmp:
        work = Path(tmp)
        rows.append(run_batch("tiny", tiny_inputs(work / "inputs"), work, ["base_a", "base_b"], ["fp16", "fp32"]))
        print(json.dumps(rows[-1]), flush=True)
        if not args.tiny_only:
            rows.append(run_batch("full", full_inputs(args.cache_dir), work, ["base_a"], ["fp16", "bf16"]))
            print(json.dumps(rows[-1]), flush=True)
    args.json.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
