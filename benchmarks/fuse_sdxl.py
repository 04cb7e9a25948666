#!/usr/bin/env python
"""Benchmark: fuse the SDXL-Lightning LoRA into a full-size SDXL checkpoint (not a test).

Builds (or reuses) a synthetic full-size SDXL single file (~6.9 GB fp16) and a LoRA shaped like
``sdxl_lightning_4step_lora.safetensors`` (788 modules, rank 64, fp16, ~394 MB), then times in
one run, each job in its own fresh subprocess so its peak RSS is its own:

  cp               ``cp base out && sync out``: a durable copy (the reference for the 1.3x target)
  pycopy           the I/O floor: tensor by tensor with lora_tools.io.safetensors (read_header +
                   TensorFile + StreamingWriter with its defaults, fsync + rename), no hashing
  pycopy-buffered  the same with StreamingWriter(direct=False): page-cache writes (only where the
                   writer has a ``direct`` switch)
  fuse             ``loratool fuse BASE --lightning 4 --lightning-dir DIR -o OUT --overwrite -q`` (a big output
                   records the xxh3-128 of its data in its header: the default output hash)
  fuse-nohash      the same as a library call with ``FusePlan.hash_output = False``: no output hash at all
  fuse-hash        ``fuse --hash-output``: the output's sha256/AutoV2 while writing
  fuse-unet        the same with ``--save unet`` (a diffusers-layout UNet, like diffusers writes)
  diffusers        UNet2DConditionModel.from_single_file + lora_state_dict + load_lora_adapter +
                   fuse_lora + unload_lora + save_pretrained (+ fsync, so it is as durable as ours)
  sdmecha          sd-mecha (its own venv, ``--sdmecha-python``): the kohya LoRA converted to a delta of
                   the ``sdxl-sgm`` base, added to it, the whole checkpoint written as fp16 safetensors
                   with 2 threads (+ fsync); its output compared with ``fuse``'s on sampled tensors

Page cache: caches cannot be dropped reliably without root, so before every job the inputs
are read once (outside the timing) and every job sees them warm. A ``sync`` and the removal of
the previous job's output also happen outside the timing.

Peak RSS is the job's ``ru_maxrss`` as GNU ``/usr/bin/time`` reports it (or a bare Python
launcher's ``wait4`` where there is no GNU time): the largest resident set of the job or any
process it waited for. Pages touched through a memory map count there too.

Usage:
    python benchmarks/fuse_sdxl.py                       # full size, writes benchmarks/RESULTS.md
    python benchmarks/fuse_sdxl.py --size tiny           # smoke run in seconds
    python benchmarks/fuse_sdxl.py --repeat 3 --skip-diffusers
    python benchmarks/fuse_sdxl.py --sdmecha-python /work/mechavenv/bin/python   # + sd-mecha, same run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: Where ``lora_tools`` is imported from: the repository, or the snapshot a run copied (see --no-snapshot).
LIBRARY_ROOT = Path(os.environ.get("FUSE_SDXL_LIBRARY_ROOT", str(REPO)))
sys.path.insert(0, str(LIBRARY_ROOT))

LORA_NAME = "sdxl_lightning_4step_lora.safetensors"
MARK = "BENCH-JSON "
GB = 1e9
MIB = 1 << 20


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    root: Path
    base: Path
    lora_dir: Path
    lora: Path
    config_dir: Path  # holds unet/config.json for diffusers' from_single_file
    out_dir: Path


def ensure_inputs(cache: Path, size: str) -> Inputs:
    """Build the synthetic checkpoint, LoRA and UNet config once; reuse them afterwards."""
    root = cache / size
    inp = Inputs(root, root / f"sdxl-{size}-fp16.safetensors", root / "lightning", root / "lightning" / LORA_NAME,
                 root / "diffusers-config", root / "out")
    inp.lora_dir.mkdir(parents=True, exist_ok=True)
    inp.out_dir.mkdir(parents=True, exist_ok=True)
    if not inp.base.exists():
        from lora_tools.testing.synthetic import write_checkpoint

        print(f"building {inp.base} (synthetic SDXL, fp16, streamed) ...", flush=True)
        t = time.perf_counter()
        write_checkpoint(inp.base, size, dtype="fp16")  # type: ignore[arg-type]
        print(f"  {inp.base.stat().st_size / GB:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    if not inp.lora.exists():
        from lora_tools.testing.synthetic_lora import write_lightning_lora

        print(f"building {inp.lora} (Lightning-shaped LoRA) ...", flush=True)
        write_lightning_lora(inp.lora, size)  # type: ignore[arg-type]
    cfg_file = inp.config_dir / "unet" / "config.json"
    if not cfg_file.exists():
        from lora_tools.layouts.sdxl import SIZES

        cfg_file.parent.mkdir(parents=True, exist_ok=True)
        cfg_file.write_text(json.dumps(SIZES[size].unet.diffusers_config(), indent=2))
    return inp


def warm(paths: list[Path]) -> tuple[float, int]:
    """Read files once with plain reads so they sit in the page cache; (seconds, bytes)."""
    buf = bytearray(16 * MIB)
    view = memoryview(buf)
    total = 0
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return time.perf_counter() - t, total


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_free() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemFree:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------------------------
# Jobs (each runs in a fresh process: `python fuse_sdxl.py --job NAME ...`)
# --------------------------------------------------------------------------------------------

def job_pycopy(base: Path, out: Path, direct: bool | None = None) -> dict[str, object]:
    """The I/O floor: stream every tensor of ``base`` into a new file with the library's own
    reader and writer (its defaults, or ``direct`` forced on/off), fsync, rename. No hashing."""
    import dataclasses

    from lora_tools.io.safetensors import StreamingWriter, TensorFile, TensorPlan, read_header

    t0 = time.perf_counter()
    header = read_header(base)
    infos = sorted(header.tensors.values(), key=lambda t: t.begin)
    plans = [TensorPlan(i.name, i.dtype, i.shape) for i in infos]
    read_s = write_s = 0.0
    kwargs = {}
    if direct is not None and "direct" in {f.name for f in dataclasses.fields(StreamingWriter)}:
        kwargs["direct"] = direct
    with TensorFile(base, header) as f, StreamingWriter(out, plans, header.metadata, **kwargs) as w:
        mode = type(getattr(w, "_out", None) or getattr(w, "_fh", None)).__name__
        for info in infos:
            a = time.perf_counter()
            data = f.read_bytes(info.name)
            b = time.perf_counter()
            w.write(info.name, data)
            write_s += time.perf_counter() - b
            read_s += b - a
            del data
        a = time.perf_counter()
        w.finalize()
        fsync_s = time.perf_counter() - a
    return {"read_s": read_s, "write_s": write_s, "fsync_s": fsync_s, "total_s": time.perf_counter() - t0, "writer": mode}


def job_fuse_hash(base: Path, lora_dir: Path, out: Path, ask: bool = True) -> dict[str, object]:
    """``loratool fuse`` as a library call with the output's sha256 computed while writing
    (``FusePlan.hash_output``: what a big output costs when its sha256/AutoV2 is asked for), or with
    ``ask=False`` no hash at all (not even the data's xxh3-128 a big output records by default)."""
    t0 = time.perf_counter()
    import gc

    gc.freeze()
    from lora_tools.ops.fuse import run_fuse
    from lora_tools.ops.fuse_plan import plan_fuse

    plan = plan_fuse(base, "lightning-4step", preset_dir=lora_dir, output=out, overwrite=True)
    plan.hash_output = ask
    try:
        res = run_fuse(plan)
    finally:
        plan.close()
    if not ask:
        assert getattr(res.files[0], "data_xxh3_128", None) is None and res.files[0].sha256 is None
        return {"total_s": time.perf_counter() - t0}
    assert res.files[0].sha256, "no sha256: this library predates FusePlan.hash_output"
    return {"total_s": time.perf_counter() - t0, "autov2": res.files[0].sha256[:10]}


def job_diffusers(base: Path, lora: Path, config_dir: Path, out: Path) -> dict[str, float]:
    """diffusers' UNet-only path: load the UNet from the single file, fuse the LoRA, save it."""
    t0 = time.perf_counter()
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    t_import = time.perf_counter()
    unet = UNet2DConditionModel.from_single_file(str(base), config=str(config_dir), subfolder="unet",
                                                 local_files_only=True, torch_dtype=torch.float16)
    t_load = time.perf_counter()
    state_dict, network_alphas = StableDiffusionXLPipeline.lora_state_dict(str(lora))
    unet.load_lora_adapter(state_dict, prefix="unet", network_alphas=network_alphas, adapter_name="lightning")
    del state_dict
    t_lora = time.perf_counter()
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    t_fuse = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(out), safe_serialization=True)
    t_save = time.perf_counter()
    for p in out.glob("*.safetensors"):
        fsync_path(p)
    t_sync = time.perf_counter()
    return {"import_s": t_import - t0, "from_single_file_s": t_load - t_import, "load_lora_s": t_lora - t_load,
            "fuse_s": t_fuse - t_lora, "save_s": t_save - t_fuse, "fsync_s": t_sync - t_save, "total_s": t_sync - t0}


def fsync_path(path: Path) -> None:
    """A peer's output made durable, as ours is (the writer fsyncs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: sd-mecha's model config identifiers: the single-file SDXL base, and a kohya LoRA with diffusers-style
#: module names (``lora_unet_down_blocks_0_...``, like the Lightning LoRA).
SDMECHA_BASE_CONFIG = "sdxl-sgm"
SDMECHA_LORA_CONFIG = "sdxl-kohya_but_diffusers_kohya_lora"


def job_sdmecha(base: Path, lora: Path, out: Path) -> dict[str, object]:
    """sd-mecha's LoRA merge, run by the interpreter of its own venv (this module imports no lora_tools):
    ``convert`` turns the LoRA into a delta in the base's config, ``base + delta`` adds it (its
    ``add_difference``), ``| base`` keeps the keys the LoRA does not touch; ``merge`` streams the whole
    checkpoint to a safetensors file. Its defaults otherwise (fp32 maths), with 2 threads and fp16 output."""
    t0 = time.perf_counter()
    import sd_mecha
    import torch

    t_import = time.perf_counter()
    model = sd_mecha.model(str(base), SDMECHA_BASE_CONFIG)
    delta = sd_mecha.convert(sd_mecha.model(str(lora), SDMECHA_LORA_CONFIG), model)
    recipe = (model + delta) | model
    t_recipe = time.perf_counter()
    sd_mecha.merge(recipe, output=str(out), threads=2, output_dtype=torch.float16, tqdm=_NoProgress)
    t_merge = time.perf_counter()
    fsync_path(out)
    t_sync = time.perf_counter()
    return {"import_s": t_import - t0, "recipe_s": t_recipe - t_import, "merge_s": t_merge - t_recipe,
            "fsync_s": t_sync - t_merge, "total_s": t_sync - t0, "sd_mecha": _version("sd-mecha"),
            "torch": torch.__version__}


class _NoProgress:
    """A tqdm stand-in (sd-mecha's ``tqdm`` option): no progress bar in the job's log."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, *args: object, **kwargs: object) -> None:
        pass

    def set_postfix(self, *args: object, **kwargs: object) -> None:
        pass

    def close(self) -> None:
        pass


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def sdmecha_problem(python: str | None, size: str) -> str | None:
    """Why the sdmecha job cannot run (None: it can): no interpreter given, sd-mecha not importable there,
    or inputs whose shapes are not SDXL's (sd-mecha's SDXL config reshapes each LoRA delta to the real shape)."""
    if not python:
        return "no --sdmecha-python (or SDMECHA_PYTHON) given"
    if size != "full":
        return (f"--size {size}: sd-mecha's {SDMECHA_BASE_CONFIG} config has the real SDXL shapes and reshapes every "
                "LoRA delta to them, so it cannot merge the scaled-down model (it runs on --size full)")
    p = subprocess.run([python, "-c", "import sd_mecha, importlib.metadata as m; print(m.version('sd-mecha'))"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return f"sd_mecha is not importable by {python}: {(p.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def run_job(argv: list[str]) -> None:  # noqa: C901
    name, *rest = argv
    if name == "pycopy":
        res = job_pycopy(Path(rest[0]), Path(rest[1]))
    elif name == "pycopy-buffered":
        res = job_pycopy(Path(rest[0]), Path(rest[1]), direct=False)
    elif name == "fuse-hash":
        res = job_fuse_hash(Path(rest[0]), Path(rest[1]), Path(rest[2]))
    elif name == "fuse-nohash":
        res = job_fuse_hash(Path(rest[0]), Path(rest[1]), Path(rest[2]), ask=False)
    elif name == "sdmecha":
        res = job_sdmecha(Path(rest[0]), Path(rest[1]), Path(rest[2]))
    elif name == "diffusers":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        res = job_diffusers(Path(rest[0]), Path(rest[1]), Path(rest[2]), Path(rest[3]))
    else:
        raise SystemExit(f"unknown job {name}")
    print(MARK + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------

@dataclass
class Run:
    wall_s: float
    peak_rss: int  # bytes
    phases: dict[str, object] = field(default_factory=dict)
    warm_s: float = 0.0
    cpu_s: float = 0.0  # user + system CPU seconds of the job (and its children)
    other_load: float = 0.0  # average busy cores *not* used by the job during it (other processes)
    mem_free: int = 0  # MemFree (bytes) when the job started: buffered writes slow down once it runs out


@dataclass
class Job:
    key: str
    label: str
    cmd: list[str]
    output: Path
    writes: str  # what the job writes, for the table
    keep_output: bool = False
    runs: list[Run] = field(default_factory=list)
    env: dict[str, str] | None = None  # extra environment (the baseline job imports another lora_tools)

    @property
    def wall(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def peak(self) -> int:
        return max(r.peak_rss for r in self.runs)


GNU_TIME = Path(os.environ.get("BENCH_GNU_TIME", "/usr/bin/time"))
#: Fallback launcher: a fresh, small interpreter forks the job and reports wait4's rusage.
_LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write('%d %.2f %.2f' % (ru.ru_maxrss, ru.ru_utime, ru.ru_stime))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def cpu_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` cores; returns the load seen."""
    deadline = time.monotonic() + max_wait
    while True:
        a = cpu_busy_seconds()
        time.sleep(1.0)
        load = cpu_busy_seconds() - a
        if load < threshold or time.monotonic() >= deadline:
            return load


def measure(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> Run:
    """Run ``cmd`` in a fresh process; its wall time and its own peak RSS.

    The job is started by a small process (GNU ``/usr/bin/time``, else a bare ``python -S``
    launcher): on Linux a child's ``ru_maxrss`` starts at its parent's resident size at fork
    time, so forking from this (large) process would inflate small jobs such as ``cp``.
    """
    rss_file = log.with_suffix(".rss")
    if GNU_TIME.exists():
        wrapped = [str(GNU_TIME), "-f", "%M %U %S", "-o", str(rss_file)] + cmd
    else:
        wrapped = [sys.executable, "-S", "-c", _LAUNCHER, str(rss_file)] + cmd
    with open(log, "wb") as fh:
        busy0 = cpu_busy_seconds()
        t = time.perf_counter()
        rc = subprocess.call(wrapped, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        wall = time.perf_counter() - t
        busy = cpu_busy_seconds() - busy0
    text = log.read_text(errors="replace")
    if rc != 0:
        raise SystemExit(f"job failed (exit {rc}): {' '.join(cmd)}\n--- {log} ---\n{text[-4000:]}")
    kb, user, system = rss_file.read_text().split()[-3:]
    rss = int(kb) * (1 if sys.platform == "darwin" else 1024)
    cpu = float(user) + float(system)
    phases: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(MARK):
            phases.update({k: v for k, v in json.loads(line[len(MARK):]).items()})
        elif line.startswith("Fused ") and " in " in line and line.rstrip().endswith(" s."):
            try:
                phases["loratool_reported_s"] = float(line.rstrip()[:-3].rsplit(" in ", 1)[1])
            except ValueError:
                pass
    return Run(wall, rss, phases, cpu_s=cpu, other_load=max(0.0, busy - cpu) / wall)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def loratool_cmd() -> list[str]:
    """``loratool``: the console script's own two lines, run by this interpreter (so that
    PYTHONPATH, i.e. the snapshot, decides which lora_tools is imported)."""
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'loratool'; from lora_tools.cli import main; sys.exit(main())"]


def writer_has_direct() -> bool:
    import dataclasses

    from lora_tools.io.safetensors import StreamingWriter

    return "direct" in {f.name for f in dataclasses.fields(StreamingWriter)}


def preflight(cache: Path, env: dict[str, str]) -> None:
    """A tiny ``loratool fuse`` with the measured library, so a broken library state fails in
    seconds instead of half-way through a full-size run."""
    tiny = ensure_inputs(cache, "tiny")
    out = tiny.out_dir / "preflight.safetensors"
    remove(out)
    cmd = loratool_cmd() + ["fuse", str(tiny.base), "--lightning", "4", "--lightning-dir", str(tiny.lora_dir),
                            "--overwrite", "-q", "-o", str(out)]
    p = subprocess.run(cmd, env=env, cwd=tiny.root, capture_output=True, text=True)
    if p.returncode != 0 or not out.exists():
        raise SystemExit(f"preflight failed: a tiny `loratool fuse` does not work with this lora_tools "
                         f"({LIBRARY_ROOT}):\n{(p.stdout + p.stderr)[-3000:]}")
    remove(out)


def snapshot_revision(cache: Path, rev: str) -> Path:
    """lora_tools/ as it was at git revision REV (``git archive``), for the before/after job."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True,
                         text=True)
    if sha.returncode != 0:
        raise SystemExit(f"--baseline {rev}: not a commit of this repository")
    root = cache / "snapshots" / f"rev-{sha.stdout.strip()[:12]}"
    if not (root / "lora_tools").is_dir():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha.stdout.strip(), "lora_tools"], cwd=REPO, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        tmp.rename(root)
    import compileall

    compileall.compile_dir(str(root / "lora_tools"), quiet=1)
    return root


def build_jobs(inp: Inputs, skip_diffusers: bool, baseline: tuple[str, Path] | None = None,
               sdmecha_python: str | None = None) -> list[Job]:
    out = inp.out_dir
    me = [sys.executable, str(Path(__file__).resolve()), "--job"]
    fuse = loratool_cmd() + ["fuse", str(inp.base), "--lightning", "4", "--lightning-dir", str(inp.lora_dir),
                             "--overwrite", "-q"]
    cp_out = out / "cp.safetensors"
    jobs = [
        Job("cp", "cp + sync (durable copy)", ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(inp.base), str(cp_out)],
            cp_out, "whole file"),
        Job("pycopy", "I/O floor: lora_tools tensor-by-tensor copy (writer defaults) + fsync",
            me + ["pycopy", str(inp.base), str(out / "pycopy.safetensors")],
            out / "pycopy.safetensors", "whole file"),
        Job("fuse", "loratool fuse (whole checkpoint; records its data's xxh3-128)", fuse + ["-o", str(out / "fused.safetensors")],
            out / "fused.safetensors", "whole file"),
        Job("fuse-nohash", "fuse with no output hash at all (library call: FusePlan.hash_output = False)",
            me + ["fuse-nohash", str(inp.base), str(inp.lora_dir), str(out / "fused-nohash.safetensors")],
            out / "fused-nohash.safetensors", "whole file"),
        Job("fuse-hash", "loratool fuse --hash-output (whole checkpoint + its sha256/AutoV2 while writing)",
            fuse + ["--hash-output", "-o", str(out / "fused-hash.safetensors")], out / "fused-hash.safetensors",
            "whole file"),
        Job("fuse-fp8", "loratool fuse --dtype fp8 (whole checkpoint, UNet weights scaled e4m3fn)",
            fuse + ["--dtype", "fp8", "-o", str(out / "fused-fp8.safetensors")], out / "fused-fp8.safetensors",
            "whole file, fp8 UNet"),
    ]
    if baseline is not None:
        rev, root = baseline
        env = {"PYTHONPATH": str(root), "FUSE_SDXL_LIBRARY_ROOT": str(root)}
        jobs += [
            Job("fuse-baseline", f"loratool fuse (whole checkpoint), lora_tools at {rev} (before)",
                fuse + ["-o", str(out / "fused-baseline.safetensors")], out / "fused-baseline.safetensors",
                "whole file", env=env),
            # the CLI of then had no --hash-output: the library call with FusePlan.hash_output (no run-entry hashing)
            Job("fuse-hash-baseline", f"fuse + the output's sha256 (library call: FusePlan.hash_output), lora_tools at {rev} (before)",
                me + ["fuse-hash", str(inp.base), str(inp.lora_dir), str(out / "fused-hash-baseline.safetensors")],
                out / "fused-hash-baseline.safetensors", "whole file", env=env),
            Job("fuse-fp8-baseline", f"loratool fuse --dtype fp8, lora_tools at {rev} (before)",
                fuse + ["--dtype", "fp8", "-o", str(out / "fused-fp8-baseline.safetensors")],
                out / "fused-fp8-baseline.safetensors", "whole file, fp8 UNet", env=env),
        ]
    jobs += [
        Job("fuse-unet", "loratool fuse --save unet", fuse + ["--save", "unet", "-o", str(out / "fused-unet.safetensors")],
            out / "fused-unet.safetensors", "UNet only", keep_output=True),
    ]
    if writer_has_direct():
        jobs.insert(2, Job("pycopy-buffered", "I/O floor, page-cache writes (StreamingWriter direct=False)",
                           me + ["pycopy-buffered", str(inp.base), str(out / "pycopy-buffered.safetensors")],
                           out / "pycopy-buffered.safetensors", "whole file"))
    if not skip_diffusers:
        jobs.append(Job("diffusers", "diffusers: from_single_file + load_lora_adapter + fuse_lora + save_pretrained",
                        me + ["diffusers", str(inp.base), str(inp.lora), str(inp.config_dir), str(out / "diffusers-unet")],
                        out / "diffusers-unet", "UNet only", keep_output=True))
    if sdmecha_python:
        jobs.append(Job("sdmecha", "sd-mecha: convert(kohya LoRA) + add_difference + merge (2 threads, fp16) + fsync",
                        [sdmecha_python, str(Path(__file__).resolve()), "--job", "sdmecha", str(inp.base), str(inp.lora),
                         str(out / "sdmecha.safetensors")],
                        out / "sdmecha.safetensors", "whole file", keep_output=True))
    return jobs


# --------------------------------------------------------------------------------------------
# Correctness: loratool --save unet vs diffusers, on sampled keys
# --------------------------------------------------------------------------------------------

def verify(inp: Inputs, ours_path: Path, theirs_path: Path, n: int = 20, seed: int = 0) -> dict[str, object]:
    import torch

    from lora_tools.io.model import open_model
    from lora_tools.io.safetensors import TensorFile
    from lora_tools.layouts.sdxl import to_diffusers
    from lora_tools.testing.synthetic_lora import LCM_TARGETS

    with TensorFile(ours_path) as ours, TensorFile(theirs_path) as theirs, open_model(inp.base) as base:
        ok, kt = set(ours.keys()), set(theirs.keys())
        shapes_ok = all(ours.info(k).shape == theirs.info(k).shape for k in ok & kt)
        dtypes = sorted({ours.info(k).dtype for k in ok} | {theirs.info(k).dtype for k in kt})
        rows = {row.diffusers: (ref, row) for ref in base.refs for row in ref.rows
                if row.component == "unet" and row.diffusers is not None}
        common = sorted(ok & kt)
        targeted = [k for k in common if k.endswith(tuple(f"{t}.weight" for t in LCM_TARGETS))]
        others = [k for k in common if k not in set(targeted)]
        rng = random.Random(seed)
        sample = rng.sample(targeted, min(len(targeted), n - 4)) + rng.sample(others, min(len(others), 4))
        worst, worst_key, changed = 0.0, "", 0
        for k in sample:
            a, b = ours.tensor(k).float(), theirs.tensor(k).float()
            ref, row = rows[k]
            before = to_diffusers(row, base.read(ref)).float()
            if not torch.equal(before, b):
                changed += 1
            err = (a - b).abs().max().item() / (b.abs().max().item() or 1.0)
            if err > worst:
                worst, worst_key = err, k
    tol = 2e-3
    return {"keys_ours": len(ok), "keys_diffusers": len(kt), "same_keys": ok == kt, "same_shapes": shapes_ok,
            "dtypes": dtypes, "sampled": len(sample), "changed_by_lora": changed, "max_rel_diff": worst,
            "worst_key": worst_key, "tolerance": tol,
            "ok": ok == kt and shapes_ok and worst <= tol and changed >= len(sample) - 4}


def verify_sdmecha(inp: Inputs, ours_path: Path, theirs_path: Path, n: int = 20, seed: int = 0) -> dict[str, object]:
    """``loratool fuse`` vs sd-mecha, both whole single-file checkpoints with the same key names: keys,
    shapes, and the largest relative difference on sampled UNet weights (most of them changed by the LoRA)."""
    import torch

    from lora_tools.io.safetensors import TensorFile

    with TensorFile(ours_path) as ours, TensorFile(theirs_path) as theirs, TensorFile(inp.base) as base:
        ok, kt = set(ours.keys()), set(theirs.keys())
        common = sorted(ok & kt)
        shapes_ok = all(ours.info(k).shape == theirs.info(k).shape for k in common)
        dtypes = sorted({ours.info(k).dtype for k in ok} | {theirs.info(k).dtype for k in kt})
        unet = [k for k in common if k.startswith("model.diffusion_model.") and k.endswith(".weight")
                and len(ours.info(k).shape) >= 2]
        rng = random.Random(seed)
        sample = rng.sample(unet, min(len(unet), n))
        worst, worst_key, changed = 0.0, "", 0
        for k in sample:
            a, b = ours.tensor(k).float(), theirs.tensor(k).float()
            if not torch.equal(base.tensor(k).float(), b):
                changed += 1
            err = (a - b).abs().max().item() / (b.abs().max().item() or 1.0)
            if err > worst:
                worst, worst_key = err, k
    tol = 2e-3
    return {"keys_ours": len(ok), "keys_sdmecha": len(kt), "same_keys": ok == kt, "only_ours": sorted(ok - kt)[:5],
            "only_sdmecha": sorted(kt - ok)[:5], "same_shapes": shapes_ok, "dtypes": dtypes, "sampled": len(sample),
            "changed_by_lora": changed, "max_rel_diff": worst, "worst_key": worst_key, "tolerance": tol,
            "ok": shapes_ok and worst <= tol and changed > 0}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def library_fingerprint(root: Path = REPO) -> str:
    """sha256 (first 12 hex digits) of lora_tools/**/*.py and its C kernel (source and build), to tell which
    library state was measured."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(q for q in (root / "lora_tools").rglob("*") if q.suffix in (".py", ".c", ".so")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def snapshot_library(cache: Path) -> tuple[Path, str]:
    """Copy lora_tools/ (sources only) so that every job of a run measures the same code, even
    while the working tree changes; returns (folder to import from, fingerprint)."""
    for _ in range(5):
        fp = library_fingerprint()
        root = cache / "snapshots" / fp
        if not (root / "lora_tools").is_dir():
            tmp = cache / "snapshots" / f".{fp}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(REPO / "lora_tools", tmp / "lora_tools", ignore=shutil.ignore_patterns("__pycache__"))
            if library_fingerprint(tmp) != fp:  # changed while copying: try again
                shutil.rmtree(tmp, ignore_errors=True)
                time.sleep(2)
                continue
            tmp.rename(root)
        import compileall

        compileall.compile_dir(str(root / "lora_tools"), quiet=1)  # no first-import compile inside a timed job
        return root, fp
    raise SystemExit("lora_tools keeps changing: cannot take a consistent snapshot")


def machine() -> dict[str, str]:
    import torch

    info = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "ram": f"{mem_total() / 2**30:.1f} GiB",
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": f"{platform.system()} {platform.release()}",
        "library": library_fingerprint(LIBRARY_ROOT),
        "fp8 kernel": _fp8_kernel(),
    }
    for mod in ("diffusers", "peft", "transformers", "safetensors"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = "not installed"
    return info


def _fp8_kernel() -> str:
    """Whether the measured lora_tools rounds fp8 with its C kernel (lora_tools/io/_native.c) or with torch."""
    p = subprocess.run([sys.executable, "-c", "from lora_tools.io import fp8; print(fp8._native is not None)"],
                       env={**os.environ, "PYTHONPATH": str(LIBRARY_ROOT)}, capture_output=True, text=True)
    return {"True": "the C kernel (lora_tools/io/_native.c)", "False": "torch (the C kernel is not built here)"}.get(p.stdout.strip(), "unknown")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_rss(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table(jobs: list[Job], base_bytes: int) -> str:
    by = {j.key: j for j in jobs}
    cp, floor = by["cp"].wall, by["pycopy"].wall
    peer = by["diffusers"].wall if "diffusers" in by and by["diffusers"].runs else None
    mecha = by["sdmecha"].wall if "sdmecha" in by and by["sdmecha"].runs else None
    lines = ["| job | writes | wall s | x durable cp | x I/O floor | diffusers' time / this | this / sd-mecha | peak RSS | "
             "CPU s (job) | other busy cores | free RAM at start, GB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for j in jobs:
        spread = ""
        if len(j.runs) > 1:
            spread = f" ({min(r.wall_s for r in j.runs):.1f}-{max(r.wall_s for r in j.runs):.1f})"
        cpu = statistics.median(r.cpu_s for r in j.runs)
        other = max(r.other_load for r in j.runs)
        frees = [r.mem_free / GB for r in j.runs]
        free = f"{min(frees):.1f}" if len(frees) == 1 else f"{min(frees):.1f}-{max(frees):.1f}"
        vs_peer = f"{peer / j.wall:.2f}" if peer is not None else "-"
        vs_mecha = f"{j.wall / mecha:.2f}" if mecha is not None else "-"
        lines.append(f"| {j.label} | {j.writes} | {j.wall:.1f}{spread} | {j.wall / cp:.2f} | {j.wall / floor:.2f} | {vs_peer} | "
                     f"{vs_mecha} | "
                     f"{fmt_rss(j.peak)} | {cpu:.1f} | {other:.2f} | {free} |")
    return "\n".join(lines)


def targets(jobs: list[Job]) -> list[tuple[str, bool, str]]:
    by = {j.key: j for j in jobs}
    out: list[tuple[str, bool, str]] = []
    cp = by["cp"]
    fuse, unet, d = by.get("fuse"), by.get("fuse-unet"), by.get("diffusers")
    if fuse is not None:
        r = fuse.wall / cp.wall
        out.append(("whole-checkpoint fuse <= 1.3x durable cp", r <= 1.3, f"{fuse.wall:.1f} s / {cp.wall:.1f} s = {r:.2f}x"))
        cp_min = min(x.wall_s for x in cp.runs)
        if len(cp.runs) > 1 and max(x.wall_s for x in cp.runs) > 1.3 * cp_min:
            r2 = fuse.wall / cp_min
            out.append(("(robustness: cp varied a lot) fuse median <= 1.3x the fastest cp run", r2 <= 1.3,
                        f"{fuse.wall:.1f} s / {cp_min:.1f} s = {r2:.2f}x"))
    if d is not None and fuse is not None:
        s = d.wall / fuse.wall
        out.append((">= 2.5x faster than diffusers' UNet-only path, writing the whole checkpoint", s >= 2.5,
                    f"{d.wall:.1f} s / {fuse.wall:.1f} s = {s:.2f}x"))
    if d is not None and unet is not None:
        s2 = d.wall / unet.wall
        out.append(("(same output) loratool --save unet >= 2.5x faster than diffusers", s2 >= 2.5,
                    f"{d.wall:.1f} s / {unet.wall:.1f} s = {s2:.2f}x"))
    m = by.get("sdmecha")
    if m is not None and fuse is not None:  # issue 23: fuse vs sd-mecha in the same run
        out.append(("issue 23: whole-checkpoint fuse faster than sd-mecha's (same run, same output)", fuse.wall < m.wall,
                    f"{fuse.wall:.1f} s / {m.wall:.1f} s = {fuse.wall / m.wall:.2f}x, peak RSS {fmt_rss(fuse.peak)} vs "
                    f"{fmt_rss(m.peak)}"))
    floor = by.get("pycopy")
    if fuse is not None and floor is not None:
        r = fuse.wall / floor.wall
        out.append(("whole-checkpoint fuse <= 1.25x the I/O floor (page-cache reads, O_DIRECT writes + fsync)",
                    r <= 1.25, f"{fuse.wall:.1f} s / {floor.wall:.1f} s = {r:.2f}x"))
    hashed = by.get("fuse-hash")
    if floor is not None:  # issue 23: the user waits for the disk, not for the CPU
        nohash = by.get("fuse-nohash")
        if nohash is not None:
            r = nohash.wall / floor.wall
            out.append(("issue 23: whole-checkpoint fuse <= 1.05x the I/O floor (no output hash)", r <= 1.05,
                        f"{nohash.wall:.2f} s / {floor.wall:.2f} s = {r:.2f}x"))
        if fuse is not None:
            r = fuse.wall / floor.wall
            out.append(("issue 23: whole-checkpoint fuse <= 1.20x the I/O floor, output hash included (the CLI's "
                        "default: the data's xxh3-128, recorded in the file)", r <= 1.20,
                        f"{fuse.wall:.2f} s / {floor.wall:.2f} s = {r:.2f}x"))
        if hashed is not None:
            r = hashed.wall / floor.wall
            out.append(("whole-checkpoint fuse <= 1.20x the I/O floor with the output's sha256/AutoV2 (--hash-output)", r <= 1.20,
                        f"{hashed.wall:.2f} s / {floor.wall:.2f} s = {r:.2f}x"))
    fp8 = by.get("fuse-fp8")
    if fp8 is not None and fuse is not None:  # issue 21: fp8 at most 10 % slower than the fp16 fuse
        r = fp8.wall / fuse.wall
        cpu_r = statistics.median(x.cpu_s for x in fp8.runs) / statistics.median(x.cpu_s for x in fuse.runs)
        out.append(("issue 21: fp8 fuse <= 1.10x the fp16 fuse (wall)", r <= 1.10,
                    f"{fp8.wall:.2f} s / {fuse.wall:.2f} s = {r:.2f}x (CPU {cpu_r:.2f}x)"))
    for key in ("fuse-hash", "fuse-fp8"):
        now, then = by.get(key), by.get(key + "-baseline")
        if now is not None and then is not None:
            note = (" (the CLI now, the library call before: not the same work, the CLI also writes its run entry)"
                    if key == "fuse-hash" else "")
            out.append((f"{key} no slower than before (alternating runs){note}", now.wall <= then.wall * 1.02,
                        f"{now.wall:.2f} s now vs {then.wall:.2f} s before"))
    ours23 = [j for j in (fuse, by.get("fuse-nohash"), hashed, fp8) if j is not None]
    if ours23:
        out.append(("issue 23: fuse peak RSS <= 700 MB", max(j.peak for j in ours23) <= 700e6,
                    ", ".join(f"{fmt_rss(j.peak)} ({j.key})" for j in ours23)))
    before = by.get("fuse-baseline")
    if fuse is not None and before is not None:
        out.append(("fuse no slower than before (alternating runs)", fuse.wall <= before.wall * 1.02,
                    f"{fuse.wall:.2f} s now vs {before.wall:.2f} s before"))
        out.append(("fuse peak RSS no higher than before", fuse.peak <= before.peak * 1.05,
                    f"{fmt_rss(fuse.peak)} now vs {fmt_rss(before.peak)} before"))
    ours = [j for j in (fuse, unet) if j is not None]
    if ours:
        out.append(("loratool peak RSS < 1 GB", max(j.peak for j in ours) < 1e9,
                    ", ".join(f"{fmt_rss(j.peak)} ({j.key})" for j in ours)))
    return out


def phases_text(jobs: list[Job]) -> str:
    lines = []
    for j in jobs:
        ph = j.runs[-1].phases if j.runs else {}
        warm_s = statistics.median(r.warm_s for r in j.runs) if j.runs else 0.0
        if ph:
            lines.append(f"- {j.key}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in ph.items())
                         + f" (inputs warm-up before it: {warm_s:.1f} s)")
        else:
            lines.append(f"- {j.key}: (inputs warm-up before it: {warm_s:.1f} s)")
    return "\n".join(lines)


def write_results(path: Path, args: argparse.Namespace, inp: Inputs, jobs: list[Job], check: dict[str, object] | None,
                  info: dict[str, str], base_bytes: int, lora_bytes: int,
                  mecha_check: dict[str, object] | None = None, mecha_skipped: str | None = None) -> None:
    tg = targets(jobs)
    md = [
        "# fuse_sdxl benchmark results",
        "",
        f"Run on {info['date']} with `python benchmarks/fuse_sdxl.py --size {args.size} --repeat {args.repeat}"
        + (" --skip-diffusers" if args.skip_diffusers else "") + (f" --baseline {args.baseline}" if args.baseline else "")
        + (f" --only {' '.join(args.only)}" if args.only else "")
        + (f" --sdmecha-python {args.sdmecha_python}" if args.sdmecha_python else "") + f"`; load average {info.get('load', '?')} at the "
        "start, " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the end (2 cores: above 2, every job waited "
        "for other sessions' processes; compare within the run, and CPU seconds, not seconds across runs).",
        "",
        "## Machine",
        "",
        f"- CPU: {info['cpu']}, {info['cpus']} cores visible (torch default threads: {info['torch_threads']}; loratool sets its own)",
        f"- RAM: {info['ram']}",
        f"- OS: {info['os']}, Python {info['python']}",
        f"- torch {info['torch']}, diffusers {info['diffusers']}, peft {info['peft']}, transformers {info['transformers']}, "
        f"safetensors {info['safetensors']}"
        + (f"; sd-mecha {info['sd_mecha']} (its own venv: {args.sdmecha_python})" if info.get("sd_mecha") else ""),
        f"- lora_tools sources fingerprint: `{info['library']}` (sha256 of lora_tools/**/*.py and its C part measured); "
        f"fp8 rounding: {info.get('fp8 kernel', 'unknown')}",
        f"- Inputs: synthetic SDXL single file {base_bytes / GB:.2f} GB fp16 (UNet + 2 text encoders + VAE, "
        f"random weights, real SDXL shapes); Lightning-shaped LoRA {lora_bytes / 1e6:.0f} MB "
        "(788 modules, rank 64, alpha 8, fp16, kohya keys, named `sdxl_lightning_4step_lora.safetensors`).",
        "",
        "## Results",
        "",
        table(jobs, base_bytes),
        "",
        f"Wall time is the median of {args.repeat} run(s) (range in brackets when more than one), from process start to "
        "exit (interpreter start and imports included). Peak RSS is the job process's `ru_maxrss` (GNU `time -f %M`): pages "
        "touched through a memory map count. Page cache: the inputs were read once before every job (outside the timing), "
        "so every job read them warm; outputs were removed and `sync` run between jobs. CPU s is the job's user + "
        "system time. Other busy cores is the machine's busy CPU time during the job minus the job's own, over the "
        "wall time: other processes, plus kernel threads working for the job (page-cache writeback), so a few tenths "
        "are normal for jobs that write; more means another process competed for the 2 cores. Free RAM at start is "
        "MemFree when the job began. On this VM buffered writes are bound by kernel CPU (CPU s close to wall s) and "
        "that cost varies a lot from run to run for the same copy (`cp` + `sync` took 2.9 to 16.4 s of wall time "
        "during this work; low free memory makes it worse, but not always), so the `cp` reference moves; O_DIRECT "
        "writes, which bypass the page cache, stay steady. When `cp` varied, the targets table also compares the "
        "fuse with the fastest `cp` run.",
        "",
        "## Targets",
        "",
        "| target | met | measured |",
        "|---|---|---|",
    ]
    md += [f"| {name} | {'yes' if ok else 'NO'} | {detail} |" for name, ok, detail in tg]
    md += ["", "## Correctness (apples to apples)", ""]
    if check is None:
        md.append("Skipped (diffusers not run).")
    else:
        md.append(f"`loratool fuse --save unet` and diffusers' fused UNet: {check['keys_ours']} vs {check['keys_diffusers']} keys "
                  f"(same keys: {check['same_keys']}, same shapes: {check['same_shapes']}, dtypes {', '.join(check['dtypes'])}); "  # type: ignore[arg-type]
                  f"{check['sampled']} sampled tensors, {check['changed_by_lora']} of them changed by the LoRA, max relative "
                  f"difference {check['max_rel_diff']:.2e} (`{check['worst_key']}`), tolerance {check['tolerance']:.0e}: "
                  f"**{'OK' if check['ok'] else 'MISMATCH'}**.")
    if mecha_check is not None:
        c = mecha_check
        md.append("")
        md.append(f"`loratool fuse` and sd-mecha, whole checkpoints: {c['keys_ours']} vs {c['keys_sdmecha']} keys (same keys: "
                  f"{c['same_keys']}, same shapes: {c['same_shapes']}, dtypes {', '.join(c['dtypes'])}); "  # type: ignore[arg-type]
                  f"{c['sampled']} sampled UNet weights, {c['changed_by_lora']} of them changed by the LoRA, max relative "
                  f"difference {c['max_rel_diff']:.2e} (`{c['worst_key']}`), tolerance {c['tolerance']:.0e}: "
                  f"**{'OK' if c['ok'] else 'MISMATCH'}**.")
    elif mecha_skipped:
        md += ["", f"sd-mecha not run: {mecha_skipped}."]
    md += ["", "## Phases (last run of each job, seconds)", "", phases_text(jobs), ""]
    path.write_text("\n".join(md))


# --------------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--job":
        run_job(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=HERE / ".cache", help="where inputs and outputs go (default: benchmarks/.cache)")
    ap.add_argument("--size", choices=["full", "tiny"], default="full", help="full (~6.9 GB) or tiny (smoke run)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each job (median reported)")
    ap.add_argument("--skip-diffusers", action="store_true", help="do not run the diffusers job")
    ap.add_argument("--sdmecha-python", default=os.environ.get("SDMECHA_PYTHON"),
                    help="python of a separate venv with sd-mecha installed: adds the sdmecha job (default: "
                         "$SDMECHA_PYTHON; without it the job is skipped, with the reason printed)")
    ap.add_argument("--only", nargs="+", help="run only these jobs (cp pycopy pycopy-buffered fuse fuse-nohash fuse-hash fuse-fp8 "
                    "fuse-unet diffusers sdmecha, and with --baseline fuse-baseline fuse-hash-baseline fuse-fp8-baseline)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the jobs' outputs go (default: CACHE/SIZE/out; a folder of your own on a shared cache)")
    ap.add_argument("--results", type=Path, default=None,
                    help="markdown file for the results (default: benchmarks/RESULTS.md for --size full, none for tiny)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep every job's output under CACHE/SIZE/out")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="import lora_tools from the working tree (default: from a copy taken when the run starts, "
                         "under CACHE/snapshots/, so concurrent edits cannot mix library versions within a run)")
    ap.add_argument("--baseline", metavar="REV",
                    help="also run the fuse with lora_tools as it was at this git revision, alternating with today's "
                         "(before/after in one run)")
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="before each job, wait up to this many seconds for other processes to go quiet (0: don't)")
    args = ap.parse_args()
    args.cache_dir = args.cache_dir.resolve()  # jobs run with the cache folder as their working directory
    results = args.results or (HERE / "RESULTS.md" if args.size == "full" else None)

    global LIBRARY_ROOT
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if not args.no_snapshot:
        LIBRARY_ROOT, _ = snapshot_library(args.cache_dir)
        sys.path.insert(0, str(LIBRARY_ROOT))
        env["FUSE_SDXL_LIBRARY_ROOT"] = str(LIBRARY_ROOT)
        env["PYTHONPATH"] = os.pathsep.join([str(LIBRARY_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        print(f"measuring a snapshot of lora_tools: {LIBRARY_ROOT}")
    fingerprint = library_fingerprint(LIBRARY_ROOT)
    load_at_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    if args.size != "tiny":
        preflight(args.cache_dir, env)
    inp = ensure_inputs(args.cache_dir, args.size)
    if args.out_dir is not None:
        inp.out_dir = args.out_dir.resolve()
        inp.out_dir.mkdir(parents=True, exist_ok=True)
    base_bytes, lora_bytes = inp.base.stat().st_size, inp.lora.stat().st_size
    need = (3 if args.sdmecha_python else 2) * base_bytes + lora_bytes  # sd-mecha's output is kept for the check
    free_disk = shutil.disk_usage(inp.out_dir).free
    if free_disk < need:
        raise SystemExit(f"not enough free disk under {inp.out_dir}: {free_disk / GB:.1f} GB, need about {need / GB:.1f} GB")
    avail = mem_available()
    if avail and avail < base_bytes + lora_bytes + 2 * GB:
        print(f"warning: only {avail / GB:.1f} GB of memory available: the base may not stay in the page cache, "
              "so jobs may read it from disk", flush=True)
    baseline = (args.baseline, snapshot_revision(args.cache_dir, args.baseline)) if args.baseline else None
    mecha_skipped = sdmecha_problem(args.sdmecha_python, args.size)
    if mecha_skipped and (not args.only or "sdmecha" in args.only):
        print(f"sdmecha job skipped: {mecha_skipped}", flush=True)
    jobs = build_jobs(inp, args.skip_diffusers, baseline, None if mecha_skipped else args.sdmecha_python)
    if args.only:
        keep = set(args.only) | {"cp", "pycopy"}
        jobs = [j for j in jobs if j.key in keep]
    if any(j.key == "sdmecha" for j in jobs):
        for j in jobs:
            j.keep_output = j.keep_output or j.key == "fuse"  # compared with sd-mecha's output after the first round
    for j in jobs:
        remove(j.output)
    logs = inp.root / "logs"
    logs.mkdir(exist_ok=True)
    print(f"base {inp.base} ({base_bytes / GB:.2f} GB), LoRA {inp.lora} ({lora_bytes / 1e6:.0f} MB)")
    print("page cache: the inputs are read once before every job (not timed), so every job sees them warm", flush=True)
    check = mecha_check = None
    for rep in range(args.repeat):
        for j in jobs:
            remove(j.output)
            os.sync()
            warm_s, nbytes = warm([inp.base, inp.lora])
            if args.wait_idle > 0:
                load = wait_for_quiet(args.wait_idle)
                if load >= 0.25:
                    print(f"warning: other processes keep {load:.1f} cores busy; timings of {j.key} will suffer", flush=True)
            free = mem_free()
            # cwd: the cache folder, so no job imports lora_tools from the working tree by accident
            run = measure(j.cmd, logs / f"{j.key}-{rep}.log", dict(env, **(j.env or {})), cwd=inp.root)
            run.warm_s = warm_s
            run.mem_free = free
            j.runs.append(run)
            print(f"[{rep + 1}/{args.repeat}] {j.key:<10} {run.wall_s:7.1f} s  peak RSS {fmt_rss(run.peak_rss):>9}  "
                  f"cpu {run.cpu_s:5.1f} s  other busy cores {run.other_load:.2f}  free RAM {free / GB:.1f} GB  "
                  f"(warm-up {warm_s:.1f} s, {nbytes / GB / max(warm_s, 1e-9):.1f} GB/s)"
                  + (f"  phases: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in run.phases.items()})}"
                     if run.phases else ""),
                  flush=True)
            if not j.keep_output and not args.keep_outputs:
                remove(j.output)
        by = {j.key: j for j in jobs}
        if rep == 0 and "diffusers" in by and "fuse-unet" in by:
            theirs = next(by["diffusers"].output.glob("*.safetensors"))
            check = verify(inp, by["fuse-unet"].output, theirs)
            print(f"correctness: {json.dumps(check)}", flush=True)
        if rep == 0 and "sdmecha" in by and "fuse" in by:
            mecha_check = verify_sdmecha(inp, by["fuse"].output, by["sdmecha"].output)
            print(f"correctness vs sd-mecha: {json.dumps(mecha_check)}", flush=True)
        if not args.keep_outputs:
            for j in jobs:
                remove(j.output)

    print()
    print(table(jobs, base_bytes))
    print()
    for name, ok, detail in targets(jobs):
        print(f"{'MET ' if ok else 'MISS'}  {name}: {detail}")
    info = machine()
    info["load"] = load_at_start
    mecha_job = next((j for j in jobs if j.key == "sdmecha" and j.runs), None)
    if mecha_job is not None:
        info["sd_mecha"] = str(mecha_job.runs[-1].phases.get("sd_mecha", "?"))
    if info["library"] != fingerprint:
        info["library"] += f" (WARNING: was {fingerprint} when the run started: lora_tools changed during the run)"
        print(f"warning: lora_tools changed during the run ({fingerprint} -> {info['library']})")
    elif not args.no_snapshot and library_fingerprint() != fingerprint:
        info["library"] += f" (snapshot; the working tree is now at {library_fingerprint()})"
    raw = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "correctness": check,
           "correctness_sdmecha": mecha_check, "sdmecha_skipped": mecha_skipped,
           "jobs": {j.key: {"label": j.label, "runs": [dataclasses.asdict(r) for r in j.runs]} for j in jobs}}
    raw_path = inp.root / f"results-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    raw_path.write_text(json.dumps(raw, indent=1, default=str))
    print(f"raw measurements: {raw_path}")
    if results is not None:
        write_results(results, args, inp, jobs, check, info, base_bytes, lora_bytes, mecha_check, mecha_skipped)
        print(f"\nwrote {results}")


if __name__ == "__main__":
    main()
