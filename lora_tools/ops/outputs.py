"""Compatibility shim: the sinks live in :mod:`lora_tools.output.sinks`."""

from lora_tools.output.plan import WrittenFile
from lora_tools.output.sinks import (CheckpointSink, ComponentSink, DiffusersFolderSink, DtypeFor, LoraFileSink,
                                     Payload, Sink, finalize_all, tokenizer_provider, write_safetensors)

__all__ = ["CheckpointSink", "ComponentSink", "DiffusersFolderSink", "DtypeFor", "LoraFileSink", "Payload", "Sink",
           "WrittenFile", "finalize_all", "tokenizer_provider", "write_safetensors"]
