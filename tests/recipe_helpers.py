"""Inputs for the recipe tests, in the micro size (a fuse of it costs a fifth of a tiny one; what a recipe does
with a model does not depend on its depth): two bases, a Lightning folder (2/4/8 steps), a style LoRA (the
``recipe_assets`` fixture in conftest.py builds them once per session)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_tools.testing.synthetic import write_checkpoint
from lora_tools.testing.synthetic_lora import write_lightning_lora, write_lora

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class Assets:
    root: Path
    base_a: Path
    base_b: Path
    lightning: Path
    style: Path


def build_assets(root: Path, size: str = "micro") -> Assets:
    root.mkdir(parents=True, exist_ok=True)
    base_a = write_checkpoint(root / "base-a.safetensors", size, seed=0, dtype="fp16",
                              metadata={"format": "pt", "note": "base a"})
    base_b = write_checkpoint(root / "base-b.safetensors", size, seed=1, dtype="fp16",
                              metadata={"format": "pt", "note": "base b"})
    lightning = root / "lightning"
    lightning.mkdir(exist_ok=True)
    for steps in (2, 4, 8):
        write_lightning_lora(lightning / f"sdxl_lightning_{steps}step_lora.safetensors", size, seed=10 + steps, rank=4)
    style = write_lora(root / "style.safetensors", size, targets="attn", rank=4, seed=7)
    return Assets(root, base_a, base_b, lightning, style)


def tokenizer_config(root: Path) -> Path:
    """What verify's ``config`` folder holds for the tiny models: byte tokenizers."""
    from lora_tools.io.diffusers_folder import write_byte_tokenizer
    from lora_tools.layouts import TINY

    config = root / "config"
    for name, te in (("tokenizer", TINY.te1), ("tokenizer_2", TINY.te2)):
        write_byte_tokenizer(config / name, te.vocab, te.positions)
    return config
