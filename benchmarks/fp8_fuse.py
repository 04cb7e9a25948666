"""fp8 vs fp16 fuse on a synthetic SDXL: file size, fuse wall time, weight error of the fp8 rounding.

    python benchmarks/fp8_fuse.py --size tiny            # seconds, CPU
    python benchmarks/fp8_fuse.py --size full --repeat 3 # ~6.9 GB base; the fp8 fuse should stay within 10 % of fp16

Each run fuses the same base (fp16) and Lightning-shaped LoRA three ways (``--dtype fp16``, ``--dtype fp8``,
``--dtype fp8 --fp8 plain``) through the library (``lora_tools.fuse``); the median wall time of ``--repeat``
runs is reported with each output's size and, for fp8, the relative Frobenius error of the UNet and its
worst tensor. Results go to stdout and, with ``--results``, a JSON file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from lora_tools.ops.fuse import fuse
from lora_tools.testing.synthetic import write_checkpoint
from lora_tools.testing.synthetic_lora import write_lightning_lora

RUNS = {"fp16": {"dtype": "fp16"}, "fp8-scaled": {"dtype": "fp8", "fp8": "scaled"},
        "fp8-plain": {"dtype": "fp8", "fp8": "plain"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["tiny", "micro", "full"], default="tiny")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, default=None, help="where the inputs and outputs go (default: a temp dir)")
    ap.add_argument("--results", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    root = args.cache_dir or Path(tempfile.mkdtemp(prefix="fp8-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    base, lora = root / f"base-{args.size}.safetensors", root / f"lora-{args.size}.safetensors"
    if not base.exists():
        write_checkpoint(base, args.size, dtype="fp16")  # type: ignore[arg-type]
    if not lora.exists():
        write_lightning_lora(lora, args.size)  # type: ignore[arg-type]
    results: dict[str, dict[str, object]] = {}
    for name, kw in RUNS.items():
        seconds = []
        for _ in range(args.repeat):
            r = fuse(base, loras=[(str(lora), 1.0)], output=root / f"{name}.safetensors", overwrite=True, **kw)  # type: ignore[arg-type]
            seconds.append(r.seconds)
        entry: dict[str, object] = {"seconds": statistics.median(seconds), "bytes": r.files[0].nbytes}
        if r.fp8_error is not None:
            entry |= {"relative_error": r.fp8_error.relative, "worst": r.fp8_error.worst,
                      "fp8_tensors": r.fp8_error.tensors}
        results[name] = entry
    fp16 = results["fp16"]
    for name, e in results.items():
        line = (f"{name:11s} {e['bytes'] / 2**20:9.1f} MiB  {e['seconds']:7.2f} s "
                f"({e['seconds'] / fp16['seconds']:.2f}x fp16)")  # type: ignore[operator]
        if "relative_error" in e:
            line += f"  error {e['relative_error']:.3%} (worst {e['worst'][1]:.2%})"  # type: ignore[index]
        print(line)
    if args.results:
        args.results.write_text(json.dumps({"size": args.size, "repeat": args.repeat, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
