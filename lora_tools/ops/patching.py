"""Moved to :mod:`lora_tools.engine.patch`; what remains here speaks in fuse plans."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_tools.engine import patch as _patch
from lora_tools.engine.patch import BLOCK_ELEMS, block_ops, patch_tensor

if TYPE_CHECKING:
    import torch

    from lora_tools.models import TensorRef
    from lora_tools.ops.fuse_plan import FusePlan


def needs_check(plan: "FusePlan", ref: "TensorRef", base_dtype: "torch.dtype", out_dtype: "torch.dtype") -> bool:
    """Whether fusing ``plan`` must scan ``ref``'s result (:func:`lora_tools.engine.needs_check`)."""
    from lora_tools.ops.fuse import fuse_patches

    return _patch.needs_check(fuse_patches(plan).get(ref.key, []), base_dtype, out_dtype)


__all__ = ["BLOCK_ELEMS", "block_ops", "needs_check", "patch_tensor"]
