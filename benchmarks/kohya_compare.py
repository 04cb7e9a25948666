#!/usr/bin/env python
"""Benchmark: our LoRA maths next to kohya sd-scripts' rules on the same inputs (not a test; 4 CPU-minutes).

kohya's rules are REIMPLEMENTED here from their definitions in sd-scripts (``networks/resize_lora.py``,
``svd_merge_lora.py``, ``sdxl_merge_lora.py --concat``, ``extract_lora_from_models.py``); sd-scripts itself is not
imported (it needs its own pinned transformers/diffusers/accelerate). Per operation, as kohya documents it:

  resize          dense ``up @ down`` of each module, full SVD, the first ``r`` directions (``U S``, ``Vh``), alpha
                  ``scale * r`` (the dynamic rules count ``index + 1``, see ``lora_tools.lora.lowrank``)
  svd merge       the dense weighted sum of the deltas, full SVD, ``r`` directions, then every entry of ``U S`` and
                  ``Vh`` clamped to the 0.99 quantile of them all (``CLAMP_QUANTILE``), alpha = ``r``
  concat merge    factors concatenated, each input's scaled by ``sqrt(alpha_i / alpha_1) * w_i`` (the up factor by
                  its absolute value), alpha = the FIRST input's, rank = the sum
  extract         each module's difference, full SVD, ``r`` directions, clamped as svd merge (``--clamp_quantile``
                  0.99), alpha = ``r``

Ours runs through the real command (``loratool resize/merge/extract``). Inputs are built here: two tiny SDXL kohya
LoRAs (attention modules, rank 16, alphas 8 and 16) whose modules have decaying spectra, and a tiny SDXL checkpoint
with a full-rank decaying difference on every attention projection. The error is the overall relative Frobenius
error ``sqrt(sum ||D - D'||^2 / sum ||D||^2)`` against the exact result (the input delta, the exact weighted sum,
the true difference), in float64.

Usage:
    python benchmarks/kohya_compare.py            # prints the markdown table
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_tools.cli import cli
from lora_tools.layouts.sdxl import TINY
from lora_tools.layouts.targets import TargetIndex
from lora_tools.testing.synthetic import write_checkpoint
from lora_tools.testing.synthetic_lora import write_lora

RANK_IN = 16
CLAMP_QUANTILE = 0.99
Deltas = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------- inputs
def spectral_lora(path: Path, seed: int, alpha: float) -> Path:
    """A tiny kohya LoRA whose modules have decaying spectra with random rates."""
    write_lora(path, "tiny", fmt="kohya", rank=RANK_IN, alpha=alpha, seed=seed)
    t = load_file(str(path))
    g = torch.Generator().manual_seed(seed)
    for key in [k for k in t if k.endswith(".lora_down.weight")]:
        up = key.replace("lora_down", "lora_up")
        out, inn = t[up].shape[0], t[key].shape[1]
        rate = 0.1 + 0.5 * float(torch.rand((), generator=g))
        s = torch.exp(-rate * torch.arange(RANK_IN, dtype=torch.float32)) * (1 + 0.2 * torch.rand(RANK_IN, generator=g))
        s = s.sort(descending=True).values
        t[up] = (torch.linalg.qr(torch.randn(out, RANK_IN, generator=g)).Q * s.sqrt()).contiguous()
        t[key] = (s.sqrt()[:, None] * torch.linalg.qr(torch.randn(inn, RANK_IN, generator=g)).Q.T).contiguous()
    save_file(t, str(path), metadata={"format": "pt"})
    return path


def tuned_checkpoint(base: Path, out: Path) -> Deltas:
    """``base`` plus a full-rank decaying difference on every UNet attention projection; the differences."""
    t = load_file(str(base))
    g = torch.Generator().manual_seed(11)
    diffs = {}
    for target in TargetIndex(TINY.table).targets:
        if target.component != "unet" or ".attentions." not in target.diffusers_module or len(target.shape) != 2:
            continue
        if target.part is not None:
            continue
        o, i = target.shape
        n = min(o, i)
        s = 0.02 * torch.exp(-torch.arange(n, dtype=torch.float64) / 6)
        d = (torch.linalg.qr(torch.randn(o, n, generator=g, dtype=torch.float64)).Q * s) @ \
            torch.linalg.qr(torch.randn(i, n, generator=g, dtype=torch.float64)).Q.T
        t[target.sgm_key] = (t[target.sgm_key].double() + d).to(t[target.sgm_key].dtype)
        diffs[target.diffusers_module] = d  # the file is fp32: the stored difference is d to 1e-7 relative
    save_file(t, str(out), metadata={"format": "pt"})
    return diffs


# ---------------------------------------------------------------------------------------- reading deltas
def kohya_deltas(path: Path) -> tuple[Deltas, dict[str, int]]:
    """Every module's delta (alpha / rank * up @ down, float64) and rank of a kohya-format LoRA file."""
    t = load_file(str(path))
    deltas, ranks = {}, {}
    for key in (k for k in t if k.endswith(".lora_down.weight")):
        name = key.removesuffix(".lora_down.weight")
        down, up = t[key].double(), t[f"{name}.lora_up.weight"].double()
        r = down.shape[0]
        alpha = float(t[f"{name}.alpha"]) if f"{name}.alpha" in t else r
        deltas[name] = alpha / r * (up.reshape(up.shape[0], -1) @ down.reshape(r, -1))
        ranks[name] = r
    return deltas, ranks


def factors(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    t = load_file(str(path))
    out = {}
    for key in (k for k in t if k.endswith(".lora_down.weight")):
        name = key.removesuffix(".lora_down.weight")
        down, up = t[key].double(), t[f"{name}.lora_up.weight"].double()
        out[name] = (up, down, float(t[f"{name}.alpha"]) if f"{name}.alpha" in t else down.shape[0])
    return out


def rel_error(ref: Deltas, got: Deltas) -> float:
    num = sum(float(((ref[k] - got[k]) ** 2).sum()) if k in got else float((ref[k] ** 2).sum()) for k in ref)
    return math.sqrt(num / sum(float((v ** 2).sum()) for v in ref.values()))


# ----------------------------------------------------------------------------------- kohya's rules, reimplemented
def kohya_dynamic_rank(s: torch.Tensor, method: str, param: float, cap: int) -> int:
    if method == "sv_ratio":
        index = int((s > s[0] / param).sum())
    elif method == "sv_fro":
        index = int(torch.searchsorted(torch.cumsum(s ** 2, 0) / (s ** 2).sum(), param ** 2)) + 1
    else:
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), param)) + 1
    rank = max(1, min(index, len(s) - 1)) + 1
    return 1 if float(s[0]) <= 1e-6 else min(rank, cap)


def kohya_resize(path: Path, rank: int | None, method: str | None = None, param: float = 0.0) -> tuple[Deltas, float]:
    out, ranks = {}, []
    for name, (up, down, alpha) in factors(path).items():
        scale = alpha / down.shape[0]
        u, s, vh = torch.linalg.svd((up @ down).float())  # kohya factorises in float32
        r = kohya_dynamic_rank(s, method, param, down.shape[0]) if method else rank
        assert r is not None
        ranks.append(r)
        out[name] = scale * ((u[:, :r] * s[:r]) @ vh[:r]).double()
    return out, sum(ranks) / len(ranks)


def _clamped(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> torch.Tensor:
    us, v = u[:, :r] * s[:r], vh[:r]
    hi = torch.quantile(torch.cat([us.flatten(), v.flatten()]), CLAMP_QUANTILE)
    return (us.clamp(-hi, hi) @ v.clamp(-hi, hi)).double()


def kohya_svd_merge(paths: list[Path], weights: list[float], rank: int) -> Deltas:
    total: Deltas = {}
    for path, w in zip(paths, weights, strict=True):
        for name, (up, down, alpha) in factors(path).items():
            total[name] = total.get(name, 0) + w * alpha / down.shape[0] * (up @ down)  # type: ignore[operator]
    out = {}
    for name, m in total.items():
        u, s, vh = torch.linalg.svd(m.float())
        out[name] = _clamped(u, s, vh, min(rank, *m.shape))
    return out


def kohya_concat(paths: list[Path], weights: list[float]) -> Deltas:
    first = factors(paths[0])
    ups: dict[str, list[torch.Tensor]] = {}
    downs: dict[str, list[torch.Tensor]] = {}
    for path, w in zip(paths, weights, strict=True):
        for name, (up, down, alpha) in factors(path).items():
            s = math.sqrt(alpha / first[name][2]) * w
            ups.setdefault(name, []).append(up * abs(s))
            downs.setdefault(name, []).append(down * s)
    out = {}
    for name in ups:
        up, down = torch.cat(ups[name], 1), torch.cat(downs[name], 0)
        out[name] = first[name][2] / down.shape[0] * (up @ down)  # alpha: the first input's; rank: the sum
    return out


def kohya_extract(diffs: Deltas, rank: int) -> Deltas:
    out = {}
    for name, d in diffs.items():
        u, s, vh = torch.linalg.svd(d.float())
        out[name] = _clamped(u, s, vh, rank)
    return out


# ------------------------------------------------------------------------------------------------- ours
def ours(*args: object) -> None:
    run = CliRunner().invoke(cli, [str(a) for a in args])
    if run.exit_code != 0:
        raise SystemExit(f"loratool {' '.join(map(str, args))} failed:\n{run.output}")


def exact_sum(paths: list[Path], weights: list[float]) -> Deltas:
    total: Deltas = {}
    for path, w in zip(paths, weights, strict=True):
        for name, d in kohya_deltas(path)[0].items():
            total[name] = total.get(name, 0) + w * d  # type: ignore[operator]
    return total


def extract_deltas(path: Path) -> Deltas:
    """Our extracted LoRA (kohya format, SGM-derived names) by the diffusers module each delta changes."""
    index = TargetIndex(TINY.table)
    out = {}
    for name, d in kohya_deltas(path)[0].items():
        target = index.lookup("unet", name.removeprefix("lora_unet_"))
        assert target is not None, name
        out[target.diffusers_module] = d
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a, b = spectral_lora(root / "a.safetensors", 1, 8.0), spectral_lora(root / "b.safetensors", 2, 16.0)
        ref_a, _ = kohya_deltas(a)
        t0 = time.perf_counter()

        ours("resize", a, "--rank", "4", "-o", root / "r4.safetensors")
        k, _ = kohya_resize(a, 4)
        rows.append(("resize, fixed rank 16 -> 4", rel_error(ref_a, kohya_deltas(root / "r4.safetensors")[0]),
                     rel_error(ref_a, k), "same rank (4)"))
        for method, param in (("sv_fro", 0.9), ("sv_ratio", 4.0), ("sv_cumulative", 0.7)):
            out = root / f"{method}.safetensors"
            ours("resize", a, f"--{method.replace('_', '-')}", param, "-o", out)
            got, ranks = kohya_deltas(out)
            k, k_mean = kohya_resize(a, None, method, param)
            mean = sum(ranks.values()) / len(ranks)
            rows.append((f"resize, dynamic {method} {param:g}", rel_error(ref_a, got), rel_error(ref_a, k),
                         f"mean rank {mean:.2f} vs kohya's {k_mean:.2f}"))

        weights = [1.0, 0.6]
        exact = exact_sum([a, b], weights)
        ours("merge", a, f"{b}:0.6", "--method", "svd", "--rank", "8", "-o", root / "svd.safetensors")
        rows.append(("SVD merge of two LoRAs to rank 8", rel_error(exact, kohya_deltas(root / "svd.safetensors")[0]),
                     rel_error(exact, kohya_svd_merge([a, b], weights, 8)), "kohya clamps at the 0.99 quantile"))
        ours("merge", a, f"{b}:0.6", "-o", root / "cat.safetensors")
        rows.append(("concat merge (alphas 8 and 16, weights 1 and 0.6)",
                     rel_error(exact, kohya_deltas(root / "cat.safetensors")[0]),
                     rel_error(exact, kohya_concat([a, b], weights)), "kohya keeps the first alpha"))

        base = write_checkpoint(root / "base.safetensors", "tiny", dtype="fp32", seed=0)
        diffs = tuned_checkpoint(base, root / "tuned.safetensors")
        ours("extract", root / "tuned.safetensors", base, "--rank", "8", "--format", "kohya",
             "-o", root / "x.safetensors")
        got = extract_deltas(root / "x.safetensors")
        rows.append(("extract at rank 8 (full-rank decaying difference)", rel_error(diffs, got),
                     rel_error(diffs, kohya_extract(diffs, 8)), "kohya clamps at the 0.99 quantile"))
        seconds = time.perf_counter() - t0
    print("| operation (tiny SDXL, same inputs) | our error | kohya's rule | note |")
    print("|---|---:|---:|---|")
    for name, e_ours, e_kohya, note in rows:
        print(f"| {name} | {e_ours:.4f} | {e_kohya:.4f} | {note} |")
    cpu = time.process_time()
    print(f"\n({seconds:.0f} s wall, {cpu:.0f} s CPU; relative Frobenius error against the exact result, "
          "all modules together)")


if __name__ == "__main__":
    main()
