"""ComfyUI's own code as the oracle of tests/test_comfyui.py (imported from a checkout, never copied).

``comfyui()`` imports ComfyUI from ``$LORA_TOOLS_COMFYUI`` (a ComfyUI checkout, appended to ``sys.path``)
or from wherever it is already importable, on the CPU, and skips the calling test with the reason when it
is not (CI has no ComfyUI). The ComfyUI code run here is the real one: its checkpoint loader and model
detection, its LoRA key maps, ``load_lora`` and ``calculate_weight``, its prompt validation. The adapters
below only feed it our tiny SDXL-topology models:

* ComfyUI's model table knows SDXL by its full widths (``model_channels`` 320, ``context_dim`` 2048,
  ``adm_in_channels`` 2816). :func:`tiny_sdxl_class` registers ComfyUI's own SDXL model class with those
  three numbers replaced by the tiny model's, so the rest of the detection (depths per level, linear
  projections, the ADM embedding) is ComfyUI's unchanged.
* ComfyUI's key maps read a model's ``state_dict()`` keys; :func:`comfy_state` names a checkpoint's
  tensors as ComfyUI's models do (UNet ``diffusion_model.``, text encoders through ComfyUI's SDXL
  ``process_clip_state_dict``), so our fused file and ComfyUI's patched weights compare key by key.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_tools.testing.comfyui import torchvision_stand_in

ENV = "LORA_TOOLS_COMFYUI"
SGM_UNET = "model.diffusion_model."

_MODULES: types.SimpleNamespace | None = None


def comfyui() -> types.SimpleNamespace:
    """ComfyUI's modules (``sd``, ``lora``, ``utils``, ``model_detection``, ``supported_models``,
    ``model_patcher``, ``sd``, ``root``), imported once; skips the test when ComfyUI is not importable."""
    global _MODULES
    if _MODULES is not None:
        return _MODULES
    root = os.environ.get(ENV)
    if root and root not in sys.path:
        if not (Path(root) / "comfy" / "sd.py").is_file():
            pytest.skip(f"{ENV}={root} is not a ComfyUI checkout (no comfy/sd.py there)")
        sys.path.append(root)  # after ours: ComfyUI's top-level "tests"/"utils" must not shadow anything
    try:
        importlib.import_module("comfy.cli_args")
    except ImportError as e:
        pytest.skip(f"ComfyUI is not importable ({e}); set {ENV} to a ComfyUI checkout to run these tests")
    try:
        with torchvision_stand_in():
            args = importlib.import_module("comfy.cli_args").args
            args.cpu = True  # before comfy.model_management picks a device
            args.disable_xformers = True
            names = ("comfy.sd", "comfy.lora", "comfy.lora_convert", "comfy.utils", "comfy.model_detection",
                     "comfy.model_base", "comfy.supported_models", "comfy.model_patcher", "comfy.model_management")
            mods = {n.split(".")[-1]: importlib.import_module(n) for n in names}
    except ImportError as e:
        pytest.skip(f"ComfyUI's modules do not import here ({e}); install its requirements "
                    "(einops, torchsde, transformers, av, aiohttp, ...)")
    mods["root"] = Path(mods["sd"].__file__).resolve().parents[1]
    _MODULES = types.SimpleNamespace(**mods)
    return _MODULES


def comfyui_nodes() -> types.SimpleNamespace:
    """ComfyUI's ``nodes`` and ``execution`` modules (its built-in nodes and prompt validation)."""
    c = comfyui()
    try:
        with torchvision_stand_in():
            nodes = importlib.import_module("nodes")
            execution = importlib.import_module("execution")
    except ImportError as e:
        pytest.skip(f"ComfyUI's nodes do not import here ({e}); install its requirements (av, aiohttp, ...)")
    return types.SimpleNamespace(nodes=nodes, execution=execution, comfy=c)


def tiny_sdxl_class(c: types.SimpleNamespace, unet_config: Mapping[str, Any]) -> type:
    """ComfyUI's SDXL model class with the widths of ``unet_config`` (a config ComfyUI detected), put first
    in ComfyUI's model table; everything else about SDXL stays ComfyUI's."""
    sdxl = c.supported_models.SDXL
    widths = {k: unet_config[k] for k in ("model_channels", "context_dim", "adm_in_channels")}
    tiny = type("TinySDXL", (sdxl,), {"unet_config": {**sdxl.unet_config, **widths}})
    if not any(getattr(m, "__name__", "") == "TinySDXL" and m.unet_config == tiny.unet_config
               for m in c.supported_models.models):
        c.supported_models.models.insert(0, tiny)
    return tiny


@contextlib.contextmanager
def registered_tiny_sdxl(c: types.SimpleNamespace, state: Mapping[str, torch.Tensor]) -> Iterator[type]:
    """:func:`tiny_sdxl_class` for the UNet of ``state`` for the duration of the block."""
    config = c.model_detection.detect_unet_config(state, SGM_UNET)
    before = list(c.supported_models.models)
    try:
        yield tiny_sdxl_class(c, config)
    finally:
        c.supported_models.models[:] = before


def comfy_state(c: types.SimpleNamespace, checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A single-file SDXL checkpoint's UNet and text-encoder tensors under the names ComfyUI's models give
    them (``diffusion_model.*``, ``clip_l.transformer.*``, ``clip_g.transformer.*``), converted by ComfyUI."""
    unet = {"diffusion_model." + k[len(SGM_UNET):]: v for k, v in checkpoint.items() if k.startswith(SGM_UNET)}
    config = c.model_detection.detect_unet_config(dict(checkpoint), SGM_UNET)
    sdxl = c.supported_models.SDXL(config)
    te = {k: v for k, v in checkpoint.items() if k.startswith("conditioner.")}
    clip = sdxl.process_clip_state_dict(te)
    return {**unet, **clip}


class _FakeModel:
    """What ComfyUI's key-map functions read of a model: ``state_dict()`` and ``model_config.unet_config``."""

    def __init__(self, state: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]):
        self._state = state
        self.model_config = types.SimpleNamespace(unet_config=dict(unet_config))

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        return self._state


class LogLines(logging.Handler):
    """Collects the messages ComfyUI logs at ``level`` and above."""

    def __init__(self, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def comfy_apply_lora(c: types.SimpleNamespace, checkpoint: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor],
                     strength: float = 1.0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ComfyUI's LoRA loading on a checkpoint (fp32): its key maps (``model_lora_keys_unet``/``_clip``), its
    ``convert_lora`` and ``load_lora``, and its ``calculate_weight`` on every patched weight, as
    ``load_lora_for_models`` + ``ModelPatcher.patch_model`` do. Returns the patched weights (ComfyUI names,
    only those patched) and the keys ComfyUI left unloaded (its "lora key not loaded" warnings)."""
    state = {k: v.to(torch.float32) for k, v in comfy_state(c, checkpoint).items()}
    config = c.model_detection.detect_unet_config(dict(checkpoint), SGM_UNET)
    unet = {k: v for k, v in state.items() if k.startswith("diffusion_model.")}
    clip = {k: v for k, v in state.items() if not k.startswith("diffusion_model.")}
    key_map: dict[str, Any] = {}
    key_map = c.lora.model_lora_keys_unet(_FakeModel(unet, config), key_map)
    key_map = c.lora.model_lora_keys_clip(_FakeModel(clip, config), key_map)
    lora_sd = c.lora_convert.convert_lora(dict(lora))
    handler = LogLines()
    logging.getLogger().addHandler(handler)
    try:
        patches = c.lora.load_lora(lora_sd, key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    unloaded = [m.split(": ", 1)[1] for m in handler.messages if m.startswith("lora key not loaded")]
    out: dict[str, torch.Tensor] = {}
    for key, patch in patches.items():
        target = key if isinstance(key, str) else key[0]
        assert isinstance(key, str), f"ComfyUI patches a slice of {target}; not expected on SDXL"
        weight = state[target].clone()
        out[target] = c.lora.calculate_weight([(strength, patch, 1.0, None, None)], weight, target)
    return out, unloaded


_EXTRA_NODES: list[str] = []


def validate_workflow(ns: types.SimpleNamespace, workflow: Mapping[str, Any], checkpoints: Path) -> tuple[bool, Any]:
    """ComfyUI's own ``execution.validate_prompt`` of an API-format workflow, with ComfyUI's built-in nodes
    and its bundled extra nodes (``comfy_extras``: ModelSamplingDiscrete...) loaded and ``checkpoints``
    registered as a checkpoint folder. Returns ``(valid, error)``, with each failing node's errors."""
    import asyncio
    import uuid

    folder_paths = importlib.import_module("folder_paths")
    if not _EXTRA_NODES:
        with torchvision_stand_in():
            asyncio.run(ns.nodes.init_builtin_extra_nodes())
        _EXTRA_NODES.append("loaded")
    before = folder_paths.folder_names_and_paths["checkpoints"]
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(checkpoints)], before[1])  # this folder only
    folder_paths.filename_list_cache.clear()
    try:
        result = asyncio.run(ns.execution.validate_prompt(str(uuid.uuid4()), dict(workflow), None))
    finally:
        folder_paths.folder_names_and_paths["checkpoints"] = before
        folder_paths.filename_list_cache.clear()
    return bool(result[0]), (result[1], result[3])
