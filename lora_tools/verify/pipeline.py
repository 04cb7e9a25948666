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

Each model is built empty and filled one tensor at a time from the file
(:mod:`lora_tools.verify.components`): :func:`open_parts` gives a pipeline whose models are loaded only
while a stage of the render needs them (:class:`ModelParts`, what ``verify`` runs);
:func:`build_pipeline` loads all four at once (the weights oracle, the GPU benchmark).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tools.errors import Hint, InvalidFileError, UsageError
from lora_tools.io.diffusers_folder import SCHEDULER_CONFIG, write_pipeline_configs
from lora_tools.io.fp8 import is_fp8_extra
from lora_tools.io.model import ModelSource, open_model
from lora_tools.io.safetensors import read_header
from lora_tools.layouts.components import Component
from lora_tools.layouts.sdxl import SDXLConfig, config_from_shapes, sgm_to_diffusers_state_dicts
from lora_tools.verify.components import PIPELINE_PARTS, Components
from lora_tools.verify.sampler import quiet_diffusers

__all__ = ["LoadedPipeline", "ModelParts", "build_pipeline", "find_config_dir", "model_kind", "open_parts",
           "torch_dtype"]

ALL_COMPONENTS: tuple[Component, ...] = ("unet", "vae", "te1", "te2")

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
    """A pickled (``.bin``) UNet's weights with diffusers names (SGM names converted)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)  # a pickle: weights only, never code
    if not isinstance(state, dict):
        raise InvalidFileError(f"{path}: not a state dict.")
    if any(k.startswith("model.diffusion_model.") for k in state):
        if cfg is None:
            raise UsageError(f"{path} has SGM key names: give a single-file checkpoint as its base",
                             hint=Hint("base", "with an SDXL single-file checkpoint", "PATH"))
        return sgm_to_diffusers_state_dicts(state, cfg.table, ["unet"], source=str(path))["unet"]
    return state


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


@dataclass
class ModelParts:
    """A model's pipeline whose four models are loaded only while a stage of the render needs them.

    ``pipe`` is a ``StableDiffusionXLPipeline`` with its tokenizers and scheduler; its ``text_encoder``,
    ``text_encoder_2``, ``unet`` and ``vae`` are ``None`` until :meth:`use` loads them, each from the model file
    (:class:`~lora_tools.verify.components.Components`), and dropped again when the next stage does not name them.

    Attributes:
        pipe: the pipeline.
        components: where each model's weights come from.
        kind, cfg, metadata: as in :class:`LoadedPipeline`.
        on_load: called with the pipeline and the attribute just loaded (runtime LoRAs are applied there).
    """

    pipe: Any
    components: Components
    kind: str
    cfg: SDXLConfig | None
    metadata: dict[str, str]
    on_load: Callable[[Any, str], None] | None = None

    def use(self, *parts: str, vae_fp32: bool = True) -> None:
        """Hold exactly the models named (pipeline attributes): the others are dropped first, then the missing
        ones loaded (the VAE in fp32 with ``vae_fp32``: SDXL's overflows in fp16)."""
        import gc

        import torch

        for attr in PIPELINE_PARTS:
            if attr not in parts and getattr(self.pipe, attr, None) is not None:
                setattr(self.pipe, attr, None)
        gc.collect()
        for attr in parts:
            if getattr(self.pipe, attr, None) is None:
                dtype = torch.float32 if attr == "vae" and vae_fp32 else None
                setattr(self.pipe, attr, self.components.load(PIPELINE_PARTS[attr], dtype))
                if self.on_load is not None:
                    self.on_load(self.pipe, attr)

    def close(self) -> None:
        """Drop every model and close the model files."""
        self.use()
        self.components.close()


def open_parts(model: str | Path, *, base: str | Path | None = None, config: str | Path | None = None,
               dtype: str = "fp32", device: str = "cpu", tokenizers: bool = True) -> ModelParts:
    """The :class:`ModelParts` of ``model``, with no model loaded yet (arguments as in :func:`build_pipeline`).

    Raises:
        [`UsageError`]: a UNet without ``base``, or no tokenizers to be found.
        [`InvalidFileError`]: the model is not an SDXL checkpoint, UNet or folder.
    """
    path = Path(model)
    kind = model_kind(path)
    tdtype = torch_dtype(dtype)
    if kind == "diffusers":
        unet_file = path / "unet" / "diffusion_pytorch_model.safetensors"
        folder_metadata = read_header(unet_file).metadata if unet_file.is_file() else {}
        components = Components(path, dict.fromkeys(ALL_COMPONENTS, path), dtype=tdtype, device=device)
        pipe = _empty_pipeline(path, components, {} if tokenizers else _NO_TOKENIZERS)
        return ModelParts(pipe, components, kind, None, dict(folder_metadata))
    if kind == "unet":
        if base is None:
            raise UsageError(f"{path} is a standalone UNet: the text encoders and the VAE must come from a base model",
                             hint=Hint("base", "with an SDXL checkpoint or diffusers folder", "PATH"))
        parts = open_parts(base, config=config, dtype=dtype, device=device, tokenizers=tokenizers)
        unet: ModelSource | Callable[[], Any]
        if path.suffix == ".bin":
            cfg = parts.cfg
            unet = lambda: _unet_state(path, cfg).items()  # noqa: E731 - read when the UNet stage comes
            metadata: dict[str, str] = {}
        else:
            unet = open_model(path)
            metadata = dict(read_header(path).metadata)
        parts.components.weights["unet"] = unet
        return ModelParts(parts.pipe, parts.components, "unet", parts.cfg, metadata)
    header = read_header(path)
    cfg = config_from_shapes({k: t.shape for k, t in header.tensors.items()})
    cfg.table.check_total([k for k in header.tensors if not is_fp8_extra(k)], str(path), ALL_COMPONENTS)
    needs_files = tokenizers and (config is not None or _needs_tokenizer_files(cfg))
    config_dir = find_config_dir(config) if needs_files else None
    scheduler_config: dict[str, Any] = dict(SCHEDULER_CONFIG)
    if config_dir is not None:
        scheduler_file = config_dir / "scheduler" / "scheduler_config.json"
        if scheduler_file.is_file():
            scheduler_config = json.loads(scheduler_file.read_text())
    source = open_model(path)
    with tempfile.TemporaryDirectory(prefix="loratool-verify-") as tmp:
        root = Path(tmp)
        write_pipeline_configs(root, cfg, scheduler_config)
        if tokenizers:
            _write_tokenizers(root, cfg, config_dir)
        components = Components(root, dict.fromkeys(ALL_COMPONENTS, source), dtype=tdtype, device=device)
        pipe = _empty_pipeline(root, components, {} if tokenizers else _NO_TOKENIZERS)
    return ModelParts(pipe, components, kind, cfg, dict(header.metadata))


_NO_TOKENIZERS = {"tokenizer": None, "tokenizer_2": None}


def _empty_pipeline(root: Path, components: Components, extra: dict[str, Any]) -> Any:
    """The pipeline of the folder ``root`` (tokenizers, scheduler) around empty models, which are then dropped:
    it is built with each model's config (the VAE's scale factor...), and holds no weights."""
    with quiet_diffusers():
        from diffusers import StableDiffusionXLPipeline

        empties = {attr: components.empty(comp) for attr, comp in PIPELINE_PARTS.items()}
        pipe = StableDiffusionXLPipeline.from_pretrained(root, local_files_only=True, **empties, **extra)
    for attr in PIPELINE_PARTS:
        setattr(pipe, attr, None)
    pipe.set_progress_bar_config(disable=True)
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
    parts = open_parts(model, base=base, config=config, dtype=dtype, device=device, tokenizers=tokenizers)
    parts.use(*PIPELINE_PARTS, vae_fp32=False)
    parts.components.close()
    return LoadedPipeline(parts.pipe, parts.kind, parts.cfg, parts.metadata)
