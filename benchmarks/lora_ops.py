#!/usr/bin/env python
"""Benchmark: resize and svd-merge of a full-size Lightning-shaped LoRA, ours vs dense (not a test).

The LoRA is the one ``write_lightning_lora(size="full")`` writes (788 UNet modules of the LCM-LoRA
SDXL target list, rank 64, alpha 8), built in memory from the same factor generator (so no
~394 MB file is written; file I/O is not what is measured here).

  resize       rank 64 -> 16 of every module with :func:`lora_tools.lowrank.truncate` (QR of the
               factors, SVD of the 64 x 64 core)
  resize-dense the approach kohya's ``resize_lora.py`` takes: form each module's dense delta and
               take its full SVD. Over a fixed sample of modules (every ``--dense-every``-th),
               scaled by the sample's share of the total delta size (sum of out*in) to a full-LoRA estimate
  merge        svd merge of two such LoRAs to rank 64 (stacked factors, QR, SVD of the 128 x 128 core)
  merge-dense  dense sum of both deltas and its full SVD, same sample and scaling

The optimality check compares our singular values with the dense ones on the sample.

Usage:
    python benchmarks/lora_ops.py                 # full size, dense on every 8th module
    python benchmarks/lora_ops.py --quick         # dense on every 40th module
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from lora_tools.lora.delta import module_scale
from lora_tools.lowrank import RankRule, flatten_conv, stack_factors, truncate
from lora_tools.testing.synthetic import config_for
from lora_tools.testing.synthetic_lora import module_factors, select_targets


def _lora(seed: int, rank: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    cfg = config_for("full")
    mods = []
    for t in select_targets(cfg, "lightning"):
        f = module_factors(t, "lora", rank, seed=seed)
        up, down, _ = flatten_conv(f["up"].half().float(), f["down"].half().float())
        mods.append((t.diffusers_module, up, down))
    return mods


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _dense_sv(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(up @ down)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="dense reference on every 40th module")
    ap.add_argument("--dense-every", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    every = 40 if args.quick else args.dense_every
    t0 = time.perf_counter()
    a, b = _lora(0, 64), _lora(1, 64)
    _say(f"built two LoRAs of {len(a)} modules in {time.perf_counter() - t0:.1f} s")
    scale = module_scale(8.0, 64)
    size_all = sum(u.shape[0] * d.shape[1] for _, u, d in a)
    sample = list(range(0, len(a), every))
    size_sample = sum(a[i][1].shape[0] * a[i][2].shape[1] for i in sample)
    factor = size_all / size_sample  # dense SVD cost grows at least with out*in: a conservative scale

    t0 = time.perf_counter()
    res = [truncate(u, d, RankRule(rank=args.rank), scale=scale) for _, u, d in a]
    t_resize = time.perf_counter() - t0
    _say(f"resize: {t_resize:.2f} s")

    t0 = time.perf_counter()
    dense_sv = {}
    for i in sample:
        _, u, d = a[i]
        dense_sv[i] = _dense_sv(scale * u, d)
    t_resize_dense = (time.perf_counter() - t0) * factor
    _say(f"resize dense (est.): {t_resize_dense:.1f} s")
    worst = max(float((res[i].singular_values - dense_sv[i][:64]).abs().max() / dense_sv[i][0]) for i in sample)

    t0 = time.perf_counter()
    for (_, ua, da), (_, ub, db) in zip(a, b):
        up, down = stack_factors([(ua, da, scale), (ub, db, scale)])
        truncate(up, down, RankRule(rank=64))
    t_merge = time.perf_counter() - t0
    _say(f"merge: {t_merge:.2f} s")

    t0 = time.perf_counter()
    for i in sample:
        (_, ua, da), (_, ub, db) = a[i], b[i]
        torch.linalg.svdvals(scale * (ua @ da) + scale * (ub @ db))
    t_merge_dense = (time.perf_counter() - t0) * factor

    energy = sum(r.retained_energy * r.total_energy for r in res) / sum(r.total_energy for r in res)
    out = {
        "modules": len(a), "rank_in": 64, "rank_out": args.rank, "threads": args.threads,
        "dense_sample": f"{len(sample)} of {len(a)} modules, x{factor:.1f}",
        "resize_s": round(t_resize, 2), "resize_dense_s_est": round(t_resize_dense, 1),
        "resize_speedup": round(t_resize_dense / t_resize, 1),
        "merge_s": round(t_merge, 2), "merge_dense_s_est": round(t_merge_dense, 1),
        "merge_speedup": round(t_merge_dense / t_merge, 1),
        "retained_energy_rank16": round(energy, 4),
        "max_rel_sv_diff_vs_dense": float(f"{worst:.2e}"),
    }
    print(json.dumps(out, indent=2))
    assert math.isfinite(worst)


if __name__ == "__main__":
    main()
