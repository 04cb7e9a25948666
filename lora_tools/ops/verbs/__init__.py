"""One module per verb: its options model, inputs, outputs, ``plan`` and ``run`` (see :mod:`lora_tools.ops.registry`).

These modules import only pydantic at import time (the CLI builds its options from them); the
maths each one runs is imported inside ``plan``/``run``.
"""
