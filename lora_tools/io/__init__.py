"""Bytes on disk, and no policy: the safetensors reader and streaming writer (:mod:`.safetensors`), the
O_DIRECT output file (:mod:`.direct`), atomic temp-and-rename steps and free-space reservation
(:mod:`.atomic`), hashing (:mod:`.hashing`), tensor sources (:mod:`.sources`), a base model in any
layout (:mod:`.model`), diffusers folders (:mod:`.diffusers_folder`) and objects on S3-compatible storage
(``s3://`` URLs, read by ranges and written by multipart upload: :mod:`.remote`).

What to write, where, and whether it may replace something is decided above, in :mod:`lora_tools.output`.
"""
