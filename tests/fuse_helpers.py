"""Shared data and helpers of the fuse tests (test_fuse_oracle.py, test_fuse_cli.py and the LoRA ops).

Everything expensive is built once per test session (the ``fuse_assets`` fixture in conftest.py holds
one :class:`FuseAssets`): the tiny fp32 base checkpoint, the same model as a diffusers folder, the
Lightning-shaped LoRA and its ``--lightning-dir`` folder, and diffusers' own fusion of LoRAs (the oracle).
This module holds plain functions and classes only; fixtures live in conftest.py.

The oracle is diffusers: ``StableDiffusionXLPipeline.from_pretrained(folder)`` +
``load_lora_weights`` + ``set_adapters`` + ``fuse_lora``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from lora_tools.io.safetensors import load_tensors
from lora_tools.layouts import TINY
from lora_tools.layouts.sdxl import sgm_to_diffusers_state_dicts
from lora_tools.testing.synthetic import write_checkpoint, write_diffusers_folder, write_unet_file
from lora_tools.testing.synthetic_lora import select_targets, write_lora

LIGHTNING_LORA = "sdxl_lightning_4step_lora.safetensors"
LIGHTNING_UNET_4 = "sdxl_lightning_4step_unet.safetensors"
LIGHTNING_UNET_1 = "sdxl_lightning_1step_unet_x0.safetensors"
#: Metadata of the base checkpoint; a fuse must keep it.
BASE_METADATA = {"format": "pt", "base.note": "tiny test base", "ss_sd_model_name": "tiny-sdxl"}
#: Max abs difference / max abs of the weight, for fp32 outputs against diffusers.
REL_TOL = 1e-6
#: Our components -> attribute of a StableDiffusionXLPipeline.
PIPE_ATTR = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2", "vae": "vae"}

StateDicts = dict[str, dict[str, torch.Tensor]]


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run with ``n`` torch threads (tiny matmuls on a busy 2-core box are much faster single-threaded)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def n_targets(targets: str, components: Sequence[str] = ("unet",)) -> int:
    return len(select_targets(TINY, targets, components))  # type: ignore[arg-type]


def target_keys(targets: str, components: Sequence[str] = ("unet",)) -> set[str]:
    """SGM keys of the base tensors a synthetic LoRA with these targets changes."""
    return {t.sgm_key for t in select_targets(TINY, targets, components)}  # type: ignore[arg-type]


def to_diffusers(path: Path, components: Sequence[str] = ("unet", "te1", "te2", "vae")) -> StateDicts:
    """A single file's tensors as diffusers state dicts (our tables), one per component."""
    return sgm_to_diffusers_state_dicts(load_tensors(path), TINY.table, list(components))  # type: ignore[return-value,arg-type]


def our_key(sd: dict[str, torch.Tensor], key: str) -> str:
    """transformers >= 5 drops the ``text_model.`` prefix of CLIPTextModel keys; ours keep it."""
    return key if key in sd else "text_model." + key


def compare(ours: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
            where: str) -> tuple[int, int, float, str]:
    """Compare every oracle tensor with ours; returns (changed by oracle, changed by us, worst rel diff, worst key)."""
    changed_oracle = changed_ours = 0
    worst, worst_key = 0.0, ""
    compared = 0
    for key, ref in oracle.items():
        k = our_key(ours, key)
        assert k in ours, f"{where}: diffusers has '{key}', the fused file has no counterpart"
        mine, before = ours[k].float(), base[k].float()
        ref = ref.float()
        assert mine.shape == ref.shape, f"{where}: {key} {tuple(mine.shape)} vs diffusers {tuple(ref.shape)}"
        compared += 1
        changed_oracle += not torch.equal(ref, before)
        changed_ours += not torch.equal(mine, before)
        err = ((mine - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        if math.isnan(err) or err > worst:
            worst, worst_key = (math.inf if math.isnan(err) else err), key
    assert compared == len(oracle) > 0
    return changed_oracle, changed_ours, worst, worst_key


def load_pipeline(folder: Path):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def snapshot(pipe, components: Sequence[str] = ("unet", "te1", "te2")) -> StateDicts:  # type: ignore[no-untyped-def]
    """Weights of the pipeline's modules; fused PEFT layers count as their ``base_layer`` (LoRA factors dropped)."""
    out: StateDicts = {}
    for c in components:
        sd = getattr(pipe, PIPE_ATTR[c]).state_dict()
        out[c] = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in sd.items()
                  if ".lora_" not in k}
    return out


_PIPELINES: dict[str, tuple[object, StateDicts]] = {}


def clean_pipeline(folder: Path):  # type: ignore[no-untyped-def]
    """One pipeline per folder and session, with a copy of its weights to restore after each use."""
    key = str(folder)
    if key not in _PIPELINES:
        pipe = load_pipeline(folder)
        _PIPELINES[key] = (pipe, snapshot(pipe, ("unet", "te1", "te2")))
    return _PIPELINES[key]


def diffusers_fuse(folder: Path, loras: Sequence[tuple[Path, float]], *, scales: Sequence[float] = (1.0,)) -> list[StateDicts]:
    """diffusers' fusion of ``loras`` (weights via ``set_adapters``) into the pipeline in ``folder``.

    With several ``scales`` the LoRAs are fused with ``fuse_lora(lora_scale=s)`` for each scale in
    turn (``unfuse_lora`` in between); one snapshot of unet/te1/te2 per scale.
    """
    with torch_threads(1):
        pipe, clean = clean_pipeline(folder)
        names = [f"l{i}" for i in range(len(loras))]
        try:
            for name, (path, _) in zip(names, loras, strict=True):
                pipe.load_lora_weights(str(path), adapter_name=name)
            pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
            out = []
            for i, scale in enumerate(scales):
                if i:
                    pipe.unfuse_lora()
                pipe.fuse_lora(adapter_names=names, lora_scale=scale)
                out.append(snapshot(pipe))
        finally:  # back to the exact base weights for the next oracle
            pipe.unload_lora_weights()
            for comp, sd in clean.items():
                getattr(pipe, PIPE_ATTR[comp]).load_state_dict(sd, strict=True)
    return out


@dataclass
class FuseAssets:
    """Files shared by the fuse tests, each built on first use."""

    root: Path

    @cached_property
    def base(self) -> Path:
        """Tiny SDXL single file, fp32, all four components, seed 0."""
        return write_checkpoint(self.root / "base.safetensors", "tiny", dtype="fp32", seed=0, metadata=BASE_METADATA)

    @cached_property
    def folder(self) -> Path:
        """The same model (seed 0) as a diffusers StableDiffusionXLPipeline folder, fp32."""
        return write_diffusers_folder(self.root / "base-diffusers", "tiny", dtype="fp32", seed=0)

    @cached_property
    def base_sd(self) -> StateDicts:
        return to_diffusers(self.base)

    @cached_property
    def lightning_dir(self) -> Path:
        """A --lightning-dir holding a tiny Lightning-shaped LoRA (kohya envelope, diffusers names, fp16)."""
        d = self.root / "lightning"
        d.mkdir(exist_ok=True)
        write_lora(d / LIGHTNING_LORA, "tiny", fmt="kohya-diffusers", targets="lightning", components=("unet",),
                   rank=8, alpha=4.0, dtype="fp16", seed=7)
        return d

    @property
    def lightning_lora(self) -> Path:
        return self.lightning_dir / LIGHTNING_LORA

    @cached_property
    def style(self) -> Path:
        """A kohya SGM-named style LoRA on attention, UNet and both text encoders."""
        return write_lora(self.root / "style.safetensors", "tiny", fmt="kohya-sgm", targets="attn",
                          components=("unet", "te1", "te2"), rank=4, alpha=2.0, dtype="fp32", seed=1)

    @cached_property
    def unet_dir(self) -> Path:
        """--lightning-dir for --method unet: tiny tuned UNets (4-step seed 2, 1-step seed 4), diffusers layout."""
        d = self.root / "lightning-unets"
        d.mkdir(exist_ok=True)
        write_unet_file(d / LIGHTNING_UNET_4, "tiny", seed=2)
        write_unet_file(d / LIGHTNING_UNET_1, "tiny", seed=4)
        return d

    @cached_property
    def original_unet(self) -> Path:
        """The 'SDXL base' UNet the Lightning UNets were distilled from (seed 3), diffusers layout."""
        return write_unet_file(self.root / "sdxl_base_unet_original.safetensors", "tiny", seed=3)

    @cached_property
    def oracle_lightning_style(self) -> StateDicts:
        """diffusers: Lightning-shaped LoRA at 1.0 + style LoRA at 0.6, fused."""
        return diffusers_fuse(self.folder, [(self.lightning_lora, 1.0), (self.style, 0.6)])[0]


def fill_hub_cache(cache: Path, repo_id: str, filename: str, content: bytes,
                   commit: str = "c9a24f48e1c025556787b0c58dd67a091ece2e44") -> Path:
    """Put one file into a huggingface_hub cache laid out as hf_hub_download leaves it."""
    import os

    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    blob = repo_dir / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    pointer = repo_dir / "snapshots" / commit / filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:
        pointer.write_bytes(content)
    return pointer


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` (hidden temp files too) with size and mtime."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}
