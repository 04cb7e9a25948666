"""The files around the weights of an SDXL diffusers folder: configs, scheduler, tokenizers."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from lora_tools.errors import InvalidFileError
from lora_tools.layouts.components import COMPONENTS
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


_STEMS = ("diffusion_pytorch_model", "model")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


def component_weight_files(root: Path, component: Component, *, variant: str | None = None,
                           allow_bin: bool = False) -> list[Path]:
    """The weight files of one component of a diffusers folder: THE discovery rule.

    In ``root / <component folder>``, weights are ``<stem>[.<variant>].safetensors``, or shards
    listed by ``<stem>.safetensors.index[.<variant>].json`` (diffusers' spelling; the older
    ``<stem>[.<variant>].safetensors.index.json`` is read too), or shards
    ``<stem>[.<variant>]-0000k-of-0000n.safetensors`` without an index. ``<stem>`` is the
    component's (``diffusion_pytorch_model`` or ``model``), then the other one. With
    ``allow_bin``, pickled ``.bin`` weights are found when no safetensors weights are.

    Args:
        root (`Path`): the pipeline folder (holding ``model_index.json``).
        component (`str`): ``unet``, ``te1``, ``te2`` or ``vae``.
        variant (`str`, *optional*): only this variant (``fp16``). Defaults to ``None``: the
            files without a variant, else ``fp16``, else the first other variant by name.
        allow_bin (`bool`, *optional*, defaults to `False`): also look for ``.bin`` weights.

    Returns:
        `list[Path]`: the files, shards in order; ``[]`` when the folder holds no weights at all.

    Raises:
        [`InvalidFileError`]: ``variant`` was asked for and the folder has weights, but not in that
            variant (the message lists the variants it has); an unreadable shard index.
    """
    folder = root / COMPONENTS[component].diffusers_folder
    if not folder.is_dir():
        return []
    stems = (COMPONENTS[component].weights_stem,) + tuple(s for s in _STEMS if s != COMPONENTS[component].weights_stem)
    for suffix in (".safetensors",) + ((".bin",) if allow_bin else ()):
        for stem in stems:
            found = _variants(folder, stem, suffix)
            if not found:
                continue
            if variant is not None:
                if variant in found:
                    return found[variant]
                have = ", ".join("no variant" if v == "" else v for v in sorted(found))
                raise InvalidFileError(f"'{folder}' has no '{variant}' variant of its weights (it has: {have}).")
            for preferred in ("", "fp16"):
                if preferred in found:
                    return found[preferred]
            return found[sorted(found)[0]]
    return []


def _variants(folder: Path, stem: str, suffix: str) -> dict[str, list[Path]]:
    """variant ('' for none) -> weight files of one stem and suffix."""
    found: dict[str, list[Path]] = {}
    loose: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        name = f.name
        if not name.startswith(stem):
            continue
        rest = name[len(stem):]
        index = re.fullmatch(re.escape(suffix) + r"\.index(?:\.([^.]+))?\.json", rest) or \
            re.fullmatch(r"(?:\.([^.]+))?" + re.escape(suffix) + r"\.index\.json", rest)
        if index:
            found[index.group(1) or ""] = _index_files(f, folder)
            continue
        if not rest.endswith(suffix):
            continue
        body = rest[: -len(suffix)]
        shard = _SHARD.search(body)
        if shard:
            body = body[: shard.start()]
        if body and not re.fullmatch(r"\.[^.]+", body):
            continue
        (loose if shard else found).setdefault(body[1:], []).append(f)
    for v, files in loose.items():
        found.setdefault(v, files)
    return found


def _index_files(index: Path, folder: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidFileError(f"'{index}' is not a valid sharded-weights index ({e!r}).") from e
    if not all(isinstance(n, str) and "/" not in n and "\\" not in n and n not in ("", ".", "..") for n in names):
        raise InvalidFileError(f"'{index}' names a shard outside its folder.")
    return [folder / n for n in names]
