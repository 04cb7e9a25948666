#!/usr/bin/env python
"""Benchmark: fuse from and to ``s3://`` through a loopback S3 server vs the same fuse on local files (not a test).

Each job runs ``loratool fuse BASE --lora LORA -o OUT -q`` in a fresh subprocess, so its wall time, CPU time
(user + sys) and peak RSS (GNU time's ``%M``) are its own:

  local  BASE, LORA and OUT are local files
  s3     all three are ``s3://`` objects on a moto server (``python -m moto.server``) on 127.0.0.1, in its
         own process (its memory is not the job's); the job reaches it through AWS_ENDPOINT_URL

Jobs alternate (local, s3, local, s3...) and the medians are reported; the two outputs' tensor data are
compared (same bytes). The server's own peak RSS is reported beside.

Size: moto keeps each object in a spooled temporary file and reads the WHOLE object into memory for every
ranged GET (and concatenates a multipart upload in memory), so the full-size 6.9 GB model would cost the
server 7 GB of memory and ~7 GB of copying per request: infeasible on a shared 23 GB machine. The default
model has the full SDXL topology at a reduced width (``--channels``, 128 = 2x tiny... full is 320), fp16;
``--base`` takes any other checkpoint (e.g. /work/benchcache/full/sdxl-full-fp16.safetensors on a machine
with the memory for it). The client side does not depend on the size: it holds one 16 MiB read window and
two 16 MiB upload parts beside what the local fuse holds.

``--endpoint URL`` uses an S3-compatible server already running there instead (MinIO, s3rver...: one that
serves ranges from disk can take the full-size model); credentials from the AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY), ``--server-pid`` reports its peak RSS; the uploaded and written objects are deleted after.

Usage:
    python benchmarks/s3_fuse.py --cache-dir /work/benchcache            # default size, 2 rounds
    AWS_ACCESS_KEY_ID=S3RVER AWS_SECRET_ACCESS_KEY=S3RVER python benchmarks/s3_fuse.py \
        --endpoint http://127.0.0.1:4568 --server-pid PID --cache-dir /work/benchcache/s3bench \
        --base /work/benchcache/full/sdxl-full-fp16.safetensors \
        --lora /work/benchcache/full/lightning/sdxl_lightning_4step_lora.safetensors   # full size
    python benchmarks/s3_fuse.py --channels 64 --repeat 1                  # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MIB = 1 << 20


def build_inputs(root: Path, channels: int) -> tuple[Path, Path]:
    """A synthetic SDXL-topology checkpoint ``channels`` wide (fp16, constant values: fast to write) and a
    Lightning-shaped rank-64 LoRA for it; built once."""
    import torch

    from lora_tools.io.safetensors import StreamingWriter, TensorPlan, torch_dtype
    from lora_tools.layouts import TINY
    from lora_tools.testing.synthetic import ALL_COMPONENTS, checkpoint_plan
    from lora_tools.testing.synthetic_lora import write_lora

    root.mkdir(parents=True, exist_ok=True)
    base = root / f"sdxl-c{channels}-fp16.safetensors"
    lora = root / f"sdxl-c{channels}-lightning-lora.safetensors"
    cfg = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, model_channels=channels))
    if not base.exists():
        entries = checkpoint_plan(cfg, ALL_COMPONENTS, "F16")
        with StreamingWriter(base, [TensorPlan(k, dt, s) for k, s, dt in entries], {"format": "pt"}) as w:
            for key, shape, dt in entries:
                w.write(key, torch.full(shape, 0.01, dtype=torch_dtype(dt)) if dt in ("F16", "F32")
                        else torch.zeros(shape, dtype=torch_dtype(dt)))
            w.finalize()
    if not lora.exists():
        write_lora(lora, cfg, fmt="kohya-diffusers", targets="lightning", rank=64, alpha=64.0)
    return base, lora


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the moto server did not start")


def rss_kib(pid: int) -> int:
    """A live process's peak RSS (VmHWM), KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd`` under GNU time (this process is big: a forked child's ru_maxrss starts at its parent's);
    its wall time, user+sys CPU seconds and peak RSS (MiB)."""
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(log), *cmd], env=env, capture_output=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout.decode()}\n{proc.stderr.decode()}")
    kib, user, system = log.read_text().split()[-3:]
    return {"wall_s": wall, "cpu_s": float(user) + float(system), "peak_rss_mib": int(kib) / 1024}


def data_sha256(read: object, size: int) -> str:
    """sha256 of a safetensors file's tensor data (after its header), read in 16 MiB pieces by ``read(a, b)``."""
    n = int.from_bytes(read(0, 8), "little")  # type: ignore[operator]
    h, pos = hashlib.sha256(), 8 + n
    while pos < size:
        end = min(size, pos + 16 * MIB)
        h.update(read(pos, end))  # type: ignore[operator]
        pos = end
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=Path("/work/benchcache"))
    ap.add_argument("--channels", type=int, default=128, help="UNet model_channels of the synthetic base (full: 320)")
    ap.add_argument("--base", type=Path, help="a checkpoint to use instead of the synthetic one")
    ap.add_argument("--lora", type=Path, help="the LoRA for --base")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--endpoint", help="an S3-compatible server already running (no moto server is started)")
    ap.add_argument("--server-pid", type=int, help="that server's process id (its peak RSS is reported)")
    ap.add_argument("--bucket", default="bench", help="the bucket to use (created if missing)")
    ap.add_argument("--read-timeout", type=float, help="the S3 client's read timeout, s (s3fs: 15; a server that "
                    "assembles a multipart upload before answering, as s3rver does, needs more for a 7 GB one)")
    args = ap.parse_args()

    work = args.cache_dir / "s3"
    if args.base:
        base, lora = args.base, args.lora
    else:
        base, lora = build_inputs(work, args.channels)
    out_dir = work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    server = None
    if args.endpoint:
        endpoint, server_pid = args.endpoint, args.server_pid
    else:
        port = free_port()
        server = start_server(port)
        endpoint, server_pid = f"http://127.0.0.1:{port}", server.pid
    keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    if args.endpoint:
        keys = {k: os.environ.get(k, v) for k, v in keys.items()}
    env = {**os.environ, **keys, "AWS_ENDPOINT_URL": endpoint, "PYTHONPATH": str(REPO)}
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION")})
    try:
        import s3fs

        if args.read_timeout:
            s3fs.S3FileSystem.read_timeout = args.read_timeout
        fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
        b = args.bucket
        if not fs.exists(b):
            fs.mkdir(b)
        t = time.perf_counter()
        fs.put_file(str(base), f"{b}/in/base.safetensors")
        fs.put_file(str(lora), f"{b}/in/lora.safetensors")
        print(f"uploaded {base.stat().st_size / MIB:.0f} MiB base + {lora.stat().st_size / MIB:.0f} MiB LoRA "
              f"in {time.perf_counter() - t:.1f} s", flush=True)
        loratool = [sys.executable, "-c", "from lora_tools.cli import main; main()"]
        timeout = f"import s3fs; s3fs.S3FileSystem.read_timeout = {args.read_timeout}; " if args.read_timeout else ""
        s3tool = [sys.executable, "-c", timeout + "from lora_tools.cli import main; main()"]
        local_out = out_dir / "fused-local.safetensors"
        jobs = {
            "local": loratool + ["fuse", str(base), "--lora", str(lora), "-o", str(local_out), "--overwrite", "-q"],
            "s3": s3tool + ["fuse", f"s3://{b}/in/base.safetensors", "--lora", f"s3://{b}/in/lora.safetensors",
                              "-o", f"s3://{b}/out/fused.safetensors", "--overwrite", "-q"],
        }
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in jobs}
        for i in range(args.repeat):
            for name, cmd in jobs.items():
                r = measure(cmd, env, work / "time.log")
                runs[name].append(r)
                print(f"round {i + 1} {name:5}: wall {r['wall_s']:6.1f} s  cpu {r['cpu_s']:6.1f} s  "
                      f"peak RSS {r['peak_rss_mib']:7.0f} MiB", flush=True)
        size = local_out.stat().st_size
        with open(local_out, "rb") as f:
            def read_local(a: int, b: int) -> bytes:
                f.seek(a)
                return f.read(b - a)
            local_sha = data_sha256(read_local, size)
        out_key = f"{b}/out/fused.safetensors"
        remote_sha = data_sha256(lambda a, z: fs.cat_file(out_key, start=a, end=z), fs.info(out_key)["size"])
        server_peak = rss_kib(server_pid) / 1024 if server_pid else 0.0
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        elif args.endpoint:
            for key in ("in/base.safetensors", "in/lora.safetensors", "out/fused.safetensors"):
                if fs.exists(f"{args.bucket}/{key}"):
                    fs.rm_file(f"{args.bucket}/{key}")
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    machine = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
               "load_1_5_15": [round(x, 1) for x in os.getloadavg()], "note": "load at the end of the run"}
    result = {"machine": machine, "base_bytes": base.stat().st_size, "lora_bytes": lora.stat().st_size, "output_bytes": size,
              "repeat": args.repeat, "median": med, "runs": runs, "same_tensor_data": local_sha == remote_sha,
              "server_peak_rss_mib": server_peak, "server": args.endpoint or "moto.server",
              "read_timeout_s": args.read_timeout}
    print(json.dumps(result["median"], indent=2))
    ratio = med["s3"]["peak_rss_mib"] / med["local"]["peak_rss_mib"]
    print("| job | wall (median) | CPU user+sys | peak RSS |\n|---|---|---|---|")
    for k in ("local", "s3"):
        print(f"| {k} | {med[k]['wall_s']:.1f} s | {med[k]['cpu_s']:.1f} s | {med[k]['peak_rss_mib']:.0f} MiB |")
    print(f"s3/local: wall {med['s3']['wall_s'] / med['local']['wall_s']:.2f}x, peak RSS {ratio:.2f}x; "
          f"same tensor data: {local_sha == remote_sha}; server peak RSS {server_peak:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    local_out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
