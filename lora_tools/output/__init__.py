"""The one output path of every command that writes model or LoRA files.

plan (:mod:`.plan`: names, inputs never outputs, overwrite, path kinds, space) -> sinks
(:mod:`.sinks`: checkpoint, component, diffusers folder, LoRA file) -> :class:`WrittenFile` list,
through atomic writes (:mod:`lora_tools.io.atomic`), with metadata built by :func:`.metadata.output_metadata`.
"""

from lora_tools.output.metadata import output_metadata
from lora_tools.output.plan import WrittenFile, check_output, default_stem, refuse_input_as_output

__all__ = ["WrittenFile", "check_output", "default_stem", "output_metadata", "refuse_input_as_output",
           "write_safetensors"]


def __getattr__(name: str) -> object:  # the sinks import torch-free modules only, but lazily all the same
    if name == "write_safetensors":
        from lora_tools.output.sinks import write_safetensors

        return write_safetensors
    raise AttributeError(name)
