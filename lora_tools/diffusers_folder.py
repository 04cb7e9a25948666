"""The files around the weights of an SDXL diffusers folder: configs, scheduler, tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from lora_tools.layouts.sdxl import SDXLConfig
from lora_tools.layouts.table import DIFFUSERS_FOLDERS, Component

ALL_COMPONENTS: tuple[Component, ...] = ("unet", "te1", "te2", "vae")


def component_config(cfg: SDXLConfig, comp: Component) -> dict[str, object]:
    if comp == "unet":
        return cfg.unet.diffusers_config()
    if comp == "vae":
        return cfg.vae.diffusers_config()
    return (cfg.te1 if comp == "te1" else cfg.te2).transformers_config()


SCHEDULER_CONFIG: dict[str, object] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "timestep_spacing": "leading",
    "steps_offset": 1, "interpolation_type": "linear", "use_karras_sigmas": False,
}


PIPELINE_INDEX: dict[str, object] = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.30.0",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_pipeline_configs(root: Path, cfg: SDXLConfig, scheduler: Mapping[str, object] = SCHEDULER_CONFIG) -> None:
    """model_index.json, every component's config.json and the scheduler config of an SDXL folder."""
    (root / "model_index.json").write_text(json.dumps(PIPELINE_INDEX, indent=2))
    for comp in ALL_COMPONENTS:
        (root / DIFFUSERS_FOLDERS[comp]).mkdir(parents=True, exist_ok=True)
        (root / DIFFUSERS_FOLDERS[comp] / "config.json").write_text(json.dumps(component_config(cfg, comp), indent=2))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(scheduler), indent=2))


def write_byte_tokenizer(folder: Path, vocab_size: int, max_length: int = 77) -> Path:
    """A tiny CLIP BPE tokenizer with byte-level tokens and no merges.

    It tokenises any text, so tiny pipelines run end to end offline. Token ids stay below
    ``vocab_size`` (at least 514 needed). Full-size models need the real CLIP vocabulary, which
    comes from the hub, not from here.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) > vocab_size:
        tokens = tokens[: vocab_size - 2] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return folder


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]
