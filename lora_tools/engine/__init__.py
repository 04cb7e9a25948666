"""The streaming engine: read a model once (or two side by side), patch tensors in fp32 row
blocks from per-key contributions, write to any set of sinks. It knows nothing of fuse.

- :mod:`~lora_tools.engine.contributions`: what a tensor receives (:class:`LowRank`, :class:`DenseDifference`).
- :mod:`~lora_tools.engine.patch`: one tensor, patched in row blocks; the overflow-scan rule.
- :mod:`~lora_tools.engine.stream`: :func:`stream` and :func:`stream_pairs`.
- :mod:`~lora_tools.engine.pipeline`: read / compute / write overlapped, bytes in flight bounded.
- :mod:`~lora_tools.engine.buffers`: the page-aligned read ring.
- :mod:`~lora_tools.engine.torch_loading`: torch loaded on a thread while untouched tensors stream.
"""

from lora_tools.engine.contributions import BlockOp, Contribution, DenseDifference, LowRank
from lora_tools.engine.patch import block_ops, needs_check, patch_tensor
from lora_tools.engine.stream import Sink, StageHook, StreamStats, stream, stream_order, stream_pairs

__all__ = ["BlockOp", "Contribution", "DenseDifference", "LowRank", "Sink", "StageHook", "StreamStats",
           "block_ops", "needs_check", "patch_tensor", "stream", "stream_order", "stream_pairs"]
