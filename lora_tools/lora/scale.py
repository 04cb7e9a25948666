"""The scale of a LoRA module, ``alpha / rank``: torch-free, so header-only reports use the fuse's rule."""

from __future__ import annotations

from lora_tools.errors import ShapeMismatchError

__all__ = ["module_scale"]


def module_scale(alpha: float | None, rank: int) -> float:
    """Return the scale `alpha / rank` of an adapter module (kohya convention).

    Args:
        alpha (`float` or `None`):
            The module's `alpha` value. `None` (no alpha key) or `0` mean alpha = rank, i.e. a
            scale of 1, as in kohya sd-scripts, ComfyUI and diffusers.
        rank (`int`):
            The module's rank, e.g. `lora_down.shape[0]`.

    Returns:
        `float`: `alpha / rank`, or `1.0` when alpha is `None` or 0.

    Raises:
        [`ShapeMismatchError`]: `rank` is not positive while an alpha is given.
    """
    if alpha is None:
        return 1.0
    alpha = float(alpha)
    if alpha == 0.0:
        return 1.0
    if rank <= 0:
        raise ShapeMismatchError(
            f"Cannot scale by alpha / rank: rank must be positive, got {rank} (alpha {alpha}). "
            "The module's down factor has an empty rank dimension."
        )
    return alpha / rank
