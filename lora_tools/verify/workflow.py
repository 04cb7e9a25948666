"""A ComfyUI API-format prompt (the JSON ``/prompt`` accepts) that samples a model with its preset.

Only node classes and inputs that ComfyUI itself defines are used (``nodes.py``: CheckpointLoaderSimple,
CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, SaveImage; ``comfy_extras/nodes_model_advanced.py``:
ModelSamplingDiscrete, added for x0 and LCM models). :func:`workflow_file` plans the file written next
to a fused checkpoint (``fuse``'s ``workflow`` option) and :func:`write_workflow` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_tools.errors import Hint, OutputExistsError, UsageError
from lora_tools.presets.sampler import SamplerSettings

__all__ = ["comfy_workflow", "workflow_file", "write_workflow"]

#: What the written workflow prompts for (ComfyUI users edit it in the CLIPTextEncode node).
DEFAULT_WORKFLOW_PROMPT = "a photo of a cat"


def comfy_workflow(checkpoint_name: str, sampler: SamplerSettings, *, prompt: str, negative: str = "",
                   seed: int = 0, width: int = 1024, height: int = 1024,
                   filename_prefix: str = "loratool") -> dict[str, dict[str, Any]]:
    """The API-format prompt: node id -> ``{"class_type", "inputs"}``; links are ``[node id, output index]``.

    A ``ModelSamplingDiscrete`` node is added when the model's sampling type is not plain ``eps``
    (x0 for Lightning 1-step, lcm for LCM/DMD2): ComfyUI does not detect it from the file.
    """
    wf: dict[str, dict[str, Any]] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
    }
    model: list[Any] = ["1", 0]
    if sampler.comfy_model_sampling != "eps":
        wf["2"] = {"class_type": "ModelSamplingDiscrete",
                   "inputs": {"model": ["1", 0], "sampling": sampler.comfy_model_sampling, "zsnr": False}}
        model = ["2", 0]
    wf["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}}
    wf["4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}}
    wf["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}
    wf["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": sampler.steps, "cfg": float(sampler.comfy_cfg),
        "sampler_name": sampler.comfy_sampler, "scheduler": sampler.comfy_scheduler,
        "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    wf["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
    wf["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": filename_prefix}}
    return wf


def workflow_file(checkpoint: str | Path, sampler: SamplerSettings | None, *, overwrite: bool = False) -> Path:
    """Where the workflow of a fused ``checkpoint`` goes (``<stem>-workflow.json`` beside it), checked
    before anything is written.

    Raises:
        [`UsageError`]: no sampler settings (nothing fused a preset in) to write a workflow for.
        [`OutputExistsError`]: the file exists and ``overwrite`` is not set.
    """
    path = Path(checkpoint)
    target = path.with_name(f"{path.stem}-workflow.json")
    if sampler is None:
        raise UsageError(f"{path}: a ComfyUI workflow needs the sampler settings of a preset, and none is fused in",
                         hint=Hint("preset", "to fuse one", "NAME"))
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputExistsError(f"'{target}' already exists", hint=Hint("overwrite", "to replace it"))
    return target


def write_workflow(target: str | Path, checkpoint_name: str, sampler: SamplerSettings, *,
                   prompt: str = DEFAULT_WORKFLOW_PROMPT, width: int = 1024, height: int = 1024) -> Path:
    """Write :func:`comfy_workflow` of ``checkpoint_name`` as JSON to ``target`` (whole or not at all)."""
    from lora_tools.io import atomic

    out = Path(target)
    wf = comfy_workflow(checkpoint_name, sampler, prompt=prompt, width=width, height=height,
                        filename_prefix=Path(checkpoint_name).stem)
    atomic.write_text(out, json.dumps(wf, indent=2) + "\n")
    return out
