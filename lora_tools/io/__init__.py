"""Bytes on disk, and no policy: the safetensors reader and streaming writer (:mod:`.safetensors`), the
O_DIRECT output file (:mod:`.direct`), atomic temp-and-rename steps and free-space reservation
(:mod:`.atomic`), hashing (:mod:`.hashing`), tensor sources (:mod:`.sources`), a base model in any
layout (:mod:`.model`) and diffusers folders (:mod:`.diffusers_folder`).

What to write, where, and whether it may replace something is decided above, in :mod:`lora_tools.output`.
"""
