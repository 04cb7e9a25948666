"""The ``__metadata__`` of every file lora_tools writes: built by one function (and, for LoRAs, what model
they are for: :func:`lora_base_metadata`).

It holds the base's own metadata (for a single-file checkpoint) or just ``format: pt``, the SAI
model-spec keys (``modelspec.*``, as kohya's sd-scripts and ComfyUI write them), and the
``loratool`` record (:func:`lora_tools.provenance.with_record`; read back with
:func:`lora_tools.provenance.read_record`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lora_tools.provenance import utc_now, with_record

SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"
SDXL_LORA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"

#: What a LoRA for each model says it is for, in the keys the loaders and sites read: kohya sd-scripts'
#: ``ss_base_model_version`` (A1111/Forge show a LoRA with an SDXL checkpoint only when it starts with ``sdxl_``;
#: any other metadata means SD1, ``ss_v2: True`` SD2) and the SAI model spec's ``modelspec.architecture`` with
#: its implementation and resolution (kohya's ``sai_model_spec.py`` values; ComfyUI's model managers and Civitai
#: read these). SD2 has no architecture here: 512 (eps) and 768-v cannot be told apart from a LoRA.
LORA_BASES: dict[str, dict[str, str]] = {
    "sdxl": {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
             "modelspec.architecture": SDXL_LORA_ARCHITECTURE, "modelspec.implementation": SGM_IMPLEMENTATION,
             "modelspec.resolution": "1024x1024"},
    "sd1": {"ss_base_model_version": "sd_v1", "ss_v2": "False",
            "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation": "diffusers",
            "modelspec.resolution": "512x512"},
    "sd2": {"ss_base_model_version": "sd_v2", "ss_v2": "True"},
}


def lora_base_metadata(metadata: Mapping[str, str], base: str | None, *, title: str) -> dict[str, str]:
    """``metadata`` with the keys saying which model the LoRA is for (:data:`LORA_BASES`) where it lacks them.

    Keys the LoRA already has are kept (an SDXL LoRA trained on ``sdxl_base_v0-9`` stays so); ``base`` ``None``
    (not known) adds nothing. With a model-spec architecture come ``modelspec.sai_model_spec`` and
    ``modelspec.title`` (the spec's required keys).
    """
    out = dict(metadata)
    if base is None:
        return out
    for key, value in LORA_BASES[base].items():
        out.setdefault(key, value)
    if "modelspec.architecture" in out:
        out.setdefault("modelspec.sai_model_spec", "1.0.0")
        out.setdefault("modelspec.title", title)
    return out


def output_metadata(record: Mapping[str, Any], *, title: str, merged_from: Sequence[str] = (),
                    base_metadata: Mapping[str, str] | None = None, keep_base: bool = False,
                    architecture: str = SDXL_ARCHITECTURE, resolution: str = "1024x1024",
                    usage_hint: str | None = None, prediction_type: str | None = None,
                    date: str | None = None) -> dict[str, str]:
    """The ``__metadata__`` of one output file.

    Args:
        record: the ``loratool`` record (:func:`lora_tools.provenance.build_record`).
        title: ``modelspec.title``.
        merged_from: names of the inputs (``modelspec.merged_from``, comma-separated).
        base_metadata: the base file's own metadata.
        keep_base: start from ``base_metadata`` (single-file checkpoints) instead of ``format: pt``.
        architecture: ``modelspec.architecture`` (``.../lora`` for LoRA files).
        resolution: ``modelspec.resolution``.
        usage_hint: how to sample the result (``modelspec.usage_hint``), if it needs something.
        prediction_type: ``modelspec.prediction_type`` (``epsilon``, ``sample``...), if known.
        date: ``modelspec.date`` (``YYYY-MM-DD``); the record's ``created`` day by default.

    Returns:
        String keys and values, ready for :class:`~lora_tools.io.safetensors.StreamingWriter`.
    """
    meta: dict[str, str] = dict(base_metadata or {}) if keep_base else {"format": "pt"}
    meta.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": SGM_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": date or str(record.get("created") or utc_now())[:10],
    })
    if merged_from:
        meta["modelspec.merged_from"] = ", ".join(merged_from)
    if usage_hint is not None:
        meta["modelspec.usage_hint"] = usage_hint
    if prediction_type is not None:
        meta["modelspec.prediction_type"] = prediction_type
    return with_record(meta, record)
