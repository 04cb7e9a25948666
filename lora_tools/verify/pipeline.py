"""Build a diffusers ``StableDiffusionXLPipeline`` from what a user has: a single-file checkpoint,
a standalone UNet plus a base, or a diffusers folder.

Weights of single files are converted by our own tables (``lora_tools.layouts.sdxl``), which know
SDXL at any size; component configs come from the file's shapes and are written, with the
pipeline index and the scheduler config, by the same folder writer as ``fuse --save diffusers``
(:mod:`lora_tools.io.diffusers_folder`). What a weights file does not hold (the two CLIP tokenizers
and the scheduler config) comes from ``config`` (a diffusers folder, as the user's ``--config DIR``)
or from the hub cache of ``stabilityai/stable-diffusion-xl-base-1.0``; small-vocabulary synthetic
models take the byte tokenizer, as fuse's folders do. Offline with none of these, one error says
what to provide. Nothing here reads ``lora_tools.testing``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tools.errors import Hint, InvalidFileError, UsageError
from lora_tools.io.fp8 import dequantize_state
from lora_tools.io.safetensors import load_tensors, read_header
from lora_tools.layouts.components import Component
from lora_tools.layouts.sdxl import SDXLConfig, config_from_shapes, sgm_to_diffusers_state_dicts
from lora_tools.verify.sampler import quiet_diffusers

__all__ = ["LoadedPipeline", "build_pipeline", "find_config_dir", "model_kind", "torch_dtype"]

_TOKENIZERS = ("tokenizer", "tokenizer_2")
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class LoadedPipeline:
    """A pipeline and what it was built from.

    Attributes:
        pipe: the ``StableDiffusionXLPipeline``.
        kind: ``"checkpoint"``, ``"unet"`` or ``"diffusers"``.
        cfg: the SDXL config read from the weights' shapes (``None`` for a diffusers folder).
        metadata: the model file's safetensors metadata (the UNet's, for a folder).
    """

    pipe: Any
    kind: str
    cfg: SDXLConfig | None
    metadata: dict[str, str]


def torch_dtype(name: str) -> Any:
    """``"fp32"``/``"fp16"``/``"bf16"`` as a torch dtype."""
    import torch

    if name not in _DTYPES:
        raise UsageError(f"Unknown dtype '{name}': choose fp32, fp16 or bf16.", hint=Hint("dtype", "", "fp32|fp16|bf16"))
    return getattr(torch, _DTYPES[name])


def model_kind(path: Path) -> str:
    """``"diffusers"`` (a folder with ``model_index.json``), ``"checkpoint"`` (SGM single file) or ``"unet"``."""
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InvalidFileError(f"'{path}' is a directory without model_index.json: not a diffusers pipeline folder.")
        return "diffusers"
    if not path.is_file():
        from lora_tools.special_files import refuse_special

        refuse_special(path)
        raise InvalidFileError(f"'{path}' does not exist.")
    if path.suffix == ".bin":
        return "unet"
    keys = read_header(path).tensors
    if any(k.startswith("model.diffusion_model.") for k in keys):
        if any(k.startswith("first_stage_model.") for k in keys):
            return "checkpoint"
        return "unet"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return "unet"
    raise InvalidFileError(f"{path}: neither an SDXL checkpoint nor an SDXL UNet (no UNet keys found).")


def find_config_dir(config: str | Path | None) -> Path:
    """The folder holding ``tokenizer/`` and ``tokenizer_2/``: ``config``, or the SDXL base in the hub cache.

    Raises:
        [`UsageError`]: neither is there (offline, never downloaded); names the ``config`` parameter.
    """
    from lora_tools.presets import SDXL_BASE_REPO

    if config is not None:
        root = Path(config)
        missing = [t for t in _TOKENIZERS if not (root / t).is_dir()]
        if missing:
            raise UsageError(f"{root}: not a diffusers folder with {' and '.join(missing)}/ (the CLIP tokenizers).",
                             hint=Hint("config", "with a diffusers SDXL folder", "DIR"))
        return root
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(SDXL_BASE_REPO, local_files_only=True,
                                        allow_patterns=["tokenizer/*", "tokenizer_2/*", "scheduler/*"]))
        if all((cached / t).is_dir() for t in _TOKENIZERS):
            return cached
    except Exception:  # noqa: BLE001 - any hub failure means: not in the cache
        pass
    raise UsageError(f"A single-file model needs the SDXL tokenizers: none given and {SDXL_BASE_REPO} is not in "
                     "the hub cache", hint=Hint("config", "with a diffusers SDXL folder (tokenizer/, tokenizer_2/)", "DIR"))


def _unet_state(path: Path, cfg: SDXLConfig | None) -> dict[str, Any]:
    """A standalone UNet file's weights with diffusers names (SGM names converted)."""
    if path.suffix == ".bin":
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)  # a pickle: weights only, never code
        if not isinstance(state, dict):
            raise InvalidFileError(f"{path}: not a state dict.")
    else:
        state = dequantize_state(load_tensors(path))
    if any(k.startswith("model.diffusion_model.") for k in state):
        if cfg is None:
            raise UsageError(f"{path} has SGM key names: give a single-file checkpoint as its base",
                             hint=Hint("base", "with an SDXL single-file checkpoint", "PATH"))
        return sgm_to_diffusers_state_dicts(state, cfg.table, ["unet"], source=str(path))["unet"]
    return state


def _components(state: dict[Component, dict[str, Any]], folder: Path, dtype: Any) -> dict[str, Any]:
    """diffusers/transformers models built from the configs in ``folder`` (the shared folder writer's)
    and loaded with the converted weights, every tensor of the model present."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_tools.layouts.table import DIFFUSERS_FOLDERS

    with quiet_diffusers():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / DIFFUSERS_FOLDERS["unet"]))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / DIFFUSERS_FOLDERS["vae"]))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / DIFFUSERS_FOLDERS["te1"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / DIFFUSERS_FOLDERS["te2"]))
    models = {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}
    parts: tuple[tuple[Component, str], ...] = (("unet", "unet"), ("vae", "vae"), ("te1", "text_encoder"),
                                                 ("te2", "text_encoder_2"))
    for comp, name in parts:
        model = models[name]
        own = model.state_dict()
        weights = {k: v.float() for k, v in state[comp].items()}
        if comp in ("te1", "te2") and not any(k in own for k in weights):
            weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
        missing = [k for k in own if k not in weights and not k.endswith("position_ids")]
        if missing:
            raise InvalidFileError(f"converted {comp} weights lack {len(missing)} tensors (first: {missing[0]}).")
        model.load_state_dict(weights, strict=False)
        with quiet_diffusers():
            models[name] = model.to(dtype).eval()
    return models


def _write_tokenizers(root: Path, cfg: SDXLConfig, config_dir: Path | None) -> None:
    """The two CLIP tokenizers of the skeleton folder: copied from ``config_dir``, else the byte
    tokenizer for small-vocabulary (synthetic) models, as ``fuse --save diffusers`` writes them."""
    import shutil

    from lora_tools.io.diffusers_folder import write_byte_tokenizer

    for name, te in zip(_TOKENIZERS, (cfg.te1, cfg.te2), strict=True):
        if config_dir is not None:
            shutil.copytree(config_dir / name, root / name)
        else:
            write_byte_tokenizer(root / name, te.vocab, te.positions)


def pipeline_from_state(state: dict[Component, dict[str, Any]], cfg: SDXLConfig, *, config_dir: Path | None,
                        dtype: Any, tokenizers: bool = True) -> Any:
    """A ``StableDiffusionXLPipeline`` around converted weights.

    The pipeline's files (``model_index.json``, every component's config, the scheduler config and
    the tokenizers) are written into a temporary folder by the writer of ``fuse --save diffusers``
    (:func:`lora_tools.io.diffusers_folder.write_pipeline_configs`), and the pipeline is loaded from
    it with the weights passed in: one folder writer for both. Tokenizers (and the scheduler config)
    come from ``config_dir``; without it, small-vocabulary models get the byte tokenizer; with
    ``tokenizers=False`` there are none (weights-only work).
    """
    import tempfile

    with quiet_diffusers():
        from diffusers import StableDiffusionXLPipeline

    from lora_tools.io.diffusers_folder import SCHEDULER_CONFIG, write_pipeline_configs

    scheduler_config: dict[str, Any] = dict(SCHEDULER_CONFIG)
    if config_dir is not None:
        scheduler_file = config_dir / "scheduler" / "scheduler_config.json"
        if scheduler_file.is_file():
            scheduler_config = json.loads(scheduler_file.read_text())
    with tempfile.TemporaryDirectory(prefix="loratool-verify-") as tmp:
        root = Path(tmp)
        write_pipeline_configs(root, cfg, scheduler_config)
        models = _components(state, root, dtype)
        extra: dict[str, Any] = {}
        if tokenizers:
            _write_tokenizers(root, cfg, config_dir)
        else:
            extra = {"tokenizer": None, "tokenizer_2": None}
        with quiet_diffusers():
            pipe = StableDiffusionXLPipeline.from_pretrained(root, local_files_only=True, **models, **extra)
    return pipe


def _needs_tokenizer_files(cfg: SDXLConfig) -> bool:
    """Real CLIP vocabularies need the real tokenizer files; synthetic small ones take the byte tokenizer."""
    return cfg.te1.vocab >= 49408 or cfg.te2.vocab >= 49408


def build_pipeline(model: str | Path, *, base: str | Path | None = None, config: str | Path | None = None,
                   dtype: str = "fp32", device: str = "cpu", tokenizers: bool = True) -> LoadedPipeline:
    """Build the pipeline of ``model``.

    Args:
        model (`str` or `Path`): an SGM single-file checkpoint, a standalone UNet (diffusers or SGM
            names; ``.bin`` pickles load weights-only) or a diffusers folder.
        base (`str` or `Path`, *optional*): the checkpoint or folder that provides the rest of the
            pipeline for a standalone UNet.
        config (`str` or `Path`, *optional*): a diffusers folder with the tokenizers (and scheduler).
        dtype (`str`): ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        device (`str`): torch device.
        tokenizers (`bool`): load the tokenizers (``False``: weights-only work, no prompts).

    Raises:
        [`UsageError`]: a UNet without ``base``, or no tokenizers to be found.
        [`InvalidFileError`]: the model is not an SDXL checkpoint, UNet or folder.
    """
    with quiet_diffusers():  # importing the pipeline makes transformers talk about torchvision
        from diffusers import StableDiffusionXLPipeline

    path = Path(model)
    kind = model_kind(path)
    tdtype = torch_dtype(dtype)
    if kind == "diffusers":
        with quiet_diffusers():
            pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=tdtype, local_files_only=True)
        unet_file = path / "unet" / "diffusion_pytorch_model.safetensors"
        metadata = read_header(unet_file).metadata if unet_file.is_file() else {}
        loaded = LoadedPipeline(pipe, kind, None, dict(metadata))
    elif kind == "unet":
        if base is None:
            raise UsageError(f"{path} is a standalone UNet: the text encoders and the VAE must come from a base model",
                             hint=Hint("base", "with an SDXL checkpoint or diffusers folder", "PATH"))
        loaded = build_pipeline(base, config=config, dtype="fp32", device="cpu", tokenizers=tokenizers)
        state = _unet_state(path, loaded.cfg)
        missing, unexpected = loaded.pipe.unet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InvalidFileError(f"{path}: does not fit the base's UNet ({len(missing)} missing, "
                                   f"{len(unexpected)} unexpected keys).")
        metadata = read_header(path).metadata if path.suffix != ".bin" else {}
        with quiet_diffusers():
            loaded.pipe.to(dtype=tdtype)
        loaded = LoadedPipeline(loaded.pipe, "unet", loaded.cfg, dict(metadata))
    else:
        header = read_header(path)
        cfg = config_from_shapes({k: t.shape for k, t in header.tensors.items()})
        needs_files = tokenizers and (config is not None or _needs_tokenizer_files(cfg))
        config_dir = find_config_dir(config) if needs_files else None
        components = sgm_to_diffusers_state_dicts(dequantize_state(load_tensors(path)), cfg.table,
                                                  ["unet", "vae", "te1", "te2"], source=str(path))
        pipe = pipeline_from_state(components, cfg, config_dir=config_dir, dtype=tdtype,
                                   tokenizers=tokenizers)
        loaded = LoadedPipeline(pipe, kind, cfg, dict(header.metadata))
    loaded.pipe.set_progress_bar_config(disable=True)
    with quiet_diffusers():
        loaded.pipe.to(device)
    return loaded
